"""Amber jsonl / raw text -> fixed-length uint16 shards + manifest.json. See docs/data.md."""
import base64
import datetime
import multiprocessing
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megamobi.files import fsync_directory, read_json, sha256_file, write_json_atomic
from megamobi.version import code_version

from .blend_index import CACHE_DIR as BLEND_CACHE_DIR
from .chunk_worker import MAX_LISTED_BAD_LINES, ChunkJob, ChunkResult, plan_chunks, process_chunk
from .errors import BadInputError, DataConfigError
from .indexed_format import MAX_VOCAB_UINT16, SEQ_LEN, TOKEN_DTYPE
from .input_files import expand_inputs
from .manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, PROGRESS_NAME
from .progress_log import LEGACY_PROGRESS_NAME, ProgressLog, legacy_complete, read_progress
from .shard_check import shard_problems
from .shard_writer import WindowWriter, publish_shard

WORK_DIR_NAME = ".work"  # part files of earlier versions; removed when found
SHARD_LAYOUT = "chunk-shards-1"  # each chunk's windows in its own shards, then the joined tails


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
    chunk_mb: float = 1024.0  # work unit and shard unit: ~94k Amber samples, ~7k shards for all of Amber
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
    """One run: planning, resume state, publishing each chunk's shards in chunk order."""

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
            "layout": SHARD_LAYOUT,
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
        # The state the kept records of the progress log describe (rebuilt from it on resume).
        self.records: list[dict] = []  # one per finished chunk, in chunk order
        self.final: dict | None = None  # the joined tails' shards, once written
        self.sources: list[str] = []
        self.listed_bad_lines = 0
        self.file_lines: dict[int, int] = {}  # lines in the finished chunks of each input file

    # ---------------------------------------------------------------- resume state
    def _remove_all_outputs(self) -> None:
        for path in list(self.out.glob("shard_*")) + [self.out / MANIFEST_NAME, self.out / PROGRESS_NAME,
                                                      self.out / LEGACY_PROGRESS_NAME]:
            path.unlink(missing_ok=True)
        shutil.rmtree(self.out / BLEND_CACHE_DIR, ignore_errors=True)  # tables of the shards just removed

    def _record_valid(self, record: dict) -> bool:
        return not any(shard_problems(self.out, shard, checksums=self.opts.verify_existing)
                       for shard in record["shards"])

    def prepare_output(self) -> bool:
        """Set up resume state; returns False when the output is already complete and valid."""
        self.out.mkdir(parents=True, exist_ok=True)
        for leftover in self.out.glob("*.tmp"):  # from an interrupted run; never valid
            leftover.unlink()
        shutil.rmtree(self.out / WORK_DIR_NAME, ignore_errors=True)  # part files of earlier versions
        if self.opts.overwrite:
            self._remove_all_outputs()
        fingerprint, entries = read_progress(self.out)
        if fingerprint is None:
            if legacy_complete(self.out) and (self.out / MANIFEST_NAME).exists():
                return False  # finished by an earlier version: readable as it is
            if any(self.out.glob("shard_*")) or (self.out / MANIFEST_NAME).exists():
                raise DataConfigError(
                    f"{self.out}: contains shards but no resume state ({PROGRESS_NAME}); "
                    "use another --output or pass --overwrite to rebuild it")
            self.log = ProgressLog(self.out, fingerprint=self.fingerprint, records=[])
            return True
        if fingerprint != self.fingerprint:
            raise DataConfigError(
                f"{self.out}: was built from different inputs or settings (files, sizes, tokenizer, "
                "--samples-per-shard, --chunk-mb or --skip-bad changed, or an earlier megamobi "
                "version); use another --output or pass --overwrite to rebuild it")
        for entry in entries:
            if "final" in entry:
                if len(self.records) == len(self.chunks) and self._record_valid(entry):
                    self.final = entry
                break
            if entry.get("chunk") != len(self.records) or not self._record_valid(entry):
                break  # chunks after the first damaged or missing one are rebuilt (identically)
            self._adopt(entry)
        kept = {shard["name"] for r in [*self.records, *([self.final] if self.final else [])] for shard in r["shards"]}
        for path in self.out.glob("shard_*"):
            if path.name.split(".")[0] not in kept:
                path.unlink()
        if self.final is not None and (self.out / MANIFEST_NAME).exists():
            return False
        (self.out / MANIFEST_NAME).unlink(missing_ok=True)
        self.log = ProgressLog(self.out, fingerprint=self.fingerprint,
                               records=self.records + ([self.final] if self.final else []))
        return True

    def _adopt(self, record: dict) -> None:
        """Take a finished chunk's record into the run's state (in chunk order)."""
        chunk = self.chunks[record["chunk"]]
        self.records.append(record)
        self.sources.extend(record["new_sources"])
        self.listed_bad_lines += len(record["bad_lines"])
        self.file_lines[chunk.file_index] = self.file_lines.get(chunk.file_index, 0) + record["stats"]["lines"]

    # ---------------------------------------------------------------- workers
    def _jobs(self) -> Iterator[ChunkJob]:
        for chunk in self.chunks[len(self.records):]:
            yield ChunkJob(chunk=chunk, directory=str(self.out), samples_per_shard=self.opts.samples_per_shard,
                           vocab_size=self.tok.vocab_size, skip_bad=self.opts.skip_bad,
                           tokenizer_path=self.tok.path, eos_id=self.tok.eos_id)

    def _results(self) -> Iterator[ChunkResult]:
        """Results strictly in chunk order, at most 2 chunks per worker in flight (bounds disk use)."""
        jobs = self._jobs()
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

    # ---------------------------------------------------------------- publishing, in chunk order
    def _global_sources(self, names: list[str]) -> tuple[np.ndarray, list[str]]:
        """Global ids of a chunk's local source names, and the names seen for the first time."""
        new = [n for n in dict.fromkeys(names) if n not in self.sources]
        if len(self.sources) + len(new) > np.iinfo(np.uint16).max:
            raise DataConfigError("more than 65535 distinct source names; source ids are uint16")
        index = {name: i for i, name in enumerate(self.sources + new)}
        return np.array([index[n] for n in names] or [0], dtype=np.int64), new

    def _publish(self, result: ChunkResult) -> dict:
        """Put a worker's finished chunk in place and describe it for the progress log."""
        chunk = self.chunks[result.index]
        line_base = self.file_lines.get(chunk.file_index, 0)
        if result.fatal is not None:
            line, reason, detail = result.fatal
            raise BadInputError(path=chunk.path, line=line_base + line + 1, reason=reason, detail=detail)
        mapping, new_sources = self._global_sources(result.source_names)
        shards = [publish_shard(self.out, shard, global_sources=mapping, source_names=self.sources + new_sources)
                  for shard in result.shards]
        if shards:
            fsync_directory(self.out)
        room = max(0, MAX_LISTED_BAD_LINES - self.listed_bad_lines)
        return {
            "chunk": result.index, "shards": shards, "new_sources": new_sources,
            "stats": {"lines": result.lines, "documents": result.documents,
                      "empty_documents": result.empty_documents, "blank_lines": result.blank_lines,
                      "bytes": result.input_bytes, "tokens": result.num_tokens, "bad": result.bad_counts},
            "bad_lines": [[chunk.path, line_base + line + 1, reason, detail] for line, reason, detail in result.bad[:room]],
            "tail": base64.b64encode(result.tail.astype(TOKEN_DTYPE).tobytes()).decode(),
            "tail_segments": [[name, count] for name, count in result.tail_segments],
        }

    def _write_tails(self) -> dict:
        """The chunks' tails (each < SEQ_LEN tokens) joined in chunk order, as the last shards.
        At most SEQ_LEN - 1 tokens per chunk pass through the main process."""
        writer = WindowWriter(directory=self.out, samples_per_shard=self.opts.samples_per_shard,
                              name=lambda piece: f"shard_tail_{piece:03d}")
        try:
            for record in self.records:
                tail = np.frombuffer(base64.b64decode(record["tail"]), dtype=TOKEN_DTYPE)
                offset = 0
                for name, count in record["tail_segments"]:
                    writer.add(tail[offset:offset + count], name)
                    offset += count
            dropped, _ = writer.finish()
        finally:
            writer.abort()
        mapping, _ = self._global_sources(writer.source_names)  # every tail's source is known by now
        shards = [publish_shard(self.out, shard, global_sources=mapping, source_names=self.sources)
                  for shard in writer.shards]
        if shards:
            fsync_directory(self.out)
        return {"final": True, "shards": shards, "dropped_tail_tokens": len(dropped)}

    def run(self) -> dict:
        bar = _progress_bar(self.opts, total=sum(p.stat().st_size for p in self.files))
        bar.update(sum(r["stats"]["bytes"] for r in self.records))
        tokens_done, started = 0, time.monotonic()
        try:
            for result in self._results():
                record = self._publish(result)
                self.log.append(record)
                self._adopt(record)
                tokens_done += result.num_tokens
                bar.update(result.input_bytes)
                bar.set_postfix_str(f"{tokens_done / max(time.monotonic() - started, 1e-9):,.0f} tok/s")
            if self.final is None:
                self.final = self._write_tails()
                self.log.append(self.final)
        except BaseException:
            for leftover in self.out.glob("*.tmp"):  # shards of chunks not yet published
                leftover.unlink(missing_ok=True)
            raise
        finally:
            bar.close()
            self.log.close()
        manifest = self._manifest()
        write_json_atomic(self.out / MANIFEST_NAME, manifest)  # last: its presence means "done"
        return manifest

    def _manifest(self) -> dict:
        stats = [r["stats"] for r in self.records]
        totals = {key: sum(s[key] for s in stats) for key in ("lines", "documents", "empty_documents", "blank_lines")}
        bad_by_reason: dict[str, int] = {}
        for s in stats:
            for reason, count in s["bad"].items():
                bad_by_reason[reason] = bad_by_reason.get(reason, 0) + count
        shards = [shard for r in [*self.records, self.final] for shard in r["shards"]]
        source_tokens = {name: 0 for name in self.sources}
        for record in shards:
            for name, count in record["source_tokens"].items():
                source_tokens[name] += count
        bad_lines = [line for r in self.records for line in r["bad_lines"]]
        num_samples = sum(r["num_samples"] for r in shards)
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
            "shards": shards,
            "tokenizer": asdict(self.tok),
            "vocab_size": self.tok.vocab_size,
            "max_token_id": max((r["max_token_id"] for r in shards), default=-1),
            "input_format": self.opts.input_format,
            "inputs": self.fingerprint["inputs"],
            "stats": {**totals, "input_tokens": sum(s["tokens"] for s in stats),
                      "dropped_tail_tokens": self.final["dropped_tail_tokens"],
                      "bad_lines_by_reason": bad_by_reason,
                      "bad_lines_total": sum(bad_by_reason.values())},
            "bad_lines": [{"file": f, "line": line, "reason": r, "detail": d} for f, line, r, d in bad_lines],
            "bad_lines_truncated": sum(bad_by_reason.values()) > len(bad_lines),
            "command": self.opts.command,
            "code_version": code_version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }


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
