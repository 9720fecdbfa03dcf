"""Quadratic forms vᵀ f(H) v by Lanczos (Gauss) quadrature, for one vector or K at once.

Lanczos started at v/‖v‖ gives after m steps a tridiagonal T_m = U diag(θ) Uᵀ and the Gauss rule

    vᵀ f(H) v ≈ ‖v‖² e_1ᵀ f(T_m) e_1 = ‖v‖² Σ_i w_i f(θ_i),   w_i = U_{1i}²

(Golub & Meurant, "Matrices, Moments and Quadrature"). It is exact for polynomials of degree
≤ 2m − 1 — so f = identity is exact after one step and f = square after two — and exact for every
f once the Krylov space of v is invariant (Lanczos breakdown, ``exhausted=True``; at the latest
after dim steps). For non-polynomial f the error shrinks as the Ritz values resolve the part of
the spectrum that v sees; ``change`` (the rule after m steps minus the rule after m − 1 steps) is
the practical error indicator, and the iteration stops once |change| ≤ tol·|estimate|. ``change``
is inf after a single step (there is no earlier rule); ``tol=0`` disables the early stop. It is an
indicator, not a bound: for non-smooth f the Gauss rule can stall for a step and move again. For
the kinked built-ins ("relu", "abs") a small change only counts once the Ritz values lie on both
sides of 0: before that the rule is the rule of a linear function (e.g. relu ≡ identity while all
Ritz values are positive) and cannot see negative eigenvalues not yet resolved. Consequently for a
positive (or negative) semidefinite H these run the full ``steps`` unless Lanczos breaks down.

f = "relu" is max(x, 0): vᵀH⁺v with the negative eigenvalues clipped, the per-layer quantity
vᵢᵀHᵢ⁺vᵢ of the distance-weighted Hessian measure of Ju, Li & Zhang (ICML 2022). Other names:
"identity" (vᵀHv), "abs" (vᵀ|H|v), "square" (‖Hv‖²), or any callable mapping a float64 torch
tensor of nodes to a tensor of the same shape.

:func:`quadratic_forms` runs K vectors' Lanczos processes at once (ONE HVP block per step, see
:mod:`.lanczos`); each stops on its own criterion and spends no HVPs afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..checks import check_integer, check_nonnegative
from ..operators.adapters import as_operator
from ..results import QuadratureResult
from .common import CountingOperator
from .lanczos import BatchedLanczos, gauss_quadrature

#: built-in functions with a kink at 0: while every Ritz value is on one side of 0 their Gauss rule
#: equals that of a linear function, so a small change then says nothing about the kink.
KINKED_AT_ZERO = ("relu", "abs")

FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": lambda x: x.clamp(min=0),
    "identity": lambda x: x,
    "abs": lambda x: x.abs(),
    "square": lambda x: x * x,
}


def quadratic_form(op, v: torch.Tensor, f="relu", steps: int = 50, tol: float = 1e-8) -> QuadratureResult:
    """vᵀ f(H) v by Lanczos quadrature started at v (see the module docstring)."""
    dim = int(as_operator(op).dim)
    if not isinstance(v, torch.Tensor) or v.ndim != 1 or v.shape[0] != dim:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"v must be a 1-D tensor of length {dim}, got {shape}")
    return quadratic_forms(op, v[:, None], f=f, steps=steps, tol=tol)[0]


def quadratic_forms(
    op, V: torch.Tensor, f="relu", steps: int = 50, tol: float = 1e-8
) -> list[QuadratureResult]:
    """vₖᵀ f(H) vₖ for every column vₖ of V (dim, K), all K Lanczos processes batched.

    Each result's ``hvps`` is the HVPs spent on its own vector (= its ``steps``); a zero column
    gives an exact 0 at no cost.
    """
    check_integer("steps", steps)
    tol = check_nonnegative("tol", tol)
    fn, name = _function(f)
    H = CountingOperator(op)
    if not isinstance(V, torch.Tensor) or V.ndim != 2 or V.shape[0] != H.dim:
        shape = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
        raise ValueError(f"V must be a tensor of shape ({H.dim}, K), got {shape}")
    V = V.detach().to(dtype=torch.float64)
    if not bool(torch.isfinite(V).all()):
        raise ValueError("V must be finite")
    K = V.shape[1]
    norms_sq = (V * V).sum(0)
    nonzero = (norms_sq > 0).nonzero().squeeze(1).tolist()
    results: list[QuadratureResult | None] = [
        None if k in nonzero else QuadratureResult(0.0, 0.0, 0, 0, True, name) for k in range(K)
    ]
    if not nonzero:
        return results
    state = BatchedLanczos(H, V[:, nonzero], steps)
    scale = norms_sq[nonzero].to(state.alphas.device)
    estimate = torch.full((len(nonzero),), math.nan, dtype=torch.float64, device=scale.device)
    change = torch.full_like(estimate, math.inf)
    while not state.done:
        was_active = state.active.clone()
        state.step()
        new, straddles = _gauss_rule(state, fn, was_active)
        new = new * scale
        change = torch.where(was_active, new - estimate if state.j > 1 else change, change)
        estimate = torch.where(was_active, new, estimate)
        if tol > 0:
            converged = state.active & (change.abs() <= tol * estimate.abs())
            if name in KINKED_AT_ZERO:
                converged &= straddles
            state.stop(converged)
    for position, k in enumerate(nonzero):
        length = int(state.lengths[position])
        results[k] = QuadratureResult(
            estimate=float(estimate[position]),
            change=float(change[position]),
            steps=length,
            hvps=length,
            exhausted=bool(state.exhausted[position]),
            function=name,
        )
    return results


def _gauss_rule(state: BatchedLanczos, fn, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e_1ᵀ f(T) e_1 for the processes in ``rows`` (others: nan), and whether their Ritz values
    lie on both sides of 0.
    """
    out = torch.full((state.K,), math.nan, dtype=torch.float64, device=state.alphas.device)
    straddles = torch.zeros(state.K, dtype=torch.bool, device=out.device)
    idx = rows.nonzero().squeeze(1)
    if idx.numel() == 0:
        return out, straddles
    m = int(state.lengths[idx].max())
    nodes, weights = gauss_quadrature(state.alphas[idx, :m], state.betas[idx, : m - 1], state.lengths[idx])
    values = torch.as_tensor(fn(nodes), dtype=torch.float64, device=nodes.device)
    if values.shape != nodes.shape:
        raise ValueError(
            "f must map a tensor of nodes to a tensor of the same shape, "
            f"got {tuple(values.shape)} for {tuple(nodes.shape)}"
        )
    out[idx] = (weights * values).sum(1).to(out.device)
    real = weights > 0  # padding nodes have weight 0
    below = ((nodes < 0) & real).any(1)
    above = ((nodes > 0) & real).any(1)
    straddles[idx] = (below & above).to(out.device)
    return out, straddles


def _function(f) -> tuple[Callable, str]:
    if isinstance(f, str):
        if f not in FUNCTIONS:
            raise ValueError(
                f"unknown function {f!r}; choose one of {', '.join(FUNCTIONS)} or pass a callable"
            )
        return FUNCTIONS[f], f
    if callable(f):
        return f, getattr(f, "__name__", type(f).__name__)
    raise ValueError(f"f must be one of {', '.join(FUNCTIONS)} or a callable, got {f!r}")
