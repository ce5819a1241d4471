"""Amber jsonl / raw text -> fixed-length uint16 shards + manifest.json. See docs/data.md."""
import datetime
import multiprocessing
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megamobi.files import read_json, sha256_file, write_json_atomic
from megamobi.version import code_version

from .chunk_worker import Chunk, ChunkJob, ChunkResult, plan_chunks, process_chunk
from .errors import BadInputError, DataConfigError
from .indexed_format import MAX_VOCAB_UINT16, SEQ_LEN, TOKEN_DTYPE
from .input_files import expand_inputs
from .manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, PROGRESS_NAME, shard_paths
from .shard_check import shard_problems
from .shard_writer import ShardWriter

MAX_LISTED_BAD_LINES = 10_000  # all bad lines are counted; this many are listed by file/line
WORK_DIR_NAME = ".work"


@dataclass
class PreprocessOptions:
    inputs: list[str]
    output: str
    input_format: str = "amber"  # "amber" or "text"
    tokenizer: str | None = None
    vocab_size: int | None = None
    samples_per_shard: int = 262_144
    workers: int = 1
    skip_bad: bool = False
    chunk_mb: float = 256.0
    overwrite: bool = False
    verify_existing: bool = False
    progress: bool = True
    command: list[str] = field(default_factory=list)


@dataclass
class _TokenizerInfo:
    path: str | None
    sha256: str | None
    vocab_size: int
    eos_id: int | None


def _tokenizer_info(opts: PreprocessOptions) -> _TokenizerInfo:
    if opts.input_format not in ("amber", "text"):
        raise DataConfigError(f"--format must be 'amber' or 'text', got {opts.input_format!r}")
    if opts.tokenizer is None:
        if opts.input_format == "text":
            raise DataConfigError("--format text needs --tokenizer MODEL (a SentencePiece .model file)")
        vocab = opts.vocab_size or 32000
        info = _TokenizerInfo(path=None, sha256=None, vocab_size=vocab, eos_id=None)
    else:
        import sentencepiece

        path = Path(opts.tokenizer)
        if not path.is_file():
            raise DataConfigError(f"--tokenizer {path}: no such file")
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        vocab = sp.vocab_size()
        if opts.vocab_size is not None and opts.vocab_size != vocab:
            raise DataConfigError(f"--vocab-size {opts.vocab_size} contradicts the tokenizer's {vocab}")
        eos = sp.eos_id()
        if opts.input_format == "text" and eos < 0:
            raise DataConfigError(f"{path}: tokenizer has no EOS id; documents need one (Amber rule)")
        info = _TokenizerInfo(path=str(path.resolve()), sha256=sha256_file(path), vocab_size=vocab,
                              eos_id=eos)
    if not 0 < info.vocab_size <= MAX_VOCAB_UINT16:
        raise DataConfigError(
            f"vocab size {info.vocab_size} does not fit uint16 shards (at most {MAX_VOCAB_UINT16}); "
            "megamobi shards store uint16 tokens, use a tokenizer with a smaller vocabulary")
    return info


class _Job:
    """One run: planning, resume state, the ordered consumer of worker results."""

    def __init__(self, opts: PreprocessOptions) -> None:
        if opts.samples_per_shard < 1:
            raise DataConfigError(f"--samples-per-shard must be >= 1, got {opts.samples_per_shard}")
        if opts.workers < 1:
            raise DataConfigError(f"--workers must be >= 1, got {opts.workers}")
        self.opts = opts
        self.out = Path(opts.output)
        self.tok = _tokenizer_info(opts)
        self.files = expand_inputs(opts.inputs)
        self.chunks = plan_chunks(files=self.files, kind=opts.input_format,
                                  chunk_bytes=max(1, int(opts.chunk_mb * (1 << 20))))
        self.fingerprint = {
            "input_format": opts.input_format,
            "inputs": [{"path": str(p), "bytes": p.stat().st_size} for p in self.files],
            "chunk_bytes": max(1, int(opts.chunk_mb * (1 << 20))),
            "samples_per_shard": opts.samples_per_shard,
            "vocab_size": self.tok.vocab_size,
            "tokenizer_sha256": self.tok.sha256,
            "eos_id": self.tok.eos_id,
            "skip_bad": opts.skip_bad,
            "seq_length": SEQ_LEN,
        }
        # Resume state, persisted to .progress.json after every shard.
        self.sources: list[str] = []
        self.shards: list[dict] = []
        self.chunk_stats: list[dict] = []  # prefix of chunks fully consumed, in order
        self.bad_lines: list[list] = []  # [chunk, file, line, reason, detail], capped
        self.start: tuple[int, int] = (0, 0)

    # ---------------------------------------------------------------- resume state
    def _progress_state(self, *, complete: bool) -> dict:
        return {"fingerprint": self.fingerprint, "sources": self.sources, "shards": self.shards,
                "chunk_stats": self.chunk_stats, "bad_lines": self.bad_lines, "complete": complete}

    def _save_progress(self, *, complete: bool = False) -> None:
        write_json_atomic(self.out / PROGRESS_NAME, self._progress_state(complete=complete))

    def _remove_all_outputs(self) -> None:
        for path in list(self.out.glob("shard_*")) + [self.out / MANIFEST_NAME, self.out / PROGRESS_NAME]:
            path.unlink(missing_ok=True)

    def prepare_output(self) -> bool:
        """Set up resume state; returns False when the output is already complete and valid."""
        self.out.mkdir(parents=True, exist_ok=True)
        for leftover in self.out.glob("*.tmp"):  # from an interrupted run; never valid
            leftover.unlink()
        shutil.rmtree(self.out / WORK_DIR_NAME, ignore_errors=True)
        if self.opts.overwrite:
            self._remove_all_outputs()
        progress_path = self.out / PROGRESS_NAME
        if not progress_path.exists():
            if any(self.out.glob("shard_*")) or (self.out / MANIFEST_NAME).exists():
                raise DataConfigError(
                    f"{self.out}: contains shards but no resume state ({PROGRESS_NAME}); "
                    "use another --output or pass --overwrite to rebuild it")
            return True
        state = read_json(progress_path)
        if state.get("fingerprint") != self.fingerprint:
            raise DataConfigError(
                f"{self.out}: was built from different inputs or settings (files, sizes, tokenizer, "
                "--samples-per-shard, --chunk-mb or --skip-bad changed); use another --output "
                "or pass --overwrite to rebuild it")
        valid = 0
        for record in state["shards"]:
            if shard_problems(self.out, record, checksums=self.opts.verify_existing):
                break
            valid += 1
        if state.get("complete") and valid == len(state["shards"]) and (self.out / MANIFEST_NAME).exists():
            return False
        self.sources = state["sources"]
        self.shards = state["shards"][:valid]
        self.start = tuple(self.shards[-1]["end"]) if self.shards else (0, 0)
        self.chunk_stats = state["chunk_stats"][: self.start[0]]
        self.bad_lines = [b for b in state["bad_lines"] if b[0] < self.start[0]]
        # Shards after the first invalid one are rebuilt (identically) from its start position.
        for record in state["shards"][valid:]:
            for path in shard_paths(self.out, record["name"]).values():
                path.unlink(missing_ok=True)
        (self.out / MANIFEST_NAME).unlink(missing_ok=True)
        return True

    # ---------------------------------------------------------------- workers
    def _jobs(self, work_dir: Path) -> Iterator[ChunkJob]:
        for chunk in self.chunks[self.start[0]:]:
            yield ChunkJob(chunk=chunk, part_path=str(work_dir / f"part_{chunk.index:07d}.u16"),
                           vocab_size=self.tok.vocab_size, skip_bad=self.opts.skip_bad,
                           tokenizer_path=self.tok.path, eos_id=self.tok.eos_id)

    def _results(self, work_dir: Path) -> Iterator[ChunkResult]:
        """Results strictly in chunk order, at most 2 chunks per worker in flight (bounds disk use)."""
        jobs = self._jobs(work_dir)
        if self.opts.workers == 1:
            yield from map(process_chunk, jobs)
            return
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(self.opts.workers) as pool:
            pending: deque = deque()
            for job in jobs:
                pending.append(pool.apply_async(process_chunk, (job,)))
                if len(pending) >= 2 * self.opts.workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()

    # ---------------------------------------------------------------- consumer
    def _line_base(self, chunk: Chunk) -> int:
        """Lines in earlier chunks of the same file: turns chunk-relative lines into file lines.
        Chunks are consumed in order, so a running count per file is exact."""
        return self._file_lines.get(chunk.file_index, 0)

    def _source_id(self, name: str) -> int:
        try:
            return self.sources.index(name)
        except ValueError:
            if len(self.sources) >= np.iinfo(np.uint16).max:
                raise DataConfigError("more than 65535 distinct source names; source ids are uint16") from None
            self.sources.append(name)
            return len(self.sources) - 1

    def run(self) -> dict:
        work_dir = self.out / WORK_DIR_NAME
        work_dir.mkdir()
        self._file_lines: dict[int, int] = {}
        for chunk, stats in zip(self.chunks, self.chunk_stats):
            self._file_lines[chunk.file_index] = self._file_lines.get(chunk.file_index, 0) + stats["lines"]
        writer = ShardWriter(directory=self.out, samples_per_shard=self.opts.samples_per_shard,
                             first_index=len(self.shards), source_names=self.sources,
                             on_shard_done=self._shard_done)
        bar = _progress_bar(self.opts, total=sum(p.stat().st_size for p in self.files))
        bar.update(sum(s["bytes"] for s in self.chunk_stats))
        carry = np.zeros(0, dtype=TOKEN_DTYPE)
        carry_source, carry_start = 0, self.start
        tokens_done, started = 0, time.monotonic()
        try:
            for result in self._results(work_dir):
                chunk = self.chunks[result.index]
                line_base = self._line_base(chunk)
                if result.fatal is not None:
                    line, reason, detail = result.fatal
                    raise BadInputError(path=chunk.path, line=line_base + line + 1, reason=reason,
                                        detail=detail)
                stream = np.fromfile(result.part_path, dtype=TOKEN_DTYPE)
                os.unlink(result.part_path)
                skip = self.start[1] if result.index == self.start[0] else 0
                carry, carry_source, carry_start = self._consume(
                    writer, result, stream, skip=skip, carry=carry, carry_source=carry_source,
                    carry_start=carry_start)
                self._record_chunk(result, chunk, line_base)
                tokens_done += len(stream) - skip
                bar.update(result.input_bytes)
                bar.set_postfix_str(f"{tokens_done / max(time.monotonic() - started, 1e-9):,.0f} tok/s")
            end = (len(self.chunks), 0)
            writer.finish(end=end)
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
            shutil.rmtree(work_dir, ignore_errors=True)
        manifest = self._manifest(dropped_tail_tokens=len(carry))
        self._save_progress(complete=True)
        write_json_atomic(self.out / MANIFEST_NAME, manifest)  # last: its presence means "done"
        return manifest

    def _consume(self, writer: ShardWriter, result: ChunkResult, stream: np.ndarray, *, skip: int,
                 carry: np.ndarray, carry_source: int, carry_start: tuple[int, int]):
        """Append a chunk's token stream to the global stream and emit every full SEQ_LEN window.
        A window's source is the source of its first token."""
        seg_ids = np.array([self._source_id(s) for s, _ in result.segments], dtype=np.int64)
        seg_ends = np.cumsum([n for _, n in result.segments], dtype=np.int64)

        def source_at(positions: np.ndarray) -> np.ndarray:
            return seg_ids[np.searchsorted(seg_ends, positions, side="right")]

        index, pos = result.index, skip
        if len(carry):
            need = SEQ_LEN - len(carry)
            if len(stream) - pos < need:
                return np.concatenate([carry, stream[pos:]]), carry_source, carry_start
            sample = np.concatenate([carry, stream[pos:pos + need]])[None, :]
            writer.add(sample, np.array([carry_source]), chunk=carry_start[0], offset=carry_start[1],
                       end=(index, pos + need))
            pos += need
        full = (len(stream) - pos) // SEQ_LEN
        if full:
            starts = pos + SEQ_LEN * np.arange(full, dtype=np.int64)
            writer.add(stream[pos:pos + full * SEQ_LEN].reshape(full, SEQ_LEN), source_at(starts),
                       chunk=index, offset=pos, end=(index, pos + full * SEQ_LEN))
            pos += full * SEQ_LEN
        if pos < len(stream):
            return stream[pos:].copy(), int(source_at(np.array([pos]))[0]), (index, pos)
        return np.zeros(0, dtype=TOKEN_DTYPE), 0, (index + 1, 0)

    def _record_chunk(self, result: ChunkResult, chunk: Chunk, line_base: int) -> None:
        bad_counts: dict[str, int] = {}
        for line, reason, detail in result.bad:
            bad_counts[reason] = bad_counts.get(reason, 0) + 1
            if len(self.bad_lines) < MAX_LISTED_BAD_LINES:
                self.bad_lines.append([chunk.index, chunk.path, line_base + line + 1, reason, detail])
        self._file_lines[chunk.file_index] = line_base + result.lines
        self.chunk_stats.append({"lines": result.lines, "documents": result.documents,
                                 "empty_documents": result.empty_documents,
                                 "blank_lines": result.blank_lines, "bytes": result.input_bytes,
                                 "tokens": result.num_tokens, "bad": bad_counts})

    def _shard_done(self, record: dict) -> None:
        self.shards.append(record)
        self._save_progress()

    def _manifest(self, *, dropped_tail_tokens: int) -> dict:
        totals = {key: sum(s[key] for s in self.chunk_stats)
                  for key in ("lines", "documents", "empty_documents", "blank_lines")}
        input_tokens = sum(s["tokens"] for s in self.chunk_stats)
        bad_by_reason: dict[str, int] = {}
        for stats in self.chunk_stats:
            for reason, count in stats["bad"].items():
                bad_by_reason[reason] = bad_by_reason.get(reason, 0) + count
        source_tokens = {name: 0 for name in self.sources}
        for record in self.shards:
            for name, count in record["source_tokens"].items():
                source_tokens[name] += count
        num_samples = sum(r["num_samples"] for r in self.shards)
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "seq_length": SEQ_LEN,
            "dtype": "uint16",
            "dtype_code": 8,
            "samples_per_shard": self.opts.samples_per_shard,
            "num_samples": num_samples,
            "num_tokens": num_samples * SEQ_LEN,
            "sources": self.sources,
            "source_tokens": source_tokens,
            "shards": [{k: v for k, v in r.items() if k not in ("start", "end")} for r in self.shards],
            "tokenizer": asdict(self.tok),
            "vocab_size": self.tok.vocab_size,
            "max_token_id": max((_shard_max_token_id(self.out, r) for r in self.shards), default=-1),
            "input_format": self.opts.input_format,
            "inputs": self.fingerprint["inputs"],
            "stats": {**totals, "input_tokens": input_tokens,
                      "dropped_tail_tokens": dropped_tail_tokens,
                      "bad_lines_by_reason": bad_by_reason,
                      "bad_lines_total": sum(bad_by_reason.values())},
            "bad_lines": [{"file": f, "line": line, "reason": r, "detail": d}
                          for _, f, line, r, d in self.bad_lines],
            "bad_lines_truncated": sum(bad_by_reason.values()) > len(self.bad_lines),
            "command": self.opts.command,
            "code_version": code_version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }


def _shard_max_token_id(directory: Path, record: dict) -> int:
    """Recorded by the shard writer; shards finished by an older version are read once."""
    if "max_token_id" in record:
        return record["max_token_id"]
    tokens = np.fromfile(directory / record["files"]["bin"]["file"], dtype=TOKEN_DTYPE)
    return int(tokens.max()) if len(tokens) else -1


def _progress_bar(opts: PreprocessOptions, *, total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, smoothing=0.05,
                desc="preprocess", disable=not opts.progress, dynamic_ncols=True)


def preprocess(opts: PreprocessOptions) -> dict:
    """Build (or finish building) a shard directory; returns its manifest."""
    job = _Job(opts)
    if not job.prepare_output():
        return read_json(job.out / MANIFEST_NAME)
    return job.run()
