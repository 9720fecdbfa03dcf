"""Hessian-based generalization MEASURES of a checkpoint relative to its prior weights — not certificates.

Each replaces a sampled quantity by a Taylor approximation or drops constants, so none is a bound that
holds with probability 1 − δ; the certificate is
:func:`hessian_tools.bounds.certificate.pac_bayes_certificate`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..checks import check_integer, check_positive
from ..errors import CheckpointError
from ..estimators.quadrature import quadratic_forms
from ..estimators.trace import trace as estimate_trace
from ..operators.adapters import as_operator
from ..operators.block_diagonal import BlockColumnsOperator
from ..operators.params import ParameterBlock
from ..results import HessianMeasuresResult, LayerMeasure, TraceResult

__all__ = ["hessian_measures"]


def hessian_measures(
    op,
    prior_flat,
    *,
    n: int,
    lam: float = 1.0,
    trace_result: TraceResult | None = None,
    quadrature_steps: int = 50,
    quadrature_tol: float = 1e-8,
    seed: int | None = 0,
    weights: torch.Tensor | None = None,
    trace_kwargs: dict | None = None,
    with_loss: bool = True,
) -> HessianMeasuresResult:
    """Three Hessian-based generalization MEASURES of W relative to W0 — not certificates.

    ``op`` is the Hessian (a :class:`~hessian_tools.HessianOperator` of the training loss, or any
    operator with ``blocks``; then pass ``weights``, the flat W), ``prior_flat`` the flat W0 in the
    operator's parameter order (or a state_dict), ``n`` the number of training samples. Per block i
    of ``op.blocks`` (one parameter tensor): v_i = W_i − W0_i, T_i = Tr(H_i) from ``trace_result``'s
    per-block traces (estimated here by ``trace(op, seed=seed, **trace_kwargs)`` when not given).

    (a) ``second_order`` — a second-order PAC-Bayes objective. With prior N(W0, diag σ_i²I) and
    posterior N(W, diag σ_i²I), KL = Σ_i ‖v_i‖²/(2σ_i²); a linear (Catoni-type) bound at inverse
    temperature nλ reads  E_Q L ≤ E_Q L̂ + (KL + ln(1/δ))/(nλ) + const(λ).  Replacing the sampled
    E_Q L̂ by its Taylor approximation f(W) + Σ_i σ_i²/2·T_i gives the objective

        f(W) + Σ_i [ σ_i² T_i/2 + ‖v_i‖²/(2nλσ_i²) ]   (+ σ-free constants, dropped).

    Each bracket is minimised at  σ_i⁴ = ‖v_i‖²/(nλ T_i)  (derivative in σ_i²: T_i/2 − ‖v_i‖²/(2nλσ_i⁴)),
    where both halves equal ‖v_i‖√T_i/(2√(nλ)), so the minimum is

        second_order = Σ_i ‖v_i‖·√(T_i/(nλ)),     reported next to loss = f(W).

    T_i ≤ 0 (possible for an estimate, or a block with negative curvature) is clipped to 0: the
    Taylor objective would be unbounded below as σ_i → ∞; clipped, the layer contributes 0 with
    σ_i = ∞ (``trace_clipped`` records it). stderr by the delta method per layer,
    ‖v_i‖·se(T_i)/(2√(nλT_i)) (for a clipped layer ‖v_i‖√(se(T_i)/(nλ)), the term's size at
    T_i = se(T_i)), summed over layers (an upper bound on the total's standard error whatever the
    correlation between the block estimates).

    (b) ``distance_hessian`` — Ju, Li & Zhang (ICML 2022): Σ_i √(v_iᵀ H_i⁺ v_i)/√n, H_i the
    layer's diagonal Hessian block (the restriction of H to that tensor's parameters) and H_i⁺ it
    with its negative eigenvalues set to 0. v_iᵀ H_i⁺ v_i = v_iᵀ relu(H_i) v_i by Lanczos
    quadrature started at v_i (:func:`~hessian_tools.estimators.quadrature.quadratic_forms`, up to
    ``quadrature_steps`` HVPs of H_i per layer; exact once the Krylov space is exhausted). All
    layers run as one batched Lanczos over the full operator with each column restricted to its
    block (:class:`~hessian_tools.operators.block_diagonal.BlockColumnsOperator`): one data pass
    per step for every layer together. Note
    relu(H_i) of the block is NOT the block of relu(H): the operator is the block's own.
    ``distance_hessian_change`` propagates each layer's last quadrature change (0 when exhausted).

    (c) ``trace_radius`` — the trace × radius form of the NSO paper: √(Tr(H)·‖W − W0‖²/n), Tr(H)
    the total trace (clipped at 0), stderr by the delta method.
    """
    n = check_integer("n", n, why=" (the number of training samples)")
    lam = check_positive("lam", lam)
    op = as_operator(op) if not hasattr(op, "blocks") else op
    blocks = tuple(getattr(op, "blocks", None) or (ParameterBlock("all", 0, int(op.dim), (int(op.dim),)),))
    v = _displacement(op, blocks, weights, prior_flat)
    if trace_result is None:
        trace_result = estimate_trace(op, seed=seed, **(trace_kwargs or {}))
    block_traces = _block_traces(trace_result, blocks)
    quads = _layer_quadratic_forms(op, blocks, v, quadrature_steps, quadrature_tol)
    layers = [
        _layer_measure(block, T, T_se, q, float(v[block.slice].norm()), n, n * lam)
        for block, (T, T_se), q in zip(blocks, block_traces, quads)
    ]
    T, T_se = float(trace_result.estimate), float(trace_result.stderr)
    dist = float(v.norm())
    radius, radius_se = _trace_radius(T, T_se, dist, n)
    loss = float(op.loss_and_gradient()[0]) if with_loss and hasattr(op, "loss_and_gradient") else None
    quad_hvps = sum(q.hvps for q in quads)
    return HessianMeasuresResult(
        second_order=sum(layer.second_order for layer in layers),
        second_order_stderr=sum(layer.second_order_stderr for layer in layers),
        distance_hessian=sum(layer.distance_hessian for layer in layers),
        distance_hessian_change=sum(_distance_change(layer, n) for layer in layers),
        trace_radius=radius,
        trace_radius_stderr=radius_se,
        trace=T,
        trace_stderr=T_se,
        dist=dist,
        loss=loss,
        n=n,
        lam=lam,
        seed=trace_result.seed,
        hvps=int(trace_result.hvps) + quad_hvps,
        trace_hvps=int(trace_result.hvps),
        quadrature_hvps=quad_hvps,
        quadrature_steps=int(quadrature_steps),
        layers=tuple(layers),
        note="MEASURES, not certificates: Taylor-approximated / constants dropped; no 1 − δ guarantee",
    )


def _displacement(op, blocks, weights, prior_flat) -> torch.Tensor:
    """V = W − W0, flat, float64, in the operator's parameter order."""
    if weights is None:
        if not hasattr(op, "flat_parameters"):
            raise ValueError("this operator has no flat_parameters(); pass weights= (the flat W)")
        weights = op.flat_parameters()
    w = torch.as_tensor(weights).detach().reshape(-1).to(torch.float64).cpu()
    if isinstance(prior_flat, Mapping):
        names = getattr(op, "param_names", None) or [b.name for b in blocks]
        missing = [k for k in names if k not in prior_flat]
        if missing:
            raise CheckpointError(f"prior state lacks {', '.join(missing[:3])}")
        prior_flat = torch.cat([prior_flat[k].detach().reshape(-1) for k in names])
    w0 = torch.as_tensor(prior_flat).detach().reshape(-1).to(torch.float64).cpu()
    if w.numel() != op.dim or w0.numel() != op.dim:
        raise ValueError(
            f"weights and prior must have the operator's length {op.dim}, got {w.numel()} and {w0.numel()}"
        )
    return w - w0


def _block_traces(trace_result: TraceResult, blocks) -> list[tuple[float, float]]:
    """(T_i, se(T_i)) per block from the trace result's per-block traces."""
    if trace_result.blocks:
        if [b.name for b in trace_result.blocks] != [b.name for b in blocks]:
            raise ValueError(
                "trace_result's per-block traces do not match the operator's blocks "
                "(another parameter selection?)"
            )
        return [(float(b.estimate), float(b.stderr)) for b in trace_result.blocks]
    if len(blocks) == 1:
        return [(float(trace_result.estimate), float(trace_result.stderr))]
    raise ValueError("trace_result has no per-block traces; estimate it on the same operator (with blocks)")


def _layer_quadratic_forms(op, blocks, v: torch.Tensor, steps: int, tol: float):
    """All per-layer v_iᵀ H_ii⁺ v_i in one batched Lanczos run: column i is v_i zero-padded to the full
    length, and the operator restricts each column's product to its block.
    """
    V = torch.zeros(op.dim, len(blocks), dtype=torch.float64)
    for column, block in enumerate(blocks):
        V[block.slice, column] = v[block.slice]
    return quadratic_forms(BlockColumnsOperator(op, blocks), V, f="relu", steps=steps, tol=tol)


def _layer_measure(block, T: float, T_se: float, q, d: float, n: int, nlam: float) -> LayerMeasure:
    """One layer's second-order term ‖v_i‖√(T_i/(nλ)) (T_i ≤ 0 clipped), its σ_i and stderr, and its
    Ju–Li–Zhang term √(v_iᵀH_i⁺v_i)/√n.
    """
    clipped = not T > 0
    if clipped:
        term, term_se, sigma = 0.0, d * math.sqrt(max(T_se, 0.0) / nlam), math.inf
    else:
        term = d * math.sqrt(T / nlam)
        term_se = d * T_se / (2.0 * math.sqrt(nlam * T))
        sigma = (d * d / (nlam * T)) ** 0.25
    return LayerMeasure(
        name=block.name,
        size=block.size,
        dist=d,
        trace=T,
        trace_stderr=T_se,
        trace_clipped=clipped,
        sigma=sigma,
        second_order=term,
        second_order_stderr=term_se,
        quadratic_form=q.estimate,
        quadratic_form_change=q.change,
        quadratic_form_steps=q.steps,
        exhausted=q.exhausted,
        distance_hessian=math.sqrt(max(q.estimate, 0.0)) / math.sqrt(n),
    )


def _distance_change(layer: LayerMeasure, n: int) -> float:
    """The last Lanczos step's change of the layer's √(vᵀH⁺v)/√n (0 once exhausted)."""
    if layer.exhausted or layer.quadratic_form_change == 0:
        return 0.0
    if not math.isfinite(layer.quadratic_form_change):
        return math.inf
    before = layer.quadratic_form - layer.quadratic_form_change
    return abs(math.sqrt(max(layer.quadratic_form, 0.0)) - math.sqrt(max(before, 0.0))) / math.sqrt(n)


def _trace_radius(T: float, T_se: float, dist: float, n: int) -> tuple[float, float]:
    """√(Tr(H)·‖W − W0‖²/n) (Tr H clipped at 0) and its delta-method stderr."""
    if T > 0:
        return math.sqrt(T * dist * dist / n), dist * T_se / (2.0 * math.sqrt(n * T))
    return 0.0, dist * math.sqrt(max(T_se, 0.0) / n)
