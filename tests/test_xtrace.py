"""XTrace against exact traces: a dense matrix with a known spectrum and the Hessian of a tiny MLP."""

import math

import pytest
import torch
from helpers import PROBLEMS, BlockedDense, known_spectrum

from hessian_tools.estimators.common import CountingOperator
from hessian_tools.estimators.epperly2024xtrace import xtrace
from hessian_tools.estimators.probes import gaussian
from hessian_tools.estimators.trace import trace
from hessian_tools.operators.hessian import HessianOperator
from hessian_tools.seeding import seeded_generator


@pytest.fixture(scope="module")
def spectrum():
    A, lam = known_spectrum(300)
    return A, float(lam.sum())


@pytest.fixture(scope="module")
def mlp():
    model, loss_fn, X, y = PROBLEMS["mlp"]()
    op = HessianOperator(model, loss_fn, [(X, y)], dtype=torch.float64)
    return op, op.dense()


def brute_force_samples(A, s, seed):
    """The definition: one QR per left-out column, same probes as xtrace."""
    n = A.shape[0]
    Om = gaussian(n, s, seeded_generator(seed)[0])
    Om = Om * (math.sqrt(n) / Om.norm(dim=0))
    Y = A @ Om
    out = []
    for i in range(s):
        Qi, _ = torch.linalg.qr(torch.cat([Y[:, :i], Y[:, i + 1 :]], dim=1))
        u = Om[:, i] - Qi @ (Qi.T @ Om[:, i])
        out.append(float(torch.trace(Qi.T @ A @ Qi) + (n - s + 1) * (u @ A @ u) / (u @ u)))
    return torch.tensor(out, dtype=torch.float64)


def test_downdating_matches_leave_one_out_qrs(spectrum):
    A, _ = spectrum
    result = xtrace(A, max_hvps=24, seed=3)
    expected = brute_force_samples(A, 12, 3)
    torch.testing.assert_close(
        torch.tensor(result.samples, dtype=torch.float64), expected, rtol=1e-10, atol=1e-10
    )
    assert result.estimate == pytest.approx(float(expected.mean()), rel=1e-12)


def test_error_bar_covers_exact_trace(spectrum):
    A, exact = spectrum
    inside = sum(
        abs(r.estimate - exact) <= 3 * r.stderr for r in (xtrace(A, max_hvps=40, seed=s) for s in range(20))
    )
    assert inside >= 18


def test_stderr_shrinks_with_budget(spectrum):
    A, exact = spectrum
    small = [xtrace(A, max_hvps=20, seed=s) for s in range(6)]
    large = [xtrace(A, max_hvps=160, seed=s) for s in range(6)]
    mean_se = lambda rs: sum(r.stderr for r in rs) / len(rs)
    rms = lambda rs: math.sqrt(sum((r.estimate - exact) ** 2 for r in rs) / len(rs))
    assert mean_se(large) < 0.5 * mean_se(small)
    assert rms(large) < rms(small)


@pytest.mark.parametrize(
    "max_hvps, error_bar",
    [
        (12, "exchangeable"),
        (13, "exchangeable"),
        (30, "exchangeable"),
        (14, "jackknife"),
        (15, "jackknife"),
        (30, "jackknife"),
    ],
)
def test_exact_on_low_rank(max_hvps, error_bar):
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(200, 5, generator=g, dtype=torch.float64))
    L = (U * torch.tensor([5.0, 3.0, -2.0, 1.0, 0.5], dtype=torch.float64)) @ U.T
    # exact once s − 1 ≥ rank = 5; the jackknife's leave-two-out sketches need s − 2 ≥ rank
    result = xtrace(L, max_hvps=max_hvps, seed=0, error_bar=error_bar)
    assert result.estimate == pytest.approx(7.5, abs=1e-10)
    assert result.stderr < 1e-10
    assert result.hvps == 2 * (max_hvps // 2)


def test_zero_operator_and_full_budget():
    zero = xtrace(torch.zeros(50, 50, dtype=torch.float64), max_hvps=10)
    assert zero.estimate == 0.0 and zero.stderr == 0.0
    A, lam = known_spectrum(20)
    full = xtrace(A, max_hvps=40)  # s = 20 ≥ dim: exact with dim HVPs
    assert full.estimate == pytest.approx(float(lam.sum()), abs=1e-10)
    assert full.stderr == 0.0 and full.hvps == 20


def test_hessian_of_mlp_with_blocks(mlp):
    op, H = mlp
    exact = float(torch.trace(H))
    results = [xtrace(op, max_hvps=40, seed=s) for s in range(10)]
    assert sum(abs(r.estimate - exact) <= 3 * r.stderr for r in results) >= 9
    for r in results:
        assert [b.name for b in r.blocks] == [b.name for b in op.blocks]
        assert sum(b.estimate for b in r.blocks) == pytest.approx(r.estimate, rel=1e-10, abs=1e-12)
        assert r.hvps == 40 and r.method == "xtrace" and r.n_probes == 20
    exact_blocks = [float(torch.diagonal(H)[b.slice].sum()) for b in op.blocks]
    inside = sum(
        abs(b.estimate - e) <= 3 * b.stderr + 1e-12 for r in results for b, e in zip(r.blocks, exact_blocks)
    )
    assert inside >= 0.9 * len(results) * len(exact_blocks)


def test_block_traces_are_unbiased():
    A, lam = known_spectrum(60, seed=4)
    op = BlockedDense(A, [10, 30, 20])
    exact = [float(torch.diagonal(A)[b.slice].sum()) for b in op.blocks]
    runs = [xtrace(op, max_hvps=16, seed=s) for s in range(150)]
    for number, target in enumerate(exact):
        values = torch.tensor([r.blocks[number].estimate for r in runs], dtype=torch.float64)
        se = float(values.std()) / math.sqrt(len(values))
        assert abs(float(values.mean()) - target) <= 4 * se


def test_hvp_count_determinism_and_dispatch(spectrum, mlp):
    A, _ = spectrum
    counting = CountingOperator(A)
    a = xtrace(counting, max_hvps=31, seed=7)
    assert counting.hvps == 30 == a.hvps
    b = xtrace(A, max_hvps=31, seed=7)
    assert a.samples == b.samples and a.estimate == b.estimate
    assert xtrace(A, max_hvps=31, seed=8).estimate != a.estimate
    assert trace(A, method="xtrace", max_hvps=31, seed=7).estimate == a.estimate
    assert xtrace(A, max_hvps=31, seed=7, keep_samples=False).samples == ()
    op, _ = mlp
    before = op.hvps, op.passes
    xtrace(op, max_hvps=20, seed=0)
    assert (op.hvps - before[0], op.passes - before[1]) == (20, 2)


@pytest.mark.parametrize("bad", [0, 3, -4, 10.0, True, "100"])  # None: the default budget
def test_bad_budget_raises(spectrum, bad):
    with pytest.raises(ValueError):
        xtrace(spectrum[0], max_hvps=bad)
