"""Checkpoint files hashed while they are written, never read back for their checksums.

Every byte a checkpoint writer hands to the operating system also goes through sha256 (in a helper
thread, overlapped with the write: both release the GIL), and the file is fsynced when closed. The
digests of the files one process wrote are collected in a FileDigests and end up in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

_OVERLAP_BYTES = 1 << 20  # hash concurrently with the write from this size on
_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megamobi-sha256")


class FileDigests:
    """{path relative to the checkpoint: {"bytes", "sha256"}} of the files one process wrote."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.files: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()  # a background save records from its own thread

    def record(self, path: Path, *, size: int, sha256: str) -> None:
        with self._lock:
            self.files[str(Path(path).relative_to(self.root))] = {"bytes": size, "sha256": sha256}


class HashingWriter:
    """A binary file object (write/flush/tell/close) that hashes what it writes and fsyncs on close."""

    def __init__(self, path: Path, digests: FileDigests) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = open(self.path, "wb")
        self._hash = hashlib.sha256()
        self._digests = digests
        self._size = 0
        self.error: OSError | None = None  # the write that failed, e.g. on a full disk

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            if view.nbytes >= _OVERLAP_BYTES:
                # The caller may reuse `data` once write returns: the hash must be done by then too.
                hashed = _HASHER.submit(self._hash.update, view)
                self._stream.write(view)
                hashed.result()
            else:
                self._hash.update(view)
                self._stream.write(view)
        except OSError as err:  # torch.save's C++ writer would turn it into "unexpected pos ..."
            self.error = err
            raise
        self._size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        self._stream.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self._stream.closed:
            return
        try:
            self._stream.flush()
        except OSError as err:
            self.error = err
            self._stream.close()
            raise
        os.fsync(self._stream.fileno())
        self._stream.close()
        self._digests.record(self.path, size=self._size, sha256=self._hash.hexdigest())

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._stream.close()


def torch_save_hashed(obj: Any, path: Path, digests: FileDigests, **kwargs) -> None:
    with HashingWriter(path, digests) as stream:
        try:
            torch.save(obj, stream, **kwargs)
        except Exception:
            if stream.error is not None:
                raise stream.error from None
            raise


def json_save_hashed(data: Any, path: Path, digests: FileDigests) -> None:
    with HashingWriter(path, digests) as stream:
        stream.write((json.dumps(data, indent=1) + "\n").encode())


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_save_hashed(tensors: dict[str, torch.Tensor], path: Path, digests: FileDigests, *,
                            metadata: dict[str, str] | None = None) -> None:
    """A safetensors file (8-byte header length, JSON header, raw little-endian data), streamed tensor
    by tensor: no copy of the whole file is ever built in memory."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with HashingWriter(path, digests) as stream:
        stream.write(struct.pack("<Q", len(raw)))
        stream.write(raw)
        for tensor in tensors.values():
            if tensor.numel():
                stream.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def fsync_tree(directory: Path) -> None:
    """fsync every folder under `directory` (and itself): the files' names are durable too."""
    for folder in [*(p for p in Path(directory).rglob("*") if p.is_dir()), Path(directory)]:
        fsync_directory(folder)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
