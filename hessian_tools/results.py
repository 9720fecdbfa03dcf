"""Frozen result dataclasses: every number carries its error bar, the seed, and the HVPs it cost.

Results are plain data. They serialise to JSON-ready dicts with :meth:`Result.to_dict` and come
back with :meth:`Result.from_dict`; reports and figures read these, never a model or an operator.

Conventions shared by all results:

* ``hvps`` — the number of Hessian-vector products (HVPs) spent. One HVP is one column of
  ``H @ V``; a block of K columns counts K.
* ``seed`` — the seed of the ``torch.Generator`` that drew every random vector (``None`` when the
  estimator is deterministic).
* ``stderr`` — one standard error of the estimate (the standard deviation of its sampling
  distribution, estimated from the samples); a 95% confidence interval is ``estimate ± 1.96·stderr``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

import numpy as np
import torch

from .stats import Z95


def _to_jsonable(value: Any) -> Any:
    """Convert tensors, arrays and nested containers into JSON-ready Python objects."""
    if isinstance(value, torch.Tensor):
        return _to_jsonable(value.detach().cpu().numpy())
    if isinstance(value, np.ndarray):
        return _to_jsonable(value.tolist())
    if isinstance(value, (np.floating,)):
        return _to_jsonable(float(value))
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, float):
        # JSON has no NaN/Inf; keep them readable and round-trippable as strings.
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict() if hasattr(value, "to_dict") else _to_jsonable(dataclasses.asdict(value))
    return value


#: field names of results written by earlier versions → their current names (read back transparently)
_RENAMED = {"matvecs": "hvps", "trace_matvecs": "trace_hvps", "quadrature_matvecs": "quadrature_hvps"}

#: kind → Result subclass, filled in as subclasses are defined (see Result.__init_subclass__)
RESULT_KINDS: dict[str, type] = {}


def result_from_dict(data: dict):
    """Rebuild any result from its ``to_dict()`` form, dispatching on its ``kind``."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in RESULT_KINDS:
        raise ValueError(
            f"not a serialised result (kind {kind!r}); known kinds: {', '.join(sorted(RESULT_KINDS))}"
        )
    return RESULT_KINDS[kind].from_dict(data)


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict) and value.get("kind") in RESULT_KINDS:
        return result_from_dict(value)
    if isinstance(value, list):
        return [_from_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _from_jsonable(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class Result:
    """Base of all results: JSON round trip. Subclasses are frozen dataclasses."""

    kind: ClassVar[str] = "result"
    #: fields that hold arrays (stored as lists in JSON, restored as numpy arrays)
    array_fields: ClassVar[tuple[str, ...]] = ()
    #: fields kept in memory only, never converted for JSON (they can be as large as the model)
    transient_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        RESULT_KINDS[cls.kind] = cls

    def to_dict(self) -> dict:
        out = {"kind": self.kind}
        for field in dataclasses.fields(self):
            if field.name not in self.transient_fields:
                out[field.name] = _to_jsonable(getattr(self, field.name))
        return out

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        data = {_RENAMED.get(k, k): v for k, v in data.items()}
        kwargs = {k: _from_jsonable(v) for k, v in data.items() if k in names}
        for name in cls.array_fields:
            if kwargs.get(name) is not None:
                kwargs[name] = np.asarray(kwargs[name], dtype=float)
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class BlockTrace:
    """Trace of one parameter block's diagonal Hessian block, with its standard error."""

    name: str
    estimate: float
    stderr: float

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "estimate": _to_jsonable(self.estimate),
            "stderr": _to_jsonable(self.stderr),
        }


@dataclasses.dataclass(frozen=True)
class TraceResult(Result):
    """A trace estimate ``tr(H)``.

    ``stderr`` is one standard error of ``estimate``; ``ci95`` is ``estimate ± 1.96·stderr``.
    For Hutch++ and XTrace the error bar is conditional on the low-rank sketch (see each method's
    docstring). ``blocks`` holds the per-block traces (one per parameter block) estimated from the
    same probes; they sum to ``estimate``. ``converged`` is False when a requested ``rtol`` was not
    met within ``max_hvps``.
    """

    kind: ClassVar[str] = "trace"
    estimate: float
    stderr: float
    hvps: int
    method: str
    seed: int | None
    n_probes: int
    rtol: float | None = None
    converged: bool = True
    blocks: tuple = ()
    samples: tuple = ()

    @property
    def ci95(self) -> tuple[float, float]:
        return (self.estimate - Z95 * self.stderr, self.estimate + Z95 * self.stderr)

    @property
    def relative_halfwidth(self) -> float:
        return Z95 * self.stderr / abs(self.estimate) if self.estimate else math.inf

    @classmethod
    def from_dict(cls, data: dict):
        data = dict(data)
        data["blocks"] = tuple(BlockTrace(**_from_jsonable(b)) for b in data.get("blocks", ()))
        data["samples"] = tuple(_from_jsonable(data.get("samples", ())))
        return super().from_dict(data)


@dataclasses.dataclass(frozen=True)
class ControlVariateTraceResult(TraceResult):
    """tr(H) = tr(G) + tr(H − G): ``exact_part`` = tr(G) computed exactly (the Gauss–Newton matrix,
    ``control_variate``), plus a Hutchinson estimate of the residual tr(H − G)
    (``residual_estimate``). Only the residual is stochastic: ``stderr`` is its standard error.

    Cost in HVP-equivalents, counted honestly: every residual probe costs one Hessian product AND one
    Gauss–Newton product (``hessian_products`` = ``ggn_products`` = ``n_probes``), and the exact
    tr(G) costs ``exact_passes`` (= C, the number of outputs) per-sample vector-Jacobian passes over
    the data; ``hvps`` is their sum, each counted as one HVP.
    """

    kind: ClassVar[str] = "control_variate_trace"
    control_variate: str = "ggn"
    exact_part: float = 0.0
    residual_estimate: float = 0.0
    hessian_products: int = 0
    ggn_products: int = 0
    exact_passes: int = 0


@dataclasses.dataclass(frozen=True)
class BlockDiagonal:
    """Summary of the estimated Hessian diagonal d̂ on one parameter block b (|b| = ``size``).

    ``sum`` ± ``sum_stderr`` estimates tr(H_bb) = Σ_{i∈b} H_ii (its standard error from the per-probe
    block sums, so the correlation between coordinates is accounted for). ``mean_abs`` = mean_i |d̂_i|,
    ``min``/``max`` = the extreme d̂_i: these are of the *estimate*, and noise biases mean |d̂_i| upward
    (E|d̂_i| ≥ |H_ii|); ``rms_stderr`` = √(mean_i stderr_i²) says how large that noise is.
    """

    name: str
    size: int
    sum: float
    sum_stderr: float
    mean_abs: float
    min: float
    max: float
    rms_stderr: float

    def to_dict(self) -> dict:
        return {f.name: _to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class DiagonalResult(Result):
    """An estimate of the Hessian diagonal diag(H), per coordinate, with per-coordinate error bars.

    ``estimate`` and ``stderr`` are float64 arrays of length ``dim`` (kept in memory). ``blocks`` holds
    one :class:`BlockDiagonal` per parameter block (a single block ``"all"`` for an operator without
    blocks); ``trace`` ± ``trace_stderr`` is Σ_i d̂_i, the trace estimate the same probes give.
    ``n_probes`` is the number of random probes the error bar comes from; ``sketch`` the number of
    columns of the low-rank sketch a deflated method spent (0 for Hutchinson).

    What ``stderr`` means depends on ``method`` (see each estimator's docstring): for
    ``"hutchinson"`` the textbook standard error of a mean of i.i.d. samples; for ``"diagpp"`` the
    same, conditional on the sketch; for ``"xdiag"`` the spread of exchangeable but dependent
    per-probe estimates (the paper's error estimate, checked empirically, not a theorem).

    JSON: the two per-coordinate arrays are as large as the model, so :meth:`to_dict` writes them only
    when ``dim ≤ max_serialised_dim`` or when asked (``arrays=True``); the block summaries always.
    A result read back without them has ``estimate = stderr = None``.
    """

    kind: ClassVar[str] = "diagonal"
    array_fields: ClassVar[tuple[str, ...]] = ("estimate", "stderr")
    max_serialised_dim: ClassVar[int] = 100_000
    trace: float
    trace_stderr: float
    blocks: tuple
    hvps: int
    method: str
    seed: int | None
    n_probes: int
    dim: int
    sketch: int = 0
    estimate: Any = dataclasses.field(default=None, compare=False, repr=False)
    stderr: Any = dataclasses.field(default=None, compare=False, repr=False)

    def to_dict(self, arrays: bool | None = None) -> dict:
        """JSON-ready dict; with ``arrays`` None the per-coordinate arrays are included iff
        dim ≤ max_serialised_dim.
        """
        include = self.dim <= self.max_serialised_dim if arrays is None else arrays
        # drop the arrays before conversion: turning 10⁷ floats into a list only to discard it is slow
        return Result.to_dict(self if include else dataclasses.replace(self, estimate=None, stderr=None))

    def to_json(self, arrays: bool | None = None, **kwargs) -> str:
        return json.dumps(self.to_dict(arrays=arrays), **kwargs)

    @classmethod
    def from_dict(cls, data: dict):
        data = dict(data)
        data["blocks"] = tuple(BlockDiagonal(**_from_jsonable(b)) for b in data.get("blocks", ()))
        return super().from_dict(data)


@dataclasses.dataclass(frozen=True)
class EigenResult(Result):
    """Eigenpairs of a symmetric operator.

    ``values`` are sorted in descending order for ``which="LA"``/``"LM"`` (by magnitude for LM) and
    ascending for ``"SA"``. ``residuals[i] = ‖H v_i − λ_i v_i‖₂`` with ‖v_i‖ = 1: by the Bauer–Fike /
    Kahan bound, some true eigenvalue lies within ``residuals[i]`` of ``values[i]``.
    ``vectors`` (dim × k) is kept in memory but not serialised (it can be as large as the model).
    """

    kind: ClassVar[str] = "eigen"
    array_fields: ClassVar[tuple[str, ...]] = ("values", "residuals")
    transient_fields: ClassVar[tuple[str, ...]] = ("vectors",)
    values: np.ndarray
    residuals: np.ndarray
    converged: bool
    hvps: int
    which: str
    method: str
    tol: float
    seed: int | None
    vectors: Any = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class DensityResult(Result):
    """Spectral density by stochastic Lanczos quadrature (SLQ).

    ``nodes[j]``/``weights[j]`` are the Gauss quadrature nodes and weights of probe j (each row of
    weights sums to 1); the spectral measure is ``(1/n_probes) Σ_j Σ_i weights[j,i] δ(x − nodes[j,i])``.
    ``density`` is that measure smoothed by a Gaussian of standard deviation ``sigma`` evaluated on
    ``grid`` (it integrates to ~1 over the grid). ``moments`` are the SLQ estimates of
    ``(1/dim)·tr(H^p)`` for p = 1, 2 with their standard errors over probes.
    """

    kind: ClassVar[str] = "density"
    array_fields: ClassVar[tuple[str, ...]] = ("nodes", "weights", "grid", "density")
    nodes: np.ndarray
    weights: np.ndarray
    grid: np.ndarray
    density: np.ndarray
    sigma: float
    dim: int
    moments: dict
    hvps: int
    seed: int | None
    n_probes: int
    steps: int
    #: Lanczos steps each probe actually took (≤ steps; shorter after a breakdown). Rows of
    #: ``nodes``/``weights`` of a shorter probe are padded with zero-weight nodes.
    lengths: tuple = ()

    @classmethod
    def from_dict(cls, data: dict):
        data = dict(data)
        data["lengths"] = tuple(data.get("lengths", ()))
        return super().from_dict(data)


@dataclasses.dataclass(frozen=True)
class QuadratureResult(Result):
    """An estimate of ``vᵀ f(H) v`` by Lanczos (Gauss) quadrature started at ``v``.

    ``estimate`` is the Gauss rule after ``steps`` Lanczos steps; ``change`` is the difference to
    the rule with one step fewer — a practical error indicator (exact when the Krylov space is
    invariant, ``exhausted=True``).
    """

    kind: ClassVar[str] = "quadrature"
    estimate: float
    change: float
    steps: int
    hvps: int
    exhausted: bool
    function: str


def _tuples(data: dict, *names: str) -> dict:
    """Turn the JSON lists of ``names`` back into tuples (helper for from_dict of tuple fields)."""
    data = dict(data)
    for name in names:
        if data.get(name) is not None:
            data[name] = tuple(_from_jsonable(data[name]))
    return data


@dataclasses.dataclass(frozen=True)
class StabilityResult(Result):
    """Noise stability ``E_U[f(W+U)] − f(W)``, ``U ~ N(0, σ²I)`` on the selected parameters.

    ``estimate`` ± ``stderr`` from ``n_samples`` perturbed loss evaluations (``evaluations`` adds the
    one evaluation of f(W)). With ``antithetic`` the samples are pairs (+U, −U) and each pair's sample
    is ``(f(W+U)+f(W−U))/2 − f(W)``; ``one_sided_stderr`` is the standard error a one-sided estimator
    (samples ``f(W+U) − f(W)``) would have with the same number of evaluations, estimated from the same
    evaluations, and ``variance_reduction = (one_sided_stderr / stderr)²`` is what antithetic sampling
    saves (1 without it). ``samples`` are the per-pair (or per-draw) samples.
    """

    kind: ClassVar[str] = "stability"
    estimate: float
    stderr: float
    sigma: float
    n_samples: int
    evaluations: int
    antithetic: bool
    seed: int | None
    one_sided_stderr: float
    variance_reduction: float
    base_loss: float
    dim: int
    mode: str = "eval"
    samples: tuple = ()

    @property
    def ci95(self) -> tuple[float, float]:
        return (self.estimate - Z95 * self.stderr, self.estimate + Z95 * self.stderr)

    @classmethod
    def from_dict(cls, data: dict):
        return super().from_dict(_tuples(data, "samples"))


@dataclasses.dataclass(frozen=True)
class StabilityCurveResult(Result):
    """Measured noise stability against the second-order prediction σ²/2·Tr(H), per σ (ascending).

    ``ratio[i] = measured[i] / predicted[i]`` with ``ratio_stderr`` by the delta method (measurement
    and trace errors independent). ``taylor_holds[i]`` is False when the whole 95% interval
    ``ratio ± 1.96·ratio_stderr`` lies outside ``band`` (or the ratio is undefined);
    ``breakdown_index`` is the first such index (``None``: the Taylor approximation holds on the
    whole grid) and ``breakdown_sigma`` its σ.
    """

    kind: ClassVar[str] = "stability_curve"
    sigmas: tuple
    measured: tuple
    measured_stderr: tuple
    one_sided_stderr: tuple
    predicted: tuple
    predicted_stderr: tuple
    ratio: tuple
    ratio_stderr: tuple
    taylor_holds: tuple
    breakdown_index: int | None
    breakdown_sigma: float | None
    trace: float
    trace_stderr: float
    band: tuple
    n_samples: int
    antithetic: bool
    seed: int | None
    evaluations: int
    hvps: int
    base_loss: float

    @classmethod
    def from_dict(cls, data: dict):
        return super().from_dict(
            _tuples(
                data,
                "sigmas",
                "measured",
                "measured_stderr",
                "one_sided_stderr",
                "predicted",
                "predicted_stderr",
                "ratio",
                "ratio_stderr",
                "taylor_holds",
                "band",
            )
        )


@dataclasses.dataclass(frozen=True)
class CertificateResult(Result):
    """A PAC-Bayes certificate: with probability ≥ 1 − ``delta`` (over the training sample and the
    Monte-Carlo weight draws), the true risk of the stochastic network N(W, σ²I) is ≤ ``bound``.

    ``sigma`` is the grid point with the smallest bound (``sigma_index``); its KL, Monte-Carlo
    training error (``mc_error`` ± ``mc_stderr`` over ``n_mc`` weight draws) and the upper bound
    ``mc_upper`` on it are reported, and ``grid_*`` hold the same quantities for every σ of ``sigmas``.
    ``delta = delta_bound + delta_mc``; the Monte-Carlo confidence is split over the grid
    (``delta_mc_per_sigma = delta_mc / grid_size``) and the choice of σ costs ``grid_cost = ln(grid_size)``
    nats in the KL term. ``evaluations`` counts full passes over the training set.
    """

    kind: ClassVar[str] = "certificate"
    bound: float
    sigma: float
    sigma_index: int
    kl: float
    dist_sq: float
    dim: int
    mc_error: float
    mc_stderr: float
    mc_upper: float
    kl_term: float
    n: int
    n_mc: int
    delta: float
    delta_bound: float
    delta_mc: float
    delta_mc_per_sigma: float
    grid_size: int
    grid_cost: float
    loss: str
    loss_max: float | None
    train_loss: float
    seed: int | None
    evaluations: int
    sigmas: tuple = ()
    grid_bounds: tuple = ()
    grid_kl: tuple = ()
    grid_mc_errors: tuple = ()
    grid_mc_stderr: tuple = ()
    grid_mc_upper: tuple = ()

    @classmethod
    def from_dict(cls, data: dict):
        return super().from_dict(
            _tuples(
                data, "sigmas", "grid_bounds", "grid_kl", "grid_mc_errors", "grid_mc_stderr", "grid_mc_upper"
            )
        )


@dataclasses.dataclass(frozen=True)
class LayerMeasure:
    """The inputs of :class:`HessianMeasuresResult` for one parameter block (layer tensor)."""

    name: str
    size: int
    dist: float  # ‖v_i‖ = ‖W_i − W0_i‖
    trace: float  # T_i, the block's Hessian trace estimate
    trace_stderr: float
    trace_clipped: bool  # T_i ≤ 0 was clipped to 0
    sigma: float  # the optimal σ_i of the second-order bound (inf when T_i is clipped)
    second_order: float  # ‖v_i‖·√(max(T_i, 0)/(nλ))
    second_order_stderr: float
    quadratic_form: float  # v_iᵀ H_i⁺ v_i by Lanczos quadrature
    quadratic_form_change: float
    quadratic_form_steps: int
    exhausted: bool
    distance_hessian: float  # √(max(v_iᵀ H_i⁺ v_i, 0)) / √n

    def to_dict(self) -> dict:
        return {f.name: _to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class HessianMeasuresResult(Result):
    """Hessian-based generalization MEASURES — not certificates: each replaces a sampled quantity by
    a Taylor approximation or drops constants, so none is a bound that holds with probability 1 − δ.

    * ``second_order`` = Σ_i ‖v_i‖·√(T_i/(nλ)): the curvature + KL part of a linear PAC-Bayes bound
      with the perturbed loss replaced by f(W) + Σ_i σ_i²/2·T_i and σ_i optimised per layer;
      ``loss`` is f(W).
    * ``distance_hessian`` = Σ_i √(v_iᵀ H_i⁺ v_i)/√n (Ju, Li & Zhang, ICML 2022).
    * ``trace_radius`` = √(Tr(H)·‖W − W0‖²/n) (the trace × radius form of the NSO paper).

    ``*_stderr`` propagate the trace's standard errors (summed over layers: a bound on the standard
    error whatever the correlation between block traces); ``distance_hessian_change`` is the Lanczos
    error indicator propagated the same way. ``layers`` holds every per-layer input.
    """

    kind: ClassVar[str] = "hessian_measures"
    second_order: float
    second_order_stderr: float
    distance_hessian: float
    distance_hessian_change: float
    trace_radius: float
    trace_radius_stderr: float
    trace: float
    trace_stderr: float
    dist: float
    loss: float | None
    n: int
    lam: float
    seed: int | None
    hvps: int
    trace_hvps: int
    quadrature_hvps: int
    quadrature_steps: int
    layers: tuple = ()
    note: str = "measures, not certificates"

    @classmethod
    def from_dict(cls, data: dict):
        data = dict(data)
        data["layers"] = tuple(LayerMeasure(**_from_jsonable(layer)) for layer in data.get("layers", ()))
        return super().from_dict(data)


@dataclasses.dataclass(frozen=True)
class PosteriorCertificateResult(Result):
    """A PAC-Bayes certificate for an optimised Gaussian posterior Q = N(μ, diag s²) against the prior
    P = N(W0, diag λ_g²) (see :func:`hessian_tools.bounds.posterior.optimised_certificate`): with
    probability ≥ 1 − ``delta`` over the ``n`` bound samples and the ``n_mc`` weight draws, a network
    drawn from Q has expected 0-1 error ≤ ``bound`` on new data.

    Parts: ``mc_error`` ± ``mc_stderr`` (mean 0-1 error of the drawn networks on the bound set),
    ``mc_upper`` = kl⁻¹(mc_error, ln(2/δ_mc)/n_mc), ``kl`` (``kl_mean`` of it from ‖μ − W0‖, the rest
    from the variances; ``group_kl`` per prior group; ``kl_floor`` = Σ_i ½ ln(1 + (μ_i − W0_i)²/s_i²),
    the smallest KL that ANY diagonal Gaussian prior centred at W0 could give this posterior),
    ``grid_cost`` = G·ln K for the λ chosen per group (``lambdas``, indices into ``lambda_grid``),
    ``kl_term`` = (KL + grid_cost + ln(2√n/δ_bound))/n.
    ``delta = delta_bound + delta_mc``. ``train_error``/``test_error``: the checkpoint W itself;
    ``posterior_test_error`` ± ``posterior_test_stderr``: networks drawn from Q (``n_mc_test`` draws);
    ``mean_test_error``: the network μ (only with ``optimise_mean``). ``prior`` is "pre-trained" or
    "data-dependent" (then ``n_prior`` samples trained W0 and ``n`` counts the rest only).
    ``layer_sigma``: s per parameter tensor (its RMS with ``variance="parameter"``). ``mean_shift`` =
    ‖μ − W‖, ``dist`` = ‖μ − W0‖, ``dist_checkpoint`` = ‖W − W0‖ (folded coordinates). ``history``:
    (step, objective, surrogate loss, KL) along the optimisation, each from one draw.
    ``evaluations`` counts passes over a data set (optimisation steps + Monte-Carlo draws).
    """

    kind: ClassVar[str] = "posterior_certificate"
    bound: float
    delta: float
    delta_bound: float
    delta_mc: float
    n: int
    kl: float
    kl_mean: float
    kl_floor: float
    kl_term: float
    grid_cost: float
    mc_error: float
    mc_stderr: float
    mc_upper: float
    n_mc: int
    train_error: float
    test_error: float | None
    posterior_test_error: float | None
    posterior_test_stderr: float | None
    mean_test_error: float | None
    n_test: int
    n_mc_test: int
    prior: str
    prior_split: float | None
    n_prior: int
    lambda_grid: tuple
    prior_groups: tuple
    lambdas: tuple
    lambda_indices: tuple
    group_kl: tuple
    variance: str
    layers: tuple
    layer_sigma: tuple
    optimise_mean: bool
    mean_shift: float
    dist: float
    dist_checkpoint: float
    objective: str
    loss_max: float
    steps: int
    refine_steps: int
    lr: float
    mean_lr: float | None
    batch_size: int | None
    hessian_init: bool
    final_objective: float
    folded_batchnorm: tuple
    dim: int
    seed: int | None
    evaluations: int
    wall_time_s: float
    history: tuple = ()
    label: str = ""

    @classmethod
    def from_dict(cls, data: dict):
        data = _tuples(
            data,
            "lambda_grid",
            "prior_groups",
            "lambdas",
            "lambda_indices",
            "group_kl",
            "layers",
            "layer_sigma",
            "folded_batchnorm",
        )
        if data.get("history") is not None:
            data["history"] = tuple(tuple(row) for row in _from_jsonable(data["history"]))
        return super().from_dict(data)


@dataclasses.dataclass(frozen=True)
class PairedDifference(Result):
    """tr(H_b) − tr(H_a) and the relative change tr(H_b)/tr(H_a) − 1, from the SAME probes.

    With common random numbers the per-probe differences d_i = z_iᵀH_b z_i − z_iᵀH_a z_i have a
    much smaller spread than two independent estimates when the two Hessians are alike:
    ``stderr`` is std(d_i)/√n; ``independent_stderr`` = √(se_a² + se_b²) is what two unpaired
    runs would report; ``tightening`` is their ratio. The relative change's error bar uses the
    delta method on the same paired samples.
    """

    kind: ClassVar[str] = "paired_difference"
    a: str
    b: str
    difference: float
    stderr: float
    independent_stderr: float
    tightening: float
    relative_change: float
    relative_change_stderr: float
    n_probes: int


@dataclasses.dataclass(frozen=True)
class ComparisonResult(Result):
    """Traces of several checkpoints estimated with common random numbers, and their pairwise differences."""

    kind: ClassVar[str] = "comparison"
    names: tuple
    traces: tuple
    pairs: tuple
    seed: int
    method: str
    hvps: int
