"""Hugging Face Llama / MobiLlama checkpoint -> megamobi checkpoint, to continue pretraining.

Handles what the released MobiLlama checkpoints actually contain: the shared FFN stored once per
layer (kept once when all copies are bitwise identical), `num_key_value_heads: 4` in config.json
while k/v are full multi-head (the KV head count is taken from the k_proj weight), and per-layer
`rotary_emb.inv_freq` buffers (dropped: megamobi derives RoPE from rope_theta).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from megamobi.checkpointing.manifest import MANIFEST_NAME, write_manifest
from megamobi.checkpointing.model_files import MODEL_DIR, write_full_model
from megamobi.config_io import ConfigError
from megamobi.convert.errors import ConversionError
from megamobi.convert.hf_keys import (
    MLP_PROJS,
    TORCH_DTYPES,
    check_megamobi_state_dict,
    hf_layer_mlp_key,
    megamobi_key_for_hf,
)
from megamobi.model_config import ModelConfig

FfnSharing = Literal["shared", "per_layer", "auto"]
REQUIRED_HF_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


class HFWeights:
    """Lazy access to the tensors of a HF model directory, whatever files hold them: sharded or single
    safetensors, or pytorch_model.bin (loaded with weights_only=True: never unpickles code)."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        self.key_to_file: dict[str, Path] = {}
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = model_dir / index_name
            if index_path.is_file():
                weight_map = json.loads(index_path.read_text())["weight_map"]
                self.key_to_file = {key: model_dir / name for key, name in weight_map.items()}
                break
        else:
            for single in ("model.safetensors", "pytorch_model.bin"):
                if (model_dir / single).is_file():
                    self.key_to_file = dict.fromkeys(self._file_keys(model_dir / single), model_dir / single)
                    break
            else:
                raise ConversionError(f"{model_dir}: no weights found (looked for model.safetensors[.index.json] "
                                      f"and pytorch_model.bin[.index.json])")
        missing = sorted({str(p.name) for p in self.key_to_file.values() if not p.is_file()})
        if missing:
            raise ConversionError(f"{model_dir}: the index names weight files that are missing: {', '.join(missing)}")

    def _load_bin(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._bin_cache:
            try:  # mmap keeps a multi-GB file out of memory; the pre-zip legacy format cannot be mmapped.
                self._bin_cache[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                try:
                    self._bin_cache[path] = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as err:  # weights_only refuses anything but tensors and plain containers
                    raise ConversionError(f"{path}: cannot load it as a plain state dict (weights_only=True): {err}") from err
        return self._bin_cache[path]

    def _file_keys(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        return list(self._load_bin(path).keys())

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def get(self, key: str) -> torch.Tensor:
        if key not in self.key_to_file:
            raise ConversionError(f"{self.model_dir}: tensor {key!r} not found in the weight files")
        path = self.key_to_file[key]
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(key)
        return self._load_bin(path)[key]


def _read_hf_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{model_dir}: no config.json; is this a Hugging Face model directory?")
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") not in ("llama", "mobillama"):
        raise ConversionError(f"{path}: model_type {cfg.get('model_type')!r}; only Llama / MobiLlama models can be imported")
    unsupported = []
    if cfg.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {cfg['hidden_act']!r} (megamobi uses silu)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        unsupported.append("attention_bias / mlp_bias (megamobi has no biases)")
    # transformers 4 writes `rope_scaling` (None when plain); transformers 5 writes `rope_parameters`.
    scaling = cfg.get("rope_scaling") or {}
    rope_types = {scaling.get("rope_type", scaling.get("type", "default")),
                  (cfg.get("rope_parameters") or {}).get("rope_type", "default")} - {"default"}
    if rope_types:
        unsupported.append(f"RoPE scaling {sorted(rope_types)[0]!r}")
    missing = [key for key in REQUIRED_HF_KEYS if not isinstance(cfg.get(key), int) or cfg[key] <= 0]
    if missing:
        unsupported.append(f"missing or non-positive {', '.join(missing)}")
    elif cfg["hidden_size"] % cfg["num_attention_heads"]:
        unsupported.append("hidden_size not divisible by num_attention_heads")
    if unsupported:
        raise ConversionError(f"{path}: unsupported by megamobi: {'; '.join(unsupported)}")
    return cfg


def _rope_theta(cfg: dict[str, Any]) -> float:
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    return float((cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def first_mlp_difference(weights: HFWeights, num_layers: int) -> tuple[int, str] | None:
    """(layer, tensor) of the first per-layer MLP copy that differs bitwise from layer 0's, or None.
    Copies are loaded one at a time, so 22 copies of a 0.5B model's FFN never sit in memory together."""
    for proj in MLP_PROJS:
        reference = weights.get(hf_layer_mlp_key(0, proj))
        for layer in range(1, num_layers):
            other = weights.get(hf_layer_mlp_key(layer, proj))
            if other.dtype != reference.dtype or other.shape != reference.shape or not torch.equal(other, reference):
                return layer, hf_layer_mlp_key(layer, proj)
    return None


def _check_output_dir(output_dir: Path, *, overwrite: bool) -> bool:
    """True when an existing megamobi checkpoint there is to be replaced (--overwrite). Anything else
    that is in the way (a file, a directory with other contents) is refused, never deleted."""
    if not output_dir.exists():
        return False
    if not output_dir.is_dir():
        raise ConversionError(f"--output {output_dir}: is a file; give a new directory for the checkpoint")
    if not any(output_dir.iterdir()):
        return False
    if not (output_dir / MANIFEST_NAME).is_file():
        raise ConversionError(f"--output {output_dir}: is not an empty directory nor a megamobi checkpoint; "
                              "choose a new directory")
    if not overwrite:
        raise ConversionError(f"--output {output_dir}: already holds a checkpoint; choose a new directory or pass "
                              "--overwrite to replace it")
    return True


def import_hf(
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    name: str | None = None,
    ffn_sharing: FfnSharing = "auto",
    dtype: str = "fp32",
    overwrite: bool = False,
) -> ModelConfig:
    """Write a megamobi checkpoint (model files + manifest, step 0) from a HF Llama / MobiLlama model.
    `dtype`: what the checkpoint stores; fp32 by default, the master-weight precision of training."""
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if ffn_sharing not in ("shared", "per_layer", "auto"):
        raise ConversionError(f"--ffn-sharing {ffn_sharing!r}: choose shared, per_layer or auto")
    if dtype not in TORCH_DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(TORCH_DTYPES)}")
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir}: model directory not found")
    replace_old = _check_output_dir(output_dir, overwrite=overwrite)
    cfg = _read_hf_config(model_dir)
    weights = HFWeights(model_dir)
    hint = cfg.get("megamobi") if isinstance(cfg.get("megamobi"), dict) else {}

    num_layers = int(cfg["num_hidden_layers"])
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = hidden // heads
    if cfg.get("head_dim") not in (None, head_dim):
        raise ConversionError(f"{model_dir}/config.json: head_dim {cfg['head_dim']} != hidden_size / heads = {head_dim}; "
                              f"megamobi does not support a separate head_dim")
    # The released MobiLlama configs say num_key_value_heads 4 but store full MHA k/v: trust the weights.
    k_rows = weights.get("model.layers.0.self_attn.k_proj.weight").shape[0]
    if k_rows % head_dim:
        raise ConversionError(f"{model_dir}: k_proj has {k_rows} rows, not a multiple of head_dim {head_dim}")
    kv_heads = k_rows // head_dim
    stated_kv = cfg.get("num_key_value_heads", heads)
    if stated_kv != kv_heads:
        print(f"note: config.json says num_key_value_heads {stated_kv}, the k/v weights hold {kv_heads} heads; using {kv_heads}")

    difference = first_mlp_difference(weights, num_layers) if num_layers > 1 else None
    if ffn_sharing == "shared" and difference is not None:
        layer, key = difference
        raise ConversionError(f"{model_dir}: --ffn-sharing shared, but the MLP copies differ: {key} (layer {layer}) "
                              f"is not identical to layer 0's; use --ffn-sharing per_layer")
    if ffn_sharing == "auto":
        if difference is not None:
            ffn_sharing = "per_layer"
        elif hint.get("ffn_sharing") in ("shared", "per_layer"):
            # What our own exporter recorded decides the cases the weights cannot: a 1-layer model,
            # or a per_layer model whose copies happen to match. Keeps to-hf -> from-hf exact.
            ffn_sharing = hint["ffn_sharing"]
        else:
            ffn_sharing = "shared" if num_layers > 1 else "per_layer"

    try:
        config = ModelConfig(
            name=name or hint.get("name") or model_dir.name,
            hidden_size=hidden,
            num_layers=num_layers,
            num_attention_heads=heads,
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            num_key_value_heads=None if kv_heads == heads else kv_heads,
            ffn_sharing=ffn_sharing,
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            rope_theta=_rope_theta(cfg),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            init_std=float(cfg.get("initializer_range", 0.02)),
            activation_checkpointing=hint.get("activation_checkpointing", "none"),  # bool in older exports
        )
    except ConfigError as err:
        raise ConversionError(f"{model_dir}/config.json: cannot build a megamobi model config: {err}") from err

    torch_dtype = TORCH_DTYPES[dtype]
    state_dict: dict[str, torch.Tensor] = {}
    for key in weights.keys():
        target = megamobi_key_for_hf(key)
        if target is not None:
            state_dict[target] = weights.get(key).to(torch_dtype)
    for j in range(config.num_mlps):
        for proj in MLP_PROJS:
            state_dict[f"mlps.{j}.{proj}.weight"] = weights.get(hf_layer_mlp_key(j, proj)).to(torch_dtype)
    if "lm_head.weight" not in state_dict and cfg.get("tie_word_embeddings"):
        # megamobi unties the head (as MobiLlama does); a tied source starts both from the same matrix.
        state_dict["lm_head.weight"] = state_dict["embed_tokens.weight"].clone()
    check_megamobi_state_dict(state_dict, config, where=str(model_dir))

    if replace_old:
        # The manifest first: a replacement cut short is then an incomplete checkpoint, never a valid old one.
        (output_dir / MANIFEST_NAME).unlink()
        shutil.rmtree(output_dir / MODEL_DIR, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_full_model(output_dir, state_dict)
    write_manifest(output_dir, model_config=config, info={
        "source": "from-hf", "hf_model": str(model_dir.resolve()), "step": 0, "consumed_samples": 0, "consumed_tokens": 0,
    })
    return config
