"""The exact Gauss–Newton trace, and the Hessian trace with the Gauss–Newton matrix as control variate.

``ggn_trace(op)``: tr(G) = (1/N) Σ_n ‖Λ_n^{1/2} J_n‖_F² exactly (Λ_n = ∇²_z ℓ, J_n = ∂z_n/∂θ), with
one per-sample vector-Jacobian product per output and sample: C passes over the data for C outputs
(cross-entropy: rows √p_c (e_c − p)ᵀ J_n of a factor of Λ_n; MSE: √(2/C) times the rows of J_n).

``control_variate_trace(H)``: split tr(H) = tr(G) + tr(H − G); tr(G) is exact and Hutchinson runs on
the residual operator H − G only. The residual's per-probe variance 2(‖H − G‖_F² − Σ_i (H − G)_ii²) is
usually far smaller than that of H when G dominates the curvature (near a minimum the residual
Σ_n Σ_c ∂ℓ/∂z_c ∇²_θ z_nc is weighted by the small loss gradients), so far fewer probes reach a given
tolerance; each probe costs two products (H·v and G·v), which the result counts.
"""

from __future__ import annotations

import dataclasses

import torch

from ..checks import check_integer
from ..operators.base import LinearOperator
from ..operators.gauss_newton import FisherOperator, GGNOperator, OutputCurvatureOperator
from ..operators.hessian import HessianOperator
from ..results import BlockTrace, ControlVariateTraceResult, TraceResult
from ..seeding import seeded_generator
from .common import CountingOperator, check_rtol
from .hutchinson import sample_quadratic_forms, trace_result


def gauss_newton_for(op) -> OutputCurvatureOperator:
    """``op`` itself if it is a Gauss–Newton/Fisher operator, else the GGN over a
    :class:`HessianOperator`'s data loop (same model, loss, data, parameters, dtype).
    """
    if isinstance(op, OutputCurvatureOperator):
        return op
    if isinstance(op, HessianOperator):
        return GGNOperator.from_risk(op.risk, chunk_size=op.chunk_size, memory_budget=op.memory_budget)
    raise TypeError(
        f"expected a GGNOperator, FisherOperator or HessianOperator, got {type(op).__name__}: the "
        "Gauss-Newton matrix needs the model, the loss and the data"
    )


def exact_method_name(op: OutputCurvatureOperator) -> str:
    """``exact-ggn``, ``exact-fisher-empirical``, ``exact-fisher-true`` or ``exact-fisher-mc``."""
    if isinstance(op, FisherOperator):
        return "exact-fisher-mc" if op.mc_samples else f"exact-fisher-{op.kind}"
    return "exact-ggn"


def ggn_trace(op, sample_chunk: int = 16) -> TraceResult:
    """tr(G) exactly (or tr(F) for a :class:`FisherOperator`), with zero standard error.

    Parameters
    ----------
    op: a :class:`GGNOperator` / :class:`FisherOperator`, or a :class:`HessianOperator` whose model,
        loss (cross-entropy or MSE) and data define the GGN.
    sample_chunk: samples whose per-sample products are vmapped together (memory: chunk × C × dim).

    Returns
    -------
    TraceResult with ``stderr`` 0, per-block traces, ``n_probes`` 0 and ``hvps`` = R, the number of
    per-sample vector-Jacobian passes over the data (R = C outputs for the GGN and the exact true
    Fisher, 1 for the empirical Fisher, M for the Monte-Carlo Fisher); each pass is counted as one HVP
    (a vector-Jacobian product of the outputs costs less than a Hessian-vector product).
    """
    ggn = gauss_newton_for(op)
    per_block, passes = ggn.exact_trace(sample_chunk)
    blocks = tuple(BlockTrace(b.name, float(t), 0.0) for b, t in zip(ggn.blocks, per_block))
    seed = getattr(ggn, "seed", None)
    return TraceResult(float(per_block.sum()), 0.0, passes, exact_method_name(ggn), seed, 0, blocks=blocks)


class ResidualOperator(LinearOperator):
    """H − G for two operators over the same parameters (one product of each per column)."""

    def __init__(self, hessian, ggn):
        if int(hessian.dim) != int(ggn.dim):
            raise ValueError(f"the Hessian has dim {hessian.dim} but the Gauss-Newton operator {ggn.dim}")
        self.hessian, self.ggn = hessian, ggn
        self.dim, self.dtype = int(hessian.dim), torch.float64
        self.device = getattr(hessian, "device", torch.device("cpu"))
        self.blocks = getattr(hessian, "blocks", None)
        self.hvps = 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        H = self.hessian.matmat(V.to(self.hessian.dtype)).to(torch.float64)
        return H - self.ggn.matmat(V.to(self.ggn.dtype)).to(torch.float64)


def control_variate_trace(
    hessian,
    ggn=None,
    *,
    rtol: float | None = None,
    max_hvps: int | None = None,
    min_probes: int = 32,
    block_size: int = 16,
    seed: int | None = 0,
    keep_samples: bool = True,
    sample_chunk: int = 16,
) -> ControlVariateTraceResult:
    """tr(H) = tr(G) + tr(H − G): the exact GGN trace plus Hutchinson on the residual H − G.

    Parameters
    ----------
    hessian: the :class:`HessianOperator` (any operator with ``dim`` and ``matmat`` if ``ggn`` is given).
    ggn: the control variate (default: the GGN over ``hessian``'s model, loss and data).
    rtol: stop once 1.96·stderr ≤ rtol·|tr(G) + residual mean| (at least ``min_probes`` probes).
    min_probes: default 32, not Hutchinson's 10: the residual's samples are heavy-tailed (a few
        directions carry most of H − G), and with 16 probes the sample variance was seen to
        underestimate the spread (the MLP of analysis/bench_control_variate.py stopped at 1.2% true
        error with a 0.9% half-width).
    max_hvps: the budget in HVP-equivalents, exact tr(G) included (default 100, 1000 with ``rtol``):
        at most (max_hvps − C) // 2 residual probes, each one H product and one G product.
    seed, block_size, keep_samples: as for :func:`~hessian_tools.estimators.hutchinson.hutchinson`.
    sample_chunk: as for :func:`ggn_trace`.

    Returns
    -------
    ControlVariateTraceResult: ``estimate`` = ``exact_part`` + ``residual_estimate``, ``stderr`` of the
    residual mean (the only stochastic part), and the cost split into its three parts.
    """
    rtol = check_rtol(rtol)
    max_hvps = check_integer(
        "max_hvps", max_hvps if max_hvps is not None else (100 if rtol is None else 1000)
    )
    check_integer("min_probes", min_probes, 2)
    check_integer("block_size", block_size)
    ggn = gauss_newton_for(hessian if ggn is None else ggn)
    exact = ggn_trace(ggn, sample_chunk)
    budget = (max_hvps - exact.hvps) // 2
    if budget < 2:
        raise ValueError(
            f"max_hvps={max_hvps} leaves fewer than 2 residual probes after the exact GGN trace "
            f"({exact.hvps} passes) at 2 products per probe"
        )
    residual = CountingOperator(ResidualOperator(hessian, ggn))
    generator, seed = seeded_generator(seed)
    drawn = sample_quadratic_forms(
        residual,
        generator,
        budget,
        rtol=rtol,
        min_probes=min_probes,
        block_size=block_size,
        offset=exact.estimate,
    )
    exact_blocks = (
        torch.tensor([b.estimate for b in exact.blocks], dtype=torch.float64) if exact.blocks else None
    )
    base = trace_result(
        drawn, residual, "hutchinson+ggn", seed, rtol, keep_samples, exact.estimate, exact_blocks
    )
    probes = residual.hvps
    fields = {
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
        "hvps": 2 * probes + exact.hvps,
    }
    return ControlVariateTraceResult(
        **fields,
        control_variate=exact.method.removeprefix("exact-"),
        exact_part=exact.estimate,
        residual_estimate=base.estimate - exact.estimate,
        hessian_products=probes,
        ggn_products=probes,
        exact_passes=exact.hvps,
    )
