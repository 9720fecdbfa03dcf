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

from ..checks import check_choice, check_integer, check_open_unit_interval
from ..operators import HessianOperator
from ..results import Result, _from_jsonable
from .analyses import DEFAULT_ANALYSES, PARTS, POSTERIORS, certificate, plan
from .evaluation import evaluate
from .zoo.data import DataBundle, batches

DTYPES = ("float32", "float64")

@dataclasses.dataclass(frozen=True)
class AnalysisSettings:
    """What to compute and how hard to try. The defaults suit models up to ~10⁵ parameters."""

    what: tuple = DEFAULT_ANALYSES
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
    distributed: bool = False  # shard the data over the torch.distributed ranks (torchrun)

    def __post_init__(self):
        from ..estimators.diagonal import METHODS as DIAGONAL_METHODS

        plan(self.what)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("posterior", self.posterior, POSTERIORS)
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
    ``certificate``, ``measures``, ``diagonal``; see :mod:`hessian_tools.app.analyses`); each is also readable as
    an attribute (``analysis.trace``, None when not computed) and sits at the top level of the JSON
    form, as in files written by earlier versions.
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


@dataclasses.dataclass
class AnalysisContext:
    """What an analysis of :mod:`hessian_tools.app.analyses` computes from: the model and its data,
    the loss, the settings, the Hessian operator, the prior weights, and the parts computed so far."""

    model: torch.nn.Module
    bundle: DataBundle
    settings: AnalysisSettings
    operator: HessianOperator
    prior_state: Mapping[str, torch.Tensor] | None
    loss_fn: Callable = cross_entropy
    prior_trainer: Callable | None = None  # (prior part, start weights) → state_dict: runs.recipe_trainer
    parts: dict = dataclasses.field(default_factory=dict)

    @property
    def train_batches(self) -> list:
        X, y = self.bundle.train
        return batches(X, y, self.settings.batch_size)


def analyze_model(
    model: torch.nn.Module,
    bundle: DataBundle,
    settings: AnalysisSettings = AnalysisSettings(),
    *,
    prior_state: Mapping[str, torch.Tensor] | None = None,
    prior_trainer: Callable | None = None,
    name: str = "checkpoint",
    progress: Callable[[str], None] | None = None,
) -> CheckpointAnalysis:
    """Run the analyses in ``settings.what`` (and what they need) on ``model`` (its current weights)
    over ``bundle``.

    ``prior_state`` (the initial / pre-trained weights) is needed for the PAC-Bayes certificate
    and the Hessian measures; without it ``"bound"`` yields no parts. ``prior_trainer`` trains a
    data-dependent prior when ``settings.prior_split`` is set
    (:func:`~hessian_tools.app.runs.recipe_trainer`).
    """
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    model.eval()
    op = make_operator(model, bundle, settings)
    train_loss, train_acc = evaluate(model, *bundle.train)
    test_loss, test_acc = evaluate(model, *bundle.test)
    context = AnalysisContext(model, bundle, settings, op, prior_state, prior_trainer=prior_trainer)
    timings: dict = {}
    for analysis in plan(settings.what):
        say(analysis.progress)
        t0 = time.perf_counter()
        context.parts.update({k: v for k, v in analysis.compute(context).items() if v is not None})
        timings[analysis.name] = time.perf_counter() - t0
    return CheckpointAnalysis(
        name=name, dim=op.dim, n_train=int(bundle.train[1].shape[0]), n_test=int(bundle.test[1].shape[0]),
        train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc, seed=settings.seed,
        hvps=op.hvps, wall_time_s=time.perf_counter() - start, parts=dict(context.parts),
        settings=dataclasses.asdict(settings), timings=timings,
    )


def certify(
    model: torch.nn.Module,
    bundle: DataBundle,
    settings: AnalysisSettings,
    prior_state: Mapping[str, torch.Tensor],
    prior_trainer: Callable | None = None,
) -> Result:
    """The PAC-Bayes certificate of ``model`` alone, as the ``bound`` analysis computes it (no Hessian):
    what ``compare --bound`` adds to each checkpoint."""
    model.eval()
    return certificate(AnalysisContext(model, bundle, settings, None, prior_state, prior_trainer=prior_trainer))
