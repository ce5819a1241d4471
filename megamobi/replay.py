"""Which tokens a run trained on: replayed exactly from the run directory (docs/data.md, "Replay").

    python -m megamobi.replay RUN_DIR --steps 5:7 [--rank 0] [--decode [--tokenizer SP.model]] [--json]
    python -m megamobi.replay RUN_DIR --find SHARD_DIR:ROW      (or SHARD.bin:ROW)
    python -m megamobi.replay RUN_DIR --find-text "def main" --within 1:300
    python -m megamobi.replay RUN_DIR --mix 1:300 [--json]      (or --mix step_0000100:step_0000200)

Steps count from 1, as logged; ranks are data-parallel ranks. The run's data config, layout and
position come from its checkpoints (megamobi.json); the shards must be the ones it trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage too)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _step_range(text: str) -> tuple[int, int]:
    """A:B, steps counted from 1 as logged; checkpoint names mean what lies between them:
    step_0000100:step_0000200 is steps 101..200 (what checkpoint 200 trained on since checkpoint 100)."""
    first, sep, last = text.partition(":")
    try:
        a = int(first[5:]) + 1 if first.startswith("step_") else int(first)
        last = last if sep else first
        b = int(last[5:]) if last.startswith("step_") else int(last)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not A:B (two optimizer steps, e.g. 1:100, or two checkpoint "
                                         "names, e.g. step_0000100:step_0000200)") from None
    if a < 1 or b < a:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= A <= B (steps count from 1)")
    return a, b


def _rank(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative (data-parallel ranks count from 0)")
    return value


def parse_args(argv):
    parser = _Parser(prog="python -m megamobi.replay", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run directory (holds checkpoints/)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--steps", type=_step_range, metavar="A:B", help="list the sequences of steps A..B")
    mode.add_argument("--find", metavar="SHARD_DIR:ROW", help="where one sample's windows were consumed")
    mode.add_argument("--find-text", metavar="TEXT", help="sequences containing TEXT (needs --within A:B)")
    mode.add_argument("--mix", type=_step_range, metavar="A:B", help="tokens per source over steps A..B")
    parser.add_argument("--within", type=_step_range, metavar="A:B", help="the steps --find-text searches")
    parser.add_argument("--rank", type=_rank, help="one data-parallel rank (default: all)")
    parser.add_argument("--decode", action="store_true", help="also print the text (SentencePiece)")
    parser.add_argument("--tokenizer", type=Path, help="SentencePiece .model (default: the one the data manifest records)")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    parser.add_argument("--verify-shards", action="store_true", help="also check every shard file's sha256 (reads all)")
    args = parser.parse_args(argv)
    if args.find_text is not None and args.within is None:
        parser.error("--find-text searches a bounded range: add --within A:B (optimizer steps)")
    if args.find_text is not None and not args.find_text.strip():
        parser.error("--find-text: give a non-empty text")
    if args.within is not None and args.find_text is None:
        parser.error("--within bounds --find-text; use --steps A:B to list steps")
    if args.rank is not None and args.steps is None and args.find_text is None:
        parser.error("--rank applies to --steps and --find-text")
    if args.tokenizer is not None and not args.tokenizer.is_file():
        parser.error(f"--tokenizer {args.tokenizer}: no such file (a SentencePiece .model)")
    return args


def _tokenizer(args, replay):
    """--tokenizer, else the tokenizer recorded in the first data manifest."""
    import sentencepiece

    path = args.tokenizer
    if path is None:
        from megamobi.checkpointing.recorded_paths import resolve_recorded, where_to_run
        from megamobi.data.replay import ReplayError

        directory = replay.segments[-1].data["paths"][0]
        manifest = resolve_recorded(directory, launch_dir=replay.launch_dir) / "manifest.json"
        try:
            recorded = json.loads(manifest.read_text()).get("tokenizer") or {}
        except FileNotFoundError:
            raise ReplayError(f"{directory}: no manifest.json (the run's data, whose manifest names its tokenizer; "
                              f"{where_to_run(directory, launch_dir=replay.launch_dir)}); or give --tokenizer SP.model") from None
        except (OSError, ValueError, AttributeError) as err:
            raise ReplayError(f"{manifest}: unreadable ({err}); give --tokenizer SP.model") from None
        if not recorded.get("path") or not Path(recorded["path"]).is_file():
            raise ReplayError(f"{manifest} records no tokenizer file that exists here; give --tokenizer SP.model")
        path = Path(recorded["path"])
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as err:
        from megamobi.data.replay import ReplayError

        raise ReplayError(f"--tokenizer {path}: not a SentencePiece model ({err})") from None


def _decode(sp, tokens) -> str:
    """The text of `tokens`, or a ReplayError (exit 2) when the tokenizer is too small for the data's ids."""
    if len(tokens) and int(max(tokens)) >= sp.get_piece_size():
        from megamobi.data.replay import ReplayError

        raise ReplayError(f"--tokenizer: {sp.get_piece_size()} tokens, but the data holds id {int(max(tokens))}: "
                          "not the tokenizer these shards were made with")
    return sp.decode(tokens)


def _print_sequence(seq, *, text: str | None, as_json: bool) -> None:
    if as_json:
        record = seq.record()
        if text is not None:
            record["text"] = text
        print(json.dumps(record))
        return
    skipped = "  SKIPPED (not trained on)" if seq.skipped else ""
    print(f"step {seq.step:>7}  stage {seq.stage:>2}  rank {seq.rank:>3}  mb {seq.micro_batch:>3}  sample {seq.sample_index:>10}  "
          f"{seq.shard}:{seq.row}  offset {seq.offset:>4}  {seq.source}{skipped}")
    if text is not None:
        print("    " + repr(text))


def _list(replay, args) -> None:
    sp = _tokenizer(args, replay) if args.decode else None
    for seq in replay.sequences(*args.steps, rank=args.rank):
        _print_sequence(seq, text=_decode(sp, seq.tokens) if sp else None, as_json=args.json)


def _find_text(replay, args) -> int:
    sp = _tokenizer(args, replay)
    found = 0
    for seq in replay.sequences(*args.within, rank=args.rank):
        text = _decode(sp, seq.tokens)
        if args.find_text in text:
            found += 1
            _print_sequence(seq, text=text if args.decode else None, as_json=args.json)
    if not found and not args.json:
        print(f"{args.find_text!r}: in no sequence of steps {args.within[0]}..{args.within[1]}")
    return 0


def _find(replay, args) -> None:
    answer = replay.find(args.find)
    if args.json:
        print(json.dumps(answer))
        return
    print(f"sample {answer['sample_index']} = {answer['shard']}:{answer['row']} (source {answer['source']})")
    if answer["validation"]:
        print("  in the validation split: never trained on")
    elif not answer["consumed"]:
        print(f"  not consumed in steps 1..{replay.last_step}")
    for hit in answer["consumed"]:
        skipped = "  SKIPPED (not trained on)" if hit["skipped"] else ""
        print(f"  step {hit['step']:>7}  stage {hit['stage']:>2}  rank {hit['rank']:>3}  mb {hit['micro_batch']:>3}  "
              f"offset {hit['offset']:>4}{skipped}")


def _mix_rows(entry: dict) -> None:
    print(f"{'source':<24} {'tokens':>16} {'share':>8} {'configured':>11}")
    for name, source in entry["sources"].items():
        print(f"{name:<24} {source['tokens']:>16,} {100 * source['share']:>7.2f}% {100 * source['configured']:>10.2f}%")


def _configured_text(blend: str) -> str:
    return {"weights": "the blend's source_weights", "natural": "the training split's natural mix (no blend)",
            "stages": "each stage's configured mix, weighted by its tokens"}[blend]


def _stage_text(stage: dict) -> str:
    return f"stage {stage['stage']}" + (f" '{stage['name']}'" if stage["name"] else "")


def _mix(replay, args) -> None:
    mix = replay.mix(*args.mix)
    if args.json:
        print(json.dumps(mix))
        return
    if len(mix["stages"]) > 1:
        for stage in mix["stages"]:
            print(f"{_stage_text(stage)}, steps {stage['first_step']}..{stage['last_step']}: {stage['tokens']:,} tokens; "
                  f"configured = {_configured_text(stage['blend'])}")
            _mix_rows(stage)
            print()
        print(f"total, steps {mix['first_step']}..{mix['last_step']}: {mix['tokens']:,} tokens; configured = "
              f"{_configured_text(mix['blend'])}")
    else:
        [stage] = mix["stages"]
        where = f" ({_stage_text(stage)})" if stage["stage"] > 1 or stage["name"] else ""
        print(f"steps {mix['first_step']}..{mix['last_step']}{where}: {mix['tokens']:,} tokens; configured = "
              f"{_configured_text(mix['blend'])}")
    _mix_rows(mix)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megamobi.data.errors import DataError
    from megamobi.data.replay import RunReplay

    try:
        replay = RunReplay(args.run_dir, verify_checksums=args.verify_shards)
        if args.steps is not None:
            _list(replay, args)
        elif args.find is not None:
            _find(replay, args)
        elif args.find_text is not None:
            _find_text(replay, args)
        else:
            _mix(replay, args)
    except DataError as err:
        print(f"megamobi.replay: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `| head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
