"""Reading a checkpoint file into Python objects without ever running code from it.

Two formats are read:

* ``torch.save`` files (``.pt``/``.pth``/``.bin``, PyTorch Lightning's ``.ckpt``), through
  ``torch.load(..., weights_only=True)``: the restricted unpickler builds tensors, containers and
  primitive values only. A file that asks for any other class or function is refused, and the
  message says how to re-save the weights in the user's own trusted environment.
* ``.safetensors`` files (recognised by their extension or by their header: an 8-byte
  little-endian length followed by that many bytes of JSON), through ``safetensors.torch.load_file``,
  which holds no code at all.

A small allow-list of classes that only carry plain values (:data:`HARMLESS_GLOBALS`) lets the
metadata of common training frameworks through: Lightning stores ``hyper_parameters`` as an
``AttributeDict`` (a ``dict`` subclass) or an ``argparse.Namespace``. Building either runs no code
from the file — the object is created empty and filled with values the same restricted unpickler
built — so allowing them does not weaken ``weights_only``. Lightning's class is mapped, by name,
to :class:`_PlainAttributeDict` below (it unpickles as a plain ``dict``), so Lightning need not be
installed, and is never imported.

Every error is one line of plain text (torch's own messages carry ANSI escape codes, which are
removed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import pickletools
import re
import struct
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header (100 MB)
# where dicts of several things keep the model's weights, in the order they are looked for
STATE_DICT_ENTRY_NAMES = ("state_dict", "model_state_dict", "model", "module", "net", "network")


class _PlainAttributeDict:
    """Stand-in for Lightning's ``AttributeDict`` (a ``dict`` subclass): it unpickles as a plain ``dict``,
    which the restricted unpickler then fills with the values it built itself.
    """

    def __new__(cls, *args):
        return {}


HARMLESS_GLOBALS = [
    (_PlainAttributeDict, "lightning.fabric.utilities.data.AttributeDict"),
    (_PlainAttributeDict, "lightning_fabric.utilities.data.AttributeDict"),
    (_PlainAttributeDict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (argparse.Namespace, "argparse.Namespace"),
]


def plain_line(text: object, limit: int | None = 240) -> str:
    """The first non-empty line of ``text`` without ANSI escape codes, at most ``limit`` characters."""
    lines = [line.strip() for line in _ANSI.sub("", str(text)).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return first if limit is None or len(first) <= limit else first[: limit - 1] + "…"


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a safetensors file: by its header, whatever its extension."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 2 <= header_len <= min(size - 8, _SAFETENSORS_MAX_HEADER)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> object:
    """The object stored at ``path`` (a mapping for every format this package loads), read safely.

    Raises :class:`CheckpointError` with one plain line for a missing file, a folder, an unreadable
    or truncated file, and a file that would need code to be unpickled.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a folder, not a file: {path}")
    if path.suffix == ".safetensors" or is_safetensors(path):
        return _read_safetensors(path, map_location)
    return _read_torch(path, map_location)


def _read_safetensors(path: Path, map_location) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(map_location))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type, and OSError/ValueError
        raise CheckpointError(f"{path} is not a readable safetensors file ({plain_line(exc, 160)})") from None


_UNREADABLE = (
    RuntimeError,
    EOFError,
    zipfile.BadZipFile,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
)
_REFUSAL_MARKERS = ("weights_only", "Unsupported global", "Weights only load failed")


def _read_torch(path: Path, map_location) -> object:
    try:
        with _harmless_globals_allowed():
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if any(marker in str(exc) for marker in _REFUSAL_MARKERS):
            raise CheckpointError(_refusal(path, exc)) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({plain_line(exc, 160)})") from None
    except _UNREADABLE as exc:
        reason = f"{type(exc).__name__}: {plain_line(exc, 160)}"
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({reason})") from None


def _harmless_globals_allowed():
    """:data:`HARMLESS_GLOBALS` allowed for the ``with`` block (torch ≥ 2.6 maps a name to a stand-in;
    with an older torch such files are refused as before).
    """
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 6):
        return contextlib.nullcontext()
    return torch.serialization.safe_globals(HARMLESS_GLOBALS)


def _refusal(path: Path, exc: Exception) -> str:
    """One line: what the file asks for, why it is refused, and the one-line re-save that fixes it."""
    wanted = _unsafe_globals(path) or _globals_named_in(str(exc))
    strings = _pickle_strings(path)
    is_module = (
        any(name.startswith("torch.nn.modules.") for name in wanted) or {"_modules", "_parameters"} <= strings
    )
    shown = ", ".join(wanted[:3]) + (f" and {len(wanted) - 3} more" if len(wanted) > 3 else "")
    target = path.with_suffix(".pt") if path.suffix != ".pt" else path.with_name(f"{path.stem}.state_dict.pt")
    if is_module:
        what = "a whole pickled module, not a state_dict"
        expression = f"torch.load({str(path)!r}, weights_only=False).state_dict()"
        resave = f"import torch; torch.save({expression}, {str(target)!r})"
    else:
        what = "Python objects beyond tensors" + (f" (it needs {shown})" if shown else "")
        key = next((name for name in STATE_DICT_ENTRY_NAMES if name in strings), None)
        weights = f"c[{key!r}]" if key else "{k: v for k, v in c.items() if isinstance(v, torch.Tensor)}"
        resave = (
            f"import torch; c = torch.load({str(path)!r}, weights_only=False); "
            f"torch.save({weights}, {str(target)!r})"
        )
    return (
        f"refused to load {path}: it holds {what}, whose unpickling could run code (weights_only=True); "
        f'if you trust the file, re-save its weights in your own environment: python -c "{resave}"'
    )


def _unsafe_globals(path: Path) -> list[str]:
    """The classes/functions the file's pickle names that weights_only refuses (read, never run)."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:
        return []
    try:
        with _harmless_globals_allowed():
            return list(finder(path))
    except Exception:  # noqa: BLE001 - only a better message is at stake (legacy or damaged files)
        return []


def _globals_named_in(message: str) -> list[str]:
    return re.findall(r"GLOBAL ([\w.]+)", _ANSI.sub("", message))[:1]


def _pickle_strings(path: Path) -> set[str]:
    """The short string constants of the main pickle of a zip checkpoint (dict keys, attribute
    names), found by disassembling it with :mod:`pickletools` — nothing is built or run.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return set()
            data = archive.read(name)
        return {arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str) and len(arg) <= 64}
    except Exception:  # noqa: BLE001 - only a better message is at stake
        return set()
