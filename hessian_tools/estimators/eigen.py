"""Extreme eigenpairs of a symmetric operator: thick-restart Lanczos, and power iteration.

``method="lanczos"`` (default). A block Krylov method with explicit Rayleigh–Ritz and full
reorthogonalisation: the basis Q (dim × j, orthonormal) and HQ are kept; the Ritz pairs
(θ_i, y_i = Q s_i) come from the eigendecomposition of T = QᵀHQ; the next direction is the
residual r = Hy − θy of the first unconverged wanted Ritz pair (for block size 1 this *is* the
Lanczos vector q_{j+1}, since r ∈ K_{j+1} and r ⟂ K_j). When the basis reaches ``max_basis``
columns it is restarted *thickly* from the best Ritz vectors (Wu & Simon 2000), which keeps the
Krylov structure. Every step costs ``block_size`` HVPs in one data pass.

Error bars: residuals are computed explicitly, ‖r_i‖ = ‖H y_i − θ_i y_i‖ with ‖y_i‖ = 1, and by
the Bauer–Fike/Kahan bound an eigenvalue of H lies within ‖r_i‖ of θ_i (and within
‖r_i‖²/gap_i when the spectral gap to the rest is gap_i). A pair is converged when
‖r_i‖ ≤ max(tol·|θ_i|, atol); this is the same criterion as ARPACK's, so ``tol=1e-6`` gives
eigenvalues to ~1e-6 relative at worst and far better in practice (the eigenvalue error is of
order ‖r‖²/gap). Float32 operators cannot resolve residuals much below 1e-7·‖H‖: use
``dtype=torch.float64`` on the operator for tight tolerances.

``method="power"``: power iteration with deflation (as in PyHessian), one eigenpair at a time,
largest magnitude only; kept for comparison with the literature — it needs many more HVPs.
"""

from __future__ import annotations

import math

import torch

from ..checks import check_choice, check_integer, check_positive
from ..results import EigenResult
from ..seeding import seeded_generator
from .common import CountingOperator
from .probes import gaussian

WHICH = ("LA", "SA", "LM")


def eigenvalues(
    op,
    k: int = 1,
    which: str = "LA",
    tol: float = 1e-6,
    seed: int | None = 0,
    *,
    method: str = "lanczos",
    max_hvps: int = 2000,
    block_size: int = 1,
    max_basis: int | None = None,
    atol: float = 0.0,
) -> EigenResult:
    """The ``k`` eigenvalues of H that are largest (``"LA"``), smallest (``"SA"``) or largest in
    magnitude (``"LM"``), with their eigenvectors and residual norms (see module docstring).
    """
    check_integer("k", k)
    check_integer("max_hvps", max_hvps)
    check_integer("block_size", block_size)
    check_choice("which", which, WHICH)
    tol = check_positive("tol", tol)
    generator, seed = seeded_generator(seed)
    H = CountingOperator(op)
    if k > H.dim:
        raise ValueError(f"k={k} exceeds the operator dimension {H.dim}")
    if method == "lanczos":
        values, vectors, residuals, converged = _lanczos(
            H, k, which, tol, atol, generator, max_hvps, block_size, max_basis
        )
    elif method == "power":
        if which != "LM":
            raise ValueError("power iteration finds the largest-magnitude eigenvalues only: use which='LM'")
        values, vectors, residuals, converged = _power(H, k, tol, atol, generator, max_hvps)
    else:
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    return EigenResult(
        values=values.numpy(),
        residuals=residuals.numpy(),
        converged=converged,
        hvps=H.hvps,
        which=which,
        method=method,
        tol=float(tol),
        seed=seed,
        vectors=vectors,
    )


def _order(theta: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of Ritz values from most to least wanted."""
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def _orthonormalize(X: torch.Tensor, Q: torch.Tensor, scale: float) -> torch.Tensor:
    """Orthogonalise the columns of X against Q (twice: CGS2) and among themselves; drop the
    directions that vanish (norm below 1e-10·scale relative to the input).
    """
    for _ in range(2):
        if Q.shape[1]:
            X = X - Q @ (Q.T @ X)
    keep = []
    for j in range(X.shape[1]):
        x = X[:, j]
        norm0 = float(x.norm())
        for y in keep:
            x = x - y * (y @ x)
            x = x - y * (y @ x)
        norm = float(x.norm())
        if norm > 1e-10 * max(norm0, scale):
            keep.append(x / norm)
    return torch.stack(keep, dim=1) if keep else X[:, :0]


def _lanczos(H: CountingOperator, k, which, tol, atol, generator, max_hvps, block_size, max_basis):
    n = H.dim
    max_basis = min(n, max_basis or max(3 * k + 2 * block_size, 30))
    keep_on_restart = min(max(k + (max_basis - k) // 2, k), max_basis - block_size)
    Q = torch.zeros(n, 0, dtype=torch.float64)
    HQ = torch.zeros(n, 0, dtype=torch.float64)
    X = gaussian(n, block_size, generator)
    converged = False
    while True:
        X = _orthonormalize(X, Q, 1.0)
        if X.shape[1] == 0:
            if Q.shape[1] >= n:
                break  # the basis spans everything: Ritz pairs are exact
            X = _orthonormalize(gaussian(n, 1, generator), Q, 1.0)  # invariant subspace: fresh direction
            if X.shape[1] == 0:
                break
        X = X[:, : max(1, min(X.shape[1], max_hvps - H.hvps))]
        HX = H.matmat(X).to(X.device)
        Q, HQ = torch.cat([Q, X], dim=1), torch.cat([HQ, HX], dim=1)
        T = Q.T @ HQ
        theta, S = torch.linalg.eigh((T + T.T) / 2)
        order = _order(theta, which)
        want = order[: min(k, Q.shape[1])]
        Y = Q @ S[:, want]
        R = HQ @ S[:, want] - Y * theta[want]
        res = R.norm(dim=0)
        ok = res <= torch.clamp(tol * theta[want].abs(), min=atol)
        if (len(want) == k and bool(ok.all())) or Q.shape[1] >= n:
            converged = len(want) == k
            break
        if H.hvps >= max_hvps:
            break
        pending = [i for i in range(len(want)) if not ok[i]] or list(range(len(want)))
        X = R[:, pending[:block_size]]
        if Q.shape[1] + X.shape[1] > max_basis:  # thick restart from the best Ritz vectors
            kept = order[:keep_on_restart]
            Q, HQ = Q @ S[:, kept], HQ @ S[:, kept]
    theta_w = theta[want]
    # Final ordering for the caller: LA descending, SA ascending, LM by magnitude.
    return theta_w.cpu(), Y.cpu(), res.cpu(), bool(converged and len(want) == k)


def _power(H: CountingOperator, k, tol, atol, generator, max_hvps):
    values, vectors, residuals, all_converged = [], [], [], True
    U = torch.zeros(H.dim, 0, dtype=torch.float64)
    lam_U = torch.zeros(0, dtype=torch.float64)
    for _ in range(k):
        v = gaussian(H.dim, 1, generator)[:, 0]
        v = v / v.norm()
        lam, res, converged = 0.0, math.inf, False
        while H.hvps < max_hvps:
            Hv = H.matmat(v[:, None])[:, 0] - U @ (lam_U * (U.T @ v))  # deflated product
            lam = float(v @ Hv)
            res = float((Hv - lam * v).norm())
            if res <= max(tol * abs(lam), atol):
                converged = True
                break
            norm = float(Hv.norm())
            if norm == 0.0:
                break
            v = Hv / norm
        all_converged &= converged
        values.append(lam)
        residuals.append(res)
        vectors.append(v)
        U = torch.cat([U, v[:, None]], dim=1)
        lam_U = torch.cat([lam_U, torch.tensor([lam], dtype=torch.float64)])
    return (
        torch.tensor(values, dtype=torch.float64),
        torch.stack(vectors, dim=1),
        torch.tensor(residuals, dtype=torch.float64),
        all_converged,
    )
