"""The state file of an interrupted ``analyze``: finished analyses and the products already spent.

``analyze --json OUT`` keeps ``OUT.partial`` (written atomically) while it runs: the result parts of
every finished analysis, and the log of the analysis in progress (every Hessian-vector product in
call order, with a fingerprint of its input block, see
:class:`~hessian_tools.operators.recording.RecordingOperator`). ``analyze --resume`` skips the
finished analyses and replays the log, so the resumed run ends with exactly the numbers of an
uninterrupted one without recomputing a product already paid for. The file is saved after every
finished analysis, every ``save_every`` seconds of products and on an interrupt, and removed once the
result is written. Its size is about (HVPs of the analysis in progress) × (parameters) × 4 bytes
(8 in float64); an analysis whose budget would log more than
:data:`~hessian_tools.app.pipeline.LOG_LIMIT_BYTES` (1 GiB) is not logged (an interrupt then keeps
only the analyses finished before it).

A fingerprint of the setup (the weights, the prior, the first training batch, the number of samples
and every setting except ``what``) guards the file: a resume with another checkpoint, data or option
is refused with :class:`ResumeError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import HessianToolsError
from ..operators.data_source import BatchSource
from ..results import _from_jsonable, _to_jsonable
from .io import atomic_torch_save

STATE_VERSION = 1


class ResumeError(HessianToolsError, ValueError):
    """The state file does not belong to this analysis, or cannot be read."""


def state_path(json_path: str | Path) -> Path:
    """Where the state of an analysis written to ``json_path`` lives: ``json_path`` + ``.partial``."""
    path = Path(json_path)
    return path.with_name(path.name + ".partial")


def setup_fingerprint(
    model: torch.nn.Module,
    train_data: Any,
    n_train: int,
    settings: Any,
    prior_state: Mapping[str, torch.Tensor] | None,
) -> str:
    """SHA-256 of what the numbers depend on (see the module docstring)."""
    digest = hashlib.sha256(f"v{STATE_VERSION}".encode())
    # the memory budget only chooses how products are chunked, not what they are
    options = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("what", "memory_budget")}
    digest.update(json.dumps(_to_jsonable(options), sort_keys=True).encode())
    for label, state in (("model", model.state_dict()), ("prior", prior_state or {})):
        for key in sorted(state):
            digest.update(f"{label}:{key}".encode())
            _update(digest, state[key])
    first = BatchSource(train_data).first()
    _update(digest, first[1:3] if first is not None else None)
    digest.update(f"n={n_train}".encode())
    return digest.hexdigest()


def _update(digest, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().to("cpu").contiguous()
        digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        for key in sorted(obj):
            digest.update(str(key).encode())
            _update(digest, obj[key])
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _update(digest, item)
    else:
        digest.update(repr(obj).encode())


@dataclasses.dataclass
class FinishedAnalysis:
    parts: dict
    hvps: int
    seconds: float


class AnalysisState:
    """The state file at ``path`` for the setup ``fingerprint``; with ``resume`` an existing file
    is read (and must carry the same fingerprint), else it is started afresh.
    """

    def __init__(self, path: str | Path, fingerprint: str, resume: bool, save_every: float = 30.0):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.save_every = float(save_every)
        self.finished: dict[str, dict] = {}
        self.pending: tuple[str, list] | None = None  # the interrupted analysis and its log
        self._current: tuple[str, list] | None = None
        self._saved_at = time.perf_counter()
        if resume and self.path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            data = torch.load(self.path, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: one line
            raise ResumeError(
                f"cannot read the state file {self.path} ({type(exc).__name__}); delete it or drop --resume"
            ) from None
        if not isinstance(data, dict) or data.get("fingerprint") != self.fingerprint:
            raise ResumeError(
                f"the state file {self.path} belongs to another analysis (the checkpoint, data or "
                "options differ): delete it or drop --resume"
            )
        self.finished = dict(data["finished"])
        current = data.get("current")
        self.pending = (current[0], list(current[1])) if current else None

    def finished_analysis(self, name: str) -> FinishedAnalysis | None:
        """The saved outcome of analysis ``name``, or None if it has not finished."""
        saved = self.finished.get(name)
        if saved is None:
            return None
        parts = {k: _from_jsonable(v) for k, v in json.loads(saved["parts"]).items()}
        return FinishedAnalysis(parts, int(saved["hvps"]), float(saved["seconds"]))

    def start(self, name: str) -> list:
        """Begin analysis ``name``: the log to replay (the interrupted run's, if it was this one)."""
        log = self.pending[1] if self.pending and self.pending[0] == name else []
        self.pending = None
        self._current = (name, log)
        return log

    def recorded(self, recorder) -> None:
        """After a newly computed product: keep the log, and save it every ``save_every`` seconds."""
        self._current = (self._current[0], recorder.log)
        if time.perf_counter() - self._saved_at >= self.save_every:
            self.save()

    def finish(self, name: str, parts: Mapping, hvps: int, seconds: float) -> None:
        self.finished[name] = {
            "parts": json.dumps(_to_jsonable(dict(parts))),
            "hvps": int(hvps),
            "seconds": float(seconds),
        }
        self._current = None
        self.save()

    def save(self) -> None:
        current = [self._current[0], self._current[1]] if self._current else None
        atomic_torch_save(
            {
                "version": STATE_VERSION,
                "fingerprint": self.fingerprint,
                "finished": self.finished,
                "current": current,
            },
            self.path,
        )
        self._saved_at = time.perf_counter()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
