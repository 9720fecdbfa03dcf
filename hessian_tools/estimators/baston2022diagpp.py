"""Diag++ (Baston & Nakatsukasa, "Stochastic diagonal estimation: probabilistic bounds and an
improved algorithm", 2022): deflate the top of the spectrum, then Hutchinson.

With a sketch S (dim × k, Rademacher) and Q = orth(HS), split

    diag(H) = diag(QQᵀH) + diag((I − QQᵀ)H).

The first term is computed exactly from HQ (k more HVPs): diag(QQᵀH)_i = Σ_l Q_il (HQ)_il. The
second is estimated by Hutchinson's diagonal estimator on B = (I − QQᵀ)H with g Rademacher probes z
independent of Q: E[z ⊙ Bz] = diag(B), and Bz = Hz − Q(QᵀHz) costs one HVP per probe. Because Q
captures the large-magnitude eigenvalues, B has far less off-diagonal mass than H, and the
per-coordinate variance Σ_{k≠i} B_ik² is correspondingly smaller (for low rank + small noise, much
smaller). The estimate is unbiased for any Q. Default split (the paper's): k = ⌊m/3⌋ sketch columns,
k HVPs for HQ, and g = m − 2k residual probes.

Error bar (``stderr``): conditional on the sketch (Q fixed), the residual samples z_j ⊙ Bz_j are
i.i.d., so ``stderr_i`` = their sample std / √g is the textbook standard error of coordinate i
given Q; the exact part adds no variance. Block sums and the trace get theirs from the per-probe
block sums of the same samples. When rank(H) ≤ k, B = 0 and the estimate is exact (stderr ≈ 0).

When ``max_matvecs ≥ dim`` the diagonal is computed exactly as diag(H·I) with dim HVPs instead
(stderr 0, no probes): a sketch of that size would cost more and be no better.
"""
from __future__ import annotations

import torch

from ..results import DiagonalResult
from .common import CountingOperator, check_positive_int
from .diagonal import CoordinateMoments, diagonal_result, exact_diagonal, sample_probes
from .probes import make_generator, rademacher


def diagpp(op, *, max_matvecs: int = 100, sketch: int | None = None, block_size: int = 16,
           seed: int | None = 0) -> DiagonalResult:
    """Estimate diag(H) by Diag++: a sketch of ``sketch`` columns (default ⌊max_matvecs/3⌋), then
    max_matvecs − 2·sketch Hutchinson probes of the deflated residual (see the module docstring)."""
    check_positive_int("max_matvecs", max_matvecs, 4)
    check_positive_int("block_size", block_size)
    H = CountingOperator(op)
    if max_matvecs >= H.dim:
        return exact_diagonal(H, "diagpp", seed)
    if sketch is None:
        sketch = max_matvecs // 3
    check_positive_int("sketch", sketch)
    if 2 * sketch + 2 > max_matvecs:
        raise ValueError(f"max_matvecs={max_matvecs} leaves fewer than 2 residual probes after a sketch of "
                         f"{sketch} (needs 2·sketch + 2)")
    generator = make_generator(seed)
    Q, _ = torch.linalg.qr(H.matmat(rademacher(H.dim, sketch, generator, device=H.device)))
    exact = (Q * H.matmat(Q)).sum(1)  # diag(QQᵀH)
    moments = CoordinateMoments(H)
    sample_probes(H, generator, max_matvecs - H.matvecs, block_size, moments,
                  residual=lambda HZ: HZ - Q @ (Q.T @ HZ))
    return diagonal_result(moments, H, "diagpp", seed, sketch=sketch, exact=exact)
