"""Command-line entry points of data_tools/*.py (argument parsing and exit codes only)."""
import argparse
import sys
from pathlib import Path

from megamobi.cli_support import USAGE_ERROR, UserError, load_sentencepiece, positive_float, positive_int

from .errors import DataError

EXIT_BAD_DATA = 1
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int = EXIT_BAD_DATA) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def preprocess_main(argv: list[str] | None = None) -> int:
    from .preprocess import PreprocessOptions, preprocess

    parser = argparse.ArgumentParser(
        prog="preprocess_amber.py",
        description="Amber token jsonl or raw text -> 2049-token uint16 Megatron shards + manifest.json")
    parser.add_argument("--input", nargs="+", required=True,
                        help="files, directories (recursive, sorted) and globs; gzip/zstd allowed")
    parser.add_argument("--output", required=True, help="shard directory (created; resumable)")
    parser.add_argument("--format", dest="input_format", choices=["amber", "text"], default=None,
                        help="amber: {token_ids, source} lines; text: jsonl 'text' or *.txt files "
                             "(default: from the first input's first line)")
    parser.add_argument("--tokenizer", help="SentencePiece .model (required for --format text)")
    parser.add_argument("--vocab-size", type=positive_int, help="for amber without --tokenizer (default 32000)")
    parser.add_argument("--samples-per-shard", type=positive_int, default=262_144,
                        help="the most samples in one shard (a chunk with more is split)")
    parser.add_argument("--workers", type=positive_int, default=1)
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip bad lines (counted and listed in the manifest) instead of stopping")
    parser.add_argument("--chunk-mb", type=positive_float, default=1024.0,
                        help="work unit and shard unit: byte range of an uncompressed file, written as its own "
                             "shards (output depends on it)")
    parser.add_argument("--overwrite", action="store_true", help="delete existing output first")
    parser.add_argument("--verify-existing", action="store_true",
                        help="on resume, check sha256 of finished shards (default: sizes + headers)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if Path(args.output).exists() and not Path(args.output).is_dir():
        return _fail(f"--output {args.output}: is a file; give a directory for the shards", USAGE_ERROR)
    if args.input_format is None:
        from .format_inference import infer_input_format
        from .input_files import expand_inputs

        try:
            files = expand_inputs(args.input)
        except DataError as err:
            return _fail(str(err))
        try:
            args.input_format, why = infer_input_format(files, tokenizer=args.tokenizer)
        except DataError as err:  # a missing flag: a usage error
            return _fail(str(err), 2)
        print(f"preprocess: --format {args.input_format} ({why})", file=sys.stderr)
    opts = PreprocessOptions(
        inputs=args.input, output=args.output, input_format=args.input_format,
        tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        samples_per_shard=args.samples_per_shard, workers=args.workers, skip_bad=args.skip_bad,
        chunk_mb=args.chunk_mb, overwrite=args.overwrite, verify_existing=args.verify_existing,
        progress=not args.no_progress, command=[sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    try:
        manifest = preprocess(opts)
    except DataError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return _fail("interrupted; finished shards are kept, re-run the same command to resume",
                     EXIT_INTERRUPTED)
    stats = manifest["stats"]
    print(f"{args.output}: {manifest['num_samples']} samples ({manifest['num_tokens']:,} tokens) in "
          f"{len(manifest['shards'])} shards; dropped tail tokens {stats['dropped_tail_tokens']}; "
          f"bad lines skipped {stats['bad_lines_total']} {stats['bad_lines_by_reason'] or ''}")
    return 0


def inspect_main(argv: list[str] | None = None) -> int:
    from .shard_inspection import verify_directory

    parser = argparse.ArgumentParser(prog="inspect_shards.py",
                                     description="verify shards against manifest.json; show samples")
    parser.add_argument("directory")
    parser.add_argument("--tokenizer", help="SentencePiece .model, to decode --show samples")
    parser.add_argument("--show", type=int, action="append", default=[], metavar="K",
                        help="print sample K (global index; repeatable)")
    args = parser.parse_args(argv)
    directory = Path(args.directory)
    if directory.is_file():
        return _fail(f"{directory}: is a file; give the shard directory (the one holding manifest.json)", USAGE_ERROR)
    sp = None
    if args.tokenizer:
        try:
            sp = load_sentencepiece(args.tokenizer)
        except UserError as err:
            return _fail(str(err), USAGE_ERROR)
    try:
        manifest, problems = verify_directory(directory)
    except DataError as err:
        return _fail(str(err))
    print(f"{directory}: {len(manifest['shards'])} shards, {manifest['num_samples']} samples, "
          f"{manifest['num_tokens']:,} tokens, code {manifest['code_version']}")
    total = max(manifest["num_tokens"], 1)
    for name, tokens in manifest["source_tokens"].items():
        print(f"  {name:24s} {tokens:>18,} tokens {100 * tokens / total:6.2f}%")
    bad = manifest["stats"]["bad_lines_by_reason"]
    if bad:
        print(f"  skipped bad lines: {bad}")
    if problems:
        for problem in problems:
            print(f"PROBLEM: {problem}", file=sys.stderr)
        return _fail(f"{len(problems)} problem(s); rebuild the damaged shards by re-running preprocess_amber.py "
                     "with the same arguments plus --verify-existing (it checks every finished shard's sha256 "
                     "and rebuilds from the first damaged one; --overwrite rebuilds everything)")
    print("all shards verified (sizes, headers, sha256)")
    if args.show:
        from .shard_dataset import ShardedDataset

        ds = ShardedDataset([directory])
        sources = ds.sample_sources()
        for k in args.show:
            if not 0 <= k < len(ds):
                return _fail(f"--show {k}: only {len(ds)} samples")
            tokens = ds[k].tolist()
            if sp is not None and max(tokens) >= sp.get_piece_size():
                return _fail(f"--tokenizer {args.tokenizer}: {sp.get_piece_size()} tokens, but sample {k} holds id "
                             f"{max(tokens)}: not the tokenizer these shards were made with", USAGE_ERROR)
            print(f"--- sample {k} (source {ds.sources[sources[k]]}) ---")
            print(sp.decode(tokens) if sp else tokens)
    return 0


def train_tokenizer_main(argv: list[str] | None = None) -> int:
    from .tokenizer_training import train_tokenizer

    parser = argparse.ArgumentParser(prog="train_tokenizer.py",
                                     description="train a LLaMA-style SentencePiece BPE (byte fallback)")
    parser.add_argument("--input", nargs="+", required=True, help="text / jsonl files, dirs, globs")
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.model/.vocab")
    parser.add_argument("--vocab-size", type=positive_int, default=32000)
    parser.add_argument("--max-sentences", type=positive_int, default=2_000_000)
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args(argv)
    output = Path(args.output)
    if args.output.endswith(("/", "\\")) or output.is_dir():
        return _fail(f"--output {args.output}: is a directory; --output is a file prefix, e.g. "
                     f"{output / 'tokenizer'} writes tokenizer.model and tokenizer.vocab there", USAGE_ERROR)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        path = train_tokenizer(inputs=args.input, output_prefix=args.output,
                               vocab_size=args.vocab_size, max_sentences=args.max_sentences,
                               num_threads=args.threads)
    except DataError as err:
        return _fail(str(err))
    print(f"wrote {path}")
    return 0
