"""megamobi checkpoint -> Hugging Face directory loadable by stock `transformers.LlamaForCausalLM`.

Output: `model-0000K-of-0000N.safetensors` + `model.safetensors.index.json` (always an index, even
for one shard, so scripts see one layout), `config.json`, `generation_config.json`, and with
`tokenizer=` the SentencePiece model plus `tokenizer_config.json` / `special_tokens_map.json`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from megamobi.convert.checkpoint_input import load_checkpoint
from megamobi.convert.errors import ConversionError
from megamobi.convert.hf_keys import TORCH_DTYPES, hf_config, hf_tensors
from megamobi.convert.tokenizer import SentencePieceInfo, read_sentencepiece, write_hf_tokenizer_files

DEFAULT_MAX_SHARD_SIZE = "2GB"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'2GB' (decimal, as Hugging Face counts), '500MiB', '1000000' -> bytes."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
        if not match or match.group(2) not in _SIZE_UNITS:
            raise ConversionError(f"shard size {text!r}: expected a size such as 2GB, 500MB, 4GiB or a byte count")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size <= 0:
        raise ConversionError(f"shard size {text!r} must be positive")
    return size


def plan_shards(entries: list[tuple[str, torch.Tensor]], *, max_shard_bytes: int, dtype: torch.dtype) -> list[list[str]]:
    """Group keys into shards in order; a tensor larger than the limit gets a shard of its own."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    used = 0
    for key, tensor in entries:
        nbytes = tensor.numel() * (4 if key.endswith("inv_freq") else itemsize)
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    return shards


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prepare_output_dir(output_dir: Path, *, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"{output_dir}: exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(f"{output_dir}: directory is not empty; choose a new one or pass --overwrite")
    output_dir.mkdir(parents=True, exist_ok=True)
    # Stale shards from an earlier export with another shard count would be picked up by globbing tools.
    for old in list(output_dir.glob("model-*-of-*.safetensors")) + list(output_dir.glob("model.safetensors*")):
        old.unlink()


def export_hf(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    *,
    dtype: str = "bf16",
    tokenizer: str | Path | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    include_inv_freq: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    verified: bool = False,
) -> dict:
    """Convert; returns the written config.json as a dict. `include_inv_freq`: also store the per-layer
    `rotary_emb.inv_freq` the released checkpoints carry (transformers ignores it; see docs/convert.md).
    `verified`: the caller has just checked the checkpoint's files against its manifest (not hashed again)."""
    if dtype not in TORCH_DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(TORCH_DTYPES)}")
    torch_dtype = TORCH_DTYPES[dtype]
    max_shard_bytes = parse_size(max_shard_size)
    sp_info: SentencePieceInfo | None = read_sentencepiece(tokenizer) if tokenizer is not None else None
    config, state_dict = load_checkpoint(checkpoint_dir, verified=verified)
    if sp_info is not None and sp_info.vocab_size > config.vocab_size:
        raise ConversionError(f"{tokenizer}: {sp_info.vocab_size} tokens, more than the model's vocab_size {config.vocab_size}")
    output_dir = Path(output_dir)
    _prepare_output_dir(output_dir, overwrite=overwrite)

    entries = list(hf_tensors(state_dict, config, include_inv_freq=include_inv_freq))
    shards = plan_shards(entries, max_shard_bytes=max_shard_bytes, dtype=torch_dtype)
    by_key = dict(entries)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    bar = tqdm(total=len(entries), desc="to-hf", unit="tensor", disable=not progress)
    for number, keys in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        # One fresh tensor per key: safetensors refuses tensors that share memory, and the shared
        # FFN is one tensor yielded for every layer. Only one shard's copies exist at a time.
        tensors = {}
        for key in keys:
            # inv_freq stays fp32, as a float buffer computed in fp32 does in the released files.
            target = torch.float32 if key.endswith("inv_freq") else torch_dtype
            tensors[key] = by_key[key].detach().to(dtype=target, copy=True).contiguous()
            total_bytes += tensors[key].numel() * tensors[key].element_size()
            weight_map[key] = file_name
        save_file(tensors, str(output_dir / file_name), metadata={"format": "pt"})
        # safetensors creates files 0600; an export is meant to be shared, so honour the umask instead.
        os.chmod(output_dir / file_name, 0o666 & ~_umask())
        bar.update(len(keys))
        del tensors
    bar.close()

    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (output_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    bos = sp_info.bos_id if sp_info is not None and sp_info.bos_id >= 0 else 1
    eos = sp_info.eos_id if sp_info is not None and sp_info.eos_id >= 0 else 2
    config_json = hf_config(config, dtype=torch_dtype, bos_token_id=bos, eos_token_id=eos)
    (output_dir / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    generation = {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos}
    (output_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if sp_info is not None:
        write_hf_tokenizer_files(sp_info, output_dir, model_max_length=config.max_seq_len)
    return config_json
