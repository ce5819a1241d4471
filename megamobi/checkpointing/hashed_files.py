"""Checkpoint files hashed while they are written, never read back for their checksums.

Every byte a checkpoint writer hands to the operating system also goes through sha256 (in a helper
thread, overlapped with the write: both release the GIL), and the file is fsynced when closed. The
digests of the files one process wrote are collected in a FileDigests and end up in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from megamobi.files import fsync_directory

_STAGE_BYTES = 8 << 20  # written (and hashed) in blocks of this size
_ALIGN = 4096  # O_DIRECT wants buffer, size and offset aligned to the logical block size
_THREAD = threading.local()
_HASHERS: dict[int, ThreadPoolExecutor] = {}  # by process id: a forked child has none of its parent's threads


def _hasher() -> ThreadPoolExecutor:
    """This process's helper thread for sha256 (created on first use, again after a fork)."""
    pid = os.getpid()
    if pid not in _HASHERS:
        _HASHERS.clear()
        _HASHERS[pid] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megamobi-sha256")
    return _HASHERS[pid]


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
    """A binary file object (write/tell/flush/close) that hashes what it writes and fsyncs on close.

    Bytes are gathered in a page-aligned staging buffer and written in 8 MiB blocks with O_DIRECT
    where the file system allows it (as `dd oflag=direct` does): no copy into the page cache, no
    reclaim of it under memory pressure, and a checkpoint does not evict the training job's own
    cached data. The last block is padded to the alignment and the file truncated to its size.
    Each block is hashed in a helper thread while it is being written (both release the GIL)."""

    def __init__(self, path: Path, digests: FileDigests) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self._direct = hasattr(os, "O_DIRECT")
        try:
            self._fd = os.open(self.path, flags | (os.O_DIRECT if self._direct else 0), 0o644)
        except OSError:  # tmpfs and some others refuse O_DIRECT: the page cache then
            self._fd, self._direct = os.open(self.path, flags, 0o644), False
        self._stage = staging_buffer()
        self._fill = 0
        self._hash = hashlib.sha256()
        self._digests = digests
        self._size = 0
        self.error: OSError | None = None  # the write that failed, e.g. on a full disk

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < view.nbytes:
                take = min(view.nbytes - done, len(self._stage) - self._fill)
                self._stage[self._fill:self._fill + take] = view[done:done + take]
                self._fill += take
                done += take
                if self._fill == len(self._stage):
                    self._drain()
        except OSError as err:  # torch.save's C++ writer would turn it into "unexpected pos ..."
            self.error = _naming(err, self.path)
            raise self.error from None
        self._size += view.nbytes
        return view.nbytes

    def _drain(self) -> None:
        """Write the staged bytes (padded to the alignment for O_DIRECT), hashing them meanwhile."""
        hashed = _hasher().submit(self._hash.update, self._stage[:self._fill])
        try:
            block = self._stage[:-(-self._fill // _ALIGN) * _ALIGN] if self._direct else self._stage[:self._fill]
            while len(block):
                block = block[os.write(self._fd, block):]
        finally:
            hashed.result()
        self._fill = 0

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        pass  # blocks go out when full; close() writes the rest

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            if self._fill:
                self._drain()
            if self._direct:
                os.ftruncate(self._fd, self._size)  # the padding of the last block goes
            os.fsync(self._fd)
        except OSError as err:
            self.error = _naming(err, self.path)
            raise self.error from None
        finally:
            os.close(self._fd)
            self._fd = -1
        self._digests.record(self.path, size=self._size, sha256=self._hash.hexdigest())

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _naming(err: OSError, path: Path) -> OSError:
    """`err` with the file's path (os.write's errors name none): "disk full writing PATH"."""
    if err.filename is not None:
        return err
    return type(err)(err.errno, err.strerror, str(path))


def staging_buffer() -> memoryview:
    """This thread's page-aligned 8 MiB buffer (anonymous mmap; kept: touched memory is cheap).
    Private, and made again in a forked child: ranks forked from one process must never write
    through one buffer (a shared mapping would be shared with them)."""
    pid = os.getpid()
    if getattr(_THREAD, "stage_pid", None) != pid:
        _THREAD.stage = memoryview(mmap.mmap(-1, _STAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
        _THREAD.stage_pid = pid
    return _THREAD.stage


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
