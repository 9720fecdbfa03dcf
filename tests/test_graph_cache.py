"""Gradient graphs kept across products (operators/graph_cache.py): the same numbers as rebuilding
them, against the exact Hessian, and dropped whenever the model's parameters, buffers or mode change."""

import pytest
import torch
from helpers import PROBLEMS, batches, exact_hessian

import hessian_tools as ht
from hessian_tools.operators import graph_cache


def _operator(name="cnn_bn", **kwargs):
    model, loss_fn, X, y = PROBLEMS[name]()
    kwargs.setdefault("dtype", torch.float64)
    op = ht.HessianOperator(model, loss_fn, batches(X, y, 16), backend="autograd", **kwargs)
    return op, model, loss_fn, X, y


def test_kept_graphs_give_the_exact_hessian_and_the_numbers_of_rebuilt_ones():
    op, model, loss_fn, X, y = _operator()
    fresh, *_ = _operator(reuse_graphs=False)
    V = torch.randn(op.dim, 3, dtype=torch.float64)
    first = op.matmat(V)
    assert op.graphs.kept and len(op.graphs.graphs) == 3  # 16 + 16 + 8 samples
    assert not fresh.graphs.kept
    torch.testing.assert_close(op.matmat(V), first, rtol=0, atol=0)  # from the kept graphs
    torch.testing.assert_close(op.matmat(V), fresh.matmat(V), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(op.dense(), exact_hessian(model, loss_fn, X, y), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the model itself, or a cast copy
def test_a_changed_parameter_drops_the_graphs(dtype):
    op, model, loss_fn, X, y = _operator(dtype=dtype)
    V = torch.randn(op.dim, 1, dtype=dtype)
    before = op.matmat(V)
    kept = op.graphs.graphs
    with torch.no_grad():
        model.conv.weight.add_(0.3)  # in place: only the version counter tells
    after = op.matmat(V)
    assert op.graphs.graphs is not kept
    expected = ht.HessianOperator(model, loss_fn, batches(X, y, 16), dtype=dtype, reuse_graphs=False)
    torch.testing.assert_close(after, expected.matmat(V), rtol=1e-5, atol=1e-6)
    assert (after - before).abs().max() > 1e-3


def test_loaded_weights_and_buffers_drop_the_graphs():
    op, model, loss_fn, X, y = _operator()
    other, *_ = _operator("cnn_bn")
    V = torch.randn(op.dim, 1, dtype=torch.float64)
    op.matmat(V)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["bn.running_var"] = state["bn.running_var"] * 2  # a buffer only
    model.load_state_dict(state)
    after = op.matmat(V)
    expected = ht.HessianOperator(model, loss_fn, batches(X, y, 16), dtype=torch.float64, reuse_graphs=False)
    torch.testing.assert_close(after, expected.matmat(V), rtol=1e-10, atol=1e-12)
    assert (after - other.matmat(V)).abs().max() > 1e-3


def test_graphs_are_kept_only_when_they_fit_half_the_budget(monkeypatch):
    op, *_ = _operator(memory_budget=None)
    op.matmat(torch.randn(op.dim, 1, dtype=torch.float64))
    assert not op.graphs.kept  # no budget: nothing held between products
    train, *_ = _operator(mode="train", check_determinism=False)
    train.matmat(torch.randn(train.dim, 1, dtype=torch.float64))
    assert not train.graphs.kept
    monkeypatch.setattr("hessian_tools.operators.hessian.GRAPH_SHARE", 0.0)
    tight, *_ = _operator()
    tight.matmat(torch.randn(tight.dim, 1, dtype=torch.float64))
    assert not tight.graphs.kept
    assert graph_cache.GRAPH_SHARE == 0.5


def test_a_single_column_and_a_batched_block_agree():
    op, *_ = _operator("mlp", chunk_size=4)
    V = torch.randn(op.dim, 6, dtype=torch.float64)  # chunks of 4 (batched) and 2 (batched)
    cols = torch.cat([op.matmat(V[:, j : j + 1]) for j in range(6)], dim=1)  # one plain backward each
    torch.testing.assert_close(op.matmat(V), cols, rtol=1e-10, atol=1e-12)


def test_auto_backend_runs_blocks_on_the_kept_graphs():
    model, loss_fn, X, y = PROBLEMS["mlp"]()
    op = ht.HessianOperator(model, loss_fn, batches(X, y, 32), dtype=torch.float64)  # backend auto
    V = torch.randn(op.dim, 5, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), exact_hessian(model, loss_fn, X, y) @ V, rtol=1e-9, atol=1e-11)
    assert op.graphs.kept
    rebuilt = ht.HessianOperator(model, loss_fn, batches(X, y, 32), dtype=torch.float64, reuse_graphs=False)
    torch.testing.assert_close(rebuilt.matmat(V), op.matmat(V), rtol=1e-10, atol=1e-12)
    assert not rebuilt.graphs.kept
