"""--format left out: read the first input's first line and say which format it is, so that raw text
given to the Amber reader is recognised instead of failing with "missing field 'token_ids'"."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DataConfigError
from .input_files import compression_of, logical_name, open_decompressed

PLAIN_TEXT_SUFFIXES = (".txt", ".text")


def _first_line(path: Path) -> bytes | None:
    with open_decompressed(path, compression=compression_of(path)) as stream:
        for _, line in zip(range(1000), stream):  # blank lines first: look a little further
            if line.strip():
                return line
    return None


def infer_input_format(files: list[Path], *, tokenizer: str | None) -> tuple[str, str]:
    """('amber' | 'text', why) from the first input file; raises DataConfigError naming the missing flag
    when the input is raw text and no --tokenizer was given."""
    first = files[0]
    if Path(logical_name(first)).suffix.lower() in PLAIN_TEXT_SUFFIXES:
        kind, why = "text", f"{first} is a plain-text file"
    else:
        line = _first_line(first)
        try:
            obj = json.loads(line) if line is not None else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        if isinstance(obj, dict) and "token_ids" in obj:
            return "amber", f"{first}: lines have 'token_ids'"
        if isinstance(obj, dict) and "text" in obj:
            kind, why = "text", f"{first}: lines have a 'text' field"
        elif tokenizer is not None and obj is None:
            kind, why = "text", f"{first}: not JSON lines, and --tokenizer was given"
        else:
            return "amber", f"{first}: assumed Amber token lines (give --format to choose)"
    if tokenizer is None:
        raise DataConfigError(f"{why}: raw text needs a tokenizer; pass --format text --tokenizer MODEL.model "
                              "(a SentencePiece model, e.g. from data_tools/train_tokenizer.py)")
    return kind, why
