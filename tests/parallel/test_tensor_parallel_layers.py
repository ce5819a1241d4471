"""Each tensor-parallel piece against the plain op it replaces (forward and gradients), on 2 gloo ranks,
plus the vocabulary-parallel cross entropy's padding and the layout validation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from multiproc import run_ranks

from megamobi.config_io import ConfigError
from megamobi.model import MobiLlama, language_model_loss
from megamobi.model_config import load_model_config
from megamobi.parallel.tensor_parallel import padded_size, vocab_parallel_cross_entropy
from megamobi.parallel.tensor_plan import validate_layout

VOCAB = 11  # not a multiple of 2: rank 1 holds one padded row/column


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().copy()


def _gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _layers_job(rank: int) -> dict:
    """Every layer on this rank vs the plain op (computed identically on every rank from a seed)."""
    from megamobi.parallel.groups import Layout, ParallelGroups
    from megamobi.parallel.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        gather_from_sequence_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
        scatter_to_sequence_parallel_region,
    )

    groups = ParallelGroups(Layout(tensor=2))
    tg = groups.tensor_group
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6)
    lin_col, lin_row = torch.nn.Linear(6, 8, bias=False), torch.nn.Linear(8, 6, bias=False)
    emb = torch.nn.Embedding(VOCAB, 6)
    head = torch.nn.Linear(6, VOCAB, bias=False)
    ids = torch.randint(0, VOCAB, (2, 4))
    out: dict = {}

    # Column then row: the Megatron MLP pattern; input gets its gradient through copy_to_region.
    col = ColumnParallelLinear.from_linear(lin_col, groups=groups)
    row = RowParallelLinear.from_linear(lin_row, groups=groups)
    xp = x.clone().requires_grad_()
    y = row(torch.tanh(col(xp)))
    y.pow(2).sum().backward()
    xr = x.clone().requires_grad_()
    yr = lin_row(torch.tanh(lin_col(xr)))
    yr.pow(2).sum().backward()
    out["col_row"] = (_np(y), _np(yr), _np(xp.grad), _np(xr.grad),
                      _np(_gather(col.weight.grad, tg, 0)), _np(lin_col.weight.grad),
                      _np(_gather(row.weight.grad, tg, 1)), _np(lin_row.weight.grad))

    # Column with gather_output, Row with input_is_parallel=False.
    col_g = ColumnParallelLinear.from_linear(lin_col, groups=groups, gather_output=True)
    row_s = RowParallelLinear.from_linear(lin_row, groups=groups, input_is_parallel=False)
    xp = x.clone().requires_grad_()
    y = row_s(col_g(xp))
    y.sum().backward()
    xr = x.clone().requires_grad_()
    lin_row(lin_col(xr)).sum().backward()
    out["gather_scatter"] = (_np(y), _np(lin_row(lin_col(x))), _np(xp.grad), _np(xr.grad))

    # Vocab-parallel embedding with padding.
    vemb = VocabParallelEmbedding.from_embedding(emb, groups=groups)
    e = vemb(ids)
    e.pow(2).sum().backward()
    emb.weight.grad = None
    er = emb(ids)
    er.pow(2).sum().backward()
    full_grad = _gather(vemb.weight.grad, tg, 0)
    out["embedding"] = (_np(e), _np(er), _np(full_grad[:VOCAB]), _np(emb.weight.grad), _np(full_grad[VOCAB:]),
                        vemb.weight.shape[0])

    # Padded vocabulary-parallel head + cross entropy == F.cross_entropy on full logits.
    vhead = ColumnParallelLinear.from_linear(head, groups=groups, pad_output=True)
    labels = torch.randint(0, VOCAB, (2, 4))
    labels[0, 0] = -100  # ignored, as F.cross_entropy does
    hp = x.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(vhead(hp), labels, group=tg, vocab_size=VOCAB)
    loss.backward()
    hr = x.clone().requires_grad_()
    loss_ref = F.cross_entropy(head(hr).flatten(0, 1), labels.flatten())
    loss_ref.backward()
    head_grad = _gather(vhead.weight.grad, tg, 0)
    out["cross_entropy"] = (loss.item(), loss_ref.item(), _np(hp.grad), _np(hr.grad),
                            _np(head_grad[:VOCAB]), _np(head.weight.grad), _np(head_grad[VOCAB:]))

    # Sequence-parallel primitives: gather/reduce-scatter/scatter along dim 1 and their adjoints.
    s = x.clone().requires_grad_()
    local = scatter_to_sequence_parallel_region(s, tg)
    full = gather_from_sequence_parallel_region(local * (groups.tensor_rank + 1), tg)
    back = reduce_scatter_to_sequence_parallel_region(full, tg)
    back.sum().backward()
    out["sequence"] = (tuple(local.shape), _np(full), _np(back), _np(s.grad))

    # Sequence-parallel layers: embedding -> column -> row keep the residual stream sharded along seq.
    semb = VocabParallelEmbedding.from_embedding(emb, groups=groups, sequence_parallel=True)
    scol = ColumnParallelLinear.from_linear(lin_col, groups=groups, sequence_parallel=True)
    srow = RowParallelLinear.from_linear(lin_row, groups=groups, sequence_parallel=True)
    y = srow(torch.tanh(scol(semb(ids))))
    y.pow(2).sum().backward()
    lin_col.weight.grad = None
    yr = lin_row(torch.tanh(lin_col(emb(ids))))
    yr.pow(2).sum().backward()
    half = slice(2 * groups.tensor_rank, 2 * groups.tensor_rank + 2)
    out["sequence_layers"] = (_np(y), _np(yr[:, half]), _np(_gather(scol.weight.grad, tg, 0)), _np(lin_col.weight.grad))
    return out


@pytest.fixture(scope="module")
def layers_results():
    return run_ranks(_layers_job, world_size=2)


def test_column_then_row_parallel_linear(layers_results):
    for r in layers_results:
        y, yr, gx, gxr, gcol, gcolr, grow, growr = r["col_row"]
        np.testing.assert_allclose(y, yr, atol=1e-6)
        np.testing.assert_allclose(gx, gxr, atol=1e-6)
        np.testing.assert_allclose(gcol, gcolr, atol=1e-6)
        np.testing.assert_allclose(grow, growr, atol=1e-6)


def test_gather_output_and_scattered_input(layers_results):
    for r in layers_results:
        y, yr, gx, gxr = r["gather_scatter"]
        np.testing.assert_allclose(y, yr, atol=1e-6)
        np.testing.assert_allclose(gx, gxr, atol=1e-6)


def test_vocab_parallel_embedding_with_padding(layers_results):
    for r in layers_results:
        e, er, grad, grad_ref, pad_grad, rows = r["embedding"]
        assert rows == padded_size(VOCAB, 2) // 2
        np.testing.assert_allclose(e, er, atol=1e-6)
        np.testing.assert_allclose(grad, grad_ref, atol=1e-6)
        assert not pad_grad.any()


def test_vocab_parallel_cross_entropy_excludes_padding(layers_results):
    for r in layers_results:
        loss, loss_ref, gx, gxr, ghead, gheadr, gpad = r["cross_entropy"]
        assert loss == pytest.approx(loss_ref, rel=1e-6)
        np.testing.assert_allclose(gx, gxr, atol=1e-6)
        np.testing.assert_allclose(ghead, gheadr, atol=1e-6)
        assert not gpad.any()


def test_sequence_parallel_primitives(layers_results):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6)  # the job's x: same seed, same first draw
    expected_full = torch.cat([x[:, :2] * 1, x[:, 2:] * 2], dim=1)
    for rank, r in enumerate(layers_results):
        shape, full, back, grad = r["sequence"]
        assert shape == (2, 2, 6)
        np.testing.assert_allclose(full, expected_full.numpy(), atol=1e-6)
        # reduce-scatter of a tensor that is the same on both ranks: twice this rank's half.
        np.testing.assert_allclose(back, 2 * expected_full[:, 2 * rank:2 * rank + 2].numpy(), atol=1e-6)
        # Adjoints: reduce-scatter -> all-gather (ones), gather -> reduce-scatter (2 ranks: 2), times
        # the owner's factor (r + 1), scatter -> all-gather: every rank sees [2 * 1, 2 * 2] by halves.
        np.testing.assert_allclose(grad[:, :2], 2.0, atol=1e-6)
        np.testing.assert_allclose(grad[:, 2:], 4.0, atol=1e-6)


def test_sequence_parallel_layers(layers_results):
    for r in layers_results:
        y, y_ref_shard, gcol, gcol_ref = r["sequence_layers"]
        np.testing.assert_allclose(y, y_ref_shard, atol=1e-6)
        np.testing.assert_allclose(gcol, gcol_ref, atol=1e-6)


def test_cross_entropy_single_rank_equals_plain():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 17, requires_grad=True)
    labels = torch.randint(0, 17, (3, 5))
    loss = vocab_parallel_cross_entropy(logits, labels, group=None, vocab_size=17)
    ref = language_model_loss(logits, labels)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    (g,) = torch.autograd.grad(loss, logits)
    (gr,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g, gr)


def test_cross_entropy_masks_padded_columns_single_rank():
    """Logits wider than the vocabulary (padding): the padded columns are not in the softmax."""
    torch.manual_seed(0)
    logits = torch.randn(4, 12, requires_grad=True)
    labels = torch.randint(0, 10, (4,))
    loss = vocab_parallel_cross_entropy(logits, labels, group=None, vocab_size=10)
    assert loss.item() == pytest.approx(F.cross_entropy(logits[:, :10], labels).item(), rel=1e-6)
    (g,) = torch.autograd.grad(loss, logits)
    assert not g[:, 10:].any()


def test_tensor_parallel_loss_is_language_model_loss_for_t1():
    from megamobi.parallel.tensor_plan import tensor_parallel_loss

    class OneRank:  # only .layout.tensor is read for T = 1
        layout = type("L", (), {"tensor": 1})()

    assert tensor_parallel_loss(OneRank(), 100) is language_model_loss


def _tiny(**changes):
    return dataclasses.replace(load_model_config("tiny"), **changes)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tensor=4, pipeline=1, world_size=6, zero_stage=1), "not divisible by tensor x pipeline"),
    (dict(tensor=4, pipeline=1, world_size=4, zero_stage=1), "num_attention_heads = 6 is not divisible"),
    (dict(tensor=3, pipeline=1, world_size=3, zero_stage=1), "intermediate_size = 512 is not divisible"),
    (dict(tensor=1, pipeline=9, world_size=9, zero_stage=1), "fewer than parallel.pipeline = 9"),
    (dict(tensor=1, pipeline=2, world_size=2, zero_stage=2), "allows ZeRO stage 0 or 1 only"),
    (dict(tensor=1, pipeline=2, world_size=2, zero_stage=3), "allows ZeRO stage 0 or 1 only"),
    (dict(tensor=1, pipeline=2, world_size=2, zero_stage=0), "ZeRO-0 with a pipeline"),
])
def test_validate_layout_refuses(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        validate_layout(_tiny(), **kwargs)


def test_validate_layout_refuses_kv_heads():
    with pytest.raises(ConfigError, match="num_key_value_heads = 3"):
        validate_layout(_tiny(num_key_value_heads=3), tensor=2, pipeline=1, world_size=2, zero_stage=1)


@pytest.mark.parametrize("tensor, pipeline, world, zero", [(2, 1, 8, 2), (2, 2, 8, 1), (1, 8, 16, 1), (1, 1, 3, 3)])
def test_validate_layout_accepts(tensor, pipeline, world, zero):
    validate_layout(_tiny(), tensor=tensor, pipeline=pipeline, world_size=world, zero_stage=zero)


def _plan_job(rank: int) -> dict:
    """apply_tensor_parallel on the whole model: logits (gathered) and loss equal the plain model's."""
    from megamobi.parallel.groups import Layout, ParallelGroups
    from megamobi.parallel.tensor_plan import apply_tensor_parallel, tensor_parallel_loss

    config = _tiny(num_layers=2, vocab_size=1001, max_seq_len=32)
    groups = ParallelGroups(Layout(tensor=2))
    torch.manual_seed(5)
    model = apply_tensor_parallel(MobiLlama(config), groups)
    ids = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(2))
    local = model(ids)
    loss = tensor_parallel_loss(groups, 1001)(local, labels)
    logits = _gather(local.detach(), groups.tensor_group, -1)[..., :1001]
    return {"logits": _np(logits), "loss": loss.item(), "heads": model.layers[0].self_attn.num_heads,
            "shared": model.layers[0] is not None and len(model.mlps) == 1}


def test_apply_tensor_parallel_matches_plain_model():
    results = run_ranks(_plan_job, world_size=2)
    config = _tiny(num_layers=2, vocab_size=1001, max_seq_len=32)
    torch.manual_seed(5)
    model = MobiLlama(config)
    ids = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 1001, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids)
    ref_loss = language_model_loss(logits, labels).item()
    for r in results:
        assert r["heads"] == 3 and r["shared"]
        np.testing.assert_allclose(r["logits"], logits.numpy(), atol=1e-5)
        assert r["loss"] == pytest.approx(ref_loss, rel=1e-6)
