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
from .common import CountingOperator, inner
from .probes import gaussian

WHICH = ("LA", "SA", "LM")
#: the ``method`` of the results of :func:`extreme_eigenvalues` (one run for both ends)
BOTH_ENDS = "lanczos (both ends)"


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
    H = CountingOperator(op, native=method == "lanczos")
    if k > H.dim:
        raise ValueError(f"k={k} exceeds the operator dimension {H.dim}")
    if method == "lanczos":
        (pairs,) = _lanczos(H, ((which, k),), tol, atol, generator, max_hvps, block_size, max_basis)
    elif method == "power":
        if which != "LM":
            raise ValueError("power iteration finds the largest-magnitude eigenvalues only: use which='LM'")
        pairs = _power(H, k, tol, atol, generator, max_hvps)
    else:
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    return _result(pairs, H.hvps, which, method, tol, seed)


def _result(pairs, hvps: int, which: str, method: str, tol: float, seed) -> EigenResult:
    """An :class:`EigenResult` from (values, vectors, residuals, converged) as the solvers return them."""
    values, vectors, residuals, converged = pairs
    return EigenResult(
        values=values.numpy(),
        residuals=residuals.numpy(),
        converged=converged,
        hvps=hvps,
        which=which,
        method=method,
        tol=float(tol),
        seed=seed,
        vectors=vectors,
    )


def extreme_eigenvalues(
    op,
    k_top: int = 1,
    k_bottom: int = 1,
    tol: float = 1e-6,
    seed: int | None = 0,
    *,
    max_hvps: int = 2000,
    block_size: int = 1,
    max_basis: int | None = None,
    atol: float = 0.0,
) -> tuple[EigenResult, EigenResult]:
    """The ``k_top`` largest and the ``k_bottom`` smallest eigenvalues of H from ONE Krylov basis:
    (top ``"LA"`` result, bottom ``"SA"`` result), with the residual bounds of :func:`eigenvalues`.

    A Krylov space built from one start vector approximates both ends of the spectrum at once, so one
    run stops when both groups meet ``tol`` (thick restarts keep the best Ritz vectors of both ends in
    turn) instead of two runs each building its own basis. The HVPs are spent once, for both results:
    each carries the run's total ``hvps`` and ``method="lanczos (both ends)"``; ``max_hvps`` bounds the
    run.
    """
    check_integer("k_top", k_top)
    check_integer("k_bottom", k_bottom)
    check_integer("max_hvps", max_hvps)
    check_integer("block_size", block_size)
    tol = check_positive("tol", tol)
    generator, seed = seeded_generator(seed)
    H = CountingOperator(op, native=True)
    if k_top + k_bottom > H.dim:
        raise ValueError(f"k_top + k_bottom = {k_top + k_bottom} exceeds the operator dimension {H.dim}")
    wants = (("LA", k_top), ("SA", k_bottom))
    groups = _lanczos(H, wants, tol, atol, generator, max_hvps, block_size, max_basis)
    top, bottom = (
        _result(pairs, H.hvps, which, BOTH_ENDS, tol, seed) for (which, _), pairs in zip(wants, groups)
    )
    return top, bottom


def _order(theta: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of Ritz values from most to least wanted."""
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def _norm(x: torch.Tensor) -> float:
    """‖x‖ of a column (dim × 1) summed in float64 (torch's float32 norm of 10⁷ entries is off by ~1e-4)."""
    return math.sqrt(float(inner(x, x)))


def _orthonormalize(X: torch.Tensor, Q: torch.Tensor, scale: float, passes: int = 2) -> torch.Tensor:
    """Orthogonalise the columns of X against the orthonormal columns of Q (``passes`` times: twice,
    CGS2, for arbitrary X) and among themselves; drop the directions that vanish (norm below
    1e-10·scale relative to the input).
    """
    for _ in range(passes):
        if Q.shape[1]:
            X = X - Q @ inner(Q, X).to(X.dtype)
    keep = []
    for j in range(X.shape[1]):
        x = X[:, j : j + 1]
        norm0 = _norm(x)
        for y in keep:
            x = x - y * float(inner(y, x))
            x = x - y * float(inner(y, x))
        norm = _norm(x) if keep else norm0  # the first column is not projected: its norm is norm0
        if norm > 1e-10 * max(norm0, scale):
            keep.append(x / norm)
    if len(keep) == 1:
        return keep[0]  # a block of one: no copy
    return torch.cat(keep, dim=1) if keep else X[:, :0]


def _thin_qr(columns: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """U (dim × m, orthonormal; zero columns where a column depends on the ones before) and R
    (m × m, float64, upper triangular) with [columns] = U R, by classical Gram–Schmidt applied twice:
    for the few columns of a residual factor, far cheaper than LAPACK's QR of a tall matrix.
    """
    m = len(columns)
    R = torch.zeros(m, m, dtype=torch.float64)
    # U is built in place as the rows of a buffer (U = its transpose: contiguous columns, no final copy)
    rows = torch.empty(m, columns[0].shape[0], dtype=columns[0].dtype, device=columns[0].device)
    scaled = torch.empty_like(rows[0, :, None]) if m > 1 else None  # c·u, without a new tensor each time
    for i, column in enumerate(columns):
        x = rows[i, :, None]
        x.copy_(column[:, None])
        for _ in range(2):
            for row in range(i):
                u = rows[row, :, None]
                c = float(inner(u, x))
                x -= torch.mul(u, c, out=scaled)
                R[row, i] += c
        norm = _norm(x)
        R[i, i] = norm
        x.div_(norm) if norm > 0 else x.zero_()
    return rows.T, R


class _KrylovBasis:
    """The Rayleigh–Ritz state of :func:`_lanczos` without storing HQ.

    Q (dim × j, orthonormal; stored as the rows of one preallocated ``capacity × dim`` buffer in the
    operator's precision, so appending and restarting write in place), the projected matrix
    M = QᵀHQ as computed (j × j, float64, not symmetrised; T = (M + Mᵀ)/2 is what Rayleigh–Ritz
    diagonalises) and the part of HQ outside span(Q) in factored form F Gᵀ (F: dim × r orthonormal
    and ⟂ Q, G: j × r float64), so that, for the products as computed,

        H Q = Q M + F Gᵀ.

    Each product H X adds its component outside the new span(Q) to F; the part of F along the newly
    added directions moves into M. F Gᵀ is kept at its numerical rank (an SVD of the small factor
    drops singular values below ``rank_tol`` times the largest: the rounding left when a direction of
    F joins Q); in exact arithmetic that rank is the block size, since span(Q) is a (thick-restarted)
    Krylov space. Projections take two passes, and every dot product and norm over the dimension is
    summed in float64 (:func:`~hessian_tools.estimators.common.inner`): float32 BLAS sums them in
    float32, off by a percent at dim ≈ 10⁷. A Ritz pair (θ, Qs) of T then has the residual

        H Qs − θ Qs = Q (M − T) s + F Gᵀ s,     ‖·‖² = ‖(M − T) s‖² + ‖Gᵀ s‖²,

    the explicit residual of the computed products (the first term is their asymmetry, i.e. their
    rounding), from j × j and r × j numbers. Residuals, the next directions and restarts need only
    F, G and M: O(dim·j) work and dim·(j + r) stored numbers per step instead of the dim·2j of Q and HQ.
    """

    def __init__(self, dim: int, capacity: int, dtype: torch.dtype, device):
        self.rows = torch.empty(capacity, dim, dtype=dtype, device=device)
        self.j = 0
        self.M = torch.zeros(0, 0, dtype=torch.float64)
        self.F = torch.zeros(dim, 0, dtype=dtype, device=device)
        self.G = torch.zeros(0, 0, dtype=torch.float64)
        self.rank_tol = 100 * torch.finfo(dtype).eps

    @property
    def Q(self) -> torch.Tensor:
        return self.rows[: self.j].T

    @property
    def T(self) -> torch.Tensor:
        return (self.M + self.M.T) / 2

    def add(self, X: torch.Tensor, HX: torch.Tensor) -> None:
        """Append the orthonormal columns X (⟂ Q) with their product HX."""
        j, b = self.j, X.shape[1]
        # Old columns: HQ_old = Q_old M + F Gᵀ, and F = X C + (F − X C) with C = XᵀF (two passes:
        # a long dot product of nearly parallel vectors is only accurate to ~eps·√dim in one).
        wd = X.dtype
        C = inner(X, self.F)  # b × r
        F_old = self.F.addmm_(X, C.to(wd), alpha=-1)  # in place: F is replaced below
        C2 = inner(X, F_old)
        F_old.addmm_(X, C2.to(wd), alpha=-1)
        C += C2
        lower = C @ self.G.T  # b × j: Xᵀ H Q_old
        self.rows[j : j + b] = X.T
        self.j = j + b
        Q = self.Q
        # New columns: HX = Q t + f with f ⟂ Q (two passes of classical Gram–Schmidt).
        t = inner(Q, HX)
        f = torch.addmm(HX, Q, t.to(wd), alpha=-1)  # a new tensor: a user's operator may keep HX
        c = inner(Q, f)
        f.addmm_(Q, c.to(wd), alpha=-1)
        t += c  # (j + b) × b
        M = torch.zeros(j + b, j + b, dtype=torch.float64)
        M[:j, :j] = self.M
        M[j:, :j] = lower
        M[:, j:] = t
        self.M = M
        r = F_old.shape[1]
        G = torch.zeros(j + b, r + b, dtype=torch.float64)
        G[:j, :r] = self.G
        G[j:, r:] = torch.eye(b, dtype=torch.float64)
        self._compress([*F_old.unbind(1), *f.unbind(1)], G)

    def _compress(self, columns: list[torch.Tensor], G: torch.Tensor) -> None:
        """F Gᵀ (F's ``columns``) refactored as F' G'ᵀ with F' orthonormal, at its numerical rank."""
        U, R = _thin_qr(columns)
        W, sigma, Zt = torch.linalg.svd(R @ G.T, full_matrices=False)
        keep = sigma > self.rank_tol * float(sigma.max()) if sigma.numel() else sigma > 0
        self.F = U @ W[:, keep].to(U.dtype)
        self.G = Zt[keep].T * sigma[keep]

    def residuals(self, S: torch.Tensor, T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norms, coefficients) of the residuals of the Ritz vectors Q S of ``T``: their norms (m,),
        and the coefficients (r × m) of their parts F·(coefficients) outside span(Q).
        """
        coefficients = self.G.T @ S
        inside = (self.M - T) @ S
        return (inside.square().sum(0) + coefficients.square().sum(0)).sqrt(), coefficients

    def restart(self, S: torch.Tensor) -> None:
        """Replace Q by Q S (orthonormal S: the kept Ritz vectors), in place."""
        m, j = S.shape[1], self.j
        St = S.T.to(device=self.rows.device)
        step = 1 << 16  # columns of the buffer at a time, multiplied in float64
        for start in range(0, self.rows.shape[1], step):
            cols = slice(start, start + step)
            self.rows[:m, cols] = St @ self.rows[:j, cols].double()
        self.j = m
        self.M = S.T @ self.M @ S
        self.G = S.T @ self.G


def _restart_indices(orders: list[torch.Tensor], wants, keep: int) -> torch.Tensor:
    """The ``keep`` Ritz indices a thick restart keeps: the most wanted of each group in turn (one
    group: simply its ``keep`` most wanted).
    """
    if len(orders) == 1:
        return orders[0][:keep]
    chosen: list[int] = []
    taken: set[int] = set()
    cursors = [0] * len(orders)
    while len(chosen) < keep:
        for g, order in enumerate(orders):
            while cursors[g] < len(order) and int(order[cursors[g]]) in taken:
                cursors[g] += 1
            if cursors[g] < len(order) and len(chosen) < keep:
                chosen.append(int(order[cursors[g]]))
                taken.add(chosen[-1])
        if all(c >= len(o) for c, o in zip(cursors, orders)):
            break
    return torch.tensor(chosen, dtype=torch.long)


def _lanczos(H: CountingOperator, wants, tol, atol, generator, max_hvps, block_size, max_basis):
    """Thick-restart Lanczos for one or more groups of wanted eigenpairs, ``wants`` = ((which, k), …),
    from one Krylov basis; returns per group (values, vectors, residuals, converged).
    """
    n = H.dim
    k = sum(count for _, count in wants)
    max_basis = min(n, max_basis or max(3 * k + 2 * block_size, 30))
    keep_on_restart = min(max(k + (max_basis - k) // 2, k), max_basis - block_size)
    basis = _KrylovBasis(n, max(max_basis, block_size), H.dtype, H.device)
    X = gaussian(n, block_size, generator, dtype=H.dtype, device=H.device)
    passes = 2  # the next directions come from F, which is ⟂ Q already: they need no projection
    while True:
        X = _orthonormalize(X, basis.Q, 1.0, passes)
        if X.shape[1] == 0:
            if basis.j >= n:
                break  # the basis spans everything: Ritz pairs are exact
            fresh = gaussian(n, 1, generator, dtype=H.dtype, device=H.device)
            X = _orthonormalize(fresh, basis.Q, 1.0)  # invariant subspace: fresh direction
            if X.shape[1] == 0:
                break
        X = X[:, : max(1, min(X.shape[1], max_hvps - H.hvps))]
        basis.add(X, H.matmat(X).to(X.device))
        del X
        T = basis.T
        theta, S = torch.linalg.eigh(T)
        orders = [_order(theta, which) for which, _ in wants]
        groups = [order[: min(count, basis.j)] for order, (_, count) in zip(orders, wants)]
        want = torch.cat(groups)  # a Ritz pair may be wanted by two groups while the basis is small
        res, coefficients = basis.residuals(S[:, want], T)
        ok = res <= torch.clamp(tol * theta[want].abs(), min=atol)
        complete = all(len(g) == count for g, (_, count) in zip(groups, wants))
        if (complete and bool(ok.all())) or basis.j >= n:
            break
        if H.hvps >= max_hvps:
            break
        pending = [i for i in range(len(want)) if not ok[i]] or list(range(len(want)))
        X, passes = basis.F @ coefficients[:, pending[:block_size]].to(basis.F.dtype), 0
        if basis.j + X.shape[1] > max_basis:  # thick restart from the best Ritz vectors
            basis.restart(S[:, _restart_indices(orders, wants, keep_on_restart)])
    # Final ordering for the caller: LA descending, SA ascending, LM by magnitude.
    out, start = [], 0
    for g, (_, count) in zip(groups, wants):
        part = slice(start, start + len(g))
        start += len(g)
        Y = basis.Q @ S[:, g].to(basis.rows.dtype)
        done = len(g) == count and (bool(ok[part].all()) or basis.j >= n)  # a full basis: exact pairs
        out.append((theta[g].cpu(), Y.cpu(), res[part].cpu(), done))
    return out


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
