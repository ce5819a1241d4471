"""Which kernels a run gets, how they are applied, and the Trainer with train.compile and each
activation-checkpointing mode under ZeRO-1 and ZeRO-2 (compiled and eager losses agree)."""

import dataclasses

import pytest
import torch
from multiproc import run_ranks
from training_runs import make_run, train_losses

from megamobi.config_io import ConfigError
from megamobi.kernels.liger import liger_available
from megamobi.kernels.loss import HiddenStatesHead
from megamobi.kernels.plan import apply_kernels, choose_kernels
from megamobi.model import MobiLlama, causal_attention, language_model_loss
from megamobi.model_config import load_model_config
from megamobi.training.loop import Trainer


def test_cpu_auto_plan_is_sdpa_and_the_chunked_loss():
    plan = choose_kernels(mode="auto", on_cuda=False)
    assert (plan.attention, plan.liger_layers, plan.loss, plan.fused_adamw) == (
        "sdpa", (), "chunked-linear-cross-entropy", False)
    assert plan.describe() == ("kernels (auto): attention sdpa, liger layers none, loss chunked-linear-cross-entropy, "
                               "eager, AdamW per-tensor")


@pytest.mark.parametrize("layout, reason", [
    ({"mode": "plain"}, "train.kernels: plain"),
    ({"tensor": 2}, "vocab-parallel cross entropy"),
    ({"pipeline": 2}, "head stage"),
    ({"zero_stage": 3}, "ZeRO-3"),
])
def test_layouts_that_keep_the_full_logits_say_why(layout, reason):
    plan = choose_kernels(**{"mode": "auto", "on_cuda": False, **layout})
    assert plan.loss == "full-logits" and reason in plan.loss_note and reason in plan.describe()


def test_no_liger_without_cuda_and_no_liger_layers_when_compiled():
    # liger-kernel is installed here for the interpreter tests, but the plan takes it only on CUDA.
    assert choose_kernels(on_cuda=False).liger_layers == ()
    assert choose_kernels(on_cuda=True, compile_backend="inductor").liger_layers == ()
    with pytest.raises(ConfigError, match="train.kernels must be one of auto, plain"):
        choose_kernels(mode="fast", on_cuda=False)


def test_flash_attention_is_planned_only_where_it_runs(monkeypatch):
    """flash-attn takes bf16/fp16 tensors only: an fp32 run on a GPU gets SDPA and its log line says so."""
    from megamobi.kernels import attention

    monkeypatch.setattr(attention, "flash_attn_func", lambda *a, **k: pytest.fail("not called here"))
    assert choose_kernels(on_cuda=True, precision="bf16").attention == "flash-attn"
    fp32 = choose_kernels(on_cuda=True, precision="fp32")
    assert fp32.attention == "sdpa" and "attention sdpa" in fp32.describe()
    assert choose_kernels(on_cuda=False, precision="bf16").attention == "sdpa"
    assert choose_kernels(mode="plain", on_cuda=True, precision="bf16").attention == "sdpa"


def test_plain_plan_leaves_the_model_as_written():
    model = MobiLlama(dataclasses.replace(load_model_config("tiny"), num_layers=1))
    loss_fn = apply_kernels(model, choose_kernels(mode="plain", on_cuda=False), loss_fn=language_model_loss)
    assert loss_fn is language_model_loss
    assert type(model.lm_head) is torch.nn.Linear and model.layers[0].self_attn.attend is causal_attention
    auto_fn = apply_kernels(model, choose_kernels(mode="auto", on_cuda=False), loss_fn=language_model_loss)
    assert auto_fn is not language_model_loss and isinstance(model.lm_head, HiddenStatesHead)


def compiled_model_grads(backend):
    config = dataclasses.replace(load_model_config("tiny"), num_layers=3, activation_checkpointing="selective")
    torch.manual_seed(0)
    eager = MobiLlama(config)
    compiled = MobiLlama(config)
    compiled.load_state_dict(eager.state_dict())
    plan = choose_kernels(on_cuda=False, compile_backend=backend)
    loss_fn = apply_kernels(compiled, plan, loss_fn=language_model_loss)
    tokens = torch.randint(0, config.vocab_size, (2, 17))
    ref = language_model_loss(eager(tokens[:, :-1]), tokens[:, 1:])
    got = loss_fn(compiled(tokens[:, :-1]), tokens[:, 1:])
    ref.backward()
    got.backward()
    return ref, got, eager, compiled


def test_compiled_layers_keep_names_and_match_eager():
    """aot_eager: Dynamo + AOTAutograd tracing of every layer (the shared FFN inside each), without
    needing Inductor's C compiler; the CUDA Inductor comparison is in bench/gpu_check.sh."""
    from torch._dynamo.utils import counters

    counters.clear()
    ref, got, eager, compiled = compiled_model_grads("aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    # One graph serves all three layers (parameters are graph inputs), and nothing breaks it.
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def _train(rank, run):
    Trainer(run).train()


def test_trainer_compile_with_checkpointing_and_zero_1_2_matches_eager(tmp_path, token_shards, capfd):
    """Real Trainer runs (DeepSpeed engine, world size 1): eager ZeRO-1 is the reference; compiled
    with full checkpointing under ZeRO-1 and with selective checkpointing under ZeRO-2 give the same
    losses; train.kernels: plain (full logits) too. The kernel line is logged once."""
    runs = {
        "eager": make_run(tmp_path / "eager", token_shards, train={"steps": 3, "log_interval": 1}),
        "plain": make_run(tmp_path / "plain", token_shards, train={"steps": 3, "log_interval": 1, "kernels": "plain"}),
        "compiled-full-z1": make_run(tmp_path / "c1", token_shards, model={"activation_checkpointing": "full"},
                                     train={"steps": 3, "log_interval": 1, "compile": True, "compile_backend": "aot_eager"}),
        "compiled-selective-z2": make_run(tmp_path / "c2", token_shards, model={"activation_checkpointing": "selective"},
                                          parallel={"zero_stage": 2},
                                          train={"steps": 3, "log_interval": 1, "compile": True,
                                                 "compile_backend": "aot_eager"}),
    }
    for run in runs.values():
        run_ranks(_train, world_size=1, args=(run,))
    reference = torch.tensor(train_losses(runs["eager"].run_dir))
    assert len(reference) == 3
    for name, run in runs.items():
        torch.testing.assert_close(torch.tensor(train_losses(run.run_dir)), reference, rtol=1e-5, atol=0, msg=name)
    err = capfd.readouterr().err
    assert err.count("kernels (auto): attention sdpa") == 3, err  # once per auto run
    # On a GPU machine with liger-kernel (bench/gpu_check.sh) the loss is liger's fused one instead.
    loss = "liger-fused-linear-cross-entropy" if torch.cuda.is_available() and liger_available() else "chunked-linear-cross-entropy"
    assert f"loss {loss}, torch.compile (aot_eager) per decoder layer" in err
    assert "kernels (plain): attention sdpa, liger layers none, loss full-logits (train.kernels: plain)" in err
