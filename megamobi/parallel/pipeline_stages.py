"""The pieces of MobiLlama that DeepSpeed's PipelineModule chains together, one per pipeline layer.

A plain decoder layer becomes two pipeline layers so that the shared FFN can be a DeepSpeed tied
module (one replica per stage) that is called directly, without `forward_fn` (which DeepSpeed 0.19.8
leaves out of checkpoints):

    EmbeddingPipe                 input_ids -> h
    AttentionBlockPipe(i)         h -> (h + attn_i(norm_in_i(h)), norm_post_i(that))
    MLPBlockPipe (tied or per i)  (h, normed) -> h + mlp(normed)
    ...
    HeadPipe                      h -> lm_head(norm(h))   (local vocabulary logits under TP)

Every piece wraps modules of an already-built plain (and tensor-parallel) MobiLlama, so the weights
are exactly the plain model's. With sequence parallelism the activations between pieces (and
between stages) are this tensor rank's sequence chunk [batch, seq/T, hidden]; AttentionBlockPipe
then takes the full length as T x its input's, for the rotary tables. `full_key(name)` maps a piece's parameter name back to the plain
model's state_dict key (used by the shard specs for checkpoints and conversion).
"""

from __future__ import annotations

import torch
from torch import nn

from megamobi.model import MLP, DecoderLayer, RMSNorm


class EmbeddingPipe(nn.Module):
    def __init__(self, embed_tokens: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens

    def full_key(self, name: str) -> str:
        return name

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class AttentionBlockPipe(nn.Module):
    def __init__(self, layer: DecoderLayer, *, layer_index: int, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                 sequence_parallel_size: int = 1):
        super().__init__()
        self.layer = layer
        self.layer_index = layer_index
        # T under sequence parallelism (the input is a 1/T chunk of the sequence), else 1.
        self.sequence_parallel_size = sequence_parallel_size
        # Each piece owns its rotary tables (derived from the config, not saved), so it can run on any stage.
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)

    def full_key(self, name: str) -> str:
        return f"layers.{self.layer_index}." + name.removeprefix("layer.")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = x.shape[1] * self.sequence_parallel_size  # the attention runs on the full sequence
        h = self.layer.attention_block(x, self.rope_cos[:seq_len], self.rope_sin[:seq_len])
        return h, self.layer.post_attention_layernorm(h)


class MLPBlockPipe(nn.Module):
    """h + mlp(normed). As the shared FFN it is DeepSpeed's tied module (the same instance runs at
    every layer position on its stage); per-layer configs get one ordinary piece per layer."""

    def __init__(self, mlp: MLP, *, mlp_index: int = 0):
        super().__init__()
        self.mlp = mlp
        self.mlp_index = mlp_index

    def full_key(self, name: str) -> str:
        return f"mlps.{self.mlp_index}." + name.removeprefix("mlp.")

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, normed = inputs
        return h + self.mlp(normed)


class HeadPipe(nn.Module):
    def __init__(self, norm: RMSNorm, lm_head: nn.Module):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def full_key(self, name: str) -> str:
        return name

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))


PIPE_PIECES = (EmbeddingPipe, AttentionBlockPipe, MLPBlockPipe, HeadPipe)
