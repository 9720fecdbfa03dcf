"""The Hessian diagonal diag(H), per coordinate, with per-coordinate error bars.

``diagonal(op, method=...)`` is the entry point; the methods:

* ``"hutchinson"`` — Hutchinson's diagonal estimator, :func:`hutchinson_diagonal` below (Bekas,
  Kokiopoulou & Saad, "An estimator for the diagonal of a matrix", Appl. Numer. Math. 57(11), 2007).
* ``"diagpp"`` — Diag++ (:mod:`.baston2022diagpp`): the diagonal of a sketched top subspace exactly,
  Hutchinson on the rest; conditional error bars.
* ``"xdiag"`` — XDiag (:mod:`.epperly2024xtrace`): every probe serves both the sketch and the residual
  estimate (leave-one-out); error estimate from the spread of the per-probe estimates.

Hutchinson's diagonal estimator. For a Rademacher probe z (independent ±1 entries),

    (z ⊙ Hz)_i = H_ii z_i² + Σ_{k≠i} H_ik z_i z_k = H_ii + Σ_{k≠i} H_ik z_i z_k,

so E[z ⊙ Hz] = diag(H), and since the products z_i z_k (k ≠ i) are uncorrelated ±1 variables,

    Var((z ⊙ Hz)_i) = Σ_{k≠i} H_ik²,

the squared off-diagonal mass of row i. With m probes the estimate is the sample mean d̂ = (1/m)
Σ_j z_j ⊙ Hz_j (Bekas et al. divide by Σ_j z_j ⊙ z_j, which is exactly m for Rademacher probes)
and ``stderr_i`` = sample std of the m values of coordinate i / √m: the textbook standard error
of a mean of i.i.d. samples. It is exactly 0 for a diagonal H (every sample equals H_ii), and large
where a row carries off-diagonal mass; the error is O(1/√m) per coordinate. Unlike the deflated
methods, Hutchinson never switches to an exact computation: it is the plain baseline.

Per-block summaries (:class:`~hessian_tools.results.BlockDiagonal`) use the same probes: each
probe's block sums Σ_{i∈b} (z ⊙ Hz)_i are the Hutchinson samples of tr(H_bb), so the block sum's
standard error comes from those per-probe sums (coordinates are correlated; summing per-coordinate
variances would be wrong).

Memory: probes are drawn in blocks of ``block_size`` (one data pass each) and the per-coordinate
mean and variance are accumulated on the fly, so memory is O(dim · block_size), not O(dim · m).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..checks import check_integer
from ..operators.params import ParameterBlock
from ..results import BlockDiagonal, DiagonalResult
from ..seeding import seeded_generator
from ..stats import mean_and_stderr
from .common import CountingOperator, block_index, block_sums
from .probes import rademacher

METHODS = ("xdiag", "diagpp", "hutchinson")
#: identity columns per HVP block when a deflated method computes the diagonal exactly
EXACT_BLOCK = 256


def blocks_of(H: CountingOperator) -> tuple:
    """The operator's parameter blocks, or one block "all" for an operator without blocks."""
    return tuple(H.blocks) if H.blocks else (ParameterBlock("all", 0, H.dim, (H.dim,)),)


class CoordinateMoments:
    """Per-coordinate sample mean and variance of sample columns (dim, K), streamed block by block,
    plus every sample's per-block sums (n_blocks numbers per sample).

    Sums are taken about a shift (the first sample), which keeps the variance accurate when it is
    small next to the mean, and makes it exactly 0 when every sample of a coordinate is the same.
    """

    def __init__(self, H: CountingOperator):
        self.blocks = blocks_of(H)
        _, self.index = block_index(self.blocks, H.dim, device=H.device)
        self.count = 0
        self.shift = torch.zeros(H.dim, dtype=torch.float64, device=H.device)
        self.total = torch.zeros_like(self.shift)
        self.total_sq = torch.zeros_like(self.shift)
        self.per_block: list[torch.Tensor] = []

    def add(self, samples: torch.Tensor) -> None:
        if self.count == 0:
            self.shift = samples[:, 0].clone()
        centred = samples - self.shift[:, None]
        self.total += centred.sum(1)
        self.total_sq += (centred * centred).sum(1)
        self.per_block.append(block_sums(samples, self.index, len(self.blocks)))
        self.count += samples.shape[1]

    def mean(self) -> torch.Tensor:
        return self.shift + self.total / self.count

    def stderr(self) -> torch.Tensor:
        if self.count < 2:
            return torch.full_like(self.shift, float("inf"))
        variance = (self.total_sq - self.total**2 / self.count) / (self.count - 1)
        return (variance.clamp(min=0) / self.count).sqrt()

    def block_samples(self) -> torch.Tensor:
        """(n_blocks, count): each sample's sum over each block."""
        return torch.cat(self.per_block, dim=1)


def sample_probes(
    H: CountingOperator,
    generator: torch.Generator,
    n_probes: int,
    block_size: int,
    moments: CoordinateMoments,
    residual: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Add the samples z ⊙ residual(Hz) of ``n_probes`` Rademacher probes z to ``moments``, in blocks
    of ``block_size`` (residual: the identity by default; Diag++ projects Hz out of its sketch).
    """
    drawn = 0
    while drawn < n_probes:
        size = min(block_size, n_probes - drawn)
        Z = rademacher(H.dim, size, generator, device=H.device)
        HZ = H.matmat(Z)
        moments.add(Z * (HZ if residual is None else residual(HZ)))
        drawn += size


def diagonal_result(
    moments: CoordinateMoments,
    H: CountingOperator,
    method: str,
    seed,
    *,
    sketch: int = 0,
    exact: torch.Tensor | None = None,
) -> DiagonalResult:
    """The DiagonalResult of an exactly known part ``exact`` (dim,) plus the mean of the samples."""
    estimate, stderr = moments.mean(), moments.stderr()
    block_samples = moments.block_samples()
    offsets = torch.zeros(len(moments.blocks), dtype=torch.float64, device=H.device)
    if exact is not None:
        estimate = estimate + exact
        offsets = block_sums(exact[:, None], moments.index, len(moments.blocks))[:, 0]
    sums = [mean_and_stderr(row) for row in block_samples]
    trace, trace_stderr = mean_and_stderr(block_samples.sum(0))
    sums = [(float(offset) + mean, se) for offset, (mean, se) in zip(offsets, sums)]
    return _result(
        H,
        moments.blocks,
        estimate,
        stderr,
        sums,
        (float(offsets.sum()) + trace, trace_stderr),
        method,
        seed,
        moments.count,
        sketch,
    )


def exact_diagonal(H: CountingOperator, method: str, seed) -> DiagonalResult:
    """diag(H) exactly from H·I (dim HVPs, in blocks of EXACT_BLOCK columns): stderr 0, no probes."""
    diag = torch.empty(H.dim, dtype=torch.float64, device=H.device)
    for start in range(0, H.dim, EXACT_BLOCK):
        stop = min(start + EXACT_BLOCK, H.dim)
        E = torch.zeros(H.dim, stop - start, dtype=torch.float64, device=H.device)
        E[start:stop] = torch.eye(stop - start, dtype=torch.float64, device=H.device)
        diag[start:stop] = torch.diagonal(H.matmat(E)[start:stop])
    blocks = blocks_of(H)
    sums = [(float(diag[b.start : b.stop].sum()), 0.0) for b in blocks]
    return _result(
        H,
        blocks,
        diag,
        torch.zeros_like(diag),
        sums,
        (float(diag.sum()), 0.0),
        method,
        seed,
        n_probes=0,
        sketch=H.dim,
    )


def _result(H, blocks, estimate, stderr, sums, trace, method, seed, n_probes, sketch) -> DiagonalResult:
    estimate = estimate.detach().cpu().numpy().astype(np.float64)
    stderr = stderr.detach().cpu().numpy().astype(np.float64)
    summaries = []
    for block, (total, total_se) in zip(blocks, sums):
        values, errors = estimate[block.start : block.stop], stderr[block.start : block.stop]
        summaries.append(
            BlockDiagonal(
                name=block.name,
                size=block.stop - block.start,
                sum=total,
                sum_stderr=total_se,
                mean_abs=float(np.abs(values).mean()),
                min=float(values.min()),
                max=float(values.max()),
                rms_stderr=float(np.sqrt(np.mean(errors**2))),
            )
        )
    return DiagonalResult(
        trace=trace[0],
        trace_stderr=trace[1],
        blocks=tuple(summaries),
        hvps=H.hvps,
        method=method,
        seed=seed,
        n_probes=n_probes,
        dim=H.dim,
        sketch=sketch,
        estimate=estimate,
        stderr=stderr,
    )


def hutchinson_diagonal(
    op, *, max_hvps: int = 100, block_size: int = 16, seed: int | None = 0
) -> DiagonalResult:
    """Estimate diag(H) by Hutchinson's diagonal estimator with ``max_hvps`` Rademacher probes
    (see the module docstring).
    """
    check_integer("max_hvps", max_hvps, 2)
    check_integer("block_size", block_size)
    H = CountingOperator(op)
    moments = CoordinateMoments(H)
    generator, seed = seeded_generator(seed)
    sample_probes(H, generator, max_hvps, block_size, moments)
    return diagonal_result(moments, H, "hutchinson", seed)


def diagonal(
    op, method: str = "xdiag", max_hvps: int = 100, seed: int | None = 0, **options
) -> DiagonalResult:
    """Estimate diag(H) of any operator (``dim`` + ``matmat``) with ``max_hvps`` HVPs.

    ``method``: ``"xdiag"`` (default), ``"diagpp"`` or ``"hutchinson"`` (see the module docstring).
    The deflated methods compute the diagonal exactly (dim HVPs) once ``max_hvps ≥ dim``.
    Other keyword options go to the method (``block_size=``; ``sketch=`` for Diag++).
    """
    if method not in METHODS:
        raise ValueError(f"unknown diagonal method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "hutchinson":
        return hutchinson_diagonal(op, max_hvps=max_hvps, seed=seed, **options)
    if method == "diagpp":
        from .baston2022diagpp import diagpp

        return diagpp(op, max_hvps=max_hvps, seed=seed, **options)
    from .epperly2024xtrace import xdiag

    return xdiag(op, max_hvps=max_hvps, seed=seed, **options)
