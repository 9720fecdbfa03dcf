"""Trace estimators against exact traces: error bars that hold, shrink, and sum over blocks."""

import pytest
import torch
from helpers import PROBLEMS, batches, exact_hessian, known_spectrum

import hessian_tools as ht
from hessian_tools.results import TraceResult

SEEDS = range(20)


@pytest.fixture(scope="module")
def mlp_op():
    model, loss_fn, X, y = PROBLEMS["mlp"]()
    op = ht.HessianOperator(model, loss_fn, batches(X, y, 32), dtype=torch.float64)
    return op, exact_hessian(model, loss_fn, X, y)


@pytest.fixture(scope="module")
def spectrum_op():
    H, lam = known_spectrum()
    return ht.DenseOperator(H), H


def _misses(op, H, method, budget):
    exact = float(torch.trace(H))
    results = [ht.trace(op, method=method, max_hvps=budget, seed=s) for s in SEEDS]
    misses = sum(abs(r.estimate - exact) > 3 * r.stderr for r in results)
    return misses, results


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
@pytest.mark.parametrize("which", ["mlp_op", "spectrum_op"])
def test_trace_within_three_stderr_of_exact(method, which, request):
    op, H = request.getfixturevalue(which)
    misses, results = _misses(op, H, method, 60)
    # P(|Z| > 3) = 0.27%: more than 2 misses in 20 seeds means the error bar is wrong.
    assert misses <= 2, [(r.estimate, r.stderr) for r in results]
    assert all(r.hvps == 60 for r in results)


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_reported_error_shrinks_with_budget(method, spectrum_op):
    op, H = spectrum_op
    small = [ht.trace(op, method=method, max_hvps=30, seed=s).stderr for s in range(8)]
    large = [ht.trace(op, method=method, max_hvps=240, seed=s).stderr for s in range(8)]
    # 8× the budget: Hutchinson's stderr falls ~√8 ≈ 2.8×; Hutch++ at least as fast.
    assert sum(large) < sum(small) / 2.2


def test_hutchpp_beats_hutchinson_on_a_spectrum_with_outliers(spectrum_op):
    op, H = spectrum_op
    exact = float(torch.trace(H))
    err = {
        m: sum(abs(ht.trace(op, method=m, max_hvps=60, seed=s).estimate - exact) for s in range(10))
        for m in ("hutchinson", "hutchpp")
    }
    assert err["hutchpp"] < err["hutchinson"] / 3


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_block_traces_sum_to_total_and_match_exact_blocks(method, mlp_op):
    op, H = mlp_op
    r = ht.trace(op, method=method, max_hvps=90, seed=3)
    assert [b.name for b in r.blocks] == [b.name for b in op.blocks]
    assert sum(b.estimate for b in r.blocks) == pytest.approx(r.estimate, rel=1e-10, abs=1e-12)
    for block, est in zip(op.blocks, r.blocks):
        exact = float(torch.diagonal(H)[block.slice].sum())
        assert abs(est.estimate - exact) <= 4 * est.stderr + 1e-9, (block.name, est, exact)


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_sequential_rule_meets_rtol(method, spectrum_op):
    op, H = spectrum_op
    exact = float(torch.trace(H))
    hits = 0
    for seed in range(10):
        r = ht.trace(op, method=method, rtol=0.01, max_hvps=20000, seed=seed)
        assert r.converged and 1.96 * r.stderr <= 0.01 * abs(r.estimate)
        hits += abs(r.estimate - exact) <= 0.01 * abs(exact)
    assert hits >= 8  # ~95% coverage of the 1% interval


def test_sequential_rule_reports_non_convergence_within_budget(spectrum_op):
    op, H = spectrum_op
    r = ht.trace(op, method="hutchinson", rtol=1e-5, max_hvps=40, seed=0)
    assert not r.converged and r.hvps == 40


def test_hutchpp_is_exact_when_the_sketch_spans_the_range():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(100, 4, generator=g, dtype=torch.float64)
    H = U @ torch.diag(torch.tensor([5.0, 3.0, -2.0, 1.0], dtype=torch.float64)) @ U.T
    r = ht.trace(H, method="hutchpp", max_hvps=30, sketch=8, seed=1)
    assert r.estimate == pytest.approx(float(torch.trace(H)), rel=1e-10)
    assert r.stderr < 1e-9


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_same_seed_same_numbers_and_json_round_trip(method, mlp_op):
    op, _ = mlp_op
    a = ht.trace(op, method=method, max_hvps=40, seed=7)
    b = ht.trace(op, method=method, max_hvps=40, seed=7)
    c = ht.trace(op, method=method, max_hvps=40, seed=8)
    assert a == b and a.estimate != c.estimate
    back = TraceResult.from_dict(a.to_dict())
    assert back == a and back.seed == 7 and back.hvps == 40


def test_trace_accepts_scipy_and_numpy_operators(spectrum_op):
    op, H = spectrum_op
    import scipy.sparse.linalg as sla

    ref = ht.trace(op, max_hvps=45, seed=2).estimate
    assert ht.trace(sla.aslinearoperator(H.numpy()), max_hvps=45, seed=2).estimate == pytest.approx(
        ref, rel=1e-12
    )
    assert ht.trace(H.numpy(), max_hvps=45, seed=2).estimate == pytest.approx(ref, rel=1e-12)


def test_bad_options_are_refused(spectrum_op):
    op, _ = spectrum_op
    with pytest.raises(ValueError, match="unknown trace method"):
        ht.trace(op, method="pyhessian")
    with pytest.raises(ValueError, match="rtol"):
        ht.trace(op, rtol=2.0)
    with pytest.raises(ValueError, match="max_hvps"):
        ht.trace(op, method="hutchpp", max_hvps=4, sketch=2)
    with pytest.raises(TypeError, match="operator"):
        ht.trace("not an operator")
