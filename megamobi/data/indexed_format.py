"""Megatron indexed-dataset (.bin/.idx) layout, restricted to what megamobi writes.

Every sequence is exactly SEQ_LEN uint16 tokens, so `.bin` is a dense N x SEQ_LEN matrix
and `.idx` is fully determined by N; we still write the complete index so that Megatron's
own `IndexedDataset` can read our shards.
"""
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

SEQ_LEN = 2049  # 2048 model inputs + 1 for the shifted label, as in Amber
TOKEN_DTYPE = np.uint16
DTYPE_CODE_UINT16 = 8
MAX_VOCAB_UINT16 = 65535  # ids must fit in uint16: vocab_size <= 65535 (ids 0..65534)
IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_VERSION = 1
IDX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, seq count, doc count
SAMPLE_BYTES = SEQ_LEN * 2


@dataclass(frozen=True)
class IdxHeader:
    version: int
    dtype_code: int
    sequence_count: int
    document_count: int


def idx_file_bytes(num_samples: int) -> int:
    """Size of an .idx for num_samples sequences of one document each."""
    return IDX_HEADER_BYTES + num_samples * (4 + 8) + (num_samples + 1) * 8


def write_idx(stream: BinaryIO, num_samples: int) -> None:
    """Write the index of a dense shard: every sequence SEQ_LEN long, one document each."""
    stream.write(IDX_MAGIC)
    stream.write(struct.pack("<Q", IDX_VERSION))
    stream.write(struct.pack("<B", DTYPE_CODE_UINT16))
    stream.write(struct.pack("<Q", num_samples))
    stream.write(struct.pack("<Q", num_samples + 1))  # Megatron counts document_indices entries
    stream.write(np.full(num_samples, SEQ_LEN, dtype=np.int32).tobytes())
    stream.write((np.arange(num_samples, dtype=np.int64) * SAMPLE_BYTES).tobytes())
    stream.write(np.arange(num_samples + 1, dtype=np.int64).tobytes())


def read_idx_header(path: Path) -> IdxHeader:
    """Read only the fixed-size header (34 bytes), never the arrays: start-up stays O(shards)."""
    with open(path, "rb") as stream:
        raw = stream.read(IDX_HEADER_BYTES)
    if len(raw) < IDX_HEADER_BYTES:
        raise ValueError(f"{path}: truncated index header ({len(raw)} of {IDX_HEADER_BYTES} bytes)")
    if raw[:9] != IDX_MAGIC:
        raise ValueError(f"{path}: not a Megatron index file (magic {raw[:9]!r})")
    version, = struct.unpack_from("<Q", raw, 9)
    dtype_code, = struct.unpack_from("<B", raw, 17)
    seq_count, doc_count = struct.unpack_from("<QQ", raw, 18)
    return IdxHeader(version=version, dtype_code=dtype_code,
                     sequence_count=seq_count, document_count=doc_count)
