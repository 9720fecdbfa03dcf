"""The analysis of one checkpoint, and paired comparisons of several: operator → estimators → results.

This is the only place that wires a model and its data to the estimators; the command line,
reports and figures use the results it returns. Every stochastic number in them carries its
error bar, seed and HVP count (see :mod:`hessian_tools.results`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from math import nan
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..checks import check_choice, check_integer, check_open_unit_interval
from ..errors import HessianToolsError
from ..operators import HessianOperator
from ..operators.memory import parse_size
from ..results import Result, _from_jsonable
from .analyses import DEFAULT_ANALYSES, PARTS, POSTERIORS, TRACE_METHODS, certificate, plan
from .evaluation import cross_entropy, evaluate_batches
from .zoo.data import DataBundle
from .zoo.models import load_factory

DTYPES = ("float32", "float64")


class LossSpecError(HessianToolsError, ValueError):
    """A ``--loss`` that names no usable loss."""


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The batch-mean squared error ``mean((outputs − targets)²)`` over all entries (``F.mse_loss``).

    Integer class labels (targets of shape (n,) against outputs (n, C)) are compared as one-hot
    vectors, so ``--loss mse`` also runs on classification data.
    """
    if not targets.dtype.is_floating_point and targets.ndim == outputs.ndim - 1:
        targets = F.one_hot(targets, outputs.shape[-1])
    return F.mse_loss(outputs, targets.to(outputs.dtype).reshape(outputs.shape))


#: the ``--loss`` names; anything else is ``MODULE:FACTORY``
LOSSES: dict[str, Callable] = {"cross_entropy": cross_entropy, "mse": mse}


def make_loss(spec: str) -> Callable:
    """The loss named by ``spec``: ``cross_entropy``, ``mse`` or ``MODULE:FACTORY``, where
    ``FACTORY()`` returns a callable ``loss(outputs, targets)`` → the batch-mean scalar loss.
    """
    if spec in LOSSES:
        return LOSSES[spec]
    if not isinstance(spec, str) or ":" not in spec:
        raise LossSpecError(f"unknown loss {spec!r}; choose {', '.join(LOSSES)} or MODULE:FACTORY")
    factory = load_factory(spec, error=LossSpecError)
    try:
        loss = factory()
    except Exception as exc:  # noqa: BLE001 - the user's factory failed; one line
        raise LossSpecError(f"loss factory {spec} raised {type(exc).__name__}: {exc}") from None
    if not callable(loss):
        raise LossSpecError(
            f"loss factory {spec} returned a {type(loss).__name__}, not a callable "
            "loss(outputs, targets) -> batch-mean scalar"
        )
    return loss


@dataclasses.dataclass(frozen=True)
class AnalysisSettings:
    """What to compute and how hard to try. The defaults suit models up to ~10⁵ parameters."""

    what: tuple = DEFAULT_ANALYSES
    params: str | None = None  # regex over parameter names; None = all trainable
    batch_size: int = 512
    seed: int = 0
    trace_method: str = "auto"  # XTrace where its sketch fits the memory budget (analyses.trace_method_for)
    trace_rtol: float | None = 0.02
    trace_max_hvps: int = 600
    eig_k: int = 5
    eig_tol: float = 1e-4
    eig_max_hvps: int = 600
    density_probes: int = 6
    density_steps: int = 40
    sigmas: tuple = (1e-3, 1e-2, 3e-2, 1e-1)
    stability_samples: int = 32
    # the PAC-Bayes certificate ("bound"): "optimised" (a diagonal Gaussian posterior fitted to the bound)
    # or "isotropic" (N(W, σ²I) on the σ grid ``certificate_sigmas``: vacuous on fine-tuned networks)
    posterior: str = "optimised"
    delta: float = 0.05
    certificate_sigmas: tuple = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    certificate_samples: int | None = None  # Monte-Carlo weight draws; None: 1000 optimised, 20 isotropic
    certificate_steps: int = 600  # optimisation steps of the optimised posterior
    certificate_test_samples: int = 200  # draws for the posterior's test error (optimised posterior)
    # data-dependent prior: trained with the run's recipe on this fraction of the training set for
    # ``prior_epochs`` epochs; the bound is then on the rest. None: the pre-trained prior (init weights)
    prior_split: float | None = None
    prior_epochs: int = 20
    diag_method: str = "xdiag"
    diag_max_hvps: int = 200
    dtype: str = "float32"
    device: str = "cpu"
    loss: str = "cross_entropy"  # cross_entropy | mse | MODULE:FACTORY (see make_loss)
    distributed: bool = False  # shard the data over the torch.distributed ranks (torchrun)
    # bytes one Hessian-vector product may take beyond the model and data: a number or a size such as
    # "4GB"; "auto": a quarter of the available memory; None: no bound (hessian_tools.operators.memory)
    memory_budget: int | str | None = "auto"

    def __post_init__(self):
        from ..estimators.diagonal import METHODS as DIAGONAL_METHODS

        plan(self.what)
        check_choice("dtype", self.dtype, DTYPES)
        if self.memory_budget is not None and self.memory_budget != "auto":
            parse_size(self.memory_budget)
        check_choice("posterior", self.posterior, POSTERIORS)
        check_choice("trace_method", self.trace_method, TRACE_METHODS)
        check_choice("diag_method", self.diag_method, DIAGONAL_METHODS)
        check_open_unit_interval("delta", self.delta)
        check_integer("prior_epochs", self.prior_epochs)
        check_integer("certificate_steps", self.certificate_steps)
        if self.certificate_samples is not None:
            check_integer("certificate_samples", self.certificate_samples)
        if self.prior_split is not None:
            check_open_unit_interval("prior_split", self.prior_split)
            if self.posterior != "optimised":
                raise ValueError("a data-dependent prior (prior_split) needs the optimised posterior")


@dataclasses.dataclass(frozen=True)
class CheckpointAnalysis(Result):
    """Everything measured on one checkpoint.

    ``train_loss``/``train_acc``/``test_acc`` are exact (full passes, eval mode). ``hvps`` is the
    total number of Hessian-vector products spent on this checkpoint. ``parts`` holds the results of
    the analyses run, by part name (``trace``, ``top``, ``bottom``, ``density``, ``stability``,
    ``certificate``, ``measures``, ``diagonal``; see :mod:`hessian_tools.app.analyses`); each is also
    readable as an attribute (``analysis.trace``, None when not computed) and sits at the top level
    of the JSON form, as in files written by earlier versions.
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
    parts: Mapping = dataclasses.field(default_factory=dict)
    settings: dict = dataclasses.field(default_factory=dict)
    timings: dict = dataclasses.field(default_factory=dict)  # seconds spent per analysis

    def __getattr__(self, name: str):
        if name in PARTS:
            return self.__dict__.get("parts", {}).get(name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(out.pop("parts"))
        return out

    @classmethod
    def from_dict(cls, data: dict):
        data = dict(data)
        data["parts"] = {p: _from_jsonable(data.pop(p)) for p in PARTS if data.get(p) is not None}
        return super().from_dict(data)


def make_operator(
    model: torch.nn.Module, bundle: DataBundle, settings: AnalysisSettings, loss_fn: Callable | None = None
) -> HessianOperator:
    """The Hessian of the mean training loss (``settings.loss``) over all of ``bundle.train``."""
    loss_fn = loss_fn or make_loss(settings.loss)
    dtype = torch.float64 if settings.dtype == "float64" else None
    data = bundle.train_batches(settings.batch_size)
    if settings.distributed:
        # Each rank streams its own (possibly uneven or empty) share of the batches; one all_reduce
        # per product combines the sample-weighted sums, so every rank gets the full-data H·V.
        import torch.distributed as dist

        from ..operators.distributed import distributed_hessian_operator, shard

        return distributed_hessian_operator(
            model.to(settings.device),
            loss_fn,
            shard(data, dist.get_rank(), dist.get_world_size()),
            params=settings.params,
            dtype=dtype,
            device=settings.device,
            memory_budget=settings.memory_budget,
        )
    return HessianOperator(
        model.to(settings.device),
        loss_fn,
        data,
        params=settings.params,
        dtype=dtype,
        device=settings.device,
        memory_budget=settings.memory_budget,
    )


@dataclasses.dataclass
class AnalysisContext:
    """What an analysis of :mod:`hessian_tools.app.analyses` computes from: the model and its data,
    the loss, the settings, the Hessian operator, the prior weights, and the parts computed so far.
    """

    model: torch.nn.Module
    bundle: DataBundle
    settings: AnalysisSettings
    operator: HessianOperator
    prior_state: Mapping[str, torch.Tensor] | None
    loss_fn: Callable = cross_entropy
    prior_trainer: Callable | None = None  # (prior part, start weights) → state_dict: runs.recipe_trainer
    parts: dict = dataclasses.field(default_factory=dict)

    @property
    def train_batches(self):
        return self.bundle.train_batches(self.settings.batch_size)


def analyze_model(
    model: torch.nn.Module,
    bundle: DataBundle,
    settings: AnalysisSettings = AnalysisSettings(),
    *,
    prior_state: Mapping[str, torch.Tensor] | None = None,
    prior_trainer: Callable | None = None,
    name: str = "checkpoint",
    progress: Callable[[str], None] | None = None,
    state_file: str | None = None,
    resume: bool = False,
) -> CheckpointAnalysis:
    """Run the analyses in ``settings.what`` (and what they need) on ``model`` (its current weights)
    over ``bundle``.

    ``prior_state`` (the initial / pre-trained weights) is needed for the PAC-Bayes certificate
    and the Hessian measures; without it ``"bound"`` yields no parts. ``prior_trainer`` trains a
    data-dependent prior when ``settings.prior_split`` is set
    (:func:`~hessian_tools.app.runs.recipe_trainer`).
    ``progress`` gets a line per
    analysis and, while one runs, the HVPs done / budget, the rate and the time left. With
    ``state_file`` the finished analyses and the products spent so far are kept there (see
    :mod:`hessian_tools.app.resume`); ``resume`` continues from it, with the same numbers as an
    uninterrupted run. The caller removes the file once the result is safe.
    """
    start = time.perf_counter()
    model.eval()
    loss_fn = make_loss(settings.loss)
    op = make_operator(model, bundle, settings, loss_fn)
    train_data = bundle.train_batches(settings.batch_size)
    train_loss, train_acc = evaluate_batches(model, train_data, loss_fn)
    test_data = bundle.test_batches(settings.batch_size)
    test_loss, test_acc = evaluate_batches(model, test_data, loss_fn) if test_data is not None else (nan, nan)
    state = None
    if state_file is not None:
        from .resume import AnalysisState, setup_fingerprint

        fingerprint = setup_fingerprint(model, train_data, op.num_samples, settings, prior_state)
        state = AnalysisState(state_file, fingerprint, resume)
    context = AnalysisContext(model, bundle, settings, op, prior_state, loss_fn, prior_trainer=prior_trainer)
    timings: dict = {}
    hvps = 0
    for analysis in plan(settings.what):
        spent, timings[analysis.name] = _run_analysis(analysis, context, op, state, progress)
        hvps += spent
    return CheckpointAnalysis(
        name=name,
        dim=op.dim,
        n_train=op.num_samples,
        n_test=bundle.n_test,
        train_loss=train_loss,
        train_acc=train_acc,
        test_loss=test_loss,
        test_acc=test_acc,
        seed=settings.seed,
        hvps=hvps,
        wall_time_s=time.perf_counter() - start,
        parts=dict(context.parts),
        settings=dataclasses.asdict(settings),
        timings=timings,
    )


def certify(
    model: torch.nn.Module,
    bundle: DataBundle,
    settings: AnalysisSettings,
    prior_state: Mapping[str, torch.Tensor],
    prior_trainer: Callable | None = None,
) -> Result:
    """The PAC-Bayes certificate of ``model`` alone, as the ``bound`` analysis computes it (no Hessian):
    what ``compare --bound`` adds to each checkpoint.
    """
    model.eval()
    return certificate(
        AnalysisContext(model, bundle, settings, None, prior_state, prior_trainer=prior_trainer)
    )


def _run_analysis(analysis, context: AnalysisContext, op, state, progress) -> tuple[int, float]:
    """Compute one analysis into ``context.parts`` (or take it from ``state``): (HVPs, seconds)."""
    from ..operators.recording import RecordingOperator, ReplayMismatchError

    say = progress or (lambda _msg: None)
    saved = state.finished_analysis(analysis.name) if state else None
    if saved is not None:
        say(f"{analysis.progress}: finished before (state file)")
        context.parts.update(saved.parts)
        return saved.hvps, saved.seconds
    say(analysis.progress)
    log = state.start(analysis.name) if state else []
    watched = _monitored(op, analysis, context.settings, progress, replayed=sum(p.shape[1] for _, p in log))
    if state is not None and _log_fits(analysis, context.settings, op, say):
        watched = RecordingOperator(watched, log, on_record=state.recorded)
    context.operator = watched
    t0 = time.perf_counter()
    try:
        parts = {k: v for k, v in analysis.compute(context).items() if v is not None}
    except ReplayMismatchError as exc:
        from .resume import ResumeError

        raise ResumeError(
            f"{exc}: the checkpoint, data or options differ from the interrupted run; delete "
            f"{state.path} or drop --resume"
        ) from None
    except BaseException:
        if state is not None:
            state.save()  # an interrupt keeps the products spent so far
        raise
    finally:
        context.operator = op
    seconds = time.perf_counter() - t0
    if progress is not None and watched.hvps:
        say(f"{analysis.name}: {watched.hvps} HVPs in {_duration(seconds)}")
    context.parts.update(parts)
    if state is not None:
        state.finish(analysis.name, parts, watched.hvps, seconds)
    return watched.hvps, seconds


#: the most memory (and state-file size) the log of one analysis's products may take
LOG_LIMIT_BYTES = 2**30


def _log_fits(analysis, settings: AnalysisSettings, op, say) -> bool:
    """Whether the products of ``analysis`` can be logged for a resume within :data:`LOG_LIMIT_BYTES`;
    if not, only its result is kept once it finishes (and ``say`` tells so).
    """
    budget = analysis.budget(settings, op.dim)
    size = (budget or 0) * op.dim * torch.empty((), dtype=op.dtype).element_size()
    if size <= LOG_LIMIT_BYTES:
        return True
    say(
        f"{analysis.name}: its {budget} products would take {size / 2**30:.1f} GiB to log, so an interrupt "
        "keeps only the analyses finished before it"
    )
    return False


def _monitored(op, analysis, settings: AnalysisSettings, progress, replayed: int):
    """``op`` reporting HVPs done / budget, HVPs/s and the time left to ``progress`` (``op`` itself when
    quiet).
    """
    from ..operators.recording import MonitoredOperator

    if progress is None:
        return MonitoredOperator(op, lambda *_: None, offset=replayed, every=float("inf"))
    budget = analysis.budget(settings, op.dim)

    def report(done: int, rate: float | None, left: float | None) -> None:
        total = f"/{budget}" if budget else ""
        speed = f", {rate:.1f} HVPs/s" if rate else ""
        eta = f", ≤ {_duration(left)} left" if left is not None else ""
        progress(f"{analysis.name}: {done}{total} HVPs{speed}{eta}")

    return MonitoredOperator(op, report, budget=budget, offset=replayed)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
