"""Input chunks and the worker that turns one chunk into whole shards.

A chunk is a byte range of one uncompressed input file (it owns the lines that START inside
the range) or a whole compressed / plain-text file. Chunks depend only on the inputs and
--chunk-mb, never on --workers, which is what makes the output independent of the worker count.
A worker cuts its chunk's token stream into SEQ_LEN windows and writes them as the chunk's own
shards (hashed as written); only the chunk's last < SEQ_LEN tokens (its tail) go back to the main
process, which joins the tails of all chunks into the last shards.
"""
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .indexed_format import SEQ_LEN, TOKEN_DTYPE
from .input_files import compression_of, logical_name, open_decompressed, source_stem
from .line_parsers import AmberLineParser, LineRejected, parse_text_jsonl_line
from .shard_writer import WindowWriter, WrittenShard, chunk_shard_name

KIND_AMBER = "amber"
KIND_TEXT_JSONL = "text-jsonl"
KIND_TEXT_PLAIN = "text-plain"
_TEXT_BATCH_CHARS = 1 << 20  # documents per encode() call: big enough to amortise call overhead
MAX_LISTED_BAD_LINES = 10_000  # all bad lines are counted; this many are listed by file/line


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
    directory: str  # the output directory: the chunk's shards are written there as *.tmp
    samples_per_shard: int
    vocab_size: int
    skip_bad: bool
    tokenizer_path: str | None = None
    eos_id: int | None = None


@dataclass
class ChunkResult:
    index: int
    num_tokens: int = 0
    shards: list[WrittenShard] = field(default_factory=list)
    source_names: list[str] = field(default_factory=list)  # the shards' local source ids -> names
    tail: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=TOKEN_DTYPE))
    tail_segments: list[tuple[str, int]] = field(default_factory=list)  # (source, tokens), run-length
    lines: int = 0
    documents: int = 0
    empty_documents: int = 0
    blank_lines: int = 0
    bad: list[tuple[int, str, str]] = field(default_factory=list)  # (line in chunk, reason, detail)
    bad_counts: dict[str, int] = field(default_factory=dict)  # every bad line, by reason
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


def _reject(result: ChunkResult, job: ChunkJob, line_in_chunk: int, err: LineRejected) -> bool:
    """Record a bad line; returns True when processing must stop (no --skip-bad)."""
    if job.skip_bad:
        result.bad_counts[err.reason] = result.bad_counts.get(err.reason, 0) + 1
        if len(result.bad) < MAX_LISTED_BAD_LINES:
            result.bad.append((line_in_chunk, err.reason, err.detail))
        return False
    result.fatal = (line_in_chunk, err.reason, err.detail)
    return True


def _process_amber(job: ChunkJob, lines: Iterator[bytes], out: WindowWriter, result: ChunkResult) -> None:
    parse = AmberLineParser(vocab_size=job.vocab_size)
    for line_no, raw in enumerate(lines):
        result.lines += 1
        if raw.isspace():
            result.blank_lines += 1
            continue
        try:
            tokens, source = parse(raw)
        except LineRejected as err:
            if _reject(result, job, line_no, err):
                return
            continue
        out.add(tokens, source)
        result.documents += 1


class _TextEncoder:
    """Collects documents and encodes them in batches; every document gets EOS, no BOS (Amber rule)."""

    def __init__(self, job: ChunkJob, out: WindowWriter, result: ChunkResult) -> None:
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
        for ids, source in zip(encoded, self._sources):
            ids.append(self._eos)
            self._out.add(np.array(ids, dtype=TOKEN_DTYPE), source)
        self._result.documents += len(self._texts)
        self._texts, self._sources, self._chars = [], [], 0


def _process_text_jsonl(job: ChunkJob, lines: Iterator[bytes], encoder: _TextEncoder,
                        result: ChunkResult) -> None:
    default_source = source_stem(Path(job.chunk.path))
    for line_no, raw in enumerate(lines):
        result.lines += 1
        if raw.isspace():
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
    """Parse/tokenize one chunk into its own shards (*.tmp, see shard_writer). Runs in a worker."""
    chunk = job.chunk
    result = ChunkResult(index=chunk.index)
    out = WindowWriter(directory=Path(job.directory), samples_per_shard=job.samples_per_shard,
                       name=lambda piece: chunk_shard_name(chunk.index, piece))
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
        if result.fatal is None:
            result.tail, result.tail_segments = out.finish()
    finally:
        out.abort()
    result.shards, result.source_names = out.shards, out.source_names
    result.num_tokens = sum(s.num_samples for s in out.shards) * SEQ_LEN + len(result.tail)
    size = os.path.getsize(chunk.path)
    result.input_bytes = (size if chunk.end < 0 else chunk.end) - chunk.start
    return result
