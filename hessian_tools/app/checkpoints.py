"""Resolve what the command line is pointed at — a run folder or a state_dict file — into a model,
its data and its prior weights, safely (``torch.load(weights_only=True)`` only)."""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Mapping

import torch

from .zoo.data import DataBundle, load_data
from ..errors import CheckpointError
from .io import load_checkpoint_into, load_state_dict
from .zoo.models import build_model, load_factory


@dataclasses.dataclass
class LoadedCheckpoint:
    name: str
    model: torch.nn.Module
    data: DataBundle
    data_spec: str
    prior: Mapping[str, torch.Tensor] | None
    path: Path


def build_user_model(spec: str, bundle: DataBundle) -> torch.nn.Module:
    """``mlp``/``cnn``/``resnet`` (built for the data's classes and input shape) or ``module:factory``
    (called with ``num_classes=`` when its signature takes it, else with no arguments)."""
    if ":" not in spec:
        return build_model(spec, bundle.num_classes, bundle.input_shape)
    factory = load_factory(spec)
    try:
        takes_classes = "num_classes" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_classes = False
    model = factory(num_classes=bundle.num_classes) if takes_classes else factory()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"--model {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def resolve(target: str, model_spec: str | None = None, data_spec: str | None = None,
            prior: str | None = None, epoch_file: str = "final.pt") -> LoadedCheckpoint:
    """A run folder (model, data and prior read from run.json / init.pt; ``--model``/``--data``
    override) or a checkpoint file (``--model`` and ``--data`` required; ``--prior`` optional)."""
    path = Path(target)
    if path.is_dir():
        from .runs import build_run_model, load_run

        meta, checkpoints = load_run(path)
        checkpoint = path / epoch_file if (path / epoch_file).is_file() else (checkpoints[-1] if checkpoints else None)
        if checkpoint is None:
            raise CheckpointError(f"{path} has no finished epoch to analyse")
        spec = data_spec or meta["config"]["data"]
        bundle = load_data(spec)
        model = build_user_model(model_spec, bundle) if model_spec else build_run_model(meta)
        load_checkpoint_into(model, checkpoint)
        prior_path = Path(prior) if prior else path / "init.pt"
        prior_state = load_state_dict(prior_path) if prior_path.is_file() or prior else None
        return LoadedCheckpoint(f"{path.name}/{checkpoint.name}", model.eval(), bundle, spec, prior_state, checkpoint)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not model_spec or not data_spec:
        raise ValueError(f"{path} is a checkpoint file: say which model and data it belongs to with --model and --data")
    bundle = load_data(data_spec)
    model = load_checkpoint_into(build_user_model(model_spec, bundle), path)
    prior_state = load_state_dict(prior) if prior else None
    return LoadedCheckpoint(path.name, model.eval(), bundle, data_spec, prior_state, path)
