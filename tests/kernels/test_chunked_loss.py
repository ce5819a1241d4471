"""The plain-PyTorch chunked linear + cross entropy gives F.cross_entropy's loss and gradients."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megamobi.kernels.loss import (
    HiddenStatesHead,
    chunked_linear_cross_entropy,
    chunked_loss_for,
    default_chunk_tokens,
    defer_lm_head,
)
from megamobi.model import MobiLlama, language_model_loss
from megamobi.model_config import load_model_config


def plain_and_chunked(hidden, weight, labels, *, dtype=torch.float32, chunk_tokens=None, grad_scale=1.0):
    results = []
    for fn in ("plain", "chunked"):
        h = hidden.clone().to(dtype).requires_grad_()
        w = weight.clone().to(dtype).requires_grad_()
        if fn == "plain":
            loss = F.cross_entropy(F.linear(h, w).float(), labels)
        else:
            loss = chunked_linear_cross_entropy(h, w, labels, chunk_tokens=chunk_tokens)
        (loss * grad_scale).backward()
        results.append((loss.detach(), h.grad, w.grad))
    return results


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 1000])  # one token, a ragged last chunk, one chunk for all
def test_loss_and_gradients_equal_cross_entropy_in_fp32(chunk_tokens):
    torch.manual_seed(0)
    hidden, weight = torch.randn(300, 24), torch.randn(101, 24) * 0.5
    labels = torch.randint(0, 101, (300,))
    labels[::5] = -100  # padding / ignored positions: out of the loss and the mean
    (ref, ref_h, ref_w), (got, got_h, got_w) = plain_and_chunked(hidden, weight, labels, chunk_tokens=chunk_tokens,
                                                                 grad_scale=0.37)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-7)


def test_bf16_matches_the_plain_bf16_path():
    torch.manual_seed(1)
    hidden, weight, labels = torch.randn(64, 16), torch.randn(50, 16), torch.randint(0, 50, (64,))
    (ref, ref_h, ref_w), (got, got_h, got_w) = plain_and_chunked(hidden, weight, labels, dtype=torch.bfloat16,
                                                                 chunk_tokens=16)
    assert got_h.dtype == got_w.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got_h.float(), ref_h.float(), rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(got_w.float(), ref_w.float(), rtol=2e-2, atol=1e-3)


def test_all_ignored_is_nan_like_cross_entropy_and_no_grad_computes_the_loss_only():
    hidden, weight = torch.randn(8, 4), torch.randn(11, 4)
    ignored = torch.full((8,), -100)
    assert torch.isnan(chunked_linear_cross_entropy(hidden, weight, ignored)).item()
    assert torch.isnan(F.cross_entropy(F.linear(hidden, weight), ignored)).item()
    labels = torch.randint(0, 11, (8,))
    with torch.no_grad():
        value = chunked_linear_cross_entropy(hidden.requires_grad_(), weight, labels, chunk_tokens=3)
    assert not value.requires_grad
    torch.testing.assert_close(value, F.cross_entropy(F.linear(hidden, weight), labels))


def test_chunks_bound_the_logits_by_the_hidden_states():
    # mobillama-0.5b, micro batch 8 x 2048: 16 chunks of 1024 tokens, 131 MB of fp32 logits instead of 2.1 GB.
    assert default_chunk_tokens(tokens=8 * 2048, hidden=2048, vocab=32000) == 1024
    assert default_chunk_tokens(tokens=40 * 2048, hidden=2048, vocab=32000) == 5120
    assert default_chunk_tokens(tokens=10, hidden=192, vocab=4096) == 1024
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        chunked_linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(2, dtype=torch.long), chunk_tokens=0)


def test_model_with_deferred_head_trains_like_the_plain_model():
    """The whole model: lm_head made pass-through + chunked loss = logits + F.cross_entropy, in loss and in
    every parameter's gradient; the state_dict keys and tensors do not change."""
    config = dataclasses.replace(load_model_config("tiny"), num_layers=2)
    torch.manual_seed(0)
    plain = MobiLlama(config)
    fused = MobiLlama(config)
    fused.load_state_dict(plain.state_dict())
    head = defer_lm_head(fused)
    assert isinstance(fused.lm_head, HiddenStatesHead) and list(fused.state_dict()) == list(plain.state_dict())
    tokens = torch.randint(0, config.vocab_size, (3, 33))
    ref = language_model_loss(plain(tokens[:, :-1]), tokens[:, 1:])
    hidden = fused(tokens[:, :-1])
    assert hidden.shape == (3, 32, config.hidden_size)
    got = chunked_loss_for(head)(hidden, tokens[:, 1:])
    ref.backward()
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_defer_lm_head_refuses_a_tensor_parallel_head():
    model = MobiLlama(dataclasses.replace(load_model_config("tiny"), num_layers=1))
    model.lm_head = torch.nn.Linear(4, 4, bias=True)
    with pytest.raises(TypeError, match="bias-free nn.Linear"):
        defer_lm_head(model)
