"""Input chunks and the worker that turns one chunk into a token stream on disk.

A chunk is a byte range of one uncompressed input file (it owns the lines that START inside
the range) or a whole compressed / plain-text file. Chunks depend only on the inputs and
--chunk-mb, never on --workers, which is what makes the output independent of the worker count.
"""
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .indexed_format import TOKEN_DTYPE
from .input_files import compression_of, logical_name, open_decompressed, source_stem
from .line_parsers import LineRejected, parse_amber_line, parse_text_jsonl_line

KIND_AMBER = "amber"
KIND_TEXT_JSONL = "text-jsonl"
KIND_TEXT_PLAIN = "text-plain"
_TEXT_BATCH_CHARS = 1 << 20  # documents per encode() call: big enough to amortise call overhead


@dataclass(frozen=True)
class Chunk:
    index: int
    file_index: int
    path: str
    kind: str
    compression: str | None
    start: int
    end: int  # exclusive; -1 means "to the end of the (decompressed) file"


@dataclass
class ChunkJob:
    chunk: Chunk
    part_path: str
    vocab_size: int
    skip_bad: bool
    tokenizer_path: str | None = None
    eos_id: int | None = None


@dataclass
class ChunkResult:
    index: int
    part_path: str
    num_tokens: int = 0
    segments: list[tuple[str, int]] = field(default_factory=list)  # (source, tokens), run-length
    lines: int = 0
    documents: int = 0
    empty_documents: int = 0
    blank_lines: int = 0
    bad: list[tuple[int, str, str]] = field(default_factory=list)  # (line in chunk, reason, detail)
    fatal: tuple[int, str, str] | None = None
    input_bytes: int = 0


def plan_chunks(*, files: list[Path], kind: str, chunk_bytes: int) -> list[Chunk]:
    """Split every file into chunks. `kind` is 'amber' or 'text' (per-file: *.txt is plain text)."""
    chunks: list[Chunk] = []
    for file_index, path in enumerate(files):
        compression = compression_of(path)
        file_kind = kind
        if kind == "text":
            is_plain = Path(logical_name(path)).suffix.lower() in (".txt", ".text")
            file_kind = KIND_TEXT_PLAIN if is_plain else KIND_TEXT_JSONL
        size = path.stat().st_size
        # Compressed streams cannot be entered in the middle; plain-text documents span lines.
        if compression or file_kind == KIND_TEXT_PLAIN or size <= chunk_bytes:
            ranges = [(0, -1)]
        else:
            ranges = [(s, min(s + chunk_bytes, size)) for s in range(0, size, chunk_bytes)]
        for start, end in ranges:
            chunks.append(Chunk(index=len(chunks), file_index=file_index, path=str(path),
                                kind=file_kind, compression=compression, start=start, end=end))
    return chunks


def _iter_lines(stream: BinaryIO, *, start: int, end: int) -> Iterator[bytes]:
    """Lines whose first byte lies in [start, end) (all lines when end == -1)."""
    position = start
    if start > 0:
        stream.seek(start - 1)
        # Skip the rest of the line that contains byte start-1: it belongs to the previous chunk.
        # If byte start-1 is a newline, this reads just that newline and we stand at `start`.
        position = start - 1 + len(stream.readline())
    while end < 0 or position < end:
        line = stream.readline()
        if not line:
            return
        position += len(line)
        yield line


class _PartWriter:
    """Buffers token arrays and appends them to the part file in large writes."""

    def __init__(self, path: str) -> None:
        self._stream = open(path, "wb")
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self.num_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self._pending.append(tokens)
        self._pending_tokens += len(tokens)
        self.num_tokens += len(tokens)
        if self._pending_tokens >= 1 << 22:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._stream.write(np.concatenate(self._pending).astype(TOKEN_DTYPE, copy=False).tobytes())
            self._pending.clear()
            self._pending_tokens = 0

    def close(self) -> None:
        self.flush()
        self._stream.close()


def _add_segment(segments: list[tuple[str, int]], source: str, tokens: int) -> None:
    if segments and segments[-1][0] == source:
        segments[-1] = (source, segments[-1][1] + tokens)
    else:
        segments.append((source, tokens))


def _reject(result: ChunkResult, job: ChunkJob, line_in_chunk: int, err: LineRejected) -> bool:
    """Record a bad line; returns True when processing must stop (no --skip-bad)."""
    if job.skip_bad:
        result.bad.append((line_in_chunk, err.reason, err.detail))
        return False
    result.fatal = (line_in_chunk, err.reason, err.detail)
    return True


def _process_amber(job: ChunkJob, lines: Iterator[bytes], out: _PartWriter, result: ChunkResult) -> None:
    for line_no, raw in enumerate(lines):
        result.lines += 1
        if not raw.strip():
            result.blank_lines += 1
            continue
        try:
            tokens, source = parse_amber_line(raw, vocab_size=job.vocab_size)
        except LineRejected as err:
            if _reject(result, job, line_no, err):
                return
            continue
        out.add(tokens)
        result.documents += 1
        _add_segment(result.segments, source, len(tokens))


class _TextEncoder:
    """Collects documents and encodes them in batches; every document gets EOS, no BOS (Amber rule)."""

    def __init__(self, job: ChunkJob, out: _PartWriter, result: ChunkResult) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=job.tokenizer_path)
        self._eos = job.eos_id
        self._out, self._result = out, result
        self._texts: list[str] = []
        self._sources: list[str] = []
        self._chars = 0

    def add(self, text: str, source: str) -> None:
        if not text:
            self._result.empty_documents += 1
            return
        self._texts.append(text)
        self._sources.append(source)
        self._chars += len(text)
        if self._chars >= _TEXT_BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        if not self._texts:
            return
        # One thread per worker: parallelism comes from --workers, not from hidden threads.
        encoded = self._sp.encode(self._texts, out_type=int, add_bos=False, add_eos=False, num_threads=1)
        flat: list[int] = []
        for ids, source in zip(encoded, self._sources):
            flat.extend(ids)
            flat.append(self._eos)
            _add_segment(self._result.segments, source, len(ids) + 1)
        self._out.add(np.array(flat, dtype=TOKEN_DTYPE))
        self._result.documents += len(self._texts)
        self._texts, self._sources, self._chars = [], [], 0


def _process_text_jsonl(job: ChunkJob, lines: Iterator[bytes], encoder: _TextEncoder,
                        result: ChunkResult) -> None:
    default_source = source_stem(Path(job.chunk.path))
    for line_no, raw in enumerate(lines):
        result.lines += 1
        if not raw.strip():
            result.blank_lines += 1
            continue
        try:
            text, source = parse_text_jsonl_line(raw, default_source=default_source)
        except LineRejected as err:
            if _reject(result, job, line_no, err):
                return
            continue
        encoder.add(text, source)


def _process_text_plain(job: ChunkJob, lines: Iterator[bytes], encoder: _TextEncoder,
                        result: ChunkResult) -> None:
    """Documents are maximal runs of non-blank lines, joined by '\\n' (the final newline dropped)."""
    source = source_stem(Path(job.chunk.path))
    paragraph: list[str] = []
    for line_no, raw in enumerate(lines):
        result.lines += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if _reject(result, job, line_no, LineRejected("bad_utf8", f"undecodable UTF-8 at byte {err.start}")):
                return
            continue
        if text.strip():
            paragraph.append(text.rstrip("\r\n"))
        else:
            result.blank_lines += 1
            if paragraph:
                encoder.add("\n".join(paragraph), source)
                paragraph = []
    if paragraph:
        encoder.add("\n".join(paragraph), source)


def process_chunk(job: ChunkJob) -> ChunkResult:
    """Parse/tokenize one chunk into job.part_path (raw uint16 tokens). Runs in a worker process."""
    chunk = job.chunk
    result = ChunkResult(index=chunk.index, part_path=job.part_path)
    out = _PartWriter(job.part_path)
    try:
        with open_decompressed(Path(chunk.path), compression=chunk.compression) as stream:
            lines = _iter_lines(stream, start=chunk.start, end=chunk.end)
            if chunk.kind == KIND_AMBER:
                _process_amber(job, lines, out, result)
            else:
                encoder = _TextEncoder(job, out, result)
                if chunk.kind == KIND_TEXT_JSONL:
                    _process_text_jsonl(job, lines, encoder, result)
                else:
                    _process_text_plain(job, lines, encoder, result)
                encoder.flush()
    finally:
        out.close()
    result.num_tokens = out.num_tokens
    size = os.path.getsize(chunk.path)
    result.input_bytes = (size if chunk.end < 0 else chunk.end) - chunk.start
    return result
