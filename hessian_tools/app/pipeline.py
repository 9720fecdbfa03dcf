"""The analysis of one checkpoint, and paired comparisons of several: operator → estimators → results.

This is the only place that wires a model and its data to the estimators; the command line,
reports and figures use the results it returns. Every stochastic number in them carries its
error bar, seed and HVP count (see :mod:`hessian_tools.results`).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .zoo.data import DataBundle, batches
from ..estimators import eigenvalues, trace
from ..operators import HessianOperator
from ..results import Z95, Result, TraceResult
from .runs import evaluate

ANALYSES = ("trace", "eigs", "density", "stability", "bound")


@dataclasses.dataclass(frozen=True)
class AnalysisSettings:
    """What to compute and how hard to try. The defaults suit models up to ~10⁵ parameters."""

    what: tuple = ("trace", "eigs", "density", "stability", "bound")
    params: str | None = None  # regex over parameter names; None = all trainable
    batch_size: int = 512
    seed: int = 0
    trace_method: str = "hutchpp"
    trace_rtol: float | None = 0.02
    trace_max_matvecs: int = 600
    eig_k: int = 5
    eig_tol: float = 1e-4
    eig_max_matvecs: int = 600
    density_probes: int = 6
    density_steps: int = 40
    sigmas: tuple = (1e-3, 1e-2, 3e-2, 1e-1)
    stability_samples: int = 32
    delta: float = 0.05
    certificate_sigmas: tuple = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    certificate_samples: int = 20
    dtype: str = "float32"
    device: str = "cpu"
    distributed: bool = False  # shard the data over the torch.distributed ranks (torchrun)

    def __post_init__(self):
        unknown = [w for w in self.what if w not in ANALYSES]
        if unknown:
            raise ValueError(f"unknown analysis {', '.join(map(repr, unknown))}; choose from {', '.join(ANALYSES)}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")


@dataclasses.dataclass(frozen=True)
class CheckpointAnalysis(Result):
    """Everything measured on one checkpoint. Sub-results are ``None`` when not asked for.

    ``train_loss``/``train_acc``/``test_acc`` are exact (full passes, eval mode).
    ``hvps`` is the total number of Hessian-vector products spent on this checkpoint.
    """

    kind: ClassVar[str] = "checkpoint_analysis"
    name: str
    dim: int
    n_train: int
    n_test: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    seed: int
    hvps: int
    wall_time_s: float
    trace: TraceResult | None = None
    top: Result | None = None
    bottom: Result | None = None
    density: Result | None = None
    stability: Result | None = None
    certificate: Result | None = None
    measures: Result | None = None
    settings: dict = dataclasses.field(default_factory=dict)
    timings: dict = dataclasses.field(default_factory=dict)  # seconds spent per analysis


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The batch-mean cross-entropy, the loss whose Hessian every command analyses."""
    return F.cross_entropy(outputs, targets)


def make_operator(model: torch.nn.Module, bundle: DataBundle, settings: AnalysisSettings) -> HessianOperator:
    """The Hessian of the mean training cross-entropy over all of ``bundle.train``."""
    X, y = bundle.train
    dtype = torch.float64 if settings.dtype == "float64" else None
    data = batches(X, y, settings.batch_size)
    if settings.distributed:
        # Each rank streams its own (possibly uneven or empty) share of the batches; one all_reduce
        # per product combines the sample-weighted sums, so every rank gets the full-data H·V.
        import torch.distributed as dist

        from ..operators.distributed import distributed_hessian_operator, shard

        return distributed_hessian_operator(model.to(settings.device), cross_entropy,
                                            shard(data, dist.get_rank(), dist.get_world_size()),
                                            params=settings.params, dtype=dtype, device=settings.device)
    return HessianOperator(model.to(settings.device), cross_entropy, data, params=settings.params, dtype=dtype,
                           device=settings.device)


def analyze_model(
    model: torch.nn.Module,
    bundle: DataBundle,
    settings: AnalysisSettings = AnalysisSettings(),
    *,
    prior_state: Mapping[str, torch.Tensor] | None = None,
    name: str = "checkpoint",
    progress: Callable[[str], None] | None = None,
) -> CheckpointAnalysis:
    """Run the analyses in ``settings.what`` on ``model`` (its current weights) over ``bundle``.

    ``prior_state`` (the initial / pre-trained weights) is needed for the PAC-Bayes certificate
    and the Hessian measures; without it ``"bound"`` is skipped.
    """
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    model.eval()
    op = make_operator(model, bundle, settings)
    train_loss, train_acc = evaluate(model, *bundle.train)
    test_loss, test_acc = evaluate(model, *bundle.test)
    parts: dict = {}
    timings: dict = {}
    seed = settings.seed

    def timed(name: str, message: str, compute: Callable[[], object]) -> None:
        say(message)
        t0 = time.perf_counter()
        parts[name] = compute()
        timings[name] = time.perf_counter() - t0

    if "trace" in settings.what or "bound" in settings.what:
        timed("trace", "trace", lambda: trace(op, method=settings.trace_method, rtol=settings.trace_rtol,
                                               max_matvecs=settings.trace_max_matvecs, seed=seed))
    if "eigs" in settings.what:
        timed("top", "top eigenvalues", lambda: eigenvalues(op, k=min(settings.eig_k, op.dim), which="LA", tol=settings.eig_tol,
                                                             seed=seed, max_matvecs=settings.eig_max_matvecs))
        timed("bottom", "smallest eigenvalue", lambda: eigenvalues(op, k=1, which="SA", tol=settings.eig_tol, seed=seed,
                                                                     max_matvecs=settings.eig_max_matvecs))
    if "density" in settings.what:
        from ..estimators.density import density

        timed("density", "density", lambda: density(op, n_probes=settings.density_probes,
                                                     steps=min(settings.density_steps, op.dim), seed=seed))
    if "stability" in settings.what:
        timed("stability", "noise stability", lambda: _stability(model, bundle, settings, parts.get("trace")))
    if "bound" in settings.what and prior_state is not None:
        timed("certificate", "PAC-Bayes certificate", lambda: _certificate(model, bundle, settings, prior_state))
        timed("measures", "Hessian measures", lambda: _measures(op, bundle, settings, prior_state, parts["trace"]))
    hvps = op.matvecs
    return CheckpointAnalysis(
        name=name, dim=op.dim, n_train=int(bundle.train[1].shape[0]), n_test=int(bundle.test[1].shape[0]),
        train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc, seed=seed,
        hvps=hvps, wall_time_s=time.perf_counter() - start, settings=dataclasses.asdict(settings), timings=timings, **parts,
    )


def _stability(model, bundle, settings, trace_result):
    from ..stability import stability_curve

    X, y = bundle.train
    return stability_curve(model, cross_entropy, batches(X, y, settings.batch_size), list(settings.sigmas),
                           trace_result, n_samples=settings.stability_samples, seed=settings.seed, params=settings.params)


def _certificate(model, bundle, settings, prior_state):
    from ..bounds.certificate import pac_bayes_certificate

    return pac_bayes_certificate(model, bundle.train, prior_state, sigmas=settings.certificate_sigmas,
                                 n_mc=settings.certificate_samples, delta=settings.delta, seed=settings.seed,
                                 params=settings.params)


def _measures(op, bundle, settings, prior_state, trace_result):
    from ..bounds.certificate import hessian_measures

    return hessian_measures(op, _flat_prior(op, prior_state), n=int(bundle.train[1].shape[0]),
                            trace_result=trace_result, seed=settings.seed)


def _flat_prior(op: HessianOperator, prior_state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    missing = [n for n in op.param_names if n not in prior_state]
    if missing:
        raise ValueError(f"the prior weights lack {len(missing)} analysed parameter(s), first: {', '.join(missing[:3])}")
    return torch.cat([prior_state[n].reshape(-1).to(op.dtype) for n in op.param_names])


# --------------------------------------------------------------------------- paired comparison
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


def paired_difference(name_a: str, a: TraceResult, name_b: str, b: TraceResult) -> PairedDifference:
    """Paired difference of two trace results made with the same seed, method and budget."""
    if (a.seed, a.method, a.n_probes) != (b.seed, b.method, b.n_probes) or not a.samples:
        raise ValueError("a paired comparison needs two results with the same seed, method and number of probes, with samples kept")
    sa, sb = np.asarray(a.samples), np.asarray(b.samples)
    n = len(sa)
    diff = b.estimate - a.estimate
    stderr = float(np.std(sb - sa, ddof=1) / math.sqrt(n))
    independent = math.hypot(a.stderr, b.stderr)
    ratio = b.estimate / a.estimate
    influence = (sb - ratio * sa) / a.estimate  # linearisation of B̂/Â around the estimates
    rel_stderr = float(np.std(influence, ddof=1) / math.sqrt(n))
    return PairedDifference(a=name_a, b=name_b, difference=diff, stderr=stderr, independent_stderr=independent,
                            tightening=independent / stderr if stderr > 0 else math.inf,
                            relative_change=ratio - 1.0, relative_change_stderr=rel_stderr, n_probes=n)


def compare_traces(operators: Mapping[str, HessianOperator], *, method: str = "hutchpp", max_matvecs: int = 300,
                   seed: int = 0, progress: Callable[[str], None] | None = None) -> ComparisonResult:
    """Estimate every operator's trace with the SAME probes (same seed, fixed budget, no rtol) and
    report each pair's paired difference (the first name is the baseline of every pair)."""
    if len(operators) < 2:
        raise ValueError("compare needs at least two checkpoints")
    dims = {op.dim for op in operators.values()}
    if len(dims) != 1:
        raise ValueError(f"the checkpoints have different parameter counts {sorted(dims)}: they are not comparable")
    say = progress or (lambda _msg: None)
    results = {}
    for name, op in operators.items():
        say(name)
        results[name] = trace(op, method=method, max_matvecs=max_matvecs, seed=seed)
    names = list(results)
    base = names[0]
    pairs = tuple(paired_difference(base, results[base], other, results[other]) for other in names[1:])
    return ComparisonResult(names=tuple(names), traces=tuple(results[n] for n in names), pairs=pairs, seed=seed,
                            method=method, hvps=sum(r.matvecs for r in results.values()))


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval over independent runs (seeds); 0 for one run."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return float(values.mean()), 0.0
    half = stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    return float(values.mean()), float(half)


def relative_change_ci(new: Sequence[float], base: Sequence[float]) -> tuple[float, float]:
    """mean(new)/mean(base) − 1 and a 95% half-width by the delta method (independent groups)."""
    m_new, m_base = np.mean(new), np.mean(base)
    se_new = np.std(new, ddof=1) / math.sqrt(len(new)) if len(new) > 1 else 0.0
    se_base = np.std(base, ddof=1) / math.sqrt(len(base)) if len(base) > 1 else 0.0
    ratio = m_new / m_base
    se = abs(ratio) * math.sqrt((se_new / m_new) ** 2 + (se_base / m_base) ** 2)
    return float(ratio - 1.0), float(Z95 * se)
