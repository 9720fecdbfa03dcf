"""Hessian diagonal estimators against exact diagonals: torch.func.hessian on tiny models, dense matrices."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import PROBLEMS, BlockedDense, exact_hessian, known_spectrum

import hessian_tools as ht
from hessian_tools.estimators.baston2022diagpp import diagpp
from hessian_tools.estimators.common import CountingOperator
from hessian_tools.estimators.diagonal import hutchinson_diagonal
from hessian_tools.estimators.epperly2024xtrace import xdiag
from hessian_tools.estimators.probes import rademacher
from hessian_tools.results import DiagonalResult, result_from_dict
from hessian_tools.seeding import seeded_generator

METHODS = ("hutchinson", "diagpp", "xdiag")
SEEDS = range(10)


def low_rank_plus_noise(dim=200, rank=8, noise=0.05, seed=0):
    """U diag(100 … 10) Uᵀ + a small dense symmetric noise: most off-diagonal mass is low rank."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=torch.float64))
    E = torch.randn(dim, dim, generator=g, dtype=torch.float64) * noise
    return (U * torch.logspace(2, 1, rank, dtype=torch.float64)) @ U.T + (E + E.T) / 2


def relative_error(result, exact: torch.Tensor) -> float:
    exact = exact.numpy()
    return float(np.linalg.norm(result.estimate - exact) / np.linalg.norm(exact))


@pytest.fixture(scope="module")
def models():
    """name → (HessianOperator in float64, exact Hessian by torch.func.hessian)."""
    out = {}
    for name, make in PROBLEMS.items():
        model, loss_fn, X, y = make()
        op = ht.HessianOperator(model, loss_fn, [(X, y)], dtype=torch.float64)
        out[name] = op, exact_hessian(model, loss_fn, X, y)
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", sorted(PROBLEMS) + ["spectrum"])
def test_diagonal_within_three_stderr_of_exact(method, which, models):
    if which == "spectrum":
        H, _ = known_spectrum(120)
        op = ht.DenseOperator(H)
    else:
        op, H = models[which]
    budget = min(30, op.dim - 4)  # below dim: the deflated methods must not switch to the exact path
    exact = torch.diagonal(H).numpy()
    within1 = within3 = total = 0
    for seed in SEEDS:
        r = ht.diagonal(op, method=method, max_hvps=budget, seed=seed)
        error = np.abs(r.estimate - exact)
        within1 += int((error <= r.stderr + 1e-12).sum())
        within3 += int((error <= 3 * r.stderr + 1e-12).sum())
        total += op.dim
    # Normal errors: 99.7% within 3·stderr, 68% within 1. The second check fails a bar that is too wide.
    assert within3 >= 0.95 * total
    assert 0.45 * total <= within1 <= 0.85 * total


@pytest.mark.parametrize("method", METHODS)
def test_error_and_stderr_shrink_with_budget(method):
    H, _ = known_spectrum(300)
    exact = torch.diagonal(H)
    small = [ht.diagonal(H, method=method, max_hvps=30, seed=s) for s in range(6)]
    large = [ht.diagonal(H, method=method, max_hvps=240, seed=s) for s in range(6)]
    # 8× the budget: Hutchinson's error falls ~√8 ≈ 2.8×, the deflated ones faster.
    error = [sum(relative_error(r, exact) for r in runs) for runs in (small, large)]
    assert error[1] < error[0] / 2.2
    assert sum(r.stderr.mean() for r in large) < sum(r.stderr.mean() for r in small) / 2.2


@pytest.mark.parametrize("method", ["diagpp", "xdiag"])
def test_deflated_method_beats_hutchinson_on_low_rank_plus_noise(method):
    A = low_rank_plus_noise()
    exact = torch.diagonal(A)
    error = {
        m: sum(relative_error(ht.diagonal(A, method=m, max_hvps=60, seed=s), exact) for s in range(6))
        for m in ("hutchinson", method)
    }
    assert error[method] < error["hutchinson"] / 4, error


@pytest.mark.parametrize("method", METHODS)
def test_block_sums_equal_block_traces_within_error_bars(method, models):
    op, H = models["cnn_bn"]
    exact = torch.diagonal(H)
    exact_blocks = [float(exact[b.slice].sum()) for b in op.blocks]
    inside = inside_trace = 0
    for seed in SEEDS:
        r = ht.diagonal(op, method=method, max_hvps=30, seed=seed)
        assert [b.name for b in r.blocks] == [b.name for b in op.blocks]
        for summary, block, target in zip(r.blocks, op.blocks, exact_blocks):
            values = r.estimate[block.slice]
            assert summary.size == block.size
            assert summary.sum == pytest.approx(values.sum(), rel=1e-9, abs=1e-12)
            assert (summary.min, summary.max) == (values.min(), values.max())
            assert summary.mean_abs == pytest.approx(np.abs(values).mean(), rel=1e-12)
            rms = math.sqrt(np.mean(r.stderr[block.slice] ** 2))
            assert summary.rms_stderr == pytest.approx(rms, rel=1e-12)
            inside += abs(summary.sum - target) <= 3 * summary.sum_stderr + 1e-12
        assert r.trace == pytest.approx(sum(b.sum for b in r.blocks), rel=1e-9, abs=1e-12)
        inside_trace += abs(r.trace - float(exact.sum())) <= 3 * r.trace_stderr
    assert inside >= 0.9 * len(SEEDS) * len(exact_blocks)
    assert inside_trace >= 9


def test_operator_without_blocks_gets_one_block():
    H, _ = known_spectrum(50)
    r = ht.diagonal(H, method="hutchinson", max_hvps=20, seed=0)
    (block,) = r.blocks
    assert (block.name, block.size) == ("all", 50)
    assert block.sum == pytest.approx(r.trace, rel=1e-12)
    assert block.sum_stderr == pytest.approx(r.trace_stderr, rel=1e-12)


def test_hutchinson_is_exact_with_zero_error_on_a_diagonal_matrix():
    d = torch.linspace(-3.0, 7.0, 40, dtype=torch.float64)
    r = hutchinson_diagonal(torch.diag(d), max_hvps=5, seed=1)
    assert np.array_equal(r.estimate, d.numpy())
    assert np.array_equal(r.stderr, np.zeros(40))
    assert r.trace == pytest.approx(float(d.sum()), rel=1e-14) and r.trace_stderr == 0.0


@pytest.mark.parametrize("method", ["diagpp", "xdiag"])
def test_deflated_method_is_exact_when_budget_covers_dim(method):
    H, _ = known_spectrum(30)
    op = BlockedDense(H, [10, 20])
    r = ht.diagonal(op, method=method, max_hvps=30, seed=0)
    np.testing.assert_allclose(r.estimate, torch.diagonal(H).numpy(), rtol=0, atol=1e-12)
    assert np.array_equal(r.stderr, np.zeros(30)) and r.trace_stderr == 0.0
    assert r.hvps == 30 and r.n_probes == 0
    assert [b.sum_stderr for b in r.blocks] == [0.0, 0.0]


@pytest.mark.parametrize("method", ["diagpp", "xdiag"])
def test_deflated_method_is_exact_on_low_rank(method):
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(200, 5, generator=g, dtype=torch.float64))
    L = (U * torch.tensor([5.0, 3.0, -2.0, 1.0, 0.5], dtype=torch.float64)) @ U.T
    r = ht.diagonal(L, method=method, max_hvps=20, seed=0)  # sketch 6 (Diag++) or 9 (XDiag) ≥ rank 5
    np.testing.assert_allclose(r.estimate, torch.diagonal(L).numpy(), rtol=0, atol=1e-12)
    assert r.stderr.max() < 1e-12
    hutchinson = ht.diagonal(L, method="hutchinson", max_hvps=20, seed=0)
    assert hutchinson.stderr.max() > 1e-3  # the plain estimator is not exact here


def test_xdiag_downdating_matches_leave_one_out_qrs():
    """The definition: one QR per left-out probe, the same probes as xdiag."""
    A = low_rank_plus_noise(dim=60, seed=3)
    s = 8
    Om = rademacher(60, s, seeded_generator(5)[0])
    Y = A @ Om
    samples = []
    for i in range(s):
        Qi, _ = torch.linalg.qr(torch.cat([Y[:, :i], Y[:, i + 1 :]], dim=1))
        Pi = Qi @ Qi.T
        residual = Y[:, i] - Pi @ Y[:, i]  # (I − Q_(i)Q_(i)ᵀ) A ω_i
        samples.append(torch.diagonal(Pi @ A) + Om[:, i] * residual)
    samples = torch.stack(samples, dim=1)
    r = xdiag(A, max_hvps=2 * s, seed=5, block_size=3)
    np.testing.assert_allclose(r.estimate, samples.mean(1).numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(r.stderr, (samples.std(1) / math.sqrt(s)).numpy(), rtol=1e-6, atol=1e-10)
    assert (r.n_probes, r.sketch, r.hvps) == (s, s, 2 * s)


def test_diagpp_matches_its_definition():
    A = low_rank_plus_noise(dim=60, seed=4)
    g, _ = seeded_generator(2)
    Q, _ = torch.linalg.qr(A @ rademacher(60, 5, g))
    Z = torch.cat([rademacher(60, 4, g), rademacher(60, 3, g)], dim=1)  # in blocks of 4, as diagpp draws them
    samples = Z * ((torch.eye(60, dtype=torch.float64) - Q @ Q.T) @ A @ Z)
    r = diagpp(A, max_hvps=17, sketch=5, seed=2, block_size=4)
    expected = torch.diagonal(Q @ Q.T @ A) + samples.mean(1)
    np.testing.assert_allclose(r.estimate, expected.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(r.stderr, (samples.std(1) / math.sqrt(7)).numpy(), rtol=1e-6, atol=1e-10)
    assert (r.n_probes, r.sketch, r.hvps) == (7, 5, 17)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_result_and_hvp_count(method, models):
    H, _ = known_spectrum(100)
    counting = CountingOperator(H)
    a = ht.diagonal(counting, method=method, max_hvps=41, seed=7)
    assert a.hvps == counting.hvps == (40 if method == "xdiag" else 41)
    b = ht.diagonal(H, method=method, max_hvps=41, seed=7)
    assert np.array_equal(a.estimate, b.estimate) and np.array_equal(a.stderr, b.stderr) and a == b
    assert not np.array_equal(ht.diagonal(H, method=method, max_hvps=41, seed=8).estimate, a.estimate)
    assert (a.method, a.seed, a.dim) == (method, 7, 100)
    fresh = ht.diagonal(H, method=method, max_hvps=41, seed=None)  # a fresh seed, recorded: reproducible
    again = ht.diagonal(H, method=method, max_hvps=41, seed=fresh.seed)
    assert isinstance(fresh.seed, int) and np.array_equal(fresh.estimate, again.estimate)
    op, _ = models["mlp"]
    before = op.hvps
    ht.diagonal(op, method=method, max_hvps=20, seed=0)
    assert op.hvps - before == 20


def test_bad_input_raises():
    H, _ = known_spectrum(40)
    with pytest.raises(ValueError, match="unknown diagonal method"):
        ht.diagonal(H, method="hutchpp")
    bad_budgets = [
        ("hutchinson", 1),
        ("diagpp", 3),
        ("xdiag", 3),
        ("xdiag", 10.0),
        ("diagpp", True),
        ("hutchinson", None),
    ]
    for method, bad in bad_budgets:
        with pytest.raises(ValueError, match="max_hvps"):
            ht.diagonal(H, method=method, max_hvps=bad)
    with pytest.raises(ValueError, match="residual probes"):
        diagpp(H, max_hvps=20, sketch=10)
    with pytest.raises(ValueError, match="block_size"):
        hutchinson_diagonal(H, block_size=0)
    with pytest.raises(TypeError, match="expected an operator"):
        ht.diagonal("not an operator")


def test_result_json_round_trip(monkeypatch):
    H, _ = known_spectrum(60)
    r = ht.diagonal(BlockedDense(H, [20, 40]), method="diagpp", max_hvps=20, seed=3)
    back = result_from_dict(json.loads(r.to_json()))
    assert isinstance(back, DiagonalResult) and back == r
    assert np.array_equal(back.estimate, r.estimate) and np.array_equal(back.stderr, r.stderr)
    assert back.blocks == r.blocks and back.blocks[1].name == "b1"
    # above the size threshold the arrays stay in memory only; the block summaries are always written
    monkeypatch.setattr(DiagonalResult, "max_serialised_dim", 50)
    small = json.loads(r.to_json())
    assert small["estimate"] is None and small["stderr"] is None and len(small["blocks"]) == 2
    back = DiagonalResult.from_dict(small)
    assert back.estimate is None and back == r and back.blocks == r.blocks
    assert len(json.loads(r.to_json(arrays=True))["estimate"]) == 60
    monkeypatch.undo()
    assert r.to_dict(arrays=False)["estimate"] is None
