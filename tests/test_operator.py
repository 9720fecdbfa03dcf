"""HessianOperator against torch.func.hessian, and its handling of batches, modes and bad input."""

import pytest
import torch
from helpers import PROBLEMS, batches, exact_hessian
from torch import nn

import hessian_tools as ht
from hessian_tools.errors import DataError, NondeterminismError, NonFiniteError
from hessian_tools.operators.params import ParameterSelectionError


@pytest.mark.parametrize("backend", ["func", "autograd"])
def test_dense_matches_exact_hessian(problem, backend):
    name, model, loss_fn, X, y, H = problem
    op = ht.HessianOperator(model, loss_fn, batches(X, y, 16), backend=backend, dtype=torch.float64)
    assert op.dim == H.shape[0]
    torch.testing.assert_close(op.dense(), H, rtol=1e-9, atol=1e-11)


def test_float32_operator_is_close_to_exact(problem):
    name, model, loss_fn, X, y, H = problem
    op = ht.HessianOperator(model, loss_fn, (X, y))
    assert op.dtype == torch.float32
    torch.testing.assert_close(op.dense().double(), H, rtol=1e-4, atol=1e-5)


def test_uneven_last_batch_is_weighted_by_size():
    model, loss_fn, X, y = PROBLEMS["mlp"]()
    H = exact_hessian(model, loss_fn, X, y)
    data = batches(X, y, 32)  # 32 + 32 + 7
    assert [len(b[1]) for b in data] == [32, 32, 7]
    op = ht.HessianOperator(model, loss_fn, data, dtype=torch.float64)
    torch.testing.assert_close(op.dense(), H, rtol=1e-9, atol=1e-11)
    # The equal-weight average (hessian-eigenthings' operator) is measurably different.
    equal = sum(exact_hessian(model, loss_fn, xb, yb) for xb, yb in data) / len(data)
    assert (equal - H).abs().max() > 1e-3


def test_matmat_is_one_pass_and_equals_matvecs():
    model, loss_fn, X, y = PROBLEMS["cnn_bn"]()
    op = ht.HessianOperator(model, loss_fn, batches(X, y, 16), dtype=torch.float64)
    V = torch.randn(op.dim, 5, dtype=torch.float64)
    before = op.passes
    HV = op.matmat(V)
    assert op.passes == before + 1
    cols = torch.stack([op.matvec(V[:, j]) for j in range(5)], dim=1)
    torch.testing.assert_close(HV, cols, rtol=1e-10, atol=1e-12)


def test_chunked_vmap_matches_unchunked():
    model, loss_fn, X, y = PROBLEMS["mlp"]()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 7, dtype=torch.float64)
    full = ht.HessianOperator(model, loss_fn, (X, y), dtype=torch.float64).matmat(V)
    for backend in ("func", "autograd"):
        chunked = ht.HessianOperator(
            model, loss_fn, (X, y), dtype=torch.float64, chunk_size=3, backend=backend
        ).matmat(V)
        torch.testing.assert_close(chunked, full, rtol=1e-10, atol=1e-12)


def test_parameter_selection_by_regex_names_and_modules():
    model, loss_fn, X, y = PROBLEMS["mlp"]()
    H = exact_hessian(model, loss_fn, X, y)
    n0 = model[0].weight.numel() + model[0].bias.numel()
    by_regex = ht.HessianOperator(model, loss_fn, (X, y), params=r"^2\.", dtype=torch.float64)
    by_names = ht.HessianOperator(model, loss_fn, (X, y), params=["2.weight", "2.bias"], dtype=torch.float64)
    by_module = ht.HessianOperator(model, loss_fn, (X, y), params=[model[2]], dtype=torch.float64)
    for op in (by_regex, by_names, by_module):
        assert [b.name for b in op.blocks] == ["2.weight", "2.bias"]
        torch.testing.assert_close(op.dense(), H[n0:, n0:], rtol=1e-9, atol=1e-11)


def test_blocks_cover_the_flat_vector():
    model, loss_fn, X, y = PROBLEMS["cnn_bn"]()
    op = ht.HessianOperator(model, loss_fn, (X, y))
    assert op.blocks[0].start == 0 and op.blocks[-1].stop == op.dim
    assert all(a.stop == b.start for a, b in zip(op.blocks, op.blocks[1:]))
    assert [b.name for b in op.blocks] == [n for n, _ in model.named_parameters()]


def test_mode_and_buffers_are_restored():
    model, loss_fn, X, y = PROBLEMS["cnn_bn"]()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    op = ht.HessianOperator(model, loss_fn, (X, y), mode="train")
    op.matvec(torch.randn(op.dim))
    assert model.training and model.bn.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    ht.HessianOperator(model, loss_fn, (X, y)).matvec(torch.randn(op.dim))
    assert model.training


def test_eval_mode_uses_running_statistics_train_mode_batch_statistics():
    model, loss_fn, X, y = PROBLEMS["cnn_bn"]()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    ev = ht.HessianOperator(model, loss_fn, (X, y), dtype=torch.float64).matvec(v)
    tr = ht.HessianOperator(model, loss_fn, (X, y), dtype=torch.float64, mode="train").matvec(v)
    assert (ev - tr).abs().max() > 1e-4


def test_dropout_in_train_mode_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 2))
    X, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    with pytest.raises(NondeterminismError, match="different losses"):
        ht.HessianOperator(model, nn.functional.cross_entropy, (X, y), mode="train")
    ht.HessianOperator(model, nn.functional.cross_entropy, (X, y))  # eval mode: dropout off, fine


def test_bad_input_gets_one_clear_error():
    model, loss_fn, X, y = PROBLEMS["mlp"]()
    op = ht.HessianOperator(model, loss_fn, (X, y))
    with pytest.raises(ValueError, match=rf"length 3.*expects {op.dim}"):
        op.matvec(torch.zeros(3))
    with pytest.raises(ValueError, match=rf"\({op.dim}, K\)"):
        op.matmat(torch.zeros(op.dim + 1, 2))
    with pytest.raises(TypeError):
        op.matvec([0.0] * op.dim)
    with pytest.raises(DataError, match="empty"):
        ht.HessianOperator(model, loss_fn, [])
    with pytest.raises(ParameterSelectionError, match="matches none"):
        ht.HessianOperator(model, loss_fn, (X, y), params="nothing_like_this")
    with pytest.raises(DataError, match="one-shot iterator"):
        ht.HessianOperator(model, loss_fn, iter(batches(X, y, 16)))
    with pytest.raises(ValueError, match="mode"):
        ht.HessianOperator(model, loss_fn, (X, y), mode="inference")
    with pytest.raises(TypeError, match="nn.Module"):
        ht.HessianOperator(lambda x: x, loss_fn, (X, y))


def test_non_finite_loss_names_the_batch():
    model, loss_fn, X, y = PROBLEMS["mlp"]()
    Xbad = X.clone()
    Xbad[40] = float("nan")
    op = ht.HessianOperator(model, loss_fn, batches(Xbad, y, 16))  # batch 0 is fine
    with pytest.raises(NonFiniteError, match="batch 2"):
        op.matvec(torch.randn(op.dim))
    with pytest.raises(NonFiniteError, match="batch 0"):
        ht.HessianOperator(model, loss_fn, batches(Xbad[32:], y[32:], 16))


def test_to_scipy_speaks_linear_operator():
    model, loss_fn, X, y = PROBLEMS["mlp"]()
    H = exact_hessian(model, loss_fn, X, y).numpy()
    lin = ht.HessianOperator(model, loss_fn, (X, y), dtype=torch.float64).to_scipy()
    import numpy as np

    v = np.random.default_rng(0).normal(size=(lin.shape[0], 3))
    assert lin.dtype == np.float64
    np.testing.assert_allclose(lin.matmat(v), H @ v, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lin.matvec(v[:, 0]), H @ v[:, 0], rtol=1e-9, atol=1e-12)


def test_loss_and_gradient_match_autograd():
    model, loss_fn, X, y = PROBLEMS["cnn_bn"]()
    op = ht.HessianOperator(model, loss_fn, batches(X, y, 16), dtype=torch.float64)
    loss, g = op.loss_and_gradient()
    model.eval()
    ref = loss_fn(model(X), y)
    grads = torch.autograd.grad(ref, list(model.parameters()))
    assert loss == pytest.approx(float(ref), rel=1e-5)
    torch.testing.assert_close(g, torch.cat([x.reshape(-1) for x in grads]).double(), rtol=1e-4, atol=1e-6)
