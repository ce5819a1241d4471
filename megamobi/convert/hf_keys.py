"""Names and configs in both directions between megamobi and the Hugging Face Llama format.

megamobi stores the shared FFN once (`mlps.0.*`); Hugging Face Llama has no notion of sharing, so
the exported checkpoint holds one copy per layer, exactly like the released MobiLlama checkpoints.
Key mapping (i = layer, j = 0 when shared, j = i when per_layer):

    embed_tokens.weight                          model.embed_tokens.weight
    layers.{i}.input_layernorm.weight            model.layers.{i}.input_layernorm.weight
    layers.{i}.self_attn.{q,k,v,o}_proj.weight   model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers.{i}.post_attention_layernorm.weight   model.layers.{i}.post_attention_layernorm.weight
    mlps.{j}.{gate,up,down}_proj.weight          model.layers.{i}.mlp.{gate,up,down}_proj.weight
    norm.weight                                  model.norm.weight
    lm_head.weight                               lm_head.weight
    (derived from rope_theta)                    model.layers.{i}.self_attn.rotary_emb.inv_freq
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from megamobi.convert.errors import ConversionError
from megamobi.model_config import ModelConfig

LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
ATTENTION_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
BOS_TOKEN_ID, EOS_TOKEN_ID = 1, 2

# Export dtype names (CLI spelling) -> torch dtype, and torch dtype -> config.json spelling.
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def megamobi_keys(config: ModelConfig) -> list[str]:
    """Every key of the plain megamobi state dict for `config`, in model order."""
    keys = ["embed_tokens.weight"]
    for i in range(config.num_layers):
        keys.append(f"layers.{i}.input_layernorm.weight")
        keys += [f"layers.{i}.self_attn.{p}.weight" for p in ATTENTION_PROJS]
        keys.append(f"layers.{i}.post_attention_layernorm.weight")
    for j in range(config.num_mlps):
        keys += [f"mlps.{j}.{p}.weight" for p in MLP_PROJS]
    return keys + ["norm.weight", "lm_head.weight"]


def check_megamobi_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig, *, where: str) -> None:
    """Refuse a state dict whose keys or shapes do not fit `config` (a config/weights mismatch would
    otherwise surface as a cryptic error deep inside transformers or llama.cpp)."""
    expected = megamobi_keys(config)
    missing = [k for k in expected if k not in state_dict]
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ConversionError(
            f"{where}: weights do not match the model config ({config.ffn_sharing} FFN, {config.num_layers} layers): "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    d, kv_dim, v, f = config.hidden_size, config.kv_heads * config.head_dim, config.vocab_size, config.intermediate_size
    shapes = {"embed_tokens.weight": (v, d), "lm_head.weight": (v, d), "norm.weight": (d,)}
    for key in expected:
        name = key.rsplit(".", 2)[-2]
        shape = shapes.get(key) or {
            "input_layernorm": (d,), "post_attention_layernorm": (d,), "q_proj": (d, d), "k_proj": (kv_dim, d),
            "v_proj": (kv_dim, d), "o_proj": (d, d), "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f),
        }[name]
        if tuple(state_dict[key].shape) != shape:
            raise ConversionError(f"{where}: {key} has shape {tuple(state_dict[key].shape)}, the model config implies {shape}")


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """The `rotary_emb.inv_freq` buffer the released checkpoints store per layer (Llama's formula, fp32)."""
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim
    return 1.0 / (config.rope_theta ** exponents)


def hf_tensors(
    state_dict: dict[str, torch.Tensor], config: ModelConfig, *, include_inv_freq: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) in the released checkpoints' order. The shared MLP is yielded once per layer
    as the SAME tensor object: callers copy it only when they write it, so memory stays one copy."""
    yield "model.embed_tokens.weight", state_dict["embed_tokens.weight"]
    inv_freq = rope_inv_freq(config) if include_inv_freq else None
    for i in range(config.num_layers):
        prefix, j = f"model.layers.{i}", (0 if config.ffn_sharing == "shared" else i)
        for p in ATTENTION_PROJS:
            yield f"{prefix}.self_attn.{p}.weight", state_dict[f"layers.{i}.self_attn.{p}.weight"]
        if inv_freq is not None:
            yield f"{prefix}.self_attn.rotary_emb.inv_freq", inv_freq
        for p in MLP_PROJS:
            yield f"{prefix}.mlp.{p}.weight", state_dict[f"mlps.{j}.{p}.weight"]
        for norm in LAYER_NORMS:
            yield f"{prefix}.{norm}.weight", state_dict[f"layers.{i}.{norm}.weight"]
    yield "model.norm.weight", state_dict["norm.weight"]
    yield "lm_head.weight", state_dict["lm_head.weight"]


def hf_config(config: ModelConfig, *, dtype: torch.dtype, bos_token_id: int = BOS_TOKEN_ID,
              eos_token_id: int = EOS_TOKEN_ID) -> dict[str, Any]:
    """config.json for stock `LlamaForCausalLM` (not the released `MobiLlamaForCausalLM` + remote code:
    the exported weights already hold the FFN in every layer, so no custom code is needed)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        # What the k/v weights really hold; the released configs say 4 while storing full MHA.
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": config.init_std,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": config.vocab_size,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        # transformers 5 reads `dtype`, 4.x reads `torch_dtype`: write both.
        "dtype": HF_DTYPE_NAMES[dtype],
        "torch_dtype": HF_DTYPE_NAMES[dtype],
        # Ignored by transformers (kept as a plain attribute); lets `from-hf` restore the exact megamobi
        # config, e.g. shared vs per_layer for a 1-layer model, and tells a reader what this is.
        "megamobi": {
            "family": "MobiLlama",
            "name": config.name,
            "ffn_sharing": config.ffn_sharing,
            "activation_checkpointing": config.activation_checkpointing,
        },
    }


def hf_layer_mlp_key(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def megamobi_key_for_hf(hf_key: str) -> str | None:
    """The megamobi key for a non-MLP HF key; None for keys megamobi derives (inv_freq) or MLP keys,
    which depend on the sharing decision and are handled by the importer."""
    if hf_key.endswith("rotary_emb.inv_freq") or ".mlp." in hf_key:
        return None
    if hf_key == "lm_head.weight":
        return hf_key
    if hf_key.startswith("model."):
        return hf_key[len("model."):]
    raise ConversionError(f"unexpected tensor {hf_key!r} in a Llama checkpoint")
