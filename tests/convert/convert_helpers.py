"""Small MobiLlama checkpoints (shared, per-layer, GQA) for the converter tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megamobi.checkpointing.manifest import write_manifest
from megamobi.checkpointing.model_files import write_full_model
from megamobi.model import MobiLlama
from megamobi.model_config import ModelConfig, load_model_config

VOCAB = 320  # the SentencePiece model of the sp_model_path fixture has exactly 320 pieces


def small_config(kind: str = "shared", **overrides) -> ModelConfig:
    # init_std 0.1 (not 0.02): sharper attention, so a RoPE or layout mistake moves the logits by ~1, not ~1e-3.
    base = dataclasses.replace(load_model_config("tiny"), name=f"conv-{kind}", vocab_size=VOCAB, hidden_size=64,
                               num_layers=3, num_attention_heads=4, intermediate_size=96, max_seq_len=64,
                               rms_norm_eps=1e-5, rope_theta=10000.0, init_std=0.1)
    kinds = {
        "shared": {},
        "per_layer": {"ffn_sharing": "per_layer"},
        "gqa": {"num_key_value_heads": 2},
    }
    return dataclasses.replace(base, **kinds[kind], **overrides)


CONFIG_KINDS = ["shared", "per_layer", "gqa"]


def build_model(config: ModelConfig, *, seed: int = 0) -> MobiLlama:
    torch.manual_seed(seed)
    model = MobiLlama(config).eval()
    # Norm weights start at ones; perturb them so a mix-up between the two norms of a layer shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_checkpoint(directory: Path, model: MobiLlama) -> Path:
    """A checkpoint as the training driver leaves it: model files, another payload file, manifest last."""
    write_full_model(directory, model.state_dict())
    (directory / "optimizer").mkdir()
    (directory / "optimizer" / "state.pt").write_bytes(b"optimizer state stand-in")
    write_manifest(directory, model_config=model.config, info={"step": 7, "consumed_samples": 14, "consumed_tokens": 896})
    return directory


def random_tokens(vocab: int, *, batch: int = 2, seq: int = 24, seed: int = 123) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
