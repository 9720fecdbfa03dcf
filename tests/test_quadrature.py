"""Batched Lanczos, Gauss quadrature and quadratic forms vᵀ f(H) v against dense eigendecompositions."""

import math

import numpy as np
import pytest
import torch
from helpers import PROBLEMS, known_spectrum

from hessian_tools.estimators.common import CountingOperator
from hessian_tools.estimators.lanczos import gauss_quadrature, lanczos_tridiagonal
from hessian_tools.estimators.quadrature import quadratic_form, quadratic_forms
from hessian_tools.operators.adapters import DenseOperator
from hessian_tools.operators.hessian import HessianOperator


@pytest.fixture(scope="module")
def spectrum():
    A, lam = known_spectrum(200, seed=5)
    return A, lam


def dense_form(A, v, f):
    lam, U = torch.linalg.eigh(A)
    c = U.T @ v
    return float((c**2 * f(lam)).sum())


def plain_lanczos(A, v, steps):
    """Textbook single-vector Lanczos with full reorthogonalisation (numpy, independent code)."""
    A = A.numpy()
    q = v.numpy() / np.linalg.norm(v.numpy())
    basis, alphas, betas = [q], [], []
    for j in range(steps):
        w = A @ basis[-1]
        alphas.append(basis[-1] @ w)
        w = w - alphas[-1] * basis[-1] - (betas[-1] * basis[-2] if j else 0)
        B = np.array(basis).T
        for _ in range(2):
            w = w - B @ (B.T @ w)
        if j + 1 < steps:
            betas.append(np.linalg.norm(w))
            basis.append(w / betas[-1])
    return np.array(alphas), np.array(betas)


class CallLog(DenseOperator):
    def __init__(self, matrix):
        super().__init__(matrix)
        self.calls = []

    def matmat(self, V):
        self.calls.append(V.shape[1])
        return super().matmat(V)


def test_batched_lanczos_matches_plain_loop(spectrum):
    A, _ = spectrum
    V0 = torch.randn(200, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    op = CallLog(A)
    tri = lanczos_tridiagonal(CountingOperator(op), V0, 30)
    assert op.calls == [5] * 30  # ONE block HVP per step
    assert tri.alphas.shape == (5, 30) and tri.betas.shape == (5, 29)
    assert tri.lengths.tolist() == [30] * 5 and not tri.exhausted.any()
    for k in range(5):
        alphas, betas = plain_lanczos(A, V0[:, k], 30)
        np.testing.assert_allclose(tri.alphas[k].numpy(), alphas, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(tri.betas[k].numpy(), betas, rtol=1e-9, atol=1e-10)
        single = lanczos_tridiagonal(A, V0[:, k : k + 1], 30)
        torch.testing.assert_close(single.alphas[0], tri.alphas[k], rtol=1e-10, atol=1e-12)


def test_without_reorthogonalization_early_steps_agree(spectrum):
    A, _ = spectrum
    V0 = torch.randn(200, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    full = lanczos_tridiagonal(A, V0, 8)
    plain = lanczos_tridiagonal(A, V0, 8, reorthogonalize=False)
    torch.testing.assert_close(plain.alphas, full.alphas, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(plain.betas, full.betas, rtol=1e-8, atol=1e-10)


def test_breakdown_gives_different_lengths():
    values = torch.arange(1.0, 9.0, dtype=torch.float64).repeat_interleave(10)  # 8 eigenvalues, each ×10
    A = torch.diag(values)
    V0 = torch.zeros(80, 3, dtype=torch.float64)
    V0[:30, 0] = 1.0  # sees eigenvalues 1, 2, 3
    V0[::10, 1] = torch.arange(1.0, 9.0)  # sees all 8
    V0[:, 2] = torch.linspace(-1, 1, 80)
    H = CountingOperator(CallLog(A))
    tri = lanczos_tridiagonal(H, V0, 20)
    assert tri.lengths.tolist() == [3, 8, 8] and tri.exhausted.all()
    assert H.hvps == 19 and H.op.calls == [3, 3, 3, 2, 2, 2, 2, 2]
    assert tri.alphas.shape == (3, 8)
    assert (tri.alphas[0, 3:] == 0).all() and (tri.betas[0, 2:] == 0).all()
    nodes, weights = gauss_quadrature(tri.alphas, tri.betas, tri.lengths)
    np.testing.assert_allclose(nodes[0, :3].numpy(), [1.0, 2.0, 3.0], atol=1e-12)
    assert (weights[0, 3:] == 0).all() and (nodes[0, 3:] == tri.alphas[0, 0]).all()
    np.testing.assert_allclose(weights[0, :3].numpy(), [1 / 3] * 3, atol=1e-12)
    np.testing.assert_allclose(nodes[1].numpy(), np.arange(1.0, 9.0), atol=1e-10)


def test_steps_capped_at_dim_and_exact_eigenvalues():
    A, lam = known_spectrum(60, seed=2)
    tri = lanczos_tridiagonal(A, torch.ones(60, 1, dtype=torch.float64), 100)
    assert tri.lengths.tolist() == [60] and tri.exhausted.all()
    nodes, weights = gauss_quadrature(tri.alphas[0], tri.betas[0])
    np.testing.assert_allclose(nodes.numpy(), np.sort(lam.numpy()), atol=1e-10)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)


def test_gauss_quadrature_is_tridiagonal_eigendecomposition():
    g = torch.Generator().manual_seed(3)
    alphas = torch.randn(4, 7, generator=g, dtype=torch.float64)
    betas = torch.rand(4, 6, generator=g, dtype=torch.float64) + 0.1
    nodes, weights = gauss_quadrature(alphas, betas)
    for k in range(4):
        T = torch.diag(alphas[k]) + torch.diag(betas[k], 1) + torch.diag(betas[k], -1)
        lam, U = torch.linalg.eigh(T)
        torch.testing.assert_close(nodes[k], lam, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(weights[k], U[0] ** 2, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError):
        gauss_quadrature(alphas, betas[:, :5])


def test_identity_and_square_are_exact_quickly(spectrum):
    A, _ = spectrum
    v = torch.randn(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ident = quadratic_form(A, v, "identity")
    assert ident.estimate == pytest.approx(float(v @ A @ v), rel=1e-10, abs=1e-10)
    assert ident.steps <= 3 and ident.hvps == ident.steps and ident.function == "identity"
    square = quadratic_form(A, v, "square")
    assert square.estimate == pytest.approx(float((A @ v).norm() ** 2), rel=1e-10)
    assert square.steps <= 4


def test_relu_matches_eigendecomposition(spectrum):
    A, _ = spectrum
    v = torch.randn(200, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = dense_form(A, v, lambda x: x.clamp(min=0))
    full = quadratic_form(A, v, "relu", steps=250, tol=0.0)
    assert full.exhausted and full.steps == 200
    assert full.estimate == pytest.approx(exact, rel=1e-8)
    early = quadratic_form(A, v, "relu", steps=200)  # default tol=1e-8
    assert early.steps < 200 and not early.exhausted
    assert early.estimate == pytest.approx(exact, rel=1e-6)
    assert abs(early.change) <= 1e-8 * abs(early.estimate)
    # relu ≠ identity here (negative eigenvalues): the first, all-positive Ritz values must not stop it
    assert early.estimate != pytest.approx(float(v @ A @ v), rel=1e-6)
    absval = quadratic_form(A, v, "abs", steps=200, tol=0.0)
    assert absval.estimate == pytest.approx(dense_form(A, v, torch.abs), rel=1e-8)


def test_callable_function_and_change(spectrum):
    A, _ = spectrum
    v = torch.randn(200, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    f = lambda x: torch.exp(x / 50)
    r = quadratic_form(A, v, f, steps=40, tol=1e-13)
    assert r.estimate == pytest.approx(dense_form(A, v, f), rel=1e-11)
    one = quadratic_form(A, v, f, steps=1)
    assert one.steps == 1 and one.change == math.inf
    three, four = quadratic_form(A, v, f, steps=3, tol=0), quadratic_form(A, v, f, steps=4, tol=0)
    assert four.change == pytest.approx(four.estimate - three.estimate, rel=1e-9)


def test_batched_forms_match_single_calls(spectrum):
    A, _ = spectrum
    V = torch.randn(200, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    V[:, 2] = 0.0
    H = CountingOperator(A)
    batched = quadratic_forms(H, V, "relu", steps=60)
    assert batched[2].estimate == 0.0 and batched[2].hvps == 0 and batched[2].exhausted
    assert H.hvps == sum(r.hvps for r in batched)
    for k in (0, 1, 3):
        single = quadratic_form(A, V[:, k], "relu", steps=60)
        assert batched[k].steps == single.steps
        assert batched[k].estimate == pytest.approx(single.estimate, rel=1e-10)


def test_mlp_hessian_relu_form():
    model, loss_fn, X, y = PROBLEMS["mlp"]()
    op = HessianOperator(model, loss_fn, [(X, y)], dtype=torch.float64)
    H = op.dense()
    v = op.flat_parameters()
    exact = dense_form(H, v, lambda x: x.clamp(min=0))
    passes = op.passes
    r = quadratic_form(op, v, "relu", steps=op.dim + 5, tol=0.0)
    assert r.estimate == pytest.approx(exact, rel=1e-8)
    assert op.passes - passes == r.hvps == r.steps <= op.dim


@pytest.mark.parametrize(
    "call",
    [
        lambda A: quadratic_form(A, torch.ones(199, dtype=torch.float64)),
        lambda A: quadratic_form(A, torch.ones(200, 1, dtype=torch.float64)),
        lambda A: quadratic_form(A, torch.ones(200, dtype=torch.float64), steps=0),
        lambda A: quadratic_form(A, torch.ones(200, dtype=torch.float64), f="cube"),
        lambda A: quadratic_form(A, torch.ones(200, dtype=torch.float64), tol=-1.0),
        lambda A: quadratic_forms(A, torch.ones(199, 2, dtype=torch.float64)),
        lambda A: lanczos_tridiagonal(A, torch.ones(200, 2, dtype=torch.float64), 0),
        lambda A: lanczos_tridiagonal(A, torch.zeros(200, 2, dtype=torch.float64), 5),
        lambda A: lanczos_tridiagonal(A, torch.ones(201, 2, dtype=torch.float64), 5),
    ],
)
def test_bad_arguments_raise(spectrum, call):
    with pytest.raises(ValueError):
        call(spectrum[0])
