"""Model weights in a checkpoint, readable without knowing the layout that wrote them.

Each (tensor rank, pipeline stage) of data-parallel replica 0 writes one safetensors file,
`model/tp{T}-pp{P}.safetensors`, holding its tensors under the PLAIN model's state-dict keys
(`layers.3.self_attn.q_proj.weight`, `mlps.0.down_proj.weight`, ...). Each file's header records,
for every tensor split over tensor ranks, the split dimension, this shard's tensor rank and the
unpadded full size (the vocabulary is padded to a multiple of T). Merging concatenates the shards
and trims the padding, so conversion and resharding read every layout the same way, and loading
never unpickles anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MODEL_DIR = "model"


@dataclass(frozen=True)
class TensorShard:
    """Where one saved tensor sits in the full tensor."""

    split_dim: int | None  # None: the file holds the whole tensor
    tensor_rank: int = 0
    tensor_size: int = 1
    full_size: int | None = None  # unpadded size along split_dim


def shard_file_name(*, tensor_rank: int, pipeline_rank: int) -> str:
    return f"tp{tensor_rank:02d}-pp{pipeline_rank:02d}.safetensors"


def write_model_shard(path: str | Path, *, tensors: dict[str, torch.Tensor], shards: dict[str, TensorShard]) -> None:
    """Write one rank's tensors; `shards` describes every tensor that is a slice of a larger one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {key: t.detach().contiguous().cpu() for key, t in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(contiguous, str(tmp), metadata=shard_metadata(tensors=tensors, shards=shards))
    tmp.replace(path)


def shard_metadata(*, tensors: dict[str, torch.Tensor], shards: dict[str, TensorShard]) -> dict[str, str]:
    """The safetensors header metadata of one rank's file: how each split tensor is split."""
    layout = {key: shards[key].__dict__ for key in tensors if key in shards and shards[key].split_dim is not None}
    return {"megamobi_shards": json.dumps(layout)}


def read_full_model(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the plain model, merged from whichever layout wrote the checkpoint."""
    return read_full_tensors(checkpoint_dir, MODEL_DIR)


def read_full_tensors(checkpoint_dir: str | Path, subdir: str) -> dict[str, torch.Tensor]:
    """Merge the shard files of `checkpoint_dir/subdir` (model weights, or optimizer state)."""
    model_dir = Path(checkpoint_dir) / subdir
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no tensor files (*.safetensors); is this a megamobi checkpoint?")
    whole: dict[str, torch.Tensor] = {}
    pieces: dict[str, list[tuple[TensorShard, torch.Tensor]]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            layout = json.loads((f.metadata() or {}).get("megamobi_shards", "{}"))
            for key in f.keys():
                if key in layout:
                    pieces.setdefault(key, []).append((TensorShard(**layout[key]), f.get_tensor(key)))
                elif key in whole:
                    raise ValueError(f"{file}: tensor {key!r} is stored whole in two files")
                else:
                    whole[key] = f.get_tensor(key)
    for key, parts in pieces.items():
        parts.sort(key=lambda p: p[0].tensor_rank)
        spec = parts[0][0]
        ranks = [p[0].tensor_rank for p in parts]
        if ranks != list(range(spec.tensor_size)):
            raise ValueError(f"{model_dir}: tensor {key!r} has shards for tensor ranks {ranks}, expected 0..{spec.tensor_size - 1}")
        merged = torch.cat([p[1] for p in parts], dim=spec.split_dim)
        if spec.full_size is not None:
            merged = merged.narrow(spec.split_dim, 0, spec.full_size).clone()
        whole[key] = merged
    return whole


def write_full_model(checkpoint_dir: str | Path, state_dict: dict[str, torch.Tensor]) -> None:
    """The whole plain-model state dict as one unsharded file (what a T=1, P=1 run writes)."""
    path = Path(checkpoint_dir) / MODEL_DIR / shard_file_name(tensor_rank=0, pipeline_rank=0)
    write_model_shard(path, tensors=state_dict, shards={})
