"""Shared pieces of megamobi's command-line tools, so that every user mistake ends the same way:
one line on stderr naming the argument, file or key and what to do, and exit status 2 (argparse's
own status for a bad argument). No traceback. Cheap to import: no torch here.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from megamobi.exit_codes import USAGE as USAGE_ERROR  # a user mistake (argparse uses 2 as well)


class UserError(Exception):
    """A mistake the user can fix; the CLI prints `error: <message>` and exits USAGE_ERROR."""


def fail(message: object) -> int:
    print(f"error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _number(kind, text: str, *, minimum: float, strict: bool):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if not math.isfinite(value):  # float("inf") / float("nan") parse, but no size or rate is infinite
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if value < minimum or (strict and value == minimum):
        raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, minimum=0, strict=True)


def non_negative_int(text: str) -> int:
    return _number(int, text, minimum=0, strict=False)


def positive_float(text: str) -> float:
    return _number(float, text, minimum=0, strict=True)


def non_negative_float(text: str) -> float:
    return _number(float, text, minimum=0, strict=False)


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def checkpoint_arg(path: str | Path, *, arg: str = "--checkpoint") -> Path:
    """A megamobi checkpoint directory, or a UserError that says what `path` is instead (a run
    directory: its latest checkpoint is named; a file; nothing)."""
    from megamobi.config_io import ConfigError
    from megamobi.training.preflight import read_checkpoint_manifest

    try:
        read_checkpoint_manifest(path, what=arg)
    except ConfigError as err:
        raise UserError(str(err)) from None
    return Path(path)


def load_sentencepiece(path: str | Path, *, arg: str = "--tokenizer"):
    """A SentencePieceProcessor, or a UserError for a missing file or one that is not a SentencePiece model."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{arg} {path}: {'is a directory' if path.is_dir() else 'file not found'}; give the "
                        "SentencePiece .model file the data was made with")
    import sentencepiece

    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as err:
        raise UserError(f"{arg} {path}: not a SentencePiece model ({str(err).splitlines()[0]})") from None


def check_tokenizer_fits(sp, *, vocab_size: int, arg: str = "--tokenizer", what: str = "the model") -> None:
    """A tokenizer with more pieces than the model's embedding rows gives ids the model cannot read."""
    if sp.get_piece_size() > vocab_size:
        raise UserError(f"{arg}: {sp.get_piece_size()} tokens, more than the vocab_size {vocab_size} of {what}: "
                        "not the tokenizer it was trained with")
