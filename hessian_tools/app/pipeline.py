"""The analysis of one checkpoint, and paired comparisons of several: operator → estimators → results.

This is the only place that wires a model and its data to the estimators; the command line,
reports and figures use the results it returns. Every stochastic number in them carries its
error bar, seed and HVP count (see :mod:`hessian_tools.results`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F

from .zoo.data import DataBundle, batches
from ..estimators import eigenvalues, trace
from ..operators import HessianOperator
from ..results import Result, TraceResult
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
    trace_max_hvps: int = 600
    eig_k: int = 5
    eig_tol: float = 1e-4
    eig_max_hvps: int = 600
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
                                               max_hvps=settings.trace_max_hvps, seed=seed))
    if "eigs" in settings.what:
        timed("top", "top eigenvalues", lambda: eigenvalues(op, k=min(settings.eig_k, op.dim), which="LA", tol=settings.eig_tol,
                                                             seed=seed, max_hvps=settings.eig_max_hvps))
        timed("bottom", "smallest eigenvalue", lambda: eigenvalues(op, k=1, which="SA", tol=settings.eig_tol, seed=seed,
                                                                     max_hvps=settings.eig_max_hvps))
    if "density" in settings.what:
        from ..estimators.density import density

        timed("density", "density", lambda: density(op, n_probes=settings.density_probes,
                                                     steps=min(settings.density_steps, op.dim), seed=seed))
    if "stability" in settings.what:
        timed("stability", "noise stability", lambda: _stability(model, bundle, settings, parts.get("trace")))
    if "bound" in settings.what and prior_state is not None:
        timed("certificate", "PAC-Bayes certificate", lambda: _certificate(model, bundle, settings, prior_state))
        timed("measures", "Hessian measures", lambda: _measures(op, bundle, settings, prior_state, parts["trace"]))
    hvps = op.hvps
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
