"""Expanding --input arguments (files, directories, globs) and opening compressed inputs."""
import glob
import gzip
import io
from pathlib import Path
from typing import BinaryIO

from .errors import DataConfigError

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")


def expand_inputs(specs: list[str]) -> list[Path]:
    """Files in argument order; a directory contributes its files recursively in sorted order,
    a glob its matches in sorted order. Duplicates are kept once, at their first position.
    The order defines the sample order of the output, so it must not depend on the file system."""
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise DataConfigError(f"--input {spec!r}: no such file, directory or matching glob")
        files.extend(found)
    unique: dict[Path, None] = {}
    for file in files:
        unique.setdefault(file.resolve(), None)
    if not unique:
        raise DataConfigError(f"--input {specs}: no input files found (empty directories?)")
    return list(unique)


def compression_of(path: Path) -> str | None:
    """'gzip', 'zstd' or None, from the magic bytes (suffixes lie; magic does not)."""
    with open(path, "rb") as stream:
        head = stream.read(4)
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return None


def logical_name(path: Path) -> str:
    """File name without compression suffix: 'x.jsonl.zst' -> 'x.jsonl'."""
    name = path.name
    for suffix in _COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def source_stem(path: Path) -> str:
    """Default source name of a raw-text file: its name without compression and format suffix."""
    return Path(logical_name(path)).stem


def open_decompressed(path: Path, *, compression: str | None) -> BinaryIO:
    """A binary stream of the decompressed bytes."""
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        import zstandard

        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)
