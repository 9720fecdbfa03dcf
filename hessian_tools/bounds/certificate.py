"""A PAC-Bayes certificate for a trained checkpoint.

:func:`pac_bayes_certificate` is a **certificate**: a number that upper-bounds the true risk of a
stochastic network with probability ≥ 1 − δ (under the assumptions listed in its docstring). The
Hessian-based *measures* of :mod:`hessian_tools.bounds.measures` are not: keep the two apart when
reporting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_choice, check_integer, check_positive, check_positive_numbers
from ..errors import CheckpointError
from ..estimators.probes import gaussian_rows
from ..results import CertificateResult
from ..seeding import resolve_seed, seeded_generator
from ..stability import PerturbedEvaluator
from ..stats import mean_and_stderr
from . import pacbayes

__all__ = ["pac_bayes_certificate", "DEFAULT_SIGMAS", "LOSSES", "default_loss_max"]

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
    and agrees with it on every parameter that is NOT perturbed.
    """
    if not isinstance(prior_state, Mapping):
        raise TypeError(
            "prior_state must be a state_dict (a mapping of names to tensors), "
            f"got {type(prior_state).__name__}; "
            "load a checkpoint file with hessian_tools.app.checkpoints.load_state_dict"
        )
    params = dict(model.named_parameters())
    missing = [k for k in params if k not in prior_state]
    if missing:
        raise CheckpointError(
            f"prior_state does not fit the model: {len(missing)} parameter(s) missing, "
            f"first: {', '.join(missing[:3])}"
        )
    bad = [
        f"{k}: prior {tuple(prior_state[k].shape)} vs model {tuple(p.shape)}"
        for k, p in params.items()
        if not isinstance(prior_state[k], torch.Tensor) or tuple(prior_state[k].shape) != tuple(p.shape)
    ]
    if bad:
        raise CheckpointError(
            f"prior_state does not fit the model: {len(bad)} shape mismatch(es), first: {'; '.join(bad[:3])}"
        )
    selected = set(evaluator.param_names)
    moved = [
        k
        for k, p in params.items()
        if k not in selected and not torch.equal(prior_state[k].detach().to(p.device, p.dtype), p.detach())
    ]
    if moved:
        raise ValueError(
            "parameter(s) not in the perturbed selection differ from the prior state "
            f"({', '.join(moved[:3])}): "
            "the posterior would be a point mass away from the prior there (KL = ∞); select them too"
        )
    return torch.cat(
        [prior_state[n].detach().reshape(-1).to(torch.float64).cpu() for n in evaluator.param_names]
    )


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
    evaluator = PerturbedEvaluator(
        model, data, params, mode=mode, dtype=dtype, device=device, chunk_size=chunk_size
    )
    w0 = _prior_vector(model, prior_state, evaluator)
    n = evaluator.num_samples
    if n < pacbayes.MIN_N_MAURER:
        raise ValueError(f"the training set has n = {n} samples; the bound needs n ≥ {pacbayes.MIN_N_MAURER}")

    statistic, loss_max = _statistic(loss, loss_max, evaluator)
    w = evaluator.flat_parameters().detach().to(torch.float64).cpu()
    dist_sq = float(((w - w0) ** 2).sum())
    K = len(grid)
    rows = [
        _grid_point(evaluator, statistic, seed, sigma, n_mc, dist_sq, n, delta - delta_mc, delta_mc / K, K)
        for sigma in grid
    ]
    bounds = [c["bound"] for c, _ in rows]
    best = int(np.argmin(bounds))
    cert, mc_se = rows[best]
    return CertificateResult(
        bound=cert["bound"],
        sigma=grid[best],
        sigma_index=best,
        kl=cert["kl"],
        dist_sq=dist_sq,
        dim=evaluator.dim,
        mc_error=cert["mc_mean"],
        mc_stderr=mc_se,
        mc_upper=cert["emp_risk_upper"],
        kl_term=cert["kl_term"],
        n=n,
        n_mc=n_mc,
        delta=delta,
        delta_bound=delta - delta_mc,
        delta_mc=delta_mc,
        delta_mc_per_sigma=delta_mc / K,
        grid_size=K,
        grid_cost=cert["grid_cost"],
        loss=loss,
        loss_max=loss_max,
        train_loss=evaluator.evaluate_base(statistic),
        seed=seed,
        evaluations=1 + K * n_mc,
        sigmas=tuple(grid),
        grid_bounds=tuple(bounds),
        grid_kl=tuple(c["kl"] for c, _ in rows),
        grid_mc_errors=tuple(c["mc_mean"] for c, _ in rows),
        grid_mc_stderr=tuple(s for _, s in rows),
        grid_mc_upper=tuple(c["emp_risk_upper"] for c, _ in rows),
    )


def _grid_point(evaluator, statistic, seed, sigma, n_mc, dist_sq, n, delta_bound, delta_mc_each, grid_size):
    """The certificate at one σ of the grid: Monte-Carlo risk of N(W, σ²I) from ``n_mc`` draws (the
    same draws Z_k at every σ), KL to N(W0, σ²I), and the bound with δ_mc/K for the Monte-Carlo
    statement and δ_bound/K (through ``grid_size``) for the Seeger statement.
    """
    generator, _ = seeded_generator(seed)
    errors = _draw_and_evaluate(evaluator, statistic, generator, sigma, n_mc)
    mc_mean, mc_se = mean_and_stderr(errors)
    kl = pacbayes.isotropic_gaussian_kl(dist_sq, evaluator.dim, sigma, sigma)
    cert = pacbayes.certificate_bound(
        min(max(mc_mean, 0.0), 1.0),
        n_mc,
        kl,
        n,
        delta=delta_bound + delta_mc_each,
        delta_mc=delta_mc_each,
        grid_size=grid_size,
    )
    return cert, mc_se


def _statistic(loss: str, loss_max: float | None, evaluator: PerturbedEvaluator):
    """The per-batch statistic the certificate bounds, and ℓmax (None for the 0-1 loss)."""
    if loss == "01":
        return _zero_one, None
    if loss_max is None:
        num_classes = _num_logits(evaluator)
        if num_classes < 2:
            raise ValueError(f"bounded_ce needs at least 2 logits, the model returns {num_classes}")
        loss_max = default_loss_max(num_classes)
    loss_max = check_positive("loss_max", loss_max)
    return _bounded_ce(loss_max), loss_max


def _num_logits(evaluator: PerturbedEvaluator) -> int:
    box = {}

    def width(outputs, targets):
        box["C"] = int(outputs.shape[-1])
        return outputs.sum() * 0

    first = evaluator.risk.source.first()
    single = PerturbedEvaluator(
        evaluator.model,
        [(first[1], first[2])],
        evaluator.param_names,
        mode=evaluator.mode,
        dtype=evaluator.dtype,
        device=evaluator.device,
        chunk_size=1,
    )
    single.evaluate_base(width)
    return box["C"]


def _draw_and_evaluate(
    evaluator: PerturbedEvaluator, statistic, generator: torch.Generator, sigma: float, count: int
) -> torch.Tensor:
    """The statistic at W + σZ_k for ``count`` fresh draws Z_k, drawn and evaluated block by block."""
    step = evaluator.chunk_size or count
    out = []
    for start in range(0, count, step):
        Z = gaussian_rows(generator, evaluator.dim, min(step, count - start))
        out.append(evaluator.evaluate(statistic, sigma * Z))
    return torch.cat(out)
