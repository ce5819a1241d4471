"""The MFU formula (megamobi.model.flops_per_token) against FLOPs counted by PyTorch itself:
`torch.utils.flop_counter.FlopCounterMode` over a real forward + backward of the model.

FlopCounterMode counts matrix products (mm, bmm, attention): every call, so the shared FFN is counted
in every layer that runs it, as the formula does. It does not count elementwise work; the formula's
6 x parameters term includes the RMSNorm weights (2 per layer + the final one), which are elementwise.
So the counted FLOPs must equal the formula minus 6 x (norm weights) EXACTLY (integers, no tolerance);
that difference is the whole gap, 6.7e-5 of the formula for mobillama-0.5b (8.2827e9 vs 8.2833e9 per
token). SDPA runs its math backend here: its fused CPU kernel is not registered with the counter,
and the math backend computes the full s x s scores as the formula (PaLM's 12 L h s) counts them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megamobi.model import MobiLlama, flops_per_token, parameter_counts
from megamobi.model_config import ModelConfig, load_model_config


def counted_flops_per_token(model: MobiLlama, input_ids: torch.Tensor) -> float:
    """Forward, the loss and backward of one batch under FlopCounterMode, per input token."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(input_ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), input_ids.flatten())
        loss.backward()
    return counter.get_total_flops() / input_ids.numel()


def norm_weights(config: ModelConfig) -> int:
    return (2 * config.num_layers + 1) * config.hidden_size


@pytest.mark.parametrize("ffn_sharing, kv_heads", [("shared", None), ("per_layer", None), ("shared", 2)])
def test_formula_equals_counted_flops_on_real_weights(ffn_sharing, kv_heads):
    """A small model with real weights and a real backward (CPU, a fraction of a second)."""
    config = ModelConfig(name="flops", hidden_size=64, num_layers=3, num_attention_heads=4, intermediate_size=96,
                         vocab_size=128, max_seq_len=32, ffn_sharing=ffn_sharing, num_key_value_heads=kv_heads)
    torch.manual_seed(0)
    model = MobiLlama(config)
    counted = counted_flops_per_token(model, torch.randint(0, config.vocab_size, (2, 32)))
    formula = flops_per_token(config, seq_len=32)
    assert counted == formula - 6 * norm_weights(config)
    assert all(p.grad is not None for p in model.parameters())  # the backward really ran through everything


@pytest.mark.parametrize("name", ["mobillama-0.5b", "large-base"])
def test_formula_equals_counted_flops_for_the_paper_models(name):
    """The real configs at sequence 2048, on the meta device (shapes only: the count needs no values)."""
    config = load_model_config(name)
    with torch.device("meta"):
        model = MobiLlama(config)
        input_ids = torch.zeros(1, 2048, dtype=torch.long)
    counted = counted_flops_per_token(model, input_ids)
    formula = flops_per_token(config, seq_len=2048)
    assert counted == formula - 6 * norm_weights(config)
    assert abs(counted - formula) / formula < 1e-4  # the norms: 6.7e-5 of the total
    if name == "mobillama-0.5b":
        assert (round(counted / 1e9, 4), round(formula / 1e9, 4)) == (8.2827, 8.2833)
        # 6 x the unique parameter count (the shared FFN once) would undercount by about 1.9x.
        unique = 6 * parameter_counts(config)["params_unique"] + 12 * config.num_layers * config.hidden_size * 2048
        assert 1.85 < counted / unique < 1.95
