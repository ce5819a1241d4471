"""The files one rank writes for one checkpoint: planned in the training thread, written later.

Planning records what to write (DeepSpeed's state dicts, the portable safetensors, small JSON). For
a background save it also takes a snapshot: every tensor is copied into CPU buffers that are kept
and reused by the next save, so the training step may change its own tensors at once; the step
waits only for that copy. `write()` then writes every file, hashing the bytes on their way to disk
(megamobi.checkpointing.hashed_files), and returns the digests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map

from megamobi.checkpointing.hashed_files import (
    FileDigests,
    json_save_hashed,
    safetensors_save_hashed,
    torch_save_hashed,
)
from megamobi.files import sha256_file


class SnapshotBuffers:
    """CPU copies of a checkpoint's tensors, reused across saves (allocating fresh memory costs
    page faults, several times slower than copying into memory already touched). Within one save,
    a tensor that lies inside memory already copied (the portable files' fp32 weights and moments
    are views of DeepSpeed's flat optimizer partitions) becomes a view of that copy: each byte of
    the training state is copied once."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        # (storage address, dtype) -> (first, last element, copy, the original: held so that its memory
        # cannot be reused by another tensor of this save, which would then look "already copied").
        self._copied: dict[tuple[int, torch.dtype], list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}

    def begin(self) -> None:
        """A new save: nothing of it copied yet."""
        self._copied.clear()

    def _already_copied(self, value: torch.Tensor) -> torch.Tensor | None:
        if not value.is_contiguous():
            return None
        start = value.storage_offset()
        for first, last, copy, _ in self._copied.get((value.untyped_storage().data_ptr(), value.dtype), ()):
            if first <= start and start + value.numel() <= last:
                return copy[start - first:start - first + value.numel()].view(value.shape)
        return None

    def copy(self, obj: Any, *, key: str) -> Any:
        """`obj` with every tensor replaced by its copy (nested dicts, lists and tuples)."""
        counter = iter(range(1 << 62))

        def copy_tensor(value):
            if not isinstance(value, torch.Tensor):
                return value
            seen = self._already_copied(value)
            if seen is not None:
                return seen
            slot = (key, next(counter))
            buffer = self._buffers.get(slot)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = self._buffers[slot] = torch.empty(value.shape, dtype=value.dtype, device="cpu",
                                                           pin_memory=value.is_cuda)
            buffer.copy_(value.detach(), non_blocking=value.is_cuda)
            if value.is_contiguous():
                start = value.storage_offset()
                self._copied.setdefault((value.untyped_storage().data_ptr(), value.dtype), []).append(
                    (start, start + value.numel(), buffer.view(-1), value))
            return buffer

        copied = tree_map(copy_tensor, obj)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return copied


class CheckpointJob:
    def __init__(self, directory: Path, *, snapshot: SnapshotBuffers | None = None) -> None:
        self.directory = Path(directory)
        self.snapshot = snapshot  # None: written before the training step continues, no copy needed
        if snapshot is not None:
            snapshot.begin()
        self.digests = FileDigests(self.directory)
        self._writes: list[Callable[[], None]] = []
        self._paths: list[Path] = []  # every file this job writes, for discard()

    def _held(self, obj: Any, path: Path) -> Any:
        if self.snapshot is None:
            return obj
        return self.snapshot.copy(obj, key=str(Path(path).relative_to(self.directory)))

    def add_torch(self, path: Path, obj: Any, **save_kwargs) -> None:
        held = self._held(obj, path)
        self._paths.append(Path(path))
        self._writes.append(lambda: torch_save_hashed(held, Path(path), self.digests, **save_kwargs))

    def add_safetensors(self, path: Path, tensors: dict[str, torch.Tensor], *, metadata: dict[str, str],
                        private: bool = False) -> None:
        """`private`: the tensors are this save's own (gathered copies), no snapshot needed."""
        held = tensors if private else self._held(tensors, path)
        self._paths.append(Path(path))
        self._writes.append(lambda: safetensors_save_hashed(held, Path(path), self.digests, metadata=metadata))

    def add_json(self, path: Path, data: Any) -> None:
        """`data` must not change afterwards (pass a fresh object)."""
        self._paths.append(Path(path))
        self._writes.append(lambda: json_save_hashed(data, Path(path), self.digests))

    def write(self, *, verify: bool = False) -> dict[str, dict[str, Any]]:
        """Write every file; `verify`: then read each back and compare (a background save does, so
        that `latest` never moves to files that differ from what was written)."""
        for write in self._writes:
            write()
        self._writes.clear()
        if verify:
            for name, expected in self.digests.files.items():
                path = self.directory / name
                if path.stat().st_size != expected["bytes"] or sha256_file(path, direct=True) != expected["sha256"]:
                    raise RuntimeError(f"{path}: the bytes on disk differ from the bytes written")
        return self.digests.files

    def discard(self) -> None:
        """Remove what this job wrote (after a failure: a full disk gets its space back, so that the
        rank can still report the failure)."""
        for path in self._paths:
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a file system turned read-only keeps them; the failure is reported anyway
                pass
