"""Hutch++ (Meyer, Musco, Musco, Woodruff 2021): deflate the top of the spectrum, then Hutchinson.

With a sketch S (dim × s, Rademacher) and Q = orth(HS), split
    tr(H) = tr(QᵀHQ) + tr((I−QQᵀ) H (I−QQᵀ)).
The first term is computed exactly from HQ (s more HVPs); the second by Hutchinson on probes
projected out of span(Q), w = (I−QQᵀ)z. Because Q captures the large-magnitude eigenvalues, the
residual has a much smaller Frobenius norm, hence a smaller variance: for PSD H the error is
O(1/m) in the number of HVPs m instead of Hutchinson's O(1/√m).

Error bar: conditional on the sketch (Q fixed), the residual term is an average of i.i.d.
samples wᵀHw, so ``stderr`` = sample std / √g over the g residual probes; the exact part adds
no variance. The estimate is unbiased for any Q.

Per-block traces: diag(H) = diag(QQᵀH) + diag((I−QQᵀ)H); the first is Σ_l Q_il (HQ)_il exactly,
and E[w_i (Hw)_i] = ((I−QQᵀ)H)_ii for w = (I−QQᵀ)z, so the block estimates sum to the total.
"""

from __future__ import annotations

import torch

from ..checks import check_integer
from ..results import TraceResult
from ..seeding import seeded_generator
from .common import (
    _INNER_ROWS,
    CountingOperator,
    block_index,
    block_sums,
    check_rtol,
    columns_per_pass,
    inner,
    orthonormal_columns,
    subtract_product,
)
from .hutchinson import block_results, sample_quadratic_forms, trace_result
from .probes import rademacher_blocks


def hutchpp(
    op,
    *,
    max_hvps: int = 99,
    sketch: int | None = None,
    rtol: float | None = None,
    min_probes: int = 10,
    block_size: int = 16,
    seed: int | None = 0,
    keep_samples: bool = True,
) -> TraceResult:
    """Estimate tr(H) by Hutch++.

    Fixed budget (``rtol`` None): sketch size s = ``sketch`` (default ⌊max_hvps/3⌋), then
    max_hvps − 2s residual probes. With ``rtol``: the sketch (default min(⌊max_hvps/3⌋, 20))
    is followed by residual probes until 1.96·stderr ≤ rtol·|estimate| or the budget is spent.
    """
    rtol = check_rtol(rtol)
    check_integer("max_hvps", max_hvps, 3)
    H = CountingOperator(op, native=True)
    if sketch is None:
        sketch = max_hvps // 3 if rtol is None else min(max_hvps // 3, 20)
    check_integer("sketch", sketch)
    sketch = min(sketch, H.dim)
    if 2 * sketch + 2 > max_hvps and sketch < H.dim:
        raise ValueError(
            f"max_hvps={max_hvps} leaves no residual probes after a sketch of {sketch} (needs 2·sketch + 2)"
        )
    generator, seed = seeded_generator(seed)
    # The sketch, its range Q and diag(QQᵀH) = Σ_l Q_il (HQ)_il, a few columns at a time: only HS
    # and Q are ever held whole (in the operator's precision).
    width = columns_per_pass(H, max(sketch, 1))
    Y = torch.empty(H.dim, sketch, dtype=H.dtype, device=H.device)
    for start, stop, S in rademacher_blocks(H.dim, sketch, generator, width, H.dtype, H.device):
        Y[:, start:stop] = H.matmat(S)
        del S
    Q = orthonormal_columns(Y)  # float64: Householder QR; float32: in place, Grams in float64
    del Y
    exact_diag = torch.zeros(H.dim, 1, dtype=torch.float64, device=H.device)  # diag(QQᵀH): sums to tr(QᵀHQ)
    for start in range(0, sketch, width):
        HQ = H.matmat(Q[:, start : start + width])
        # by rows: a column of Q is strided, and the rows' cache lines are shared by its columns
        for first in range(0, H.dim, _INNER_ROWS):
            rows = slice(first, first + _INNER_ROWS)
            for i in range(HQ.shape[1]):
                exact_diag[rows, 0].addcmul_(Q[rows, start + i], HQ[rows, i])
        del HQ
    exact = float(exact_diag.sum())
    names, index = block_index(H.blocks, H.dim, device=H.device)
    exact_blocks = block_sums(exact_diag, index, len(names))[:, 0] if names is not None else None
    if sketch >= H.dim:  # Q spans everything: the trace is exact
        return TraceResult(
            exact,
            0.0,
            H.hvps,
            "hutchpp",
            seed,
            0,
            rtol,
            True,
            block_results(H.blocks, torch.zeros(len(names), 2, dtype=torch.float64), exact_blocks)
            if names
            else (),
        )

    def project(Z: torch.Tensor) -> torch.Tensor:
        return subtract_product(Z, Q, inner(Q, Z))  # Z − Q QᵀZ, in place

    drawn = sample_quadratic_forms(
        H,
        generator,
        max_hvps - H.hvps,
        rtol=rtol,
        min_probes=min_probes,
        block_size=block_size,
        offset=exact,
        project=project,
    )
    return trace_result(drawn, H, "hutchpp", seed, rtol, keep_samples, exact, exact_blocks)
