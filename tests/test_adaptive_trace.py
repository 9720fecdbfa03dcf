"""Adaptive XTrace, the default of ``trace``: staged sketches that waste no HVP, a jackknife error bar
that matches its definition, and 95% intervals that cover exact traces at their nominal rate."""

import math

import pytest
import torch
from helpers import PROBLEMS, exact_hessian, known_spectrum

import hessian_tools as ht
from hessian_tools.estimators.common import CountingOperator
from hessian_tools.estimators.epperly2024xtrace import XTraceSketch, _next_stage, xtrace
from hessian_tools.results import TraceResult
from hessian_tools.seeding import seeded_generator

RUNS = 200  # coverage runs per matrix


def rotated(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(λ) Qᵀ with a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return (Q * eigenvalues) @ Q.T


def model_hessian(name: str) -> torch.Tensor:
    model, loss_fn, X, y = PROBLEMS[name]()
    return exact_hessian(model, loss_fn, X, y)


MATRICES = {
    "decaying": lambda: rotated(1.0 / torch.arange(1, 121, dtype=torch.float64)),
    "flat": lambda: rotated(
        0.5 + 0.5 * torch.rand(120, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ),
    "outliers": lambda: known_spectrum(120)[0],
    "mlp": lambda: model_hessian("mlp"),
    "cnn_bn": lambda: model_hessian("cnn_bn"),
}


def xtrace_definition(A: torch.Tensor, Omega: torch.Tensor) -> float:
    """XTrace by its definition: one QR per left-out probe (no downdating)."""
    n, s = Omega.shape
    Y = A @ Omega
    total = 0.0
    for i in range(s):
        Q, _ = torch.linalg.qr(torch.cat([Y[:, :i], Y[:, i + 1 :]], dim=1))
        u = Omega[:, i] - Q @ (Q.T @ Omega[:, i])
        total += float(torch.trace(Q.T @ A @ Q) + (n - s + 1) * (u @ A @ u) / (u @ u))
    return total / s


def grown_sketch(A: torch.Tensor, stages, seed: int = 3) -> XTraceSketch:
    sketch = XTraceSketch(CountingOperator(A), seeded_generator(seed)[0])
    for size in stages:
        sketch.grow(size)
    return sketch


def test_staged_sketch_is_xtrace_of_all_its_probes_and_wastes_no_hvp():
    A, _ = known_spectrum(80)
    sketch = grown_sketch(A, (5, 4, 7))
    assert sketch.probes == 16 and sketch.H.hvps == 32
    assert float(sketch.samples().mean()) == pytest.approx(xtrace_definition(A, sketch.Omega), rel=1e-11)


def test_leave_one_probe_out_matches_xtrace_on_the_other_probes():
    A, _ = known_spectrum(60, seed=2)
    sketch = grown_sketch(A, (6, 5))
    expected = [xtrace_definition(A, sketch.Omega[:, [k for k in range(11) if k != j]]) for j in range(11)]
    torch.testing.assert_close(
        sketch.leave_one_probe_out(), torch.tensor(expected, dtype=torch.float64), rtol=1e-11, atol=1e-11
    )


@pytest.mark.parametrize("name", list(MATRICES))
def test_adaptive_intervals_cover_the_exact_trace_and_meet_rtol(name):
    A = MATRICES[name]()
    exact = float(torch.trace(A))
    results = [ht.trace(A, rtol=0.05, seed=seed) for seed in range(RUNS)]
    for r in results:
        assert r.method == "xtrace" and r.converged and r.hvps == 2 * r.n_probes
        assert 1.96 * r.stderr <= 0.05 * abs(r.estimate)
    covered = sum(abs(r.estimate - exact) <= 1.96 * r.stderr for r in results)
    # At the nominal 95%, covered ~ Binomial(200, 0.95): mean 190, sd 3.1; fewer than 180 (90%) has
    # probability ≈ 0.1%, while a true coverage of 85% passes this bar with probability ≈ 2.5%.
    assert covered >= 0.9 * RUNS, covered


def test_rtol_out_of_reach_stops_at_the_budget():
    A, _ = known_spectrum(200)
    r = ht.trace(A, rtol=1e-6, max_hvps=41, seed=0)
    assert not r.converged and r.hvps <= 41 and r.n_probes == 20
    assert r.rtol == 1e-6


def test_small_operator_is_exact_when_the_sketch_fills_the_space():
    A, lam = known_spectrum(20)
    r = ht.trace(A, rtol=1e-4, seed=1)
    assert r.converged and r.n_probes == 20 and r.stderr == 0.0
    assert r.estimate == pytest.approx(float(lam.sum()), rel=1e-10)


def test_next_stage_grows_at_most_twofold_and_within_budget():
    assert _next_stage([(8, 1.0)], 1e-6, 1000) == 8  # far from the target: double
    assert _next_stage([(8, 1.0)], 0.99, 1000) == 2  # almost there: the smallest step
    assert _next_stage([(8, 1.0)], 0.5, 1000) == 8  # rate 1: twice the probes halve the error
    assert _next_stage([(8, 2.0), (16, 1.0)], 0.5, 20) == 4  # the budget caps the stage
    assert _next_stage([(8, 1.0), (16, 1.0 / math.sqrt(2))], 0.5, 1000) == 16  # rate ½: 32 probes wanted


def test_default_method_seed_and_json_round_trip():
    A, _ = known_spectrum(100)
    a, b = ht.trace(A, rtol=0.02, seed=5), ht.trace(A, rtol=0.02, seed=5)
    assert a == b and a.method == "xtrace" and a.seed == 5 and a.rtol == 0.02
    assert TraceResult.from_dict(a.to_dict()) == a
    fixed = ht.trace(A, max_hvps=40, seed=5)
    assert fixed.method == "xtrace" and fixed.hvps == 40 and fixed.rtol is None


def test_error_bar_choice_is_checked_and_exchangeable_is_smaller():
    A, _ = known_spectrum(100)
    jackknife = xtrace(A, max_hvps=40, seed=0)
    exchangeable = xtrace(A, max_hvps=40, seed=0, error_bar="exchangeable")
    assert jackknife.estimate == exchangeable.estimate and jackknife.stderr > exchangeable.stderr
    with pytest.raises(ValueError, match="error_bar"):
        xtrace(A, max_hvps=40, error_bar="bootstrap")
    with pytest.raises(ValueError, match="rtol"):
        ht.trace(A, rtol=0.0)
