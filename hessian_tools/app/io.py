"""Safe checkpoint loading and atomic file writes.

* Checkpoints are read with ``torch.load(..., weights_only=True)``: a file that would need to
  unpickle arbitrary objects (and so could run code) is refused, never executed.
* Every file this package writes goes to a temporary file in the same folder first and is then
  moved into place with ``os.replace`` (atomic on POSIX), so an interrupted write never leaves a
  half-written result behind.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError
from ..results import _to_jsonable


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result file should read like any other
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        # KeyboardInterrupt included: never leave the temporary file behind.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Serialise ``obj`` (results, dicts, tensors, arrays) as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(_to_jsonable(obj), indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` into memory, then an atomic write."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


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
