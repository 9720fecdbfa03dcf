"""Eigenvalues by thick-restart Lanczos against the exact spectrum, with residual error bars."""

import numpy as np
import pytest
import torch
from helpers import known_spectrum

import hessian_tools as ht


def _check_pairs(result, H):
    """Residuals are the true ‖Hy − θy‖ and bound the distance to the exact spectrum."""
    exact = torch.linalg.eigvalsh(H).numpy()
    Y = result.vectors
    R = H @ Y - Y * torch.as_tensor(result.values)
    np.testing.assert_allclose(R.norm(dim=0).numpy(), result.residuals, rtol=1e-3, atol=1e-11)
    for value, res in zip(result.values, result.residuals):
        assert np.min(np.abs(exact - value)) <= res + 1e-12


@pytest.mark.parametrize("which,k", [("LA", 1), ("LA", 5), ("SA", 1), ("LM", 3)])
def test_eigenvalues_match_exact_spectrum(problem, which, k):
    name, model, loss_fn, X, y, H = problem
    op = ht.HessianOperator(model, loss_fn, (X, y), dtype=torch.float64)
    r = ht.eigenvalues(op, k=k, which=which, tol=1e-8)
    exact = torch.linalg.eigvalsh(H).numpy()
    expected = {"LA": exact[::-1][:k], "SA": exact[:k], "LM": exact[np.argsort(-np.abs(exact))][:k]}[which]
    assert r.converged
    np.testing.assert_allclose(r.values, expected, rtol=1e-6, atol=1e-10)
    _check_pairs(r, H)


def test_negative_curvature_is_found():
    from helpers import PROBLEMS, exact_hessian

    model, loss_fn, X, y = PROBLEMS["saddle"]()
    H = exact_hessian(model, loss_fn, X, y)
    r = ht.eigenvalues(ht.HessianOperator(model, loss_fn, (X, y), dtype=torch.float64), which="SA")
    assert r.values[0] < -1e-3
    assert r.values[0] == pytest.approx(float(torch.linalg.eigvalsh(H)[0]), rel=1e-6)


def test_restarts_and_blocks_converge_on_a_large_known_spectrum():
    H, lam = known_spectrum(dim=400)
    expected = np.sort(lam.numpy())[::-1][:5]
    for kwargs in ({"max_basis": 12}, {"block_size": 3}, {}):
        r = ht.eigenvalues(H, k=5, tol=1e-8, **kwargs)
        assert r.converged, kwargs
        np.testing.assert_allclose(r.values, expected, rtol=1e-7)
        _check_pairs(r, H)


def test_fewer_hvps_than_power_iteration():
    H, lam = known_spectrum(dim=400)
    lanczos = ht.eigenvalues(H, k=1, which="LM", tol=1e-6)
    power = ht.eigenvalues(H, k=1, which="LM", tol=1e-6, method="power")
    assert lanczos.values[0] == pytest.approx(50.0, rel=1e-6)
    assert power.values[0] == pytest.approx(50.0, rel=1e-6)
    assert lanczos.hvps * 2 < power.hvps


def test_unconverged_within_budget_is_reported():
    H, _ = known_spectrum(dim=400)
    r = ht.eigenvalues(H, k=5, which="SA", tol=1e-12, max_hvps=10)
    assert not r.converged and r.hvps <= 10


def test_determinism_and_json(problem):
    name, model, loss_fn, X, y, H = problem
    op = ht.HessianOperator(model, loss_fn, (X, y), dtype=torch.float64)
    a, b = ht.eigenvalues(op, k=2, seed=4), ht.eigenvalues(op, k=2, seed=4)
    np.testing.assert_array_equal(a.values, b.values)
    d = a.to_dict()
    assert "vectors" not in d and d["hvps"] == a.hvps
    back = ht.EigenResult.from_dict(d)
    np.testing.assert_array_equal(back.values, a.values)


def test_bad_arguments():
    H, _ = known_spectrum(dim=50)
    with pytest.raises(ValueError, match="which"):
        ht.eigenvalues(H, which="BE")
    with pytest.raises(ValueError, match="exceeds"):
        ht.eigenvalues(H, k=51)
    with pytest.raises(ValueError, match="largest-magnitude"):
        ht.eigenvalues(H, method="power", which="SA")
    with pytest.raises(ValueError, match="tol"):
        ht.eigenvalues(H, tol=-1)


def test_both_ends_from_one_basis_match_the_exact_spectrum_for_fewer_hvps(problem):
    name, model, loss_fn, X, y, H = problem
    op = ht.HessianOperator(model, loss_fn, (X, y), dtype=torch.float64)
    exact = torch.linalg.eigvalsh(H).numpy()
    top, bottom = ht.extreme_eigenvalues(op, 3, 1, tol=1e-8)
    assert top.converged and bottom.converged and top.hvps == bottom.hvps
    assert (top.which, bottom.which, top.method) == ("LA", "SA", "lanczos (both ends)")
    np.testing.assert_allclose(top.values, exact[::-1][:3], rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(bottom.values, exact[:1], rtol=1e-6, atol=1e-10)
    _check_pairs(top, H)
    _check_pairs(bottom, H)


@pytest.mark.parametrize("max_basis", [None, 12])  # 12: thick restarts keep Ritz vectors of both ends
def test_both_ends_cost_less_than_two_runs_on_a_large_known_spectrum(max_basis):
    H, lam = known_spectrum(dim=300)
    exact = np.sort(lam.numpy())
    top, bottom = ht.extreme_eigenvalues(H, 5, 1, tol=1e-6, max_basis=max_basis)
    separate = [
        ht.eigenvalues(H, 5, "LA", tol=1e-6, max_basis=max_basis),
        ht.eigenvalues(H, 1, "SA", tol=1e-6, max_basis=max_basis),
    ]
    assert top.converged and bottom.converged
    np.testing.assert_allclose(top.values, exact[::-1][:5], rtol=1e-7)
    assert abs(bottom.values[0] - exact[0]) <= bottom.residuals[0] + 1e-12
    _check_pairs(top, H)
    _check_pairs(bottom, H)
    assert top.hvps < sum(r.hvps for r in separate)


def test_both_ends_report_an_exhausted_budget():
    H, _ = known_spectrum(dim=300)
    top, bottom = ht.extreme_eigenvalues(H, 5, 1, tol=1e-12, max_hvps=8)
    assert top.hvps == 8 and not bottom.converged
