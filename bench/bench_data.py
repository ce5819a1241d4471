"""Data pipeline throughput figures (printed, not asserted). Usage:
    python bench/bench_data.py [--workdir DIR] [--text-mb 16] [--amber-lines 4000]
Text preprocessing is compared with raw SentencePieceProcessor.encode on the same documents."""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamobi.data import GlobalBatchSampler, build_datasets, collate
from megamobi.data.preprocess import PreprocessOptions, preprocess
from megamobi.data.tokenizer_training import train_tokenizer


def english_docs() -> list[str]:
    import argparse as a
    import collections
    import email
    import http.client
    import json as j
    import logging
    import pathlib
    import unittest

    docs = []
    for module in (a, collections, email, http.client, j, logging, pathlib, unittest):
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40:
                docs.append(doc)
    return docs


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_text(work: Path, *, text_mb: float) -> None:
    import sentencepiece

    docs = english_docs()
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(docs))
    model = train_tokenizer(inputs=[str(corpus)], output_prefix=str(work / "tok"), vocab_size=4000)
    texts, size, k = [], 0, 0
    while size < text_mb * 1e6:  # repeat with a counter so documents are not identical
        text = f"{k}: " + docs[k % len(docs)]
        texts.append(text)
        size += len(text.encode())
        k += 1
    files = []
    for part in range(4):  # 4 files so 2 workers have work to share
        path = work / f"text{part}.jsonl"
        with open(path, "w") as stream:
            for text in texts[part::4]:
                stream.write(json.dumps({"text": text}) + "\n")
        files.append(str(path))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    encoded, raw_s = timed(lambda: sp.encode(texts, num_threads=1))
    raw_tps = sum(len(e) + 1 for e in encoded) / raw_s
    print(f"text: {len(texts)} docs, {size / 1e6:.1f} MB, tokenizer vocab 4000")
    print(f"  raw SentencePieceProcessor.encode (1 thread): {raw_tps:,.0f} tokens/s")
    per_worker = {}
    for workers in (1, 2):
        out = work / f"text_out{workers}"
        manifest, secs = timed(lambda out=out, workers=workers: preprocess(PreprocessOptions(
            inputs=files, output=str(out), input_format="text", tokenizer=str(model),
            workers=workers, chunk_mb=4, progress=False, overwrite=True)))
        tps = manifest["stats"]["input_tokens"] / secs
        per_worker[workers] = tps
        print(f"  preprocess --workers {workers}: {tps:,.0f} tokens/s total, "
              f"{tps / workers:,.0f} per worker = {tps / workers / raw_tps:.2f} x raw encode")
    print(f"  speed-up 1 -> 2 workers: {per_worker[2] / per_worker[1]:.2f} x")


def bench_amber(work: Path, *, lines: int) -> Path:
    rng = np.random.default_rng(0)
    path = work / "amber.jsonl"
    with open(path, "w") as stream:
        for i in range(lines):
            stream.write(json.dumps({"token_ids": rng.integers(0, 32000, 2049).tolist(),
                                     "source": ("c4", "arxiv", "book")[i % 3]}) + "\n")
    mb = path.stat().st_size / 1e6
    print(f"amber: {lines} lines, {mb:.1f} MB")
    rates = {}
    for workers in (1, 2):
        out = work / f"amber_out{workers}"
        _, secs = timed(lambda out=out, workers=workers: preprocess(PreprocessOptions(
            inputs=[str(path)], output=str(out), workers=workers, chunk_mb=8,
            samples_per_shard=1024, progress=False, overwrite=True)))
        rates[workers] = mb / secs
        print(f"  preprocess --workers {workers}: {mb / secs:.1f} MB/s total, "
              f"{mb / secs / workers:.1f} MB/s per worker")
    print(f"  speed-up 1 -> 2 workers: {rates[2] / rates[1]:.2f} x")
    return work / "amber_out1"


def bench_loader(shards: Path, *, batches: int = 300, micro_batch: int = 8) -> None:
    train, _ = build_datasets([shards])
    sampler = GlobalBatchSampler(num_samples=len(train), global_batch_size=micro_batch,
                                 micro_batch_size=micro_batch, dp_rank=0, dp_size=1, seed=1)
    it = iter(sampler)
    start = time.perf_counter()
    for _ in range(batches):
        batch = collate([train[i] for i in next(it)])
    secs = time.perf_counter() - start
    tokens = batches * micro_batch * batch["input_ids"].shape[1]
    print(f"loader: random micro-batches of {micro_batch} from {len(train)} samples (page cache warm): "
          f"{tokens / secs:,.0f} tokens/s, {batches / secs:,.0f} batches/s incl. collate")


def bench_startup(work: Path, *, shards: int = 1000) -> None:
    """Opening a corpus of many shards must not scan or index the whole corpus."""
    source = work / "amber.jsonl"
    out = work / "many_shards"
    lines = sum(1 for _ in open(source))
    preprocess(PreprocessOptions(inputs=[str(source)], output=str(out), samples_per_shard=max(1, lines // shards),
                                 chunk_mb=8, progress=False, overwrite=True))
    (train, _), secs = timed(lambda: build_datasets([out]))
    count = len(list(out.glob("*.bin")))
    print(f"loader start-up: {count} shards, {len(train)} samples opened in {secs * 1e3:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir")
    parser.add_argument("--text-mb", type=float, default=16)
    parser.add_argument("--amber-lines", type=int, default=4000)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        bench_text(work, text_mb=args.text_mb)
        shards = bench_amber(work, lines=args.amber_lines)
        bench_loader(shards)
        bench_startup(work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
