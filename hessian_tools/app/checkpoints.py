"""Safe checkpoint loading, and resolving what the command line is pointed at — a run folder or a
state_dict file — into a model, its data and its prior weights.

Checkpoints are read with ``torch.load(..., weights_only=True)`` only: a file that would need to
unpickle arbitrary objects (and so could run code) is refused, never executed.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import pickle
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from .zoo.data import DataBundle, load_data
from ..errors import CheckpointError
from .zoo.models import build_model, load_factory


def load_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a ``state_dict`` from ``path`` with ``weights_only=True``.

    Accepts a plain state_dict or a dict holding one under ``"state_dict"`` or ``"model"``.
    Raises :class:`CheckpointError` with one line for a missing file, a file that is not a
    checkpoint, a pickle that asks for arbitrary objects, or content that is not a state_dict.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a folder, not a file: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"refused to load {path}: it contains Python objects beyond tensors, which could run code "
                f"when unpickled (weights_only=True). Re-save it as a plain state_dict. [{first[:160]}]"
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({first[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {first[:160]})") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return dict(obj)


def load_into_model(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy ``state_dict`` into ``model`` after checking that every key and shape matches.

    The error names the first few missing keys, unexpected keys and shape mismatches, so a
    checkpoint of another architecture is reported precisely instead of half-loaded.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es), first: {'; '.join(mismatched[:3])}")
        if missing:
            parts.append(f"{len(missing)} key(s) missing from the checkpoint, first: {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first: {', '.join(unexpected[:3])}")
        raise CheckpointError(f"{source} does not fit the model: " + " | ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint_into(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load the checkpoint at ``path`` into ``model`` safely; returns the model."""
    load_into_model(model, load_state_dict(path), source=str(path))
    return model


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
