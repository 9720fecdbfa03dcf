"""A PAC-Bayes certificate with an optimised Gaussian posterior (Dziugaite & Roy 2017; Pérez-Ortiz,
Rivasplata, Shawe-Taylor & Szepesvári 2021), for a trained — typically fine-tuned — network.

Setting. W are the network's parameters (all of them), W0 the prior weights: the pre-trained start
of a fine-tuning run (any weights fixed without the n training samples), or — with ``prior_split`` —
weights trained on a held-out part of the training set. Posterior and prior are Gaussians

    Q = N(μ, diag s²),   μ = W (default) or optimised;   s: one value per parameter tensor
                         (``variance="layer"``, default) or per parameter (``"parameter"``);
    P = N(W0, diag λ_g²) with one λ per *prior group* g (default: a single group, P = N(W0, λ²I)),
                         every λ_g from the fixed geometric grid ``lambda_grid`` (K values).

    KL(Q‖P) = Σ_g ½ Σ_{i∈g} [ s_i²/λ_g² + (μ_i − W0_i)²/λ_g² − 1 − ln(s_i²/λ_g²) ].

BatchNorm. A network with BatchNorm in eval mode is a function of its parameters *and* of its running
statistics, and the latter were computed on the training data. They are not left out of the
certificate: every BatchNorm layer is folded into an equivalent affine map, a = γ/√(v+ε),
b = β − m·a (running mean m, variance v), on a copy of the model (:func:`fold_batchnorm`), and the
Gaussians live on the folded coordinates — W from the checkpoint's statistics, W0 from the prior's. The
folded network computes exactly what the original one does in eval mode, so the certificate is on
the original network's function. Any other floating buffer must equal the prior's.

Optimisation. log s (and μ with ``optimise_mean=True``) minimise a differentiable PAC-Bayes bound on
a bounded surrogate of the 0-1 loss, ``min(CE, ℓmax)/ℓmax``, estimated with one reparameterised draw
w = μ + s⊙ε per step (full batch, or mini-batches of ``batch_size``):

* ``"quad"`` (Pérez-Ortiz et al. 2021, eq. 8):  (√(L̂ + c) + √c)²,  c = (KL + G ln K + ln(2√n/δ_b)) / (2n);
* ``"mcallester"``:  L̂ + √c.

During the first ``1 − refine_fraction`` of the steps λ_g takes its KL-minimising value
λ_g² = mean_{i∈g}(s_i² + (μ_i − W0_i)²) (clamped to the grid's range); it is then snapped to the
nearest grid point and held there while the posterior adapts to it. None of this needs to be paid
for: the bound holds for every posterior simultaneously.

Certificate, evaluated afterwards (Dziugaite & Roy 2017, Sec. 3): draw ``n_mc`` weight vectors from
Q, independently of the optimisation; their mean 0-1 error on the n bound samples, ``mc_error``, gives
L̂(Q) ≤ mc_upper = kl⁻¹(mc_error, ln(2/δ_mc)/n_mc) with probability ≥ 1 − δ_mc over the draws
(Langford & Caruana 2002). For each group the grid point with the smallest KL is taken (a
data-dependent choice among K^G priors fixed in advance: union bound, G ln K nats), and the
Seeger/Maurer bound gives, with probability ≥ 1 − δ_b over the sample,

    L(Q) ≤ kl⁻¹(mc_upper, (KL + G ln K + ln(2√n/δ_b)) / n),

so with probability ≥ 1 − δ, δ = δ_b + δ_mc, ``bound`` upper-bounds the expected 0-1 error of a
network drawn from Q on a new sample. (:func:`~hessian_tools.pacbayes.certificate_bound` does the
arithmetic.) Everything else — s, μ, the objective, the steps, the Hessian used to start s — may
depend on the data at no cost. What is NOT covered: re-running with other prior settings (grid,
groups, split) or other seeds and keeping the best; each such choice needs its own union bound.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..checks import (
    check_choice,
    check_integer,
    check_number,
    check_open_unit_interval,
    check_positive,
    check_positive_numbers,
)
from ..errors import DataError, NonFiniteError
from ..estimators.probes import gaussian_rows
from ..operators.data_source import is_single_pair
from ..operators.params import computation_mode, make_blocks
from ..results import PosteriorCertificateResult
from ..seeding import resolve_seed, seeded_generator
from ..stability import PerturbedEvaluator
from ..stats import mean_and_stderr
from . import pacbayes
from .batchnorm import fold_batchnorm
from .certificate import default_loss_max

__all__ = [
    "DEFAULT_LAMBDA_GRID",
    "MEAN_STARTS",
    "OBJECTIVES",
    "VARIANCES",
    "optimised_certificate",
    "split_for_prior",
]

#: Prior scales λ (standard deviations), fixed before seeing any data: 41 values, geometric from 1e-4
#: to 1 (ten per decade). Choosing one per prior group costs ln 41 ≈ 3.7 nats per group.
DEFAULT_LAMBDA_GRID = tuple(float(x) for x in np.geomspace(1e-4, 1.0, 41))

OBJECTIVES = ("quad", "mcallester")
VARIANCES = ("layer", "parameter")
MEAN_STARTS = ("checkpoint", "prior")
_EVAL_BATCH = 1024
_HISTORY_POINTS = 20


# --------------------------------------------------------------------------------------------
# flat coordinates
# --------------------------------------------------------------------------------------------
def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).to(torch.float64).cpu() for _, p in model.named_parameters()])


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def _as_tensors(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One (X, y) pair from an (X, y) pair or an iterable of (inputs, targets) batches."""
    if is_single_pair(data):
        X, y = data
    else:
        try:
            pairs = [(b[0], b[1]) for b in data]
        except (TypeError, IndexError):
            raise DataError(
                f"{what} must be an (X, y) pair of tensors or an iterable of (X, y) batches"
            ) from None
        if not pairs or not all(
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) for a, b in pairs
        ):
            raise DataError(f"{what} must hold at least one (X, y) batch of tensors")
        X, y = torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or y.ndim != 1:
        raise DataError(
            f"{what}: targets must be a 1-d tensor of class indices, got {y.dtype} of shape {tuple(y.shape)}"
        )
    return X, y.long()


def split_for_prior(data: Any, fraction: float, seed: int | None = 0):
    """Split ``data`` at random into ``(prior_part, bound_part)``: ``round(fraction·n)`` samples to
    train a data-dependent prior on, the rest to evaluate the bound on (a seeded permutation, so the
    split is independent of the labels). Each part is an (X, y) pair.
    """
    fraction = check_open_unit_interval("prior_split", fraction)
    X, y = _as_tensors(data, "data")
    n = y.shape[0]
    k = round(fraction * n)
    if not 0 < k < n:
        raise ValueError(f"prior_split = {fraction} leaves an empty part of the n = {n} samples")
    order = torch.randperm(n, generator=seeded_generator(seed)[0])
    return (X[order[:k]], y[order[:k]]), (X[order[k:]], y[order[k:]])


# --------------------------------------------------------------------------------------------
# groups, grid, initial variances
# --------------------------------------------------------------------------------------------
def _group_labels(names: Sequence[str], prior_groups) -> list[str]:
    """A prior-group label per parameter tensor: None → one group; "head" → ``head.*`` vs the rest;
    "layer" → one group per tensor; a mapping name → label or a callable name → label.
    """
    if prior_groups is None:
        return ["all"] * len(names)
    if prior_groups == "head":
        labels = ["head" if n.startswith("head.") else "body" for n in names]
        if len(set(labels)) < 2:
            raise ValueError("prior_groups='head' needs parameters named head.* and others")
        return labels
    if prior_groups == "layer":
        return list(names)
    if isinstance(prior_groups, Mapping):
        missing = [n for n in names if n not in prior_groups]
        if missing:
            raise ValueError(f"prior_groups lacks a group for {', '.join(missing[:3])}")
        return [str(prior_groups[n]) for n in names]
    if callable(prior_groups):
        return [str(prior_groups(n)) for n in names]
    raise ValueError(
        f"prior_groups must be None, 'head', 'layer', a mapping or a callable, got {prior_groups!r}"
    )


def _hessian_vector(hessian_diagonal, model: nn.Module, folded: Sequence[str], dim: int) -> torch.Tensor:
    """|H_ii| in the folded coordinates, flat float64. The diagonal is of the ORIGINAL parametrisation
    (flat in ``model.named_parameters()`` order, or a mapping name → tensor). A folded BatchNorm scale
    a = γ/√(v+ε) gets H_aa ≈ (v+ε)·H_γγ (the γ–β cross term is ignored: this only starts s).
    """
    names = [n for n, _ in model.named_parameters()]
    if isinstance(hessian_diagonal, Mapping):
        missing = [n for n in names if n not in hessian_diagonal]
        if missing:
            raise ValueError(f"hessian_diagonal lacks {', '.join(missing[:3])}")
        h = torch.cat([torch.as_tensor(hessian_diagonal[n]).reshape(-1) for n in names])
    else:
        h = torch.as_tensor(hessian_diagonal).reshape(-1)
    h = h.detach().to(torch.float64).cpu().abs().clone()
    if h.numel() != dim or not bool(torch.isfinite(h).all()):
        raise ValueError(
            f"hessian_diagonal must hold {dim} finite values (one per parameter), got {h.numel()}"
        )
    blocks = {b.name: b for b in make_blocks(list(model.named_parameters()))}
    for name in folded:
        module = model.get_submodule(name)
        factor = (module.running_var.detach() + module.eps).to(torch.float64).cpu()
        h[blocks[f"{name}.weight"].slice] *= factor
    return h


def _initial_log_sigma(
    h: torch.Tensor | None,
    index: torch.Tensor,
    count: int,
    init_sigma: float,
    damping: float | None,
    budget: float,
    cap: float,
) -> torch.Tensor:
    """Log s at the start: ``init_sigma`` everywhere, or s_i² = κ/(|H_ii| + c) (per layer: the layer's
    mean |H_ii|), with κ such that the second-order loss increase ½ Σ_i |H_ii| s_i² equals ``budget``
    and c = ``damping`` (default: the mean |H_ii|); capped at the largest prior scale.
    """
    if h is None:
        return torch.full((count,), math.log(init_sigma), dtype=torch.float64)
    per_unit = torch.zeros(count, dtype=torch.float64).index_add_(0, index, h)
    sizes = torch.bincount(index, minlength=count).to(torch.float64)
    h_unit = per_unit / sizes
    c = float(h.mean()) if damping is None else float(damping)
    if not c > 0:
        c = 1e-12
    weight = (sizes * h_unit / (h_unit + c)).sum()
    kappa = 2.0 * budget / float(weight) if float(weight) > 0 else cap * cap
    var = (kappa / (h_unit + c)).clamp(max=cap * cap)
    return 0.5 * torch.log(var)


# --------------------------------------------------------------------------------------------
# the differentiable objective
# --------------------------------------------------------------------------------------------
def _kl_torch(mu, log_s_flat, prior, lam2, group):
    """KL(N(μ, diag s²) ‖ N(W0, diag λ²)) with λ² given per group (``lam2[group]``), in float64."""
    var = torch.exp(2.0 * log_s_flat)
    lam2_flat = lam2[group]
    ratio = (var + (mu - prior) ** 2) / lam2_flat
    return 0.5 * (ratio - 1.0 - 2.0 * log_s_flat + torch.log(lam2_flat)).sum()


def _profile_lam2(mu, log_s_flat, prior, group, num_groups, bounds):
    """The KL-minimising λ_g² = mean_{i∈g}(s_i² + (μ_i − W0_i)²), clamped to the grid's range."""
    second = torch.exp(2.0 * log_s_flat) + (mu - prior) ** 2
    sums = torch.zeros(num_groups, dtype=second.dtype).index_add(0, group, second)
    sizes = torch.bincount(group, minlength=num_groups).to(second.dtype)
    return (sums / sizes).clamp(bounds[0] ** 2, bounds[1] ** 2)


def _surrogate_bound(loss, kl, n, confidence, objective):
    c = (kl + confidence) / (2.0 * n)
    if objective == "quad":
        return (torch.sqrt(loss + c) + torch.sqrt(c)) ** 2
    return loss + torch.sqrt(c)


# --------------------------------------------------------------------------------------------
# the certificate
# --------------------------------------------------------------------------------------------
def optimised_certificate(
    model: nn.Module,
    data: Any,
    prior_state: Mapping[str, torch.Tensor],
    *,
    test_data: Any = None,
    delta: float = 0.05,
    delta_mc: float | None = None,
    variance: str = "layer",
    optimise_mean: bool = False,
    mean_start: str = "checkpoint",
    objective: str = "quad",
    loss_max: float | None = None,
    prior_groups=None,
    lambda_grid: Sequence[float] = DEFAULT_LAMBDA_GRID,
    steps: int = 600,
    lr: float = 0.02,
    mean_lr: float = 1e-3,
    refine_fraction: float = 0.25,
    batch_size: int | None = None,
    init_sigma: float = 1e-2,
    hessian_diagonal=None,
    hessian_damping: float | None = None,
    noise_budget: float = 0.1,
    n_mc: int = 2000,
    n_mc_test: int = 200,
    prior_split: float | None = None,
    prior_trainer: Callable[[tuple, Mapping], Mapping] | None = None,
    seed: int | None = 0,
    chunk_size: int | str | None = "auto",
) -> PosteriorCertificateResult:
    """PAC-Bayes certificate on the 0-1 risk of an optimised Gaussian posterior around ``model``.

    See the module docstring for the posterior, prior, objective and the certificate's proof
    outline. ``data`` is the training set (an (X, y) pair or a list of batches; y class indices;
    the model returns logits), ``prior_state`` a state_dict of the prior weights W0 (with the
    BatchNorm running statistics). ``test_data`` (optional) adds the checkpoint's and the
    posterior's test errors (the posterior's from ``n_mc_test`` draws, mean ± standard error).

    Options: ``variance`` "layer" | "parameter"; ``optimise_mean`` (then the certified network is the
    posterior around the optimised mean μ, not the checkpoint — labelled in the result, with
    ‖μ − W‖ and the test error of μ itself); ``objective`` "quad" | "mcallester"; ``loss_max`` ℓmax of
    the surrogate (default 2 ln C, C classes: a uniform prediction scores 1/2; a smaller ℓmax saturates
    sooner and then gives no gradient); ``prior_groups`` (None: one
    λ, "head": head.* vs the rest, "layer", a mapping or a callable name → label; each group pays
    ln K); ``steps`` Adam steps (lr ``lr`` on log s, ``mean_lr`` on μ), the last ``refine_fraction`` at
    the snapped λ; ``batch_size`` (None: full batch); ``init_sigma`` the starting s, or
    ``hessian_diagonal`` (a flat tensor or a mapping name → tensor, of the original parameters) for
    s_i² ∝ 1/(|H_ii| + c) scaled to a second-order loss increase ``noise_budget``;
    ``delta_mc`` (default δ/5) the part of δ spent on the Monte-Carlo step.

    Data-dependent prior: ``prior_split`` (a fraction) with ``prior_trainer(prior_part, prior_state)``
    → a state_dict. The data is split by :func:`split_for_prior` (seeded by ``seed``); the trainer
    sees only the prior part, starting from ``prior_state``, and its output becomes W0; the bound,
    the optimisation and the Monte-Carlo error use only the other part (n = its size).

    Cost: ``steps`` forward/backward passes over a batch, ``n_mc`` full forward passes over the bound
    set and ``n_mc_test`` over the test set. ``model`` is not modified.
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    delta, delta_bound, delta_mc = pacbayes.split_delta(delta, delta / 5.0 if delta_mc is None else delta_mc)
    check_choice("variance", variance, VARIANCES)
    check_choice("mean_start", mean_start, MEAN_STARTS)
    if mean_start == "prior" and not optimise_mean:
        raise ValueError("mean_start='prior' needs optimise_mean=True (a fixed mean stays at the checkpoint)")
    check_choice("objective", objective, OBJECTIVES)
    grid = np.sort(np.asarray(check_positive_numbers("lambda_grid", lambda_grid, distinct=True)))
    steps, n_mc, n_mc_test = (
        check_integer(k, v) for k, v in (("steps", steps), ("n_mc", n_mc), ("n_mc_test", n_mc_test))
    )
    lr, mean_lr, init_sigma, noise_budget = (
        check_positive(k, v)
        for k, v in (
            ("lr", lr),
            ("mean_lr", mean_lr),
            ("init_sigma", init_sigma),
            ("noise_budget", noise_budget),
        )
    )
    refine_fraction = check_number(
        "refine_fraction", refine_fraction, minimum=0.0, maximum=1.0, open_maximum=True
    )
    if batch_size is not None:
        batch_size = check_integer("batch_size", batch_size)
    seed = resolve_seed(seed)
    sub_seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(4)]

    (X, y), prior_state, n_prior = _bound_set_and_prior(
        data, prior_state, prior_split, prior_trainer, sub_seeds[3]
    )
    prior_label = "pre-trained" if prior_split is None else "data-dependent"
    n = int(y.shape[0])
    if n < pacbayes.MIN_N_MAURER:
        raise ValueError(f"the bound set has n = {n} samples; the bound needs n ≥ {pacbayes.MIN_N_MAURER}")

    co = _coordinates(model, prior_state, prior_groups, variance)
    K = len(grid)
    grid_cost = co.num_groups * math.log(K)
    confidence = grid_cost + math.log(2.0 * math.sqrt(n) / delta_bound)
    h = None if hessian_diagonal is None else _hessian_vector(hessian_diagonal, model, co.folded, co.dim)
    log_s = _initial_log_sigma(
        h, co.var_index, co.units, init_sigma, hessian_damping, noise_budget, float(grid[-1])
    )
    num_classes = _num_classes(co.model, X[:1].to(co.device, co.dtype))
    loss_max = default_loss_max(num_classes) if loss_max is None else check_positive("loss_max", loss_max)

    mu, log_s, history, final_objective = _optimise(
        co, X, y, co.w0 if mean_start == "prior" else co.w, log_s, grid,
        steps=steps, lr=lr, mean_lr=mean_lr, optimise_mean=bool(optimise_mean),
        refine_steps=round(refine_fraction * steps), batch_size=batch_size, loss_max=loss_max, n=n,
        confidence=confidence, objective=objective, seed=sub_seeds[0],
    )  # fmt: skip

    sigma = torch.exp(log_s)[co.var_index]
    kls, lam_index = _grid_kl(mu, sigma, co.w0, co.group, co.num_groups, grid)
    kl = float(sum(kls))
    kl_mean = 0.5 * float(((mu - co.w0) ** 2 / torch.as_tensor(grid[lam_index])[co.group] ** 2).sum())
    kl_floor = 0.5 * float(torch.log1p((mu - co.w0) ** 2 / sigma**2).sum())

    bound_eval = PerturbedEvaluator(co.model, _eval_batches(X, y), mode="eval", chunk_size=chunk_size)
    shift = mu - co.w
    mc_error, mc_stderr = mean_and_stderr(_draw_errors(bound_eval, shift, sigma, n_mc, sub_seeds[1]))
    mc_error = min(max(mc_error, 0.0), 1.0)
    cert = pacbayes.certificate_bound(
        mc_error, n_mc, kl, n, delta, delta_mc=delta_mc, grid_size=K**co.num_groups
    )
    test = _test_errors(co.model, test_data, shift, sigma, n_mc_test, sub_seeds[2], optimise_mean, chunk_size)

    mean_label = (
        "optimised mean μ (the certified network is N(μ, diag s²), not the checkpoint)"
        if optimise_mean
        else "mean at the checkpoint W"
    )
    return PosteriorCertificateResult(
        bound=cert["bound"],
        delta=delta,
        delta_bound=delta_bound,
        delta_mc=delta_mc,
        n=n,
        kl=kl,
        kl_mean=kl_mean,
        kl_floor=kl_floor,
        kl_term=cert["kl_term"],
        grid_cost=grid_cost,
        mc_error=mc_error,
        mc_stderr=mc_stderr,
        mc_upper=cert["emp_risk_upper"],
        n_mc=n_mc,
        train_error=bound_eval.evaluate_base(_zero_one),
        **test,
        prior=prior_label,
        prior_split=None if prior_split is None else float(prior_split),
        n_prior=n_prior,
        lambda_grid=tuple(float(g) for g in grid),
        prior_groups=tuple(co.group_names),
        lambdas=tuple(float(grid[i]) for i in lam_index),
        lambda_indices=tuple(int(i) for i in lam_index),
        group_kl=tuple(float(k) for k in kls),
        variance=variance,
        layers=tuple(b.name for b in co.blocks),
        layer_sigma=_layer_sigmas(log_s, co.blocks, variance),
        optimise_mean=bool(optimise_mean),
        mean_shift=float(shift.norm()),
        dist=float((mu - co.w0).norm()),
        dist_checkpoint=float((co.w - co.w0).norm()),
        objective=objective,
        loss_max=float(loss_max),
        steps=steps,
        refine_steps=round(refine_fraction * steps),
        lr=lr,
        mean_lr=mean_lr if optimise_mean else None,
        batch_size=batch_size,
        hessian_init=hessian_diagonal is not None,
        final_objective=final_objective,
        folded_batchnorm=co.folded,
        dim=co.dim,
        seed=seed,
        evaluations=steps + n_mc + test["n_mc_test"],
        wall_time_s=time.perf_counter() - start,
        history=history,
        label=f"posterior N(μ, diag s²), {mean_label}, s per {variance}; prior N(W0, λ²I) per group "
        f"({', '.join(co.group_names)}) at the {prior_label} weights",
    )


def _bound_set_and_prior(data, prior_state, prior_split, prior_trainer, seed):
    """The bound set (X, y), the prior weights and the number of samples the prior was trained on:
    all of ``data`` and ``prior_state`` as given, or — with ``prior_split`` — the part not used by
    ``prior_trainer``, which turns ``prior_state`` into a prior trained on the other part.
    """
    X, y = _as_tensors(data, "data")
    if prior_split is None:
        if prior_trainer is not None:
            raise ValueError("prior_trainer is used only with prior_split")
        return (X, y), prior_state, 0
    if not callable(prior_trainer):
        raise ValueError("prior_split needs prior_trainer(prior_part, prior_state) -> state_dict")
    prior_part, bound_part = split_for_prior((X, y), prior_split, seed)
    return bound_part, prior_trainer(prior_part, prior_state), int(prior_part[1].shape[0])


@dataclasses.dataclass(frozen=True)
class _Coordinates:
    """The folded network and the flat coordinates the Gaussians live on: W (``w``) and W0 (``w0``),
    float64 of length ``dim``; per coordinate its prior group (``group``) and variance unit
    (``var_index``: the tensor's index per layer, or the coordinate itself per parameter).
    """

    model: nn.Module
    folded: tuple
    named: list
    blocks: list
    w: torch.Tensor
    w0: torch.Tensor
    group: torch.Tensor
    group_names: list
    var_index: torch.Tensor
    units: int

    @property
    def dim(self) -> int:
        return self.w.numel()

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @property
    def dtype(self) -> torch.dtype:
        return self.named[0][1].dtype

    @property
    def device(self) -> torch.device:
        return self.named[0][1].device


def _coordinates(model: nn.Module, prior_state, prior_groups, variance: str) -> _Coordinates:
    posterior_model, folded = fold_batchnorm(model)
    prior_model, _ = fold_batchnorm(model, prior_state)
    named = list(posterior_model.named_parameters())
    blocks = make_blocks(named)
    labels = _group_labels([b.name for b in blocks], prior_groups)
    group_names = list(dict.fromkeys(labels))
    block_group = torch.tensor([group_names.index(label) for label in labels])
    block_of = torch.repeat_interleave(torch.arange(len(blocks)), torch.tensor([b.size for b in blocks]))
    w = _flat(posterior_model)
    per_layer = variance == "layer"
    return _Coordinates(
        model=posterior_model, folded=folded, named=named, blocks=blocks, w=w, w0=_flat(prior_model),
        group=block_group[block_of], group_names=group_names,
        var_index=block_of if per_layer else torch.arange(w.numel()),
        units=len(blocks) if per_layer else w.numel(),
    )  # fmt: skip


def _test_errors(
    model, test_data, shift, sigma, n_mc_test: int, seed, optimise_mean: bool, chunk_size
) -> dict:
    """The checkpoint's and the posterior's test errors (the latter from ``n_mc_test`` draws, mean ±
    standard error) and, with an optimised mean, the error of μ itself; ``None``s without test data.
    """
    test = {"test_error": None, "posterior_test_error": None, "posterior_test_stderr": None,
            "mean_test_error": None, "n_test": 0, "n_mc_test": 0}  # fmt: skip
    if test_data is None:
        return test
    Xt, yt = _as_tensors(test_data, "test_data")
    test_eval = PerturbedEvaluator(model, _eval_batches(Xt, yt), mode="eval", chunk_size=chunk_size)
    posterior_test_error, posterior_test_stderr = mean_and_stderr(
        _draw_errors(test_eval, shift, sigma, n_mc_test, seed)
    )
    test.update(
        test_error=test_eval.evaluate_base(_zero_one),
        n_test=int(yt.shape[0]),
        n_mc_test=n_mc_test,
        posterior_test_error=posterior_test_error,
        posterior_test_stderr=posterior_test_stderr,
    )
    if optimise_mean:
        test["mean_test_error"] = float(test_eval.evaluate(_zero_one, shift.unsqueeze(0))[0])
    return test


def _layer_sigmas(log_s: torch.Tensor, blocks, variance: str) -> tuple[float, ...]:
    """S per parameter tensor (per-parameter variances: the tensor's root-mean-square s)."""
    s_unit = torch.exp(log_s)
    if variance == "layer":
        return tuple(float(s_unit[i]) for i in range(len(blocks)))
    return tuple(float(s_unit[b.slice].pow(2).mean().sqrt()) for b in blocks)


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), computation_mode(model, "eval"):
        out = model(x)
    if out.ndim != 2 or out.shape[1] < 2:
        raise ValueError(
            f"the model must return logits of shape (batch, classes ≥ 2), got {tuple(out.shape)}"
        )
    return int(out.shape[1])


def _zero_one(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(-1) != targets).to(outputs.dtype).mean()


def _eval_batches(X, y):
    return [(X[i : i + _EVAL_BATCH], y[i : i + _EVAL_BATCH]) for i in range(0, y.shape[0], _EVAL_BATCH)]


def _draw_errors(evaluator: PerturbedEvaluator, shift, sigma, count: int, seed) -> torch.Tensor:
    """0-1 error of ``count`` fresh draws μ + s⊙Z (as offsets from W: shift + s⊙Z), block by block."""
    generator, _ = seeded_generator(seed)
    step = max(64, evaluator.chunk_size or count)
    out = []
    for first in range(0, count, step):
        Z = gaussian_rows(generator, evaluator.dim, min(step, count - first))
        out.append(evaluator.evaluate(_zero_one, shift.unsqueeze(0) + sigma.unsqueeze(0) * Z))
    return torch.cat(out)


def _grid_kl(mu, sigma, w0, group, num_groups, grid):
    """Per group, the exact KL at every grid λ (float64, :func:`pacbayes.gaussian_kl`); returns the
    smallest per group and the grid index that attains it.
    """
    kls, index = [], []
    for g in range(num_groups):
        sel = group == g
        m, v, p = mu[sel].numpy(), (sigma[sel] ** 2).numpy(), w0[sel].numpy()
        values = [pacbayes.gaussian_kl(m, v, p, lam * lam) for lam in grid]
        best = int(np.argmin(values))
        kls.append(values[best])
        index.append(best)
    return kls, index


def _optimise(
    co: _Coordinates,
    X,
    y,
    mu0,
    log_s0,
    grid,
    *,
    steps,
    lr,
    mean_lr,
    optimise_mean,
    refine_steps,
    batch_size,
    loss_max,
    n,
    confidence,
    objective,
    seed,
):
    """Adam on log s (and μ): minimise the surrogate bound. Returns (μ, log s, history, last value)."""
    model, blocks, w0, var_index, group, num_groups = (
        co.model,
        co.blocks,
        co.w0,
        co.var_index,
        co.group,
        co.num_groups,
    )
    dtype, device = co.dtype, co.device
    generator, _ = seeded_generator(seed)
    mu = mu0.clone().requires_grad_(optimise_mean)
    log_s = log_s0.clone().requires_grad_(True)
    groups = [{"params": [log_s], "lr": lr}] + ([{"params": [mu], "lr": mean_lr}] if optimise_mean else [])
    optimizer = torch.optim.Adam(groups)
    frozen = {k: v.detach() for k, v in model.named_buffers()}
    Xd, yd = X.to(device, dtype), y.to(device)
    bounds = (float(grid[0]), float(grid[-1]))
    lam2 = None
    history, every, value = [], max(1, steps // _HISTORY_POINTS), float("nan")
    order, position = None, 0
    with computation_mode(model, "eval"):
        for step in range(steps):
            if step == steps - refine_steps:
                with torch.no_grad():
                    lam2 = _snap(_profile_lam2(mu, log_s[var_index], w0, group, num_groups, bounds), grid)
            if batch_size is None or batch_size >= n:
                xb, yb = Xd, yd
            else:
                if order is None or position + batch_size > n:
                    order, position = torch.randperm(n, generator=generator), 0
                idx = order[position : position + batch_size]
                position += batch_size
                xb, yb = Xd[idx], yd[idx]
            log_s_flat = log_s[var_index]
            noise = torch.randn(mu0.numel(), generator=generator, dtype=torch.float64)
            draw = (mu + torch.exp(log_s_flat) * noise).to(device, dtype)
            params = {b.name: draw[b.slice].view(b.shape) for b in blocks}
            outputs = functional_call(model, {**frozen, **params}, (xb,))
            loss = F.cross_entropy(outputs, yb, reduction="none").clamp(max=loss_max).mean() / loss_max
            current = (
                lam2 if lam2 is not None else _profile_lam2(mu, log_s_flat, w0, group, num_groups, bounds)
            )
            kl = _kl_torch(mu, log_s_flat, w0, current, group)
            total = _surrogate_bound(loss.to(torch.float64), kl, n, confidence, objective)
            if not bool(torch.isfinite(total)):
                raise NonFiniteError(
                    f"the PAC-Bayes objective became non-finite at step {step}: lower lr / mean_lr"
                )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            value = float(total.detach())
            if step % every == 0 or step == steps - 1:
                history.append((step, value, float(loss.detach()), float(kl.detach())))
    return mu.detach(), log_s.detach(), tuple(history), value


def _snap(lam2: torch.Tensor, grid: np.ndarray) -> torch.Tensor:
    """The grid point nearest (in log scale) to each λ."""
    log_grid = torch.as_tensor(np.log(grid))
    index = (0.5 * torch.log(lam2).unsqueeze(1) - log_grid.unsqueeze(0)).abs().argmin(1)
    return torch.as_tensor(grid)[index] ** 2
