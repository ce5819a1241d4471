"""Checks of one shard against its manifest record: cheap (sizes + idx header) or full (sha256)."""
from pathlib import Path

from megamobi.files import sha256_file

from .indexed_format import DTYPE_CODE_UINT16, IDX_VERSION, SAMPLE_BYTES, idx_file_bytes, read_idx_header


def shard_problems(directory: Path, record: dict, *, checksums: bool) -> list[str]:
    """Human-readable problems, empty when the shard matches its record."""
    problems: list[str] = []
    n = record["num_samples"]
    expected_bytes = {"bin": n * SAMPLE_BYTES, "idx": idx_file_bytes(n)}
    for key, info in record["files"].items():
        path = directory / info["file"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != info["bytes"]:
            problems.append(f"{path}: {size} bytes, manifest says {info['bytes']}")
        elif key in expected_bytes and size != expected_bytes[key]:
            problems.append(f"{path}: {size} bytes, {n} samples need {expected_bytes[key]}")
        if key == "idx" and size >= 34:
            try:
                header = read_idx_header(path)
            except ValueError as err:
                problems.append(str(err))
            else:
                if header.version != IDX_VERSION or header.dtype_code != DTYPE_CODE_UINT16:
                    problems.append(f"{path}: header version {header.version} dtype code "
                                    f"{header.dtype_code}, expected {IDX_VERSION} / {DTYPE_CODE_UINT16}")
                if header.sequence_count != n:
                    problems.append(f"{path}: header says {header.sequence_count} sequences, "
                                    f"manifest says {n}")
        if checksums and not problems and sha256_file(path) != info["sha256"]:
            problems.append(f"{path}: sha256 differs from manifest (corrupted or modified)")
    return problems
