"""The plain MobiLlama: one shared FFN, parity with transformers' Llama, counts, configs."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megamobi import model as model_module
from megamobi.config_io import ConfigError
from megamobi.kernels import attention as attention_kernels
from megamobi.kernels.attention import apply_attention_kernel, attention_kernel
from megamobi.model import MobiLlama, language_model_loss, parameter_counts
from megamobi.model_config import ModelConfig, load_model_config

TINY = load_model_config("tiny")
# An odd shape: odd layer count, odd vocab, GQA-free MHA with head_dim 12, non-default theta/eps.
ODD = dataclasses.replace(TINY, name="odd", vocab_size=1001, hidden_size=36, num_layers=5, num_attention_heads=3,
                          intermediate_size=70, rope_theta=500.0, rms_norm_eps=1e-6, max_seq_len=40)


def build(config: ModelConfig, seed: int = 0) -> MobiLlama:
    torch.manual_seed(seed)
    return MobiLlama(config)


def test_shared_ffn_is_one_module_counted_once():
    model = build(TINY)
    assert len(model.mlps) == 1
    assert all(model.mlp_for_layer(i) is model.mlps[0] for i in range(TINY.num_layers))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == parameter_counts(TINY)["params_unique"]
    per_layer = build(dataclasses.replace(TINY, ffn_sharing="per_layer"))
    assert len(per_layer.mlps) == TINY.num_layers
    assert sum(p.numel() for p in per_layer.parameters()) == parameter_counts(per_layer.config)["params_unique"]


def test_shared_ffn_gradient_is_sum_over_layers():
    shared = build(TINY)
    per_layer = MobiLlama(dataclasses.replace(TINY, ffn_sharing="per_layer"))
    # Same weights: every per-layer MLP is a copy of the one shared MLP.
    state = {k: v for k, v in shared.state_dict().items() if not k.startswith("mlps.")}
    for i in range(TINY.num_layers):
        for name, value in shared.mlps[0].state_dict().items():
            state[f"mlps.{i}.{name}"] = value.clone()
    per_layer.load_state_dict(state)

    tokens = torch.randint(0, TINY.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, TINY.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
    loss_shared = language_model_loss(shared(tokens), labels)
    loss_per_layer = language_model_loss(per_layer(tokens), labels)
    torch.testing.assert_close(loss_shared, loss_per_layer, rtol=0, atol=1e-6)
    loss_shared.backward()
    loss_per_layer.backward()
    for name, param in shared.mlps[0].named_parameters():
        summed = sum(dict(per_layer.mlps[i].named_parameters())[name].grad for i in range(TINY.num_layers))
        torch.testing.assert_close(param.grad, summed, rtol=1e-5, atol=1e-7)
        # and the sum is really a sum of different contributions, not one layer's
        assert not torch.allclose(param.grad, per_layer.mlps[0].get_parameter(name).grad)


def hf_twin(model: MobiLlama) -> LlamaForCausalLM:
    """The equivalent stock transformers Llama, with the shared MLP copied into every layer."""
    c = model.config
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads, num_key_value_heads=c.kv_heads,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    hf = LlamaForCausalLM(hf_config).float().eval()
    ours = model.state_dict()
    state = {"model.embed_tokens.weight": ours["embed_tokens.weight"], "model.norm.weight": ours["norm.weight"],
             "lm_head.weight": ours["lm_head.weight"]}
    for i in range(c.num_layers):
        for key, value in ours.items():
            if key.startswith(f"layers.{i}."):
                state[f"model.{key}"] = value
        mlp = model.mlp_for_layer(i)
        for name, value in mlp.state_dict().items():
            state[f"model.layers.{i}.mlp.{name}"] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


@pytest.mark.parametrize("config", [TINY, ODD, dataclasses.replace(ODD, ffn_sharing="per_layer"),
                                    dataclasses.replace(TINY, num_key_value_heads=2)], ids=["tiny", "odd", "odd-per-layer", "tiny-gqa"])
def test_logits_match_transformers_llama(config):
    model = build(config).eval()
    hf = hf_twin(model)
    tokens = torch.randint(0, config.vocab_size, (2, config.max_seq_len), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape == (2, config.max_seq_len, config.vocab_size)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_activation_checkpointing_gives_the_same_gradients():
    plain = build(TINY)
    ckpt = MobiLlama(dataclasses.replace(TINY, activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    for m in (plain, ckpt):
        language_model_loss(m(tokens), tokens).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpointing_modes_and_the_old_booleans():
    assert dataclasses.replace(TINY, activation_checkpointing=True).activation_checkpointing == "full"
    assert dataclasses.replace(TINY, activation_checkpointing=False).activation_checkpointing == "none"
    for bad in ("partial", 1, "Full"):
        with pytest.raises(ConfigError, match="activation_checkpointing must be one of none, full, selective"):
            dataclasses.replace(TINY, activation_checkpointing=bad)


def test_selective_checkpointing_gives_the_same_gradients():
    """Selective (attention blocks recomputed) and full checkpointing: the plain model's loss and gradients."""
    plain = build(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    losses, grads = [], []
    for mode in ("none", "selective", "full"):
        model = MobiLlama(dataclasses.replace(TINY, activation_checkpointing=mode))
        model.load_state_dict(plain.state_dict())
        loss = language_model_loss(model(tokens), tokens)
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for other in (1, 2):
        torch.testing.assert_close(losses[other], losses[0], rtol=0, atol=0)
        for name, grad in grads[0].items():
            torch.testing.assert_close(grads[other][name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_selective_checkpointing_keeps_less_than_none_and_more_than_full():
    tokens = torch.randint(0, TINY.vocab_size, (2, 32))
    saved = {}
    for mode in ("none", "selective", "full"):
        model = MobiLlama(dataclasses.replace(TINY, activation_checkpointing=mode))
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            language_model_loss(model(tokens), tokens)
        saved[mode] = total[0]
    assert saved["none"] > saved["selective"] > saved["full"], saved


def test_gpu_extras_fall_back_to_plain_pytorch(monkeypatch):
    """flash-attn and NVIDIA apex are never installed on CPU CI (the import falls back to None), and even
    when importable they are only used for CUDA tensors: CPU runs use SDPA and the plain RMSNorm."""
    model = build(TINY).eval()
    tokens = torch.randint(0, TINY.vocab_size, (1, 12))
    with torch.no_grad():
        reference = model(tokens)
        monkeypatch.setattr(attention_kernels, "flash_attn_func", lambda *a, **k: pytest.fail("flash-attn used on CPU"))
        apply_attention_kernel(model, "flash-attn")  # what train.kernels: auto would pick if flash-attn were installed
        monkeypatch.setattr(model_module, "fused_rms_norm_affine", lambda *a, **k: pytest.fail("apex used on CPU"))
        torch.testing.assert_close(model(tokens), reference)


def test_gpu_extras_are_absent_here():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        assert attention_kernels.flash_attn_func is None
        assert attention_kernel(on_cuda=True, precision="bf16") == "sdpa"
    try:
        from apex.normalization import fused_layer_norm  # noqa: F401
    except ImportError:
        assert model_module.fused_rms_norm_affine is None


def test_init_std_and_norms():
    model = build(dataclasses.replace(TINY, init_std=0.05))
    assert abs(model.lm_head.weight.std().item() - 0.05) < 0.005
    assert torch.equal(model.layers[0].input_layernorm.weight, torch.ones(TINY.hidden_size))


def test_sequence_longer_than_max_is_refused():
    model = build(TINY)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, TINY.max_seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize("name, unique, effective_gflop", [
    ("mobillama-0.5b", 534_865_920, 8.28), ("large-base", 1_261_529_088, 8.28), ("mobillama-0.8b", 819_315_200, 15.7),
])
def test_inspect_command_json(name, unique, effective_gflop, repo_root):
    out = subprocess.run([sys.executable, "-m", "megamobi.model", "--config", f"configs/{name}.yaml", "--json"],
                         cwd=repo_root, capture_output=True, text=True, check=True).stdout
    summary = json.loads(out)
    assert summary["params_unique"] == unique
    assert round(summary["flops_per_token"] / 1e9, 2 if effective_gflop < 10 else 1) == effective_gflop
    if name == "mobillama-0.5b":  # the shared FFN runs in each of the 22 layers
        assert summary["params_effective"] == unique + 21 * 3 * 2048 * 5632


def test_inspect_command_human_summary(repo_root):
    out = subprocess.run([sys.executable, "-m", "megamobi.model", "--config", "mobillama-0.5b"],
                         cwd=repo_root, capture_output=True, text=True, check=True).stdout
    assert "534,865,920" in out and "GFLOP" in out


def test_every_shipped_model_config_loads(repo_root):
    names = sorted(p.stem for p in (repo_root / "configs").glob("*.yaml") if not p.stem.startswith("pretrain"))
    assert {"mobillama-0.5b", "mobillama-0.8b", "large-base", "baseline1", "baseline2", "tiny"} <= set(names)
    for name in names:
        load_model_config(name)
    assert 0.5e9 < parameter_counts(load_model_config("baseline1"))["params_unique"] < 0.56e9
    assert 0.5e9 < parameter_counts(load_model_config("baseline2"))["params_unique"] < 0.56e9
