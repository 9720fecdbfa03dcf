"""Seeded, resumable training runs that leave a run folder of checkpoints for the analysis tools.

A run folder holds

* ``init.pt`` — the weights before the first step (the PAC-Bayes prior centre);
* ``epoch_001.pt``, ``epoch_002.pt``, … — the weights after each epoch;
* ``final.pt`` — a copy of the last epoch's weights, written when the run finishes;
* ``state_001.pt``, … — what a resume needs after each epoch: the optimizer state and the states
  of the data-order and noise generators (tensors, dicts, lists and numbers only, so
  ``torch.load(weights_only=True)`` reads them). One per epoch, so a run whose last checkpoint is
  lost still resumes, bit for bit, from the one before;
* ``run.json`` — ``{"config", "epochs": [{"epoch", "train_loss", "train_acc", "test_loss",
  "test_acc", "wall_time_s"}], "versions", "data", "model", "num_classes", "input_shape",
  "head_reinitialised", "resumed_at", "status": "running" | "finished"}``.

Every checkpoint is a plain ``state_dict`` and every file is written atomically (temp file +
``os.replace``), in the order checkpoint → state → run.json, so an interrupted run keeps each
finished epoch and ``train(config, out_dir, resume=True)`` continues after the last one.

Randomness: the model is initialised under ``torch.manual_seed(config.seed)`` inside
``torch.random.fork_rng`` (the global RNG is left as it was); the data order and the optimizer's
noise come from two ``torch.Generator`` objects seeded from ``config.seed`` (via
``numpy.random.SeedSequence``). The same config on the same CPU build gives the same weights bit
for bit, and so does an interrupted-and-resumed run.

Fine-tuning: with ``init_checkpoint`` every weight is loaded from that checkpoint except the
``head.*`` entries when ``reinit_head`` is true (the default): a transfer run (e.g. digits 0–4 →
digits 5–9 relabelled 0–4) gets a freshly initialised, seeded head even when the number of
classes is the same, since the old head maps features to different classes. With
``reinit_head=False`` the checkpoint's head is kept when its shapes fit and re-initialised
(``"head_reinitialised": true`` in run.json) when the number of classes differs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import check_choice, check_integer, check_positive
from ..errors import CheckpointError, NonFiniteError
from ..optim import BASES, METHODS
from .checkpoints import load_checkpoint_into, load_into_model, load_state_dict
from .evaluation import evaluate
from .io import atomic_torch_save, atomic_write_json, read_json
from .zoo.data import DataBundle, batches, load_data
from .zoo.models import seeded_build

__all__ = [
    "TrainConfig",
    "train",
    "load_run",
    "build_run_model",
    "evaluate",
    "learning_rate",
    "optimization_steps",
    "recipe_trainer",
    "Diverged",
    "METHODS",
    "BASES",
    "SCHEDULES",
]

SCHEDULES = ("constant", "cosine")


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of global step ``step`` (0-based) of ``total_steps``: constant, or cosine
    annealing lr·½(1 + cos(π·step/total_steps)). A function of the step alone, so a resumed run
    follows the same schedule without saved scheduler state.
    """
    if config.schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pt$")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (stored in run.json under ``"config"``).

    model: "mlp" | "cnn" | "resnet" or a "module:function" factory called as
        ``f(num_classes=..., **model_kwargs)``; model_kwargs: options of the model (JSON-able).
    data: a data spec for :func:`hessian_tools.data.load_data`.
    method: "sgd" | "nso" | "wp" | "sam" | "asam"; sigma, k, lam, two_sided, rho: its options
        (``None`` = the optimizer's default). base: the base optimizer "sgd" | "adam" | "adamw".
    init_checkpoint: start from these weights (fine-tuning); reinit_head: see the module docstring.
    """

    model: str = "mlp"
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data: str = "builtin:digits"
    method: str = "sgd"
    sigma: float | None = None
    k: int | None = None
    lam: float | None = None
    two_sided: bool | None = None
    rho: float | None = None
    base: str = "sgd"
    lr: float = 0.05
    schedule: str = "constant"  # or "cosine": lr·½(1 + cos(π·t/T)) over the T steps of the run
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    init_checkpoint: str | None = None
    reinit_head: bool = True

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        check_choice("base", self.base, BASES)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_integer("epochs", self.epochs)
        check_integer("batch_size", self.batch_size)
        check_integer("seed", self.seed, 0)
        check_positive("lr", self.lr)
        if not isinstance(self.model_kwargs, Mapping):
            raise ValueError(f"model_kwargs must be a dict, got {type(self.model_kwargs).__name__}")
        try:  # normalise through JSON, so a config read back from run.json compares equal
            kwargs = json.loads(json.dumps(dict(self.model_kwargs)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model_kwargs must be JSON-serialisable ({exc})") from None
        object.__setattr__(self, "model_kwargs", kwargs)
        if self.init_checkpoint is not None:
            object.__setattr__(self, "init_checkpoint", str(self.init_checkpoint))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**dict(data))


def _seeds(seed: int) -> tuple[int, int]:
    data_seed, noise_seed = np.random.SeedSequence(int(seed)).generate_state(2)
    return int(data_seed), int(noise_seed)


def _versions() -> dict:
    from .. import __version__

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "hessian_tools": __version__,
    }


def _make_optimizer(config: TrainConfig, model: torch.nn.Module, generator: torch.Generator):
    from ..optim import make_optimizer

    return make_optimizer(
        config.method,
        model.parameters(),
        model=model,
        base=config.base,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        generator=generator,
        sigma=config.sigma,
        k=config.k,
        lam=config.lam,
        two_sided=config.two_sided,
        rho=config.rho,
    )


def _build(config: TrainConfig, num_classes: int, input_shape) -> torch.nn.Module:
    return seeded_build(
        config.seed, config.model, num_classes, input_shape=input_shape, **config.model_kwargs
    )


def _load_init_checkpoint(model: torch.nn.Module, config: TrainConfig) -> bool:
    """Load ``config.init_checkpoint`` into ``model``; returns whether the head was re-initialised."""
    sd = load_state_dict(config.init_checkpoint)
    fresh = model.state_dict()
    head_keys = [k for k in fresh if k.startswith("head.")]
    if not head_keys:
        if config.reinit_head:
            raise CheckpointError(
                f"reinit_head is set but the model {config.model!r} has no layer named 'head'; "
                "name the output layer 'head' or set reinit_head=False"
            )
        load_into_model(model, sd, source=config.init_checkpoint)
        return False
    fits = all(k in sd and tuple(sd[k].shape) == tuple(fresh[k].shape) for k in head_keys)
    reinit = bool(config.reinit_head) or not fits
    if reinit:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        sd.update({k: fresh[k] for k in head_keys})
    load_into_model(model, sd, source=config.init_checkpoint)
    return reinit


def _epoch_path(run_dir: Path, epoch: int) -> Path:
    return run_dir / f"epoch_{epoch:03d}.pt"


def _state_path(run_dir: Path, epoch: int) -> Path:
    return run_dir / f"state_{epoch:03d}.pt"


def _compatible(old: Mapping[str, Any], new: TrainConfig) -> list[str]:
    """Config keys (other than ``epochs``) whose values differ; an option the old run folder does
    not record (written before the option existed) counts as its default.
    """
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))
    new_d = json.loads(json.dumps(new.to_dict()))
    keys = sorted((set(old) | set(new_d)) - {"epochs"})
    return [k for k in keys if old.get(k, defaults.get(k)) != new_d.get(k)]


def optimization_steps(
    optimizer: torch.optim.Optimizer,
    closures: Iterable[Callable[[], Any]],
    learning_rates: Iterable[float] | None = None,
) -> Iterator[float]:
    """The common runner: one ``optimizer.step(closure)`` per closure (with the learning rate set
    first when ``learning_rates`` is given), yielding each step's loss as a float. A non-finite loss
    raises :class:`Diverged` (carrying the 0-based step and the value) before anything else runs.

    Every optimizer of :mod:`hessian_tools.optim` takes a closure; a plain torch optimizer works too
    (the closure then zeroes the gradients itself).
    """
    rates = iter(learning_rates) if learning_rates is not None else None
    for step, closure in enumerate(closures):
        if rates is not None:
            lr = next(rates)
            for group in optimizer.param_groups:
                group["lr"] = lr
        loss = optimizer.step(closure)
        value = (
            float(loss.detach())
            if isinstance(loss, torch.Tensor)
            else (math.nan if loss is None else float(loss))
        )
        if not math.isfinite(value) and loss is not None:
            raise Diverged(step, value)
        yield value


class Diverged(NonFiniteError):
    """The loss became NaN or infinite at ``step`` (0-based) of :func:`optimization_steps`."""

    def __init__(self, step: int, value: float):
        super().__init__(f"the loss became {value} at step {step + 1}")
        self.step, self.value = step, value


@dataclasses.dataclass
class _Start:
    """Where a run starts: after epoch ``epoch`` of an earlier run (0: from scratch), with its records."""

    epoch: int = 0
    records: list = dataclasses.field(default_factory=list)
    old_meta: dict | None = None
    head_reinitialised: bool = False
    resumed_at: list = dataclasses.field(default_factory=list)


def train(
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: Callable[[dict], Any] | None = None,
) -> Path:
    """Train as ``config`` says and write a run folder at ``out_dir`` (see the module docstring).

    ``resume=True`` continues the run already in ``out_dir`` after its last epoch whose checkpoint
    and state are both present (its config must match except ``epochs``, which may grow); with no
    run there it starts a new one. ``resume=False`` refuses a folder that already holds a run.
    ``progress(record)`` is called after every epoch with that epoch's record.
    Returns the run folder.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    run_dir = Path(out_dir)
    data: DataBundle = load_data(config.data)
    old_meta = _previous_run(run_dir, config, resume)
    model = _build(config, data.num_classes, data.input_shape)
    data_seed, noise_seed = _seeds(config.seed)
    data_gen = torch.Generator().manual_seed(data_seed)
    noise_gen = torch.Generator().manual_seed(noise_seed)
    optimizer = _make_optimizer(config, model, noise_gen)
    start = _restore(run_dir, config, old_meta, model, optimizer, data_gen, noise_gen)
    meta = _run_metadata(config, data, model, start)
    run_dir.mkdir(parents=True, exist_ok=True)
    if start.epoch == 0 and not (old_meta is not None and (run_dir / "init.pt").is_file()):
        atomic_torch_save(model.state_dict(), run_dir / "init.pt")
    atomic_write_json(run_dir / "run.json", meta)

    for epoch in range(start.epoch + 1, config.epochs + 1):
        t0 = time.perf_counter()
        _train_epoch(model, optimizer, config, data, data_gen, epoch, run_dir)
        train_loss, train_acc = evaluate(model, *data.train)
        test_loss, test_acc = evaluate(model, *data.test)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "wall_time_s": time.perf_counter() - t0,
        }
        atomic_torch_save(model.state_dict(), _epoch_path(run_dir, epoch))
        atomic_torch_save(
            {
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "data_generator": data_gen.get_state(),
                "noise_generator": noise_gen.get_state(),
            },
            _state_path(run_dir, epoch),
        )
        meta["epochs"].append(record)
        atomic_write_json(run_dir / "run.json", meta)
        if progress is not None:
            progress(dict(record))

    atomic_torch_save(model.state_dict(), run_dir / "final.pt")
    meta["status"] = "finished"
    atomic_write_json(run_dir / "run.json", meta)
    return run_dir


def _previous_run(run_dir: Path, config: TrainConfig, resume: bool) -> dict | None:
    """The run.json of the run already in ``run_dir`` (None if there is none), checked to be resumable."""
    run_json = run_dir / "run.json"
    if not run_json.exists():
        return None
    if not resume:
        raise CheckpointError(
            f"{run_dir} already holds a run; pass resume=True to continue it, or choose another folder"
        )
    old_meta = read_json(run_json)
    diff = _compatible(old_meta.get("config", {}), config)
    if diff:
        raise CheckpointError(
            f"cannot resume {run_dir}: the config differs in {', '.join(diff)} (only 'epochs' may change)"
        )
    return old_meta


def _restore(
    run_dir: Path, config: TrainConfig, old_meta: dict | None, model, optimizer, data_gen, noise_gen
) -> _Start:
    """Put model, optimizer and generators where the run continues (the last epoch with both its
    checkpoint and its state, else the start) and delete files of later, stale epochs.
    """
    if old_meta is None:
        head = _load_init_checkpoint(model, config) if config.init_checkpoint else False
        return _Start(head_reinitialised=head)
    recorded = old_meta.get("epochs", [])
    epoch = next(
        (
            e
            for e in range(len(recorded), 0, -1)
            if _epoch_path(run_dir, e).is_file() and _state_path(run_dir, e).is_file()
        ),
        0,
    )
    start = _Start(
        epoch,
        list(recorded[:epoch]),
        old_meta,
        bool(old_meta.get("head_reinitialised", False)),
        list(old_meta.get("resumed_at", [])) + [epoch],
    )
    if epoch > 0:
        load_checkpoint_into(model, _epoch_path(run_dir, epoch))
        state = _load_state(_state_path(run_dir, epoch))
        optimizer.load_state_dict(state["optimizer"])
        data_gen.set_state(state["data_generator"])
        noise_gen.set_state(state["noise_generator"])
    elif (run_dir / "init.pt").is_file():
        load_checkpoint_into(model, run_dir / "init.pt")
    elif config.init_checkpoint:
        start.head_reinitialised = _load_init_checkpoint(model, config)
    for path in list(run_dir.glob("epoch_*.pt")) + list(run_dir.glob("state_*.pt")):
        m = re.match(r"^(?:epoch|state)_(\d+)\.pt$", path.name)
        if m and int(m.group(1)) > epoch:
            path.unlink()
    if (run_dir / "final.pt").exists() and epoch < config.epochs:
        (run_dir / "final.pt").unlink()
    return start


def _run_metadata(config: TrainConfig, data: DataBundle, model, start: _Start) -> dict:
    return {
        "config": config.to_dict(),
        "epochs": start.records,
        "versions": _versions(),
        "data": config.data,
        "data_name": data.name,
        "model": config.model,
        "num_classes": data.num_classes,
        "input_shape": list(data.input_shape),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "n_train": int(data.train[0].shape[0]),
        "n_test": int(data.test[0].shape[0]),
        "head_reinitialised": start.head_reinitialised,
        "resumed_at": start.resumed_at,
        "status": "running",
    }


def _train_epoch(
    model, optimizer, config: TrainConfig, data: DataBundle, data_gen, epoch: int, run_dir: Path
) -> None:
    """One pass over the shuffled training batches, the learning rate following the schedule."""
    try:
        _epoch_steps(model, optimizer, config, *data.train, data_gen, epoch)
    except Diverged as exc:
        raise NonFiniteError(
            f"training loss became {exc.value} at epoch {epoch}, step {exc.step + 1}; "
            f"try a smaller lr (now {config.lr}); epochs 1–{epoch - 1} are kept in {run_dir}"
        ) from None


def _epoch_steps(model, optimizer, config: TrainConfig, X, y, data_gen, epoch: int) -> None:
    """Epoch ``epoch`` (1-based) of ``config.epochs`` over (X, y): shuffled batches, one optimizer step
    each, the learning rate following the schedule; raises :class:`Diverged` on a non-finite loss.
    """
    steps_per_epoch = math.ceil(X.shape[0] / config.batch_size)
    total = config.epochs * steps_per_epoch

    def closure_for(xb, yb):
        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        return closure

    model.train()
    closures = (closure_for(xb, yb) for xb, yb in batches(X, y, config.batch_size, generator=data_gen))
    rates = (
        learning_rate(config, (epoch - 1) * steps_per_epoch + step, total) for step in range(steps_per_epoch)
    )
    for _ in optimization_steps(optimizer, closures, rates):
        pass


def recipe_trainer(run_dir: str | Path, epochs: int) -> Callable[[tuple, Mapping], dict]:
    """A prior trainer for a data-dependent PAC-Bayes prior
    (:func:`hessian_tools.bounds.optimised_certificate` with ``prior_split``): ``trainer((X, y), start)``
    trains the run's model with the run's own recipe, read from its run.json (method and its options,
    base optimizer, lr and schedule, momentum, weight decay, batch size, seed), for ``epochs`` epochs
    on (X, y) only, from the weights ``start`` (the run's init.pt when the certificate calls it), and
    returns the trained state_dict. Seeded as a run is: the same call gives the same weights.
    """
    meta, _ = load_run(run_dir)
    epochs = check_integer("prior_epochs", epochs)
    config = dataclasses.replace(TrainConfig.from_dict(meta["config"]), epochs=epochs)

    def trainer(part: tuple, start_state: Mapping) -> dict:
        X, y = part
        model = build_run_model(meta)
        load_into_model(model, start_state, source="the prior's start weights")
        data_seed, noise_seed = _seeds(config.seed)
        data_gen = torch.Generator().manual_seed(data_seed)
        optimizer = _make_optimizer(config, model, torch.Generator().manual_seed(noise_seed))
        try:
            for epoch in range(1, config.epochs + 1):
                _epoch_steps(model, optimizer, config, X, y, data_gen, epoch)
        except Diverged as exc:
            raise NonFiniteError(
                f"training the prior: the loss became {exc.value} at epoch {epoch}; "
                f"try a smaller lr (now {config.lr})"
            ) from None
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    return trainer


def _load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"cannot read resume state {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        ) from None
    if not isinstance(state, dict) or not {"optimizer", "data_generator", "noise_generator"} <= set(state):
        raise CheckpointError(
            f"{path} is not a resume state (needs optimizer, data_generator, noise_generator)"
        )
    return state


def load_run(run_dir: str | Path) -> tuple[dict, list[Path]]:
    """Read a run folder: (the run.json metadata, the per-epoch checkpoint paths in epoch order).

    Only checkpoints of recorded epochs that exist are listed; ``init.pt`` and ``final.pt`` are
    at ``run_dir / "init.pt"`` and ``run_dir / "final.pt"``.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no run.json)")
    meta = read_json(run_dir / "run.json")
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(f"{run_dir / 'run.json'} is not a training run's metadata (no 'config')")
    recorded = {int(r["epoch"]) for r in meta.get("epochs", [])}
    found = []
    for path in run_dir.iterdir():
        m = _EPOCH_RE.match(path.name)
        if m and int(m.group(1)) in recorded:
            found.append((int(m.group(1)), path))
    return meta, [p for _, p in sorted(found)]


def build_run_model(
    run: str | Path | Mapping[str, Any], checkpoint: str | Path | None = None
) -> torch.nn.Module:
    """Rebuild the model of a run (from its folder or its run.json metadata), in eval mode.

    Without ``checkpoint`` the weights are the run's seeded initialisation (before any
    ``init_checkpoint``); with one (a path, or a file name inside the run folder such as
    ``"final.pt"``) those weights are loaded safely.
    """
    run_dir = None
    if isinstance(run, Mapping):
        meta = run
    else:
        run_dir = Path(run)
        meta, _ = load_run(run_dir)
    try:
        cfg = TrainConfig.from_dict(meta["config"])
        num_classes = int(meta["num_classes"])
        input_shape = meta.get("input_shape")
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"run metadata lacks {exc}; cannot rebuild the model") from None
    model = _build(cfg, num_classes, input_shape)
    if checkpoint is not None:
        path = Path(checkpoint)
        if run_dir is not None and not path.is_absolute() and not path.exists():
            path = run_dir / path
        load_checkpoint_into(model, path)
    return model.eval()
