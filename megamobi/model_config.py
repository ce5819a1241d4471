"""The model's shape: one typed dataclass, loaded from `configs/<name>.yaml` and validated on creation."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from megamobi.config_io import ConfigError, from_dict, read_yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int = 32000
    # None means multi-head attention (what every released MobiLlama checkpoint really uses).
    num_key_value_heads: int | None = None
    # "shared": ONE MLP used by every layer (MobiLlama). "per_layer": the baselines and large-base.
    ffn_sharing: Literal["shared", "per_layer"] = "shared"
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    # The released configs say 1e-5; the paper's text says 1e-6. We default to the released value.
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    # "none", "full" (recompute every decoder layer in backward) or "selective" (recompute only the
    # attention blocks). true / false are still accepted and mean "full" / "none". Typed Any so that
    # __post_init__ (checkpointing_mode) gives the one clear message for every bad value.
    activation_checkpointing: Any = "none"

    def __post_init__(self) -> None:
        for field in ("hidden_size", "num_layers", "num_attention_heads", "intermediate_size", "vocab_size", "max_seq_len"):
            value = getattr(self, field)
            if value <= 0:
                raise ConfigError(f"{field} must be a positive integer, got {value}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head dimension {self.head_dim} must be even for rotary embeddings")
        kv = self.kv_heads
        if kv <= 0 or self.num_attention_heads % kv:
            raise ConfigError(
                f"num_key_value_heads {kv} must be positive and divide num_attention_heads {self.num_attention_heads}"
            )
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("rope_theta, rms_norm_eps and init_std must be positive")
        # Frozen dataclass: normalise the back-compatible booleans in place.
        object.__setattr__(self, "activation_checkpointing", checkpointing_mode(self.activation_checkpointing))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @property
    def num_mlps(self) -> int:
        return 1 if self.ffn_sharing == "shared" else self.num_layers


CHECKPOINTING_MODES = ("none", "full", "selective")


def checkpointing_mode(value: bool | str | None) -> str:
    """true/false (the old spelling) -> "full"/"none"; a mode name is returned as is."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "full"
    if value not in CHECKPOINTING_MODES:
        raise ConfigError(f"activation_checkpointing must be one of none, full, selective (or true / false), got {value!r}")
    return value


def resolve_model_config_path(name_or_path: str | Path) -> Path:
    """`configs/tiny.yaml`, a path anywhere, or just `tiny` (looked up in the repo's configs/)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    return CONFIG_DIR / f"{name_or_path}.yaml"


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    path = resolve_model_config_path(name_or_path)
    if not path.exists() and Path(name_or_path).is_dir():
        raise ConfigError(f"{name_or_path}: is a directory; give a model YAML file or a name in configs/")
    return from_dict(ModelConfig, read_yaml(path), where=str(path))
