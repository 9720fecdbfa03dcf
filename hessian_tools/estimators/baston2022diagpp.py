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

When ``max_hvps ≥ dim`` the diagonal is computed exactly as diag(H·I) with dim HVPs instead
(stderr 0, no probes): a sketch of that size would cost more and be no better.
"""

from __future__ import annotations

import torch

from ..checks import check_integer
from ..results import DiagonalResult
from ..seeding import seeded_generator
from .common import CountingOperator
from .diagonal import CoordinateMoments, diagonal_result, exact_diagonal, sample_probes
from .probes import rademacher


def diagpp(
    op, *, max_hvps: int = 100, sketch: int | None = None, block_size: int = 16, seed: int | None = 0
) -> DiagonalResult:
    """Estimate diag(H) by Diag++: a sketch of ``sketch`` columns (default ⌊max_hvps/3⌋), then
    max_hvps − 2·sketch Hutchinson probes of the deflated residual (see the module docstring).
    """
    check_integer("max_hvps", max_hvps, 4)
    check_integer("block_size", block_size)
    H = CountingOperator(op)
    if max_hvps >= H.dim:
        return exact_diagonal(H, "diagpp", seed)
    if sketch is None:
        sketch = max_hvps // 3
    check_integer("sketch", sketch)
    if 2 * sketch + 2 > max_hvps:
        raise ValueError(
            f"max_hvps={max_hvps} leaves fewer than 2 residual probes after a sketch of "
            f"{sketch} (needs 2·sketch + 2)"
        )
    generator, seed = seeded_generator(seed)
    Q, _ = torch.linalg.qr(H.matmat(rademacher(H.dim, sketch, generator, device=H.device)))
    exact = (Q * H.matmat(Q)).sum(1)  # diag(QQᵀH)
    moments = CoordinateMoments(H)
    sample_probes(
        H, generator, max_hvps - H.hvps, block_size, moments, residual=lambda HZ: HZ - Q @ (Q.T @ HZ)
    )
    return diagonal_result(moments, H, "diagpp", seed, sketch=sketch, exact=exact)
