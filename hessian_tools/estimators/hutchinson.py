"""Hutchinson's trace estimator (Hutchinson 1989) with a sequential stopping rule.

For Rademacher probes z (entries ±1), E[zᵀHz] = tr(H) and
Var(zᵀHz) = 2(‖H‖_F² − Σ_i H_ii²). With n probes the estimate is the sample mean of
zᵢᵀHzᵢ and its standard error is the sample standard deviation / √n.

Sequential rule (``rtol``): probes are drawn in blocks (each block is ONE pass over the data);
after at least ``min_probes`` probes the run stops once the 95% confidence half-width
1.96·stderr ≤ rtol·|estimate|. Unlike PyHessian's rule (stop when two consecutive running means
differ by less than a tolerance), this one measures the estimator's actual spread. As with any
data-dependent stopping time, the nominal 95% coverage is approximate; ``min_probes`` (default 10)
keeps the variance estimate itself from being too noisy.

Per-block traces use the same probes: tr(H_bb) ≈ mean of Σ_{i∈b} z_i (Hz)_i, and the block
samples of each probe sum to its total sample, so the block estimates sum to the total.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from ..checks import check_integer
from ..results import Z95, BlockTrace, TraceResult
from ..seeding import seeded_generator
from ..stats import mean_and_stderr
from .common import CountingOperator, check_rtol, columns_per_pass
from .probes import rademacher_blocks


@dataclasses.dataclass
class QuadraticFormSamples:
    """Per-probe samples wᵀHw (``totals``) and their per-block parts (``blocks``: n_blocks × n)."""

    totals: torch.Tensor
    blocks: torch.Tensor | None
    converged: bool


def sample_quadratic_forms(
    H: CountingOperator,
    generator: torch.Generator,
    budget: int,
    *,
    rtol: float | None,
    min_probes: int,
    block_size: int,
    offset: float = 0.0,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> QuadraticFormSamples:
    """Draw Rademacher probes z in blocks, w = project(z) (identity by default), and record wᵀHw.

    With ``rtol`` the loop stops once 1.96·stderr ≤ rtol·|offset + mean| (after ``min_probes``);
    ``offset`` is an exactly known part of the trace (Hutch++'s sketch). A block is multiplied in
    pieces of :func:`~hessian_tools.estimators.common.columns_per_pass` columns (the same probes
    and samples; only one piece and its product are held), the samples summed in float64.
    """
    slices = [b.slice for b in H.blocks] if H.blocks else None
    totals, per_block, drawn = [], [], 0
    converged = rtol is None
    while drawn < budget:
        size = _next_block(totals, drawn, budget, min_probes, block_size, rtol, offset)
        width = columns_per_pass(H, max(size, 1))
        sums = torch.zeros(size, dtype=torch.float64)
        parts = torch.zeros(len(slices), size, dtype=torch.float64) if slices is not None else None
        for start, stop, W in rademacher_blocks(H.dim, size, generator, width, H.dtype, H.device):
            if project is not None:
                W = project(W)
            HW = H.matmat(W).to(W.device)
            for i in range(stop - start):
                products = W[:, i] * HW[:, i]  # exact for ±1 probes; summed in float64
                sums[start + i] = float(products.sum(dtype=torch.float64))
                if parts is not None:
                    parts[:, start + i] = torch.stack(
                        [products[s].sum(dtype=torch.float64) for s in slices]
                    ).cpu()
            del W, HW
        totals.append(sums)
        if parts is not None:
            per_block.append(parts)
        drawn += size
        if rtol is not None and drawn >= min_probes and _within(torch.cat(totals), rtol, offset):
            converged = True
            break
    return QuadraticFormSamples(
        torch.cat(totals), torch.cat(per_block, dim=1) if per_block else None, converged
    )


def hutchinson(
    op,
    *,
    n_probes: int | None = None,
    rtol: float | None = None,
    max_hvps: int = 1000,
    min_probes: int = 10,
    block_size: int = 16,
    seed: int | None = 0,
    keep_samples: bool = True,
) -> TraceResult:
    """Estimate tr(H) with Rademacher probes.

    Either a fixed budget (``n_probes``, default 100 when ``rtol`` is None) or the sequential
    rule (``rtol`` given: stop at 1.96·stderr ≤ rtol·|estimate|, at most ``max_hvps`` probes).
    ``block_size`` probes share one data pass; with ``rtol`` the next block is sized from the
    current variance estimate (never fewer than ``block_size``).
    """
    rtol = check_rtol(rtol)
    check_integer("max_hvps", max_hvps)
    check_integer("min_probes", min_probes, 2)
    check_integer("block_size", block_size)
    if n_probes is None:
        n_probes = 100 if rtol is None else max_hvps
    check_integer("n_probes", n_probes, 2)
    H = CountingOperator(op, native=True)
    generator, seed = seeded_generator(seed)
    drawn = sample_quadratic_forms(
        H, generator, min(n_probes, max_hvps), rtol=rtol, min_probes=min_probes, block_size=block_size
    )
    return trace_result(drawn, H, "hutchinson", seed, rtol, keep_samples)


def trace_result(
    drawn: QuadraticFormSamples,
    H: CountingOperator,
    method: str,
    seed,
    rtol,
    keep_samples: bool,
    exact: float = 0.0,
    exact_blocks: torch.Tensor | None = None,
) -> TraceResult:
    """The TraceResult of an exactly known part (``exact``, per block ``exact_blocks``) plus the
    mean of the sampled quadratic forms, with the samples' standard error.
    """
    mean, stderr = mean_and_stderr(drawn.totals)
    return TraceResult(
        estimate=exact + mean,
        stderr=stderr,
        hvps=H.hvps,
        method=method,
        seed=seed,
        n_probes=drawn.totals.numel(),
        rtol=rtol,
        converged=drawn.converged,
        blocks=block_results(H.blocks, drawn.blocks, exact_blocks),
        samples=tuple(drawn.totals.tolist()) if keep_samples else (),
    )


def block_results(blocks, block_samples: torch.Tensor | None, exact: torch.Tensor | None = None) -> tuple:
    """Per-block (estimate, stderr) from per-probe block samples, plus an exactly known part."""
    if not blocks or block_samples is None:
        return ()
    out = []
    for number, (block, row) in enumerate(zip(blocks, block_samples)):
        mean, stderr = mean_and_stderr(row)
        out.append(
            BlockTrace(block.name, mean + (float(exact[number]) if exact is not None else 0.0), stderr)
        )
    return tuple(out)


def _within(samples: torch.Tensor, rtol: float, offset: float) -> bool:
    mean, stderr = mean_and_stderr(samples)
    return Z95 * stderr <= rtol * abs(offset + mean)


def _next_block(
    totals, drawn: int, budget: int, min_probes: int, block_size: int, rtol, offset: float
) -> int:
    """Size of the next probe block: enough to reach min_probes, then (with rtol) the number the
    current variance says is still needed, clipped to [block_size, 4·drawn] and the budget.
    """
    remaining = budget - drawn
    if drawn < min_probes:
        return min(max(min_probes - drawn, block_size), remaining)
    if rtol is None:
        return min(block_size, remaining)
    mean, stderr = mean_and_stderr(torch.cat(totals))
    estimate = offset + mean
    sd = stderr * math.sqrt(drawn)
    needed = math.ceil((Z95 * sd / (rtol * abs(estimate))) ** 2) if estimate else remaining
    return max(1, min(max(needed - drawn, block_size), 4 * drawn, remaining))
