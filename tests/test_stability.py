"""Noise stability E[f(W+U)] − f(W) against σ²/2·Tr(H): exact on a quadratic loss, → 1 as σ → 0 otherwise."""

import math

import pytest
import torch
from helpers import PROBLEMS, TinyCNN, batches
from torch import nn
from torch.func import functional_call

from hessian_tools import HessianOperator
from hessian_tools.estimators import trace
from hessian_tools.estimators.probes import gaussian_rows
from hessian_tools.results import StabilityCurveResult, StabilityResult
from hessian_tools.stability import PerturbedEvaluator, noise_stability, stability_curve

mse = nn.functional.mse_loss
ce = nn.functional.cross_entropy


def linear_regression(seed=0, n=60, d=6):
    """f(W) = mean((Xw + b − y)²): exactly quadratic, H = (2/N)·[X 1]ᵀ[X 1] constant. W is random,
    far from the least-squares solution, so the gradient (the one-sided noise) is large."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = torch.randn(n, 1, generator=g)
    torch.manual_seed(seed)
    model = nn.Linear(d, 1)
    with torch.no_grad():
        model.weight.mul_(5.0)
    A = torch.cat([X.double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    exact_trace = float(2.0 / n * (A * A).sum())
    return model, X, y, exact_trace


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [
        m.training for m in model.modules()
    ]


def assert_unchanged(model, snap):
    state, flags = snap
    now = model.state_dict()
    assert state.keys() == now.keys()
    for k, v in state.items():
        assert v.dtype == now[k].dtype and torch.equal(v, now[k]), k  # bit for bit
    assert flags == [m.training for m in model.modules()]


def test_quadratic_loss_matches_half_sigma_squared_trace():
    model, X, y, T = linear_regression()
    op = HessianOperator(model, mse, (X, y), dtype=torch.float64)
    H = op.dense()
    _, g = op.loss_and_gradient()
    for sigma in (0.05, 0.5, 2.0):  # exact at every σ: the loss is a quadratic
        r = noise_stability(model, mse, (X, y), sigma, n_samples=200, seed=1, dtype=torch.float64)
        predicted = sigma**2 / 2 * T
        assert abs(r.estimate - predicted) <= 3 * r.stderr, (sigma, r.estimate, predicted, r.stderr)
        assert r.evaluations == 201 and r.n_samples == 200 and len(r.samples) == 100
        # Variance per evaluation: one-sided σ²‖g‖² + V, antithetic pair V = Var(½UᵀHU) = σ⁴‖H‖_F²/2,
        # so at equal cost the reduction factor is (σ²‖g‖² + V)/(2V): huge at small σ, → ½ at large σ.
        V = sigma**4 * float((H * H).sum()) / 2
        expected = (sigma**2 * float(g @ g) + V) / (2 * V)
        assert 0.6 < r.variance_reduction / expected < 1.6, (sigma, r.variance_reduction, expected)
    small = noise_stability(model, mse, (X, y), 0.05, n_samples=200, seed=1, dtype=torch.float64)
    assert small.variance_reduction > 100 and small.one_sided_stderr > 10 * small.stderr


def test_antithetic_sample_is_exactly_the_quadratic_form():
    """On a quadratic, each pair's sample equals ½ UᵀHU (the odd terms cancel exactly)."""
    model, X, y, _ = linear_regression(seed=3)
    op = HessianOperator(model, mse, (X, y), dtype=torch.float64)
    H = op.dense()
    sigma = 0.3
    r = noise_stability(model, mse, (X, y), sigma, n_samples=8, seed=5, dtype=torch.float64)
    Z = gaussian_rows(torch.Generator().manual_seed(5), op.dim, 4)
    expected = [0.5 * sigma**2 * float(z @ H @ z) for z in Z]
    assert r.samples == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_one_sided_has_the_same_mean_but_larger_variance():
    model, X, y, T = linear_regression(seed=2)
    a = noise_stability(model, mse, (X, y), 0.05, n_samples=128, seed=0, dtype=torch.float64)
    b = noise_stability(
        model, mse, (X, y), 0.05, n_samples=128, antithetic=False, seed=0, dtype=torch.float64
    )
    assert b.variance_reduction == 1.0 and b.one_sided_stderr == b.stderr
    assert b.stderr > 4 * a.stderr
    assert abs(b.estimate - 0.00125 * T) <= 3 * b.stderr
    # the one-sided error bar reported by the antithetic run is the right size
    assert 0.5 < a.one_sided_stderr / b.stderr < 2.0


def test_ratio_tends_to_one_for_non_quadratic_loss():
    model, loss_fn, X, y = PROBLEMS["mlp"]()  # tanh MLP, cross-entropy
    op = HessianOperator(model, loss_fn, (X, y), dtype=torch.float64)
    T = float(torch.trace(op.dense()))
    sigmas = [3.0, 1e-3, 1e-2, 0.1, 1.0]
    curve = stability_curve(model, loss_fn, (X, y), sigmas, T, n_samples=256, seed=0, dtype=torch.float64)
    assert curve.sigmas == tuple(sorted(sigmas))
    dev = [abs(r - 1) for r in curve.ratio]
    # the smallest σ: the ratio is 1 within 3 standard errors (the spread of ½σ²ZᵀHZ over the draws)
    assert dev[0] <= 3 * curve.ratio_stderr[0], (curve.ratio, curve.ratio_stderr)
    # Sharper, free of sampling noise: against the same draws' own second-order term ½σ²·mean(ZᵀHZ)
    # (the Taylor prediction for these U), measured/prediction → 1 with an O(σ²) error.
    H = op.dense()
    Z = gaussian_rows(torch.Generator().manual_seed(0), op.dim, 128)
    quad = float(torch.einsum("ki,ij,kj->k", Z, H, Z).mean())
    own = [abs(m / (s * s / 2 * quad) - 1) for s, m in zip(curve.sigmas, curve.measured)]
    assert own[0] < 1e-6 and own[1] < 1e-4, own
    assert own[0] < own[1] < own[2] < own[3], own
    assert dev[-1] > 0.25  # σ = 3 saturates the loss: far from the second-order prediction
    assert curve.taylor_holds[:3] == (True, True, True)
    assert curve.breakdown_index is not None and curve.breakdown_index >= 3
    assert curve.breakdown_sigma == curve.sigmas[curve.breakdown_index]
    assert all(not h for h in curve.taylor_holds[curve.breakdown_index :])
    for i in range(len(sigmas)):
        assert curve.predicted[i] == pytest.approx(curve.sigmas[i] ** 2 / 2 * T)
        assert curve.predicted_stderr[i] == 0.0
    assert curve.evaluations == 1 + 5 * 256
    again = StabilityCurveResult.from_dict(curve.to_dict())
    assert again == curve


def test_curve_with_operator_propagates_trace_stderr():
    model, X, y, T = linear_regression(seed=4)
    op = HessianOperator(model, mse, (X, y), dtype=torch.float64)
    curve = stability_curve(
        model,
        mse,
        (X, y),
        [0.1, 0.4],
        op,
        n_samples=64,
        dtype=torch.float64,
        trace_kwargs={"method": "hutchinson", "max_hvps": 20},
    )
    assert curve.hvps == 20 and curve.trace_stderr > 0
    for s, p, ps in zip(curve.sigmas, curve.predicted, curve.predicted_stderr):
        assert p == pytest.approx(s * s / 2 * curve.trace) and ps == pytest.approx(
            s * s / 2 * curve.trace_stderr
        )
    assert all(curve.taylor_holds)
    assert curve.breakdown_index is None and curve.breakdown_sigma is None
    tr = trace(op, method="hutchinson", max_hvps=20, seed=0)
    same = stability_curve(model, mse, (X, y), [0.1, 0.4], tr, n_samples=64, dtype=torch.float64)
    assert same.measured == curve.measured and same.trace == curve.trace
    with pytest.raises(ValueError, match="same params"):
        stability_curve(model, mse, (X, y), [0.1], tr, params=["bias"], n_samples=8)


def test_weights_restored_bit_for_bit_eval_and_train_mode():
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
    model.train()  # a flag to be restored
    X, y = torch.randn(20, 1, 6, 6), torch.randint(0, 3, (20,))
    snap = snapshot(model)
    noise_stability(model, ce, batches(X, y, 7), 0.5, n_samples=8)
    assert_unchanged(model, snap)
    noise_stability(model, ce, batches(X, y, 7), 0.5, n_samples=8, mode="train")  # BN updates a copy
    assert_unchanged(model, snap)
    noise_stability(model, ce, (X, y), 0.5, n_samples=8, params="head", dtype=torch.float64)
    assert_unchanged(model, snap)


def test_chunking_batching_and_seeds():
    model, loss_fn, X, y = PROBLEMS["mlp"]()
    kw = dict(n_samples=16, seed=3, dtype=torch.float64)
    ref = noise_stability(model, loss_fn, (X, y), 0.2, chunk_size=1, **kw)  # plain loop
    for chunk, data in ((5, (X, y)), ("auto", batches(X, y, 10)), (None, batches(X, y, 30))):
        r = noise_stability(model, loss_fn, data, 0.2, chunk_size=chunk, **kw)  # vmap, uneven batches
        assert r.estimate == pytest.approx(ref.estimate, rel=1e-10, abs=1e-14)
        assert r.samples == pytest.approx(ref.samples, rel=1e-9, abs=1e-14)
    assert noise_stability(model, loss_fn, (X, y), 0.2, chunk_size=1, **kw) == ref  # same seed, same result
    other = noise_stability(model, loss_fn, (X, y), 0.2, n_samples=16, seed=4, dtype=torch.float64)
    assert other.samples != ref.samples
    assert StabilityResult.from_dict(ref.to_dict()) == ref


def test_evaluator_matches_functional_call_and_subset_selection():
    model, loss_fn, X, y = PROBLEMS["mlp"]()
    ev = PerturbedEvaluator(model, batches(X, y, 16), params=["2.weight"], dtype=torch.float64)
    offsets = torch.randn(3, ev.dim, dtype=torch.float64)
    values = ev.evaluate(loss_fn, offsets)
    for k in range(3):
        params = {n: p.detach().double() for n, p in model.named_parameters()}
        params["2.weight"] = params["2.weight"] + offsets[k].view_as(params["2.weight"])
        expected = float(loss_fn(functional_call(model, params, (X.double(),)), y))
        assert float(values[k]) == pytest.approx(expected, rel=1e-12)


def test_bad_input():
    model, X, y, _ = linear_regression()
    for sigma in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="sigma"):
            noise_stability(model, mse, (X, y), sigma)
    with pytest.raises(ValueError, match="even"):
        noise_stability(model, mse, (X, y), 0.1, n_samples=7)
    with pytest.raises(ValueError, match="n_samples"):
        noise_stability(model, mse, (X, y), 0.1, n_samples=1, antithetic=False)
    with pytest.raises(ValueError, match="mode"):
        noise_stability(model, mse, (X, y), 0.1, mode="test")
    with pytest.raises(ValueError, match="sigmas"):
        stability_curve(model, mse, (X, y), [], 1.0)
    with pytest.raises(TypeError, match="trace"):
        stability_curve(model, mse, (X, y), [0.1], "big")
