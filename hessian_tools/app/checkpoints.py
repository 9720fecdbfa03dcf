"""Safe checkpoint loading, and resolving what the command line is pointed at — a run folder or a
checkpoint file — into a model, its data and its prior weights.

Files are read by :mod:`.checkpoint_formats` (``torch.load(..., weights_only=True)`` or
safetensors; a file that would need code to be unpickled is refused, never executed). The weights
are then found in what the file holds, whichever way it was saved:

* a plain ``state_dict``;
* a wrapped one, whose keys all carry a prefix: ``module.`` (DistributedDataParallel, DataParallel,
  ``AveragedModel``), ``_orig_mod.`` (``torch.compile``), a LightningModule's attribute (``model.``);
* one entry of a dict of several (``{"state_dict": ..., "optimizer_states": ...}`` from Lightning,
  ``{"model": ..., "ema": ..., "optimizer": ...}``), possibly prefixed too.

Every mapping in the file that holds tensors is an *entry*; a *candidate* is an entry and a prefix
(possibly empty) of its keys. A candidate **fits** when its keys with the prefix removed are exactly
the model's keys with exactly the model's shapes — nothing missing, nothing extra under the prefix,
no shape differing. Only a candidate that fits is ever loaded: nothing is guessed and nothing is
loaded partially. When several fit, the model's own weights are preferred over averaged copies
(EMA/SWA), and an entry used whole over part of an entry; a remaining tie is refused as ambiguous.
``key=`` (``--checkpoint-key``) picks a candidate by its location, e.g. ``ema`` or
``state_dict.model_ema``. What was used and stripped is returned (:class:`CheckpointFit`) and said
in one line (:attr:`CheckpointFit.note`).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .checkpoint_formats import STATE_DICT_ENTRY_NAMES, read_checkpoint
from .zoo.data import DataBundle, load_data
from .zoo.models import build_model, load_factory

_AVERAGED_WORDS = {"ema", "swa", "averaged", "average", "avg", "shadow", "polyak"}
_MAX_DEPTH = 8


@dataclasses.dataclass(frozen=True)
class CheckpointFit:
    """The weights found in a checkpoint for a model, and where they were found.

    ``state_dict`` has exactly the model's keys. ``entry`` is the location of the mapping they came
    from ("" = the file's top level), ``prefix`` what was stripped from every key ("" = nothing),
    ``unused`` the tensors of that mapping outside the prefix (never loaded), ``also_fits`` the
    locations of other candidates that fit too but were not chosen.
    """

    source: str
    state_dict: Mapping[str, Any]
    entry: str = ""
    prefix: str = ""
    unused: tuple[str, ...] = ()
    also_fits: tuple[str, ...] = ()

    @property
    def location(self) -> str:
        return _location(self.entry, self.prefix)

    @property
    def note(self) -> str | None:
        """One line saying what was taken from the file, or None for a plain state_dict used as is."""
        parts = []
        if self.entry:
            parts.append(f"used entry {self.entry!r}")
        if self.prefix:
            parts.append(f"stripped prefix {self.prefix!r} from {len(self.state_dict)} keys")
        if self.unused:
            parts.append(
                f"left {len(self.unused)} other tensor(s) of the entry unused, first: "
                + ", ".join(self.unused[:3])
            )
        if self.also_fits:
            parts.append(f"also fits: {', '.join(map(repr, self.also_fits))} (choose with --checkpoint-key)")
        return f"{'; '.join(parts)} ({self.source})" if parts else None


@dataclasses.dataclass(frozen=True)
class _Candidate:
    path: tuple[str, ...]
    entry: Mapping
    prefix: str
    hits: int  # model keys found under the prefix (any shape)
    unused: tuple[str, ...]

    @property
    def entry_name(self) -> str:
        return ".".join(self.path)

    @property
    def location(self) -> str:
        return _location(self.entry_name, self.prefix)

    @property
    def averaged(self) -> bool:
        return any(word in _AVERAGED_WORDS for word in re.split(r"[._]", self.location.lower()))


def _location(entry: str, prefix: str) -> str:
    return ".".join(part for part in (entry, prefix.rstrip(".")) if part)


def _tensor_entries(
    obj: Any, path: tuple[str, ...] = (), ancestors: tuple[int, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Mapping]]:
    """Every mapping inside ``obj`` (nested through mappings only) that holds at least one tensor.
    The same mapping reached by two names is listed under both; a mapping inside itself only once.
    """
    if not isinstance(obj, Mapping) or id(obj) in ancestors or len(path) > _MAX_DEPTH:
        return
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        yield path, obj
    for key, value in obj.items():
        yield from _tensor_entries(value, path + (str(key),), ancestors + (id(obj),))


def _split_points(key: str) -> Iterator[tuple[str, str]]:
    """``(prefix, rest)`` for the empty prefix and for every prefix of ``key`` ending in a dot."""
    yield "", key
    for i, char in enumerate(key):
        if char == ".":
            yield key[: i + 1], key[i + 1 :]


def _candidates(path, entry, shapes, extra) -> Iterator[tuple[_Candidate, bool]]:
    """Each prefix of the entry's keys that holds at least one model key, and whether it fits.

    One pass over the keys: a prefix fits when all the model's tensors lie under it with their
    shapes, nothing else does, and the model's non-tensor (extra) state is there too.
    """
    under, hits, exact = Counter(), Counter(), Counter()
    tensor_keys = [k for k, v in entry.items() if isinstance(k, str) and isinstance(v, torch.Tensor)]
    for key in tensor_keys:
        for prefix, rest in _split_points(key):
            under[prefix] += 1
            if rest in shapes:
                hits[prefix] += 1
                exact[prefix] += tuple(entry[key].shape) == shapes[rest]
    for prefix in hits:
        fits = exact[prefix] == under[prefix] == len(shapes) and all(prefix + k in entry for k in extra)
        unused = tuple(k for k in tensor_keys if not k.startswith(prefix)) if fits else ()
        yield _Candidate(path, entry, prefix, hits[prefix], unused), fits
    if not hits:
        yield _Candidate(path, entry, "", 0, ()), False


def _strip(entry: Mapping, prefix: str, keys) -> OrderedDict:
    """The entry's values under ``prefix`` for ``keys``; torch's per-module ``_metadata`` (versions
    that some layers consult when loading) is carried over with the same prefix removed.
    """
    out = OrderedDict((k, entry[prefix + k]) for k in keys if prefix + k in entry)
    metadata = getattr(entry, "_metadata", None)
    if metadata is None and isinstance(entry.get("_metadata"), Mapping):
        metadata = entry["_metadata"]
    if isinstance(metadata, Mapping):
        module = prefix[:-1]
        out._metadata = OrderedDict(
            (name if not prefix else ("" if name == module else name[len(prefix) :]), value)
            for name, value in metadata.items()
            if not prefix or name == module or str(name).startswith(prefix)
        )
    return out


def _misfit(expected: Mapping[str, Any], state_dict: Mapping[str, Any]) -> str | None:
    """What keeps ``state_dict`` from fitting a model whose state_dict is ``expected``: the first few
    shape mismatches, missing keys and unexpected tensors; None when it fits. Unexpected non-tensor
    entries (framework metadata) do not count.
    """
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k, v in state_dict.items() if k not in expected and isinstance(v, torch.Tensor)]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if isinstance(v, torch.Tensor)
        and k in state_dict
        and (not isinstance(state_dict[k], torch.Tensor) or tuple(state_dict[k].shape) != tuple(v.shape))
    ]
    parts = []
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es), first: {'; '.join(mismatched[:3])}")
    if missing:
        parts.append(f"{len(missing)} key(s) missing from the checkpoint, first: {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), first: {', '.join(unexpected[:3])}")
    return " | ".join(parts) or None


def fit_state_dict(
    model: torch.nn.Module, obj: Any, source: str = "checkpoint", key: str | None = None
) -> CheckpointFit:
    """Find the weights for ``model`` in ``obj`` (what a checkpoint file holds); see the module doc.

    Raises :class:`CheckpointError` (one line) when no candidate fits — naming, for the closest
    one, the first missing/unexpected keys and shape mismatches — when several fit equally well,
    or when ``key`` names no entry.
    """
    expected = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in expected.items() if isinstance(v, torch.Tensor)}
    extra = [k for k, v in expected.items() if not isinstance(v, torch.Tensor)]
    found = [c for path, entry in _tensor_entries(obj) for c in _candidates(path, entry, shapes, extra)]
    if not found:
        raise CheckpointError(f"{source} does not hold a state_dict (a mapping of names to tensors)")
    if key is not None and key.strip("."):
        wanted = key.strip(".")
        chosen = [
            (c, fits) for c, fits in found if c.location == wanted or c.location.startswith(wanted + ".")
        ]
        if not chosen:
            entries = sorted({repr(c.entry_name) if c.entry_name else "the top level" for c, _ in found})
            raise CheckpointError(
                f"{source} has no state_dict at {wanted!r} (--checkpoint-key); "
                f"mappings holding tensors: {', '.join(entries[:6])}"
            )
        found = chosen
    fitting = sorted(
        (c for c, fits in found if fits), key=lambda c: (c.averaged, bool(c.unused), len(c.location))
    )
    if not fitting:
        closest = max((c for c, _ in found), key=lambda c: (c.hits, -len(c.location)))
        where = (f" (entry {closest.entry_name!r})" if closest.entry_name else "") + (
            f" after stripping prefix {closest.prefix!r}" if closest.prefix else ""
        )
        under = [
            k[len(closest.prefix) :]
            for k in closest.entry
            if isinstance(k, str) and k.startswith(closest.prefix)
        ]
        reason = _misfit(expected, _strip(closest.entry, closest.prefix, under))
        raise CheckpointError(f"{source} does not fit the model{where}: {reason}")
    best = fitting[0]
    rank = (best.averaged, bool(best.unused))
    ties = [c.location for c in fitting if (c.averaged, bool(c.unused)) == rank]
    if len(ties) > 1:
        raise CheckpointError(
            f"{source} holds several state_dicts that fit the model equally well: "
            f"{', '.join(map(repr, ties))}; choose one with --checkpoint-key"
        )
    return CheckpointFit(
        source,
        _strip(best.entry, best.prefix, expected),
        best.entry_name,
        best.prefix,
        best.unused,
        tuple(c.location for c in fitting[1:]),
    )


def load_checkpoint(
    model: torch.nn.Module,
    path: str | os.PathLike,
    key: str | None = None,
    map_location: str | torch.device = "cpu",
) -> CheckpointFit:
    """Load the weights for ``model`` from the checkpoint file at ``path`` (any format the module
    doc lists) into ``model``; returns what was used (:class:`CheckpointFit`, with its ``note``).
    """
    fit = fit_state_dict(model, read_checkpoint(path, map_location), source=str(path), key=key)
    model.load_state_dict(fit.state_dict, strict=True)
    return fit


def load_checkpoint_into(
    model: torch.nn.Module, path: str | os.PathLike, key: str | None = None
) -> torch.nn.Module:
    """Load the checkpoint at ``path`` into ``model`` safely; returns the model."""
    load_checkpoint(model, path, key=key)
    return model


def load_into_model(
    model: torch.nn.Module, state_dict: Mapping[str, Any], source: str = "checkpoint"
) -> None:
    """Copy ``state_dict`` (keys as the model names them, nothing stripped) into ``model`` after checking
    that every key and shape matches, so a checkpoint of another architecture is reported precisely
    (first few missing keys, unexpected keys, shape mismatches) instead of half-loaded.
    """
    expected = model.state_dict()
    reason = _misfit(expected, state_dict)
    if reason:
        raise CheckpointError(f"{source} does not fit the model: {reason}")
    model.load_state_dict(_strip(state_dict, "", expected), strict=True)


def load_state_dict(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", key: str | None = None
) -> dict:
    """The state_dict stored at ``path``, without a model to fit it to (so nothing is stripped).

    That is the file's top level when it holds tensors, else its entry ``key`` or the first of
    ``state_dict``, ``model_state_dict``, ``model``, ``module``, ``net``, ``network`` that holds
    tensors. Only tensors (and modules' ``*_extra_state``) are returned. Raises
    :class:`CheckpointError` with one line when the file is unreadable or unsafe, or holds none.
    """
    return _plain_entry(read_checkpoint(path, map_location), str(path), key)


def _plain_entry(obj: Any, source: str, key: str | None = None) -> dict:
    entries = dict(_tensor_entries(obj))
    names = [tuple(key.strip(".").split("."))] if key else [(), *((name,) for name in STATE_DICT_ENTRY_NAMES)]
    path = next((name for name in names if name in entries), None)
    if path is None:
        raise CheckpointError(
            f"{source} does not hold a state_dict (a mapping of names to tensors)"
            + (f" at {key!r}" if key else "")
        )
    return {
        k: v
        for k, v in entries[path].items()
        if isinstance(k, str) and (isinstance(v, torch.Tensor) or k.endswith("_extra_state"))
    }


def _load_prior(model: torch.nn.Module, path: str | os.PathLike) -> tuple[dict, str | None]:
    """Prior weights for ``model``: fitted like the checkpoint (so a wrapped prior is unwrapped the same
    way), else — for a prior that is not a whole model, such as another head — the plain state_dict.
    """
    obj = read_checkpoint(path)
    try:
        fit = fit_state_dict(model, obj, source=str(path))
    except CheckpointError:
        return _plain_entry(obj, str(path)), None
    return {k: v for k, v in fit.state_dict.items() if isinstance(v, torch.Tensor)}, fit.note


@dataclasses.dataclass
class LoadedCheckpoint:
    name: str
    model: torch.nn.Module
    data: DataBundle
    data_spec: str
    prior: Mapping[str, torch.Tensor] | None
    path: Path
    notes: tuple[str, ...] = ()  # one line each: what was taken from the files (see CheckpointFit.note)


def build_user_model(spec: str, bundle: DataBundle) -> torch.nn.Module:
    """``mlp``/``cnn``/``resnet`` (built for the data's classes and input shape) or ``module:factory``
    (called with ``num_classes=`` when its signature takes it, else with no arguments).
    """
    if ":" not in spec:
        if bundle.num_classes is None or bundle.input_shape is None:
            raise ValueError(
                f"--model {spec} needs class labels (num_classes) and tensor inputs; for other data "
                "give your own model as --model MODULE:FACTORY"
            )
        return build_model(spec, bundle.num_classes, bundle.input_shape)
    factory = load_factory(spec)
    try:
        takes_classes = "num_classes" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_classes = False
    model = factory(num_classes=bundle.num_classes) if takes_classes and bundle.num_classes else factory()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"--model {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def resolve(
    target: str,
    model_spec: str | None = None,
    data_spec: str | None = None,
    prior: str | None = None,
    epoch_file: str = "final.pt",
    checkpoint_key: str | None = None,
) -> LoadedCheckpoint:
    """A run folder (model, data and prior read from run.json / init.pt; ``--model``/``--data``
    override) or a checkpoint file (``--model`` and ``--data`` required; ``--prior`` optional).
    ``checkpoint_key`` picks the state_dict inside the checkpoint (see :func:`fit_state_dict`).
    """
    path = Path(target)
    if path.is_dir():
        from .runs import build_run_model, load_run

        meta, checkpoints = load_run(path)
        last = checkpoints[-1] if checkpoints else None
        checkpoint = path / epoch_file if (path / epoch_file).is_file() else last
        if checkpoint is None:
            raise CheckpointError(f"{path} has no finished epoch to analyse")
        spec = data_spec or meta["config"]["data"]
        bundle = load_data(spec)
        model = build_user_model(model_spec, bundle) if model_spec else build_run_model(meta)
        name = f"{path.name}/{checkpoint.name}"
        prior_path = Path(prior) if prior else path / "init.pt"
        has_prior = prior_path.is_file() or bool(prior)
    else:
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        if not model_spec or not data_spec:
            raise ValueError(
                f"{path} is a checkpoint file: say which model and data it belongs to with --model and --data"
            )
        checkpoint, spec, bundle = path, data_spec, load_data(data_spec)
        model = build_user_model(model_spec, bundle)
        name, prior_path, has_prior = path.name, (Path(prior) if prior else None), bool(prior)
    fit = load_checkpoint(model, checkpoint, key=checkpoint_key)
    prior_state, prior_note = _load_prior(model, prior_path) if has_prior else (None, None)
    notes = tuple(note for note in (fit.note, prior_note) if note)
    return LoadedCheckpoint(name, model.eval(), bundle, spec, prior_state, checkpoint, notes)
