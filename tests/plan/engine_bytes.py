"""Count the bytes a real DeepSpeed engine holds on this rank, by walking its objects.

Every tensor reachable from the engine (the module's parameters and their .grad / ZeRO-3 ds_tensor,
the ZeRO / BF16 optimizer's flat buffers, the torch optimizer's state) is found, deduplicated by
storage (a parameter that is a view into a flat buffer counts once, with the buffer), and sorted:

    params     storages that hold a module parameter's values (bf16/fp32 model weights)
    grads      param.grad, and any optimizer buffer whose attribute path says "grad"
    optimizer  everything else the optimizer holds: fp32 master copies, Adam exp_avg / exp_avg_sq
    comm       ZeRO's gradient reduction buckets (an attribute path with "ipg" or "bucket")
    buffers    module buffers (rotary tables): not part of the static model, reported apart
"""

from __future__ import annotations

import torch
from torch import nn

_WALK_MODULES = ("deepspeed", "megamobi", "torch.optim")


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def engine_bytes(engine) -> dict[str, int]:
    seen_storage: dict[int, str] = {}
    sizes: dict[int, int] = {}

    def add(t: torch.Tensor, kind: str) -> None:
        if t.device.type == "meta":
            return
        ptr, nbytes = _storage_key(t)
        if nbytes == 0 or ptr in seen_storage:
            return
        seen_storage[ptr] = kind
        sizes[ptr] = nbytes

    module: nn.Module = engine.module
    for buf in module.buffers():
        add(buf, "buffers")
    for p in module.parameters():
        ds_tensor = getattr(p, "ds_tensor", None)
        add(p.data, "params")
        if ds_tensor is not None:
            add(ds_tensor, "params")
    for p in module.parameters():
        if p.grad is not None:
            add(p.grad, "grads")

    visited: set[int] = set()
    stack: list[tuple[object, str]] = [(engine.optimizer, "optimizer")]
    while stack:
        obj, path = stack.pop()
        if id(obj) in visited:
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            low = path.lower()
            add(obj, "comm" if ("ipg" in low or "bucket" in low) else "grads" if "grad" in low else "optimizer")
            if getattr(obj, "grad", None) is not None:
                add(obj.grad, "grads")
            continue
        if isinstance(obj, dict):
            for k, v in obj.items():  # keys may be tensors (torch optimizer state is keyed by parameter)
                stack.append((v, f"{path}.{k}" if isinstance(k, str) else path))
                if isinstance(k, torch.Tensor):
                    stack.append((k, path))
        elif isinstance(obj, (list, tuple, set)):
            stack.extend((v, path) for v in obj)
        elif isinstance(obj, nn.Module):
            continue  # the model: counted above
        elif type(obj).__module__.startswith(_WALK_MODULES) and hasattr(obj, "__dict__"):
            stack.extend((v, f"{path}.{k}") for k, v in vars(obj).items())
    out = {"params": 0, "grads": 0, "optimizer": 0, "comm": 0, "buffers": 0}
    for ptr, kind in seen_storage.items():
        out[kind] += sizes[ptr]
    return out
