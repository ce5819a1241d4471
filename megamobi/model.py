"""MobiLlama in plain PyTorch: a Llama-2 decoder whose layers all call ONE shared feed-forward block.

Read top to bottom: RMSNorm, rotary embeddings, attention, the SwiGLU MLP, a decoder layer, the
model. Nothing here knows about parallelism; `megamobi.parallel` rewrites a built model for
tensor and pipeline parallelism, the way torchtitan applies a plan to a plain model.

The one idea of MobiLlama lives in `MobiLlama.mlps`: with `ffn_sharing: shared` it holds a single
MLP and every layer calls it (each layer keeps its own two norms), so autograd sums every layer's
contribution into that MLP's gradient. With `per_layer` it holds one MLP per layer (the baselines).

`python -m megamobi.model --config configs/mobillama-0.5b.yaml [--json]` prints parameter and
FLOP counts.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megamobi.model_config import ModelConfig, load_model_config

# Optional GPU extra, used when importable and the tensors are on CUDA; plain PyTorch otherwise.
# Other kernels (flash-attn, liger-kernel, compile) are chosen outside this file: megamobi/kernels.
try:  # NVIDIA apex (not the unrelated PyPI package named "apex", which has no `normalization`)
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine
except ImportError:
    fused_rms_norm_affine = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_rms_norm_affine is not None and x.is_cuda:
            return fused_rms_norm_affine(x, self.weight, self.weight.shape, self.eps)
        # Normalise in fp32 for stability under bf16, as Llama does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(*, head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim] in the Llama (rotate-half) layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [seq, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def rotate_query_key(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [b, heads, t, d]; k, v: [b, kv_heads, t, d] -> [b, heads, t, d]. PyTorch's SDPA, which
    picks its own flash / memory-efficient / cuDNN kernel on a GPU."""
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim = config.head_dim
        # Head counts are attributes, not derived from config at call time, so that the tensor
        # parallel plan can set them to the heads held by this rank.
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.kv_heads
        d, kv_dim = config.hidden_size, config.kv_heads * config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_dim, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        # Plain functions, swappable by megamobi.kernels (flash-attn, liger's rotary) without a
        # new class or new state_dict keys.
        self.rotate = rotate_query_key
        self.attend = causal_attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotate(q, k, cos, sin)
        out = self.attend(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm MLP. The MLP is passed in: it may be shared by all layers."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def attention_block(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x + self.self_attn(self.input_layernorm(x), cos, sin)

    def forward(self, x: torch.Tensor, *, mlp: MLP, cos: torch.Tensor, sin: torch.Tensor,
                checkpoint_attention: bool = False) -> torch.Tensor:
        if checkpoint_attention:  # selective activation checkpointing: recompute the attention block only
            h = checkpoint(self.attention_block, x, cos, sin, use_reentrant=False)
        else:
            h = self.attention_block(x, cos, sin)
        return h + mlp(self.post_attention_layernorm(h))


class MobiLlama(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.mlps = nn.ModuleList(MLP(config) for _ in range(config.num_mlps))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        cos, sin = rotary_tables(head_dim=config.head_dim, max_seq_len=config.max_seq_len, theta=config.rope_theta)
        # Derived from the config, so not part of the state dict.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, init_std) for every matrix, ones for norms (the Llama / MobiLlama recipe)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def mlp_for_layer(self, index: int) -> MLP:
        return self.mlps[0 if self.config.ffn_sharing == "shared" else index]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [batch, seq] -> logits [batch, seq, vocab]."""
        seq_len = input_ids.shape[1]
        if seq_len > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        x = self.embed_tokens(input_ids)
        # "full": recompute whole layers in backward; "selective": only their attention blocks.
        mode = self.config.activation_checkpointing if self.training else "none"
        for i, layer in enumerate(self.layers):
            mlp = self.mlp_for_layer(i)
            if mode == "full":
                x = checkpoint(layer, x, mlp=mlp, cos=cos, sin=sin, use_reentrant=False)
            else:
                x = layer(x, mlp=mlp, cos=cos, sin=sin, checkpoint_attention=mode == "selective")
        return self.lm_head(self.norm(x))


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy in fp32; labels already shifted (labels = sample[1:])."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


# ---------------------------------------------------------------------------------------------
# Counting: parameters and FLOPs. The shared FFN is stored once but RUNS in every layer, so an
# MFU computed from the unique parameter count would undercount the work by about 1.9x.
# ---------------------------------------------------------------------------------------------


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    d, v, n_layers = config.hidden_size, config.vocab_size, config.num_layers
    attention = 2 * d * d + 2 * d * config.kv_heads * config.head_dim
    mlp = 3 * d * config.intermediate_size
    norms = 2 * d
    embedding = lm_head = v * d
    final_norm = d
    per_layer = attention + norms
    unique = embedding + n_layers * per_layer + config.num_mlps * mlp + final_norm + lm_head
    effective = embedding + n_layers * (per_layer + mlp) + final_norm + lm_head
    return {
        "params_unique": unique,
        "params_effective": effective,
        "params_embedding": embedding,
        "params_mlp_unique": config.num_mlps * mlp,
    }


def flops_per_token(config: ModelConfig, *, seq_len: int | None = None) -> int:
    """Training FLOPs per token: 6 x effective params (with LM head, without the input embedding)
    + 12 x layers x hidden x seq_len for the attention scores (the PaLM / Megatron formula)."""
    seq_len = config.max_seq_len if seq_len is None else seq_len
    counts = parameter_counts(config)
    dense = counts["params_effective"] - counts["params_embedding"]
    return 6 * dense + 12 * config.num_layers * config.hidden_size * seq_len


def model_summary(config: ModelConfig, *, seq_len: int | None = None) -> dict:
    seq_len = config.max_seq_len if seq_len is None else seq_len
    return {
        "name": config.name,
        "ffn_sharing": config.ffn_sharing,
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.kv_heads,
        "vocab_size": config.vocab_size,
        "seq_len": seq_len,
        **parameter_counts(config),
        "flops_per_token": flops_per_token(config, seq_len=seq_len),
    }


def main(argv: list[str] | None = None) -> int:
    from megamobi.cli_support import fail, positive_int
    from megamobi.config_io import ConfigError

    parser = argparse.ArgumentParser(prog="python -m megamobi.model", description="Inspect a MobiLlama model config.")
    parser.add_argument("--config", required=True, help="configs/<name>.yaml, or just a name such as mobillama-0.5b")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="sequence length for the FLOP count (default: max_seq_len)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    args = parser.parse_args(argv)
    try:
        summary = model_summary(load_model_config(args.config), seq_len=args.seq_len)
    except ConfigError as err:
        return fail(err)
    if args.json:
        print(json.dumps(summary))
        return 0
    s = summary
    print(f"{s['name']}: {s['num_layers']} layers x hidden {s['hidden_size']}, {s['num_attention_heads']} heads "
          f"({s['num_key_value_heads']} KV), FFN {s['intermediate_size']} {s['ffn_sharing']}, vocab {s['vocab_size']}")
    print(f"  parameters (unique)     {s['params_unique']:>16,}  ({s['params_unique'] / 1e9:.3f} B)")
    print(f"  parameters (effective)  {s['params_effective']:>16,}  (shared FFN counted once per layer)")
    print(f"  training FLOPs / token  {s['flops_per_token']:>16,}  ({s['flops_per_token'] / 1e9:.2f} GFLOP at seq {s['seq_len']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
