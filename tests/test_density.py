"""SLQ spectral density against exact spectra (dense known spectrum, tiny-MLP Hessian)."""

import math

import numpy as np
import pytest
import torch
from helpers import PROBLEMS, known_spectrum

from hessian_tools.estimators.common import CountingOperator
from hessian_tools.estimators.density import density
from hessian_tools.estimators.probes import rademacher
from hessian_tools.operators.hessian import HessianOperator
from hessian_tools.results import DensityResult
from hessian_tools.seeding import seeded_generator


@pytest.fixture(scope="module")
def spectrum():
    return known_spectrum(300)


@pytest.fixture(scope="module")
def mlp():
    model, loss_fn, X, y = PROBLEMS["mlp"]()
    op = HessianOperator(model, loss_fn, [(X, y)], dtype=torch.float64)
    return op, op.dense()


def test_moments_cover_trace_and_frobenius(spectrum):
    A, lam = spectrum
    tr, fro2, dim = float(lam.sum()), float((lam**2).sum()), A.shape[0]
    # m2 = ‖Hv‖² is very skewed here (outliers up to 50): its t-interval undercovers a little at
    # small n_probes (≈94% for 30 probes over 200 seeds), hence "most seeds".
    runs = [density(A, n_probes=30, steps=3, seed=s) for s in range(20)]
    assert sum(abs(r.moments["m1"] * dim - tr) <= 3 * r.moments["m1_stderr"] * dim for r in runs) >= 18
    assert sum(abs(r.moments["m2"] * dim - fro2) <= 3 * r.moments["m2_stderr"] * dim for r in runs) >= 17
    for r in runs:
        assert r.moments["trace"] == pytest.approx(r.moments["m1"] * dim)
        assert r.moments["trace_stderr"] == pytest.approx(r.moments["m1_stderr"] * dim)


def test_moments_equal_the_probes_quadratic_forms(spectrum):
    """m1 = mean vᵀHv and m2 = mean ‖Hv‖² for the unit Rademacher probes (Gauss rule exactness)."""
    A, _ = spectrum
    r = density(A, n_probes=7, steps=5, seed=11)
    V = rademacher(A.shape[0], 7, seeded_generator(11)[0]) / math.sqrt(A.shape[0])
    HV = A @ V
    assert r.moments["m1"] == pytest.approx(float((V * HV).sum(0).mean()), rel=1e-12)
    assert r.moments["m2"] == pytest.approx(float((HV * HV).sum(0).mean()), rel=1e-10)
    se = float((V * HV).sum(0).std()) / math.sqrt(7)
    assert r.moments["m1_stderr"] == pytest.approx(se, rel=1e-10)


def test_nodes_inside_spectrum_and_extremes_found(spectrum):
    A, lam = spectrum
    r = density(A, n_probes=5, steps=60, seed=0)
    tiny = 1e-9 * float(lam.abs().max())
    assert r.nodes.min() >= float(lam.min()) - tiny and r.nodes.max() <= float(lam.max()) + tiny
    assert r.nodes.max() == pytest.approx(float(lam.max()), rel=1e-8)
    assert r.nodes.shape == r.weights.shape == (5, 60)
    np.testing.assert_allclose(r.weights.sum(1), 1.0, rtol=1e-12)
    assert (r.weights >= 0).all()


def test_full_lanczos_reproduces_eigenvalues():
    A, lam = known_spectrum(200, seed=3)
    r = density(A, n_probes=1, steps=250, seed=2)
    assert r.lengths == (200,) and r.hvps == 200
    np.testing.assert_allclose(np.sort(r.nodes[0]), np.sort(lam.numpy()), rtol=0, atol=1e-9)


def test_breakdown_on_few_distinct_eigenvalues():
    values = torch.tensor([3.0, -1.0, 0.5, 2.0, 7.0], dtype=torch.float64).repeat_interleave(20)
    r = density(torch.diag(values), n_probes=4, steps=30, seed=0)
    assert r.lengths == (5, 5, 5, 5) and r.hvps == 20
    for nodes, weights in zip(r.nodes, r.weights):
        real = weights > 0
        np.testing.assert_allclose(np.sort(nodes[real]), [-1.0, 0.5, 2.0, 3.0, 7.0], atol=1e-10)
        assert np.all(weights[~real] == 0)
    exact_m2 = float((values**2).mean())
    assert r.moments["m2"] == pytest.approx(exact_m2, rel=0.3)


def test_density_integrates_to_one_and_sigma_default(spectrum):
    A, _ = spectrum
    r = density(A, n_probes=4, steps=40, seed=1)
    real = r.weights > 0
    width = r.nodes[real].max() - r.nodes[real].min()
    assert r.sigma == pytest.approx(width / 200)
    assert r.grid.shape == (1000,) and r.density.shape == (1000,)
    assert (r.density >= 0).all()
    assert np.trapezoid(r.density, r.grid) == pytest.approx(1.0, abs=1e-4)
    custom = density(A, n_probes=4, steps=40, seed=1, sigma=0.5, grid=np.linspace(-5, 60, 3000))
    assert custom.sigma == 0.5 and custom.grid[0] == -5
    assert np.trapezoid(custom.density, custom.grid) == pytest.approx(1.0, abs=1e-4)


def test_mlp_hessian(mlp):
    op, H = mlp
    lam = torch.linalg.eigvalsh(H)
    dim = op.dim
    passes = op.passes
    r = density(op, n_probes=8, steps=30, seed=0)
    assert op.passes - passes == 30  # one batched HVP per Lanczos step
    assert r.hvps == 8 * 30 and r.dim == dim
    tiny = 1e-8 * float(lam.abs().max())
    assert r.nodes.min() >= float(lam.min()) - tiny and r.nodes.max() <= float(lam.max()) + tiny
    assert abs(r.moments["trace"] - float(lam.sum())) <= 3 * r.moments["trace_stderr"]
    assert abs(r.moments["m2"] - float((lam**2).sum()) / dim) <= 3 * r.moments["m2_stderr"]


def test_determinism_counts_and_roundtrip(spectrum):
    A, _ = spectrum
    counting = CountingOperator(A)
    a = density(counting, n_probes=3, steps=12, seed=5)
    assert counting.hvps == 36 == a.hvps
    b = density(A, n_probes=3, steps=12, seed=5)
    np.testing.assert_array_equal(a.nodes, b.nodes)
    np.testing.assert_array_equal(a.density, b.density)
    assert not np.array_equal(density(A, n_probes=3, steps=12, seed=6).nodes, a.nodes)
    back = DensityResult.from_dict(a.to_dict())
    assert back.lengths == a.lengths and back.sigma == a.sigma
    np.testing.assert_allclose(back.density, a.density)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_probes=0),
        dict(steps=0),
        dict(n_probes=2.5),
        dict(grid_size=1),
        dict(sigma=0.0),
        dict(sigma=-1.0),
        dict(grid=[1.0]),
        dict(grid=[2.0, 1.0]),
    ],
)
def test_bad_arguments_raise(spectrum, kwargs):
    with pytest.raises(ValueError):
        density(spectrum[0], **kwargs)
