"""A PAC-Bayes certificate for a trained checkpoint, and Hessian-based generalization measures.

:func:`pac_bayes_certificate` is a **certificate**: a number that upper-bounds the true risk of a
stochastic network with probability ≥ 1 − δ (under the assumptions listed in its docstring).
:func:`hessian_measures` computes **measures**: Hessian-based quantities from the literature that
correlate with generalization but are not bounds (they replace a sampled loss by a Taylor
approximation or drop constants). Keep the two apart when reporting.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import pacbayes
from ..errors import CheckpointError
from ..results import CertificateResult, HessianMeasuresResult, LayerMeasure, TraceResult
from ..checks import check_choice, check_integer, check_positive, check_positive_numbers
from ..estimators.probes import gaussian_rows
from ..seeding import resolve_seed, seeded_generator
from ..stability import PerturbedEvaluator
from ..stats import mean_and_stderr

__all__ = ["pac_bayes_certificate", "hessian_measures", "DEFAULT_SIGMAS", "LOSSES", "default_loss_max"]

#: The default σ grid (fixed before seeing any data): 13 values, geometric from 1e-3 to 1e-1
#: (two points per factor of ~2.2). Choosing among them costs ln 13 ≈ 2.6 nats.
DEFAULT_SIGMAS = tuple(float(s) for s in np.geomspace(1e-3, 1e-1, 13))

LOSSES = ("01", "bounded_ce")


def default_loss_max(num_classes: int) -> float:
    """ℓmax of the ``bounded_ce`` loss: ``2·ln(num_classes)``.

    Cross-entropy is clipped at ℓmax and divided by it, giving a loss in [0, 1]. A uniform
    prediction scores ln(C)/ℓmax = 1/2; a loss of 1 means the true class got probability ≤ 1/C².
    """
    return 2.0 * math.log(num_classes)


def _zero_one(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(-1) != targets).to(outputs.dtype).mean()


def _bounded_ce(loss_max: float):
    def statistic(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, reduction="none").clamp(max=loss_max).mean() / loss_max

    statistic.__name__ = "bounded_ce"
    return statistic


def _prior_vector(model: nn.Module, prior_state, evaluator: PerturbedEvaluator) -> torch.Tensor:
    """W0 of the selected parameters (flat, float64), after checking ``prior_state`` fits the model
    and agrees with it on every parameter that is NOT perturbed."""
    if not isinstance(prior_state, Mapping):
        raise TypeError(
            f"prior_state must be a state_dict (a mapping of names to tensors), got {type(prior_state).__name__}; "
            "load a checkpoint file with hessian_tools.app.checkpoints.load_state_dict"
        )
    params = dict(model.named_parameters())
    missing = [k for k in params if k not in prior_state]
    if missing:
        raise CheckpointError(f"prior_state does not fit the model: {len(missing)} parameter(s) missing, first: {', '.join(missing[:3])}")
    bad = [f"{k}: prior {tuple(prior_state[k].shape)} vs model {tuple(p.shape)}" for k, p in params.items()
           if not isinstance(prior_state[k], torch.Tensor) or tuple(prior_state[k].shape) != tuple(p.shape)]
    if bad:
        raise CheckpointError(f"prior_state does not fit the model: {len(bad)} shape mismatch(es), first: {'; '.join(bad[:3])}")
    selected = set(evaluator.param_names)
    moved = [k for k, p in params.items() if k not in selected
             and not torch.equal(prior_state[k].detach().to(p.device, p.dtype), p.detach())]
    if moved:
        raise ValueError(
            f"parameter(s) not in the perturbed selection differ from the prior state ({', '.join(moved[:3])}): "
            "the posterior would be a point mass away from the prior there (KL = ∞); select them too"
        )
    return torch.cat([prior_state[n].detach().reshape(-1).to(torch.float64).cpu() for n in evaluator.param_names])


def pac_bayes_certificate(
    model: nn.Module,
    data: Any,
    prior_state,
    *,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    n_mc: int = 256,
    delta: float = 0.05,
    delta_mc: float | None = None,
    loss: str = "01",
    loss_max: float | None = None,
    seed: int | None = 0,
    params=None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device=None,
    chunk_size: int | str | None = "auto",
) -> CertificateResult:
    """PAC-Bayes certificate on the true risk of the stochastic network ``N(W, σ²I)``.

    Setting. W are the model's selected parameters (``params``; default all), W0 the same entries
    of ``prior_state`` (a state_dict or checkpoint path of weights fixed WITHOUT the training data:
    the initialisation, or a network pre-trained on other data). Parameters outside the selection
    must equal ``prior_state`` (they are part of the prior; ValueError otherwise); buffers (e.g.
    BatchNorm statistics) are taken as fixed. ``data`` is the training set (an (X, y) pair or a
    list of batches, n = its size ≥ 8), y class indices, the model returns logits.

    For each σ of the grid ``sigmas`` (fixed in advance): prior P_σ = N(W0, σ²I), posterior
    Q_σ = N(W, σ²I), so ``KL = ‖W − W0‖²/(2σ²)`` (:func:`pacbayes.isotropic_gaussian_kl` with equal
    scales). The empirical risk of Q_σ is estimated from ``n_mc`` weight draws W + σZ_k (the same
    Z_k at every σ), each scored on the whole training set: ``mc_error`` = their mean.
    :func:`pacbayes.certificate_bound` then gives ``kl⁻¹(mc_upper, (KL + ln K + ln(2√n/δ_bound))/n)``
    with ``mc_upper = kl⁻¹(mc_error, ln(2K/δ_mc)/n_mc)``, K = ``len(sigmas)``.

    σ is chosen after seeing the data (the grid point with the smallest bound), and paid for by
    union bounds over the K grid points: δ_bound/K for each Seeger statement (``ln K`` added to KL)
    and δ_mc/K for each Monte-Carlo statement. With probability ≥ 1 − δ, δ = δ_bound + δ_mc
    (``delta_mc`` defaults to δ/2), all K bounds hold at once, hence the reported minimum.

    ``loss``: ``"01"`` (classification error) or ``"bounded_ce"``: cross-entropy clipped to
    [0, ℓmax] and divided by ℓmax, ℓmax = ``loss_max`` or :func:`default_loss_max` (2·ln C, C the
    number of logits). ``train_loss`` reports the same loss at W itself (no noise).

    Cost: 1 + K·n_mc full passes over ``data`` (``evaluations``), batched as in
    :mod:`hessian_tools.stability`. The model is not modified.

    Raises ValueError for δ or δ_mc outside (0, 1) (δ_mc must be < δ), a σ ≤ 0, n < 8, an unknown
    loss, or a ``prior_state`` that does not fit the model (missing keys, other shapes).
    """
    delta, _, delta_mc = pacbayes.split_delta(delta, delta_mc)
    grid = list(check_positive_numbers("sigmas", sigmas, distinct=True))
    n_mc = check_integer("n_mc", n_mc)
    check_choice("loss", loss, LOSSES)
    seed = resolve_seed(seed)
    evaluator = PerturbedEvaluator(model, data, params, mode=mode, dtype=dtype, device=device, chunk_size=chunk_size)
    w0 = _prior_vector(model, prior_state, evaluator)
    n = evaluator.num_samples
    if n < pacbayes.MIN_N_MAURER:
        raise ValueError(f"the training set has n = {n} samples; the bound needs n ≥ {pacbayes.MIN_N_MAURER}")

    if loss == "01":
        statistic, loss_max = _zero_one, None
    else:
        if loss_max is None:
            num_classes = _num_logits(evaluator)
            if num_classes < 2:
                raise ValueError(f"bounded_ce needs at least 2 logits, the model returns {num_classes}")
            loss_max = default_loss_max(num_classes)
        loss_max = check_positive("loss_max", loss_max)
        statistic = _bounded_ce(loss_max)

    w = evaluator.flat_parameters().detach().to(torch.float64).cpu()
    dist_sq = float(((w - w0) ** 2).sum())
    dim = evaluator.dim
    K = len(grid)
    delta_bound = delta - delta_mc
    train_loss = evaluator.evaluate_base(statistic)

    rows = []
    for sigma in grid:
        generator, _ = seeded_generator(seed)
        errors = _draw_and_evaluate(evaluator, statistic, generator, sigma, n_mc)
        mc_mean, mc_se = mean_and_stderr(errors)
        mc_mean = min(max(mc_mean, 0.0), 1.0)
        kl = pacbayes.isotropic_gaussian_kl(dist_sq, dim, sigma, sigma)
        # δ_mc/K per Monte-Carlo statement and δ_bound (÷K through grid_size) per Seeger statement.
        cert = pacbayes.certificate_bound(mc_mean, n_mc, kl, n, delta=delta_bound + delta_mc / K,
                                          delta_mc=delta_mc / K, grid_size=K)
        rows.append((cert, mc_se))
    bounds = [c["bound"] for c, _ in rows]
    best = int(np.argmin(bounds))
    cert, mc_se = rows[best]
    return CertificateResult(
        bound=cert["bound"], sigma=grid[best], sigma_index=best, kl=cert["kl"], dist_sq=dist_sq, dim=dim,
        mc_error=cert["mc_mean"], mc_stderr=mc_se, mc_upper=cert["emp_risk_upper"], kl_term=cert["kl_term"],
        n=n, n_mc=n_mc, delta=delta, delta_bound=delta_bound, delta_mc=delta_mc, delta_mc_per_sigma=delta_mc / K,
        grid_size=K, grid_cost=cert["grid_cost"], loss=loss, loss_max=loss_max, train_loss=train_loss, seed=seed,
        evaluations=1 + K * n_mc, sigmas=tuple(grid), grid_bounds=tuple(bounds),
        grid_kl=tuple(c["kl"] for c, _ in rows), grid_mc_errors=tuple(c["mc_mean"] for c, _ in rows),
        grid_mc_stderr=tuple(s for _, s in rows), grid_mc_upper=tuple(c["emp_risk_upper"] for c, _ in rows),
    )


def _num_logits(evaluator: PerturbedEvaluator) -> int:
    box = {}

    def width(outputs, targets):
        box["C"] = int(outputs.shape[-1])
        return outputs.sum() * 0

    first = next(iter(evaluator.source))
    single = PerturbedEvaluator(evaluator.model, [(first[1], first[2])], evaluator.param_names, mode=evaluator.mode,
                                dtype=evaluator.dtype, device=evaluator.device, chunk_size=1)
    single.evaluate_base(width)
    return box["C"]


def _draw_and_evaluate(evaluator: PerturbedEvaluator, statistic, generator: torch.Generator, sigma: float, count: int) -> torch.Tensor:
    """The statistic at W + σZ_k for ``count`` fresh draws Z_k, drawn and evaluated block by block."""
    step = evaluator.chunk_size or count
    out = []
    for start in range(0, count, step):
        Z = gaussian_rows(generator, evaluator.dim, min(step, count - start))
        out.append(evaluator.evaluate(statistic, sigma * Z))
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Hessian-based measures (NOT certificates)
# --------------------------------------------------------------------------------------------
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
    from ..estimators.quadrature import quadratic_forms
    from ..operators.block_diagonal import BlockColumnsOperator
    from ..estimators.trace import trace as estimate_trace
    from ..operators.adapters import as_operator
    from ..operators.params import ParameterBlock

    n = check_integer("n", n, why=" (the number of training samples)")
    lam = check_positive("lam", lam)
    op = as_operator(op) if not hasattr(op, "blocks") else op
    blocks = tuple(getattr(op, "blocks", None) or (ParameterBlock("all", 0, int(op.dim), (int(op.dim),)),))

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
        raise ValueError(f"weights and prior must have the operator's length {op.dim}, got {w.numel()} and {w0.numel()}")
    v = w - w0

    if trace_result is None:
        trace_result = estimate_trace(op, seed=seed, **(trace_kwargs or {}))
    if trace_result.blocks:
        if [b.name for b in trace_result.blocks] != [b.name for b in blocks]:
            raise ValueError("trace_result's per-block traces do not match the operator's blocks (another parameter selection?)")
        block_traces = [(float(b.estimate), float(b.stderr)) for b in trace_result.blocks]
    elif len(blocks) == 1:
        block_traces = [(float(trace_result.estimate), float(trace_result.stderr))]
    else:
        raise ValueError("trace_result has no per-block traces; estimate it on the same operator (with blocks)")

    nlam = n * lam
    # All per-layer quadratic forms v_iᵀ H_ii⁺ v_i in one batched Lanczos run: column i is v_i
    # zero-padded to the full length, and the operator restricts each column's product to its block.
    V = torch.zeros(op.dim, len(blocks), dtype=torch.float64)
    for column, block in enumerate(blocks):
        V[block.slice, column] = v[block.slice]
    quads = quadratic_forms(BlockColumnsOperator(op, blocks), V, f="relu", steps=quadrature_steps, tol=quadrature_tol)
    quad_hvps = sum(q.hvps for q in quads)
    layers = []
    for block, (T, T_se), q in zip(blocks, block_traces, quads):
        d = float(v[block.slice].norm())
        clipped = not T > 0
        T_pos = max(T, 0.0)
        if clipped:
            term, term_se = 0.0, d * math.sqrt(max(T_se, 0.0) / nlam)
            sigma = math.inf
        else:
            term = d * math.sqrt(T_pos / nlam)
            term_se = d * T_se / (2.0 * math.sqrt(nlam * T_pos))
            sigma = (d * d / (nlam * T_pos)) ** 0.25
        layers.append(LayerMeasure(
            name=block.name, size=block.size, dist=d, trace=T, trace_stderr=T_se, trace_clipped=clipped, sigma=sigma,
            second_order=term, second_order_stderr=term_se, quadratic_form=q.estimate,
            quadratic_form_change=q.change, quadratic_form_steps=q.steps, exhausted=q.exhausted,
            distance_hessian=math.sqrt(max(q.estimate, 0.0)) / math.sqrt(n),
        ))

    def change_of(layer: LayerMeasure) -> float:
        if layer.exhausted or layer.quadratic_form_change == 0:
            return 0.0
        if not math.isfinite(layer.quadratic_form_change):
            return math.inf
        before = layer.quadratic_form - layer.quadratic_form_change
        return abs(math.sqrt(max(layer.quadratic_form, 0.0)) - math.sqrt(max(before, 0.0))) / math.sqrt(n)

    T, T_se = float(trace_result.estimate), float(trace_result.stderr)
    dist = float(v.norm())
    if T > 0:
        radius, radius_se = math.sqrt(T * dist * dist / n), dist * T_se / (2.0 * math.sqrt(n * T))
    else:
        radius, radius_se = 0.0, dist * math.sqrt(max(T_se, 0.0) / n)
    loss = None
    if with_loss and hasattr(op, "loss_and_gradient"):
        loss = float(op.loss_and_gradient()[0])
    return HessianMeasuresResult(
        second_order=sum(l.second_order for l in layers),
        second_order_stderr=sum(l.second_order_stderr for l in layers),
        distance_hessian=sum(l.distance_hessian for l in layers),
        distance_hessian_change=sum(change_of(l) for l in layers),
        trace_radius=radius, trace_radius_stderr=radius_se, trace=T, trace_stderr=T_se, dist=dist, loss=loss,
        n=n, lam=lam, seed=trace_result.seed, hvps=int(trace_result.hvps) + quad_hvps,
        trace_hvps=int(trace_result.hvps), quadrature_hvps=quad_hvps,
        quadrature_steps=int(quadrature_steps), layers=tuple(layers),
        note="MEASURES, not certificates: Taylor-approximated / constants dropped; no 1 − δ guarantee",
    )
