"""XTrace (Epperly, Tropp & Webber, "XTrace: making the most of every sample in stochastic trace
estimation", SIAM J. Matrix Anal. Appl. 45(1), 2024).

Hutch++ spends its probes on two separate jobs: a sketch Q that captures the top of the spectrum,
and Hutchinson probes for the rest. XTrace uses every probe for both jobs (the *exchangeability*
principle). With s = ⌊max_hvps/2⌋ probes Ω = [ω_1 … ω_s] and Y = HΩ:

* for each i, Q_(i) = orth(Y without column i) — a rank-(s−1) sketch that does not depend on ω_i;
* estimate_i = tr(Q_(i)ᵀ H Q_(i)) + ω̃_iᵀ (I − Q_(i)Q_(i)ᵀ) H (I − Q_(i)Q_(i)ᵀ) ω̃_i,
  the exact trace on the sketch plus a one-probe Hutchinson estimate of the residual, with the
  probe ω_i that was left out of the sketch;
* the estimate is the mean of the s estimate_i.

Efficient leave-one-out (the paper's downdating): with the thin QR Y = QR, span(Y without
column i) = Q·span{r_j : j ≠ i}, whose orthogonal complement inside span(Q) is the unit vector
Q s_i with s_i = R⁻ᵀe_i/‖R⁻ᵀe_i‖. Hence Q_(i)Q_(i)ᵀ = Q(I − s_i s_iᵀ)Qᵀ, and with Z = HQ,
W = QᵀΩ, c_i = (I − s_i s_iᵀ)w_i, u_i = (I − Q_(i)Q_(i)ᵀ)ω_i = ω_i − Qc_i and
Hu_i = y_i − Zc_i, every term comes from Y and Z: one QR, one triangular solve and O(dim·s²)
work — no s separate QRs and no further HVPs. Total cost: 2s HVPs (HΩ and HQ), two data passes.

Probes: the paper's "improved" estimator. ω_i are Gaussian columns scaled to norm √dim (uniform
on the sphere of radius √dim), and the residual term uses the probe renormalised inside the
(dim − s + 1)-dimensional range of I − Q_(i)Q_(i)ᵀ:

    ω̃ᵢ-term = (dim − s + 1) · u_iᵀ H u_i / ‖u_i‖².

Because Ω is rotation-invariant and ω_i is independent of Q_(i), u_i/‖u_i‖ is uniform on the unit
sphere of that range, so E[(dim − s + 1)·ûûᵀ] = I − Q_(i)Q_(i)ᵀ: each estimate_i — hence the
mean — is unbiased, and the residual probe has no spread in its length (the variance of a
spherical probe is below that of a Gaussian or Rademacher one). Rademacher probes are not
rotation-invariant, so this renormalisation would bias them; that is why Gaussian/spherical
probes are used. (The column scaling of Ω changes neither the sketches nor the renormalised term.)

Error estimate (``stderr``): std(estimate_1..s)/√s, as in the paper. The estimate_i are
exchangeable but not independent (they share s − 2 of their sketch columns), so this is not a
textbook standard error; the paper shows it tracks the actual error well, which the tests check
empirically (the exact trace lies within 3·stderr for most seeds). Unlike the Hutch++ error bar it
is not conditional on a sketch: it estimates the whole error. It is 0 when the estimate is exact,
e.g. when rank(H) ≤ s − 1 (every Q_(i) then spans range(H)).

When s ≥ dim the trace is computed exactly as tr(H·I) with dim HVPs (stderr 0, no probes).

Per-block traces (``blocks``): per coordinate k, estimate_i splits as
(Q_(i)Q_(i)ᵀH)_kk + (dim − s + 1)·(u_i)_k (Hu_i)_k/‖u_i‖². For symmetric H, diag(PH) = diag(HP) for
symmetric P, and E[ûûᵀ]·(dim − s + 1) = I − P, so the expected per-coordinate parts sum to
diag(PH) + diag(H(I − P)) = diag(H): summing over a block's coordinates gives an unbiased estimate
of tr(H_bb) from the same probes and HVPs, and the block estimates sum exactly to the total.
Their stderr is computed the same way as the total's.

XDiag (the same paper, its diagonal estimator; :func:`xdiag`). The same exchangeable design for
diag(H), with s = ⌊max_hvps/2⌋ Rademacher probes Ω, Y = HΩ = QR and Z = HQ:

    d_i = diag(Q_(i)Q_(i)ᵀH) + ω_i ⊙ (I − Q_(i)Q_(i)ᵀ)Hω_i,     estimate = (1/s) Σ_i d_i.

Each d_i is unbiased (ω_i is independent of Q_(i) and E[ω_i ω_iᵀ] = I): the diagonal of the
rank-(s−1) part exactly, plus a one-probe Hutchinson diagonal estimate of the residual
(I − Q_(i)Q_(i)ᵀ)H. With the downdating above, Q_(i)Q_(i)ᵀ = Q(I − s_i s_iᵀ)Qᵀ, so

    diag(Q_(i)Q_(i)ᵀH) = diag(QQᵀH) − (Qs_i) ⊙ (Zs_i),
    (I − Q_(i)Q_(i)ᵀ)Hω_i = y_i − Qt_i + Qs_i (s_iᵀt_i),   t_i = QᵀHω_i (T = ZᵀΩ),

again from Y and Z alone: 2s HVPs in all. Probes are Rademacher, as in the paper: for the diagonal
their z_i² = 1 removes the H_ii² term a Gaussian probe would add to each coordinate's variance (no
renormalisation is needed, unlike XTrace's spherical probes). When rank(H) ≤ s − 1 every Q_(i) spans
range(H) and the estimate is exact.

XDiag's error estimate (``stderr``): per coordinate, std(d_1..s)/√s, the analogue of XTrace's; like
it, an estimate of the whole error from exchangeable, dependent samples, not a textbook standard
error; the tests check its coverage against exact diagonals. Measured: on the Hessians of the small
CNN and ResNet it matches the actual error (68–70% of coordinates within one stderr, 99% within
three; analysis/diagonal_accuracy.py); on a dense matrix with five outliers and a flat bulk it runs
about 20% small (58% within one stderr, 98% within three). Block sums and the trace get theirs
from the per-probe block sums of the d_i. When ``max_hvps ≥ dim`` the diagonal is computed
exactly as diag(H·I) with dim HVPs.
"""
from __future__ import annotations

import math

import torch

from ..checks import check_integer
from ..results import DiagonalResult, TraceResult
from ..seeding import seeded_generator
from ..stats import mean_and_stderr
from .common import CountingOperator, block_index, block_sums
from .diagonal import CoordinateMoments, diagonal_result, exact_diagonal
from .hutchinson import block_results
from .probes import gaussian, rademacher


def xtrace(op, *, max_hvps: int = 100, seed: int | None = 0, keep_samples: bool = True) -> TraceResult:
    """Estimate tr(H) by XTrace with s = ⌊max_hvps/2⌋ probes (2s HVPs); see the module docstring."""
    check_integer("max_hvps", max_hvps, 4)
    H = CountingOperator(op)
    n = H.dim
    s = max_hvps // 2
    names, index = block_index(H.blocks, n, device=H.device)
    if s >= n:  # exact: the budget covers the whole space
        Z = H.matmat(torch.eye(n, dtype=torch.float64, device=H.device))
        diag = torch.diagonal(Z)[:, None]
        blocks = ()
        if names is not None:
            blocks = block_results(H.blocks, torch.zeros(len(names), 2, dtype=torch.float64), block_sums(diag, index, len(names))[:, 0])
        return TraceResult(float(diag.sum()), 0.0, H.hvps, "xtrace", seed, 0, None, True, blocks, ())

    generator, seed = seeded_generator(seed)
    Omega = gaussian(n, s, generator)
    Omega = (Omega * (math.sqrt(n) / Omega.norm(dim=0))).to(H.device)
    Y = H.matmat(Omega)
    Q, R = torch.linalg.qr(Y)
    Z = H.matmat(Q)
    S = _leave_one_out_directions(R)  # column i: unit s_i ⟂ r_j (j ≠ i)
    W = Q.T @ Omega
    C = W - S * (S * W).sum(0)  # c_i = (I − s_i s_iᵀ) w_i
    U = Omega - Q @ C  # u_i = (I − Q_(i)Q_(i)ᵀ) ω_i
    HU = Y - Z @ C  # H u_i
    scale = (n - s + 1) / (U * U).sum(0)
    # per-coordinate parts: diag(Q_(i)Q_(i)ᵀ H) + scale_i · u_i ⊙ Hu_i  → (n, s)
    parts = (Q * Z).sum(1, keepdim=True) - (Q @ S) * (Z @ S) + U * HU * scale
    samples = parts.sum(0)
    estimate, stderr = mean_and_stderr(samples)
    blocks = block_results(H.blocks, block_sums(parts, index, len(names))) if names is not None else ()
    return TraceResult(
        estimate=estimate,
        stderr=stderr,
        hvps=H.hvps,
        method="xtrace",
        seed=seed,
        n_probes=s,
        blocks=blocks,
        samples=tuple(samples.tolist()) if keep_samples else (),
    )


def xdiag(op, *, max_hvps: int = 100, seed: int | None = 0, block_size: int = 16) -> DiagonalResult:
    """Estimate diag(H) by XDiag with s = ⌊max_hvps/2⌋ Rademacher probes (2s HVPs); see the module
    docstring. ``block_size`` bounds the memory of the per-probe estimates (columns at a time)."""
    check_integer("max_hvps", max_hvps, 4)
    check_integer("block_size", block_size)
    H = CountingOperator(op)
    if max_hvps >= H.dim:
        return exact_diagonal(H, "xdiag", seed)
    s = max_hvps // 2
    generator, seed = seeded_generator(seed)
    Omega = rademacher(H.dim, s, generator, device=H.device)
    Y = H.matmat(Omega)
    Q, R = torch.linalg.qr(Y)
    Z = H.matmat(Q)
    S = _leave_one_out_directions(R)  # column i: unit s_i ⟂ r_j (j ≠ i)
    T = Z.T @ Omega  # t_i = QᵀHω_i
    sketched = (Q * Z).sum(1, keepdim=True)  # diag(QQᵀH)
    weights = (S * T).sum(0)  # s_iᵀt_i
    moments = CoordinateMoments(H)
    for start in range(0, s, block_size):
        cols = slice(start, min(start + block_size, s))
        QS, ZS = Q @ S[:, cols], Z @ S[:, cols]
        residual = Y[:, cols] - Q @ T[:, cols] + QS * weights[cols]  # (I − Q_(i)Q_(i)ᵀ)Hω_i
        moments.add(sketched - QS * ZS + Omega[:, cols] * residual)
    return diagonal_result(moments, H, "xdiag", seed, sketch=s)


def _leave_one_out_directions(R: torch.Tensor) -> torch.Tensor:
    """Columns of R⁻ᵀ normalised to unit length: s_i is orthogonal to every column r_j, j ≠ i.

    Exactly zero pivots (H = 0, or exactly dependent columns of Y) are lifted to a tiny value so
    that the solve stays finite; the leave-one-out spaces then still contain range(Y)."""
    s = R.shape[0]
    diag = torch.diagonal(R)
    largest = float(R.abs().max())
    floor = torch.finfo(R.dtype).eps * largest if largest > 0 else 1.0
    small = diag.abs() < floor
    if bool(small.any()):
        R = R.clone()
        fixed = torch.where(diag < 0, -floor, floor)
        R.diagonal().copy_(torch.where(small, fixed, diag))
    eye = torch.eye(s, dtype=R.dtype, device=R.device)
    Rinv_T = torch.linalg.solve_triangular(R.T, eye, upper=False)
    return Rinv_T / Rinv_T.norm(dim=0)
