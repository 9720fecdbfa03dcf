"""Datasets for training runs: the shipped digits (and its pre-train/fine-tune splits), a synthetic
Gaussian-mixture task, and user-supplied data through ``module:function``.

All splits are drawn from a ``torch.Generator`` seeded by the ``seed`` argument — never the global
RNG — so the same call returns the same tensors. The data seed is independent of a training run's
seed: by default every run sees the same split (``seed=0``).

Data specs (:func:`load_data`):

* ``builtin:digits`` — all 10 classes, 80/20 (:func:`digits_full`);
* ``builtin:digits-pretrain`` — digits 0–4, 80/20 (:func:`digits_pretrain`);
* ``builtin:digits-finetune`` — digits 5–9 relabelled 0–4, ``per_class`` training samples per class
  and every other sample as test (:func:`digits_finetune`);
* ``builtin:synthetic`` — :func:`synthetic_classification`;
* options as a query string: ``builtin:digits-finetune?per_class=20&seed=1``;
* ``module:function`` (or ``path/file.py:function``) — ``function()`` returns a :class:`DataBundle`
  or a dict ``{"train": (X, y), "test": (X, y), "num_classes": int}``.
"""
from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch

from ...errors import DataError
from .models import load_factory

__all__ = [
    "DataBundle",
    "load_digits",
    "digits_full",
    "digits_pretrain",
    "digits_finetune",
    "synthetic_classification",
    "load_data",
    "batches",
    "BUILTIN_DATA",
]

Split = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value; compare by identity
class DataBundle:
    """Train and test tensors of a classification task. ``X`` is float32, ``y`` int64 in [0, num_classes)."""

    train: Split
    test: Split
    num_classes: int
    name: str = "data"

    def __post_init__(self):
        train = _as_split(self.train, "train", self.name)
        test = _as_split(self.test, "test", self.name)
        object.__setattr__(self, "train", train)
        object.__setattr__(self, "test", test)
        if int(self.num_classes) != self.num_classes or int(self.num_classes) < 2:
            raise DataError(f"{self.name}: num_classes must be an integer ≥ 2, got {self.num_classes!r}")
        object.__setattr__(self, "num_classes", int(self.num_classes))
        if train[0].shape[1:] != test[0].shape[1:]:
            raise DataError(f"{self.name}: train samples have shape {tuple(train[0].shape[1:])} but test samples {tuple(test[0].shape[1:])}")
        for which, (_, y) in (("train", train), ("test", test)):
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise DataError(f"{self.name}: {which} labels span [{int(y.min())}, {int(y.max())}], outside [0, {self.num_classes - 1}]")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample (e.g. ``(1, 8, 8)``)."""
        return tuple(int(s) for s in self.train[0].shape[1:])


def _as_split(split: Any, which: str, name: str) -> Split:
    if not isinstance(split, (tuple, list)) or len(split) != 2:
        raise DataError(f"{name}: {which} must be a pair (X, y), got {type(split).__name__}")
    X, y = split
    try:
        X = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X)
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name}: {which} (X, y) cannot be turned into tensors ({exc})") from None
    if X.ndim < 2:
        raise DataError(f"{name}: {which} X must have a batch dimension and features, got shape {tuple(X.shape)}")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise DataError(f"{name}: {which} y must have shape ({X.shape[0]},), got {tuple(y.shape)}")
    if X.shape[0] == 0:
        raise DataError(f"{name}: the {which} split is empty")
    if y.dtype.is_floating_point:
        if not torch.equal(y, y.round()):
            raise DataError(f"{name}: {which} labels must be integers (class indices)")
    X = X.to(torch.float32)
    y = y.to(torch.int64)
    if not torch.isfinite(X).all():
        raise DataError(f"{name}: {which} X contains NaN or infinite values")
    return X, y


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    resource = importlib.resources.files("hessian_tools.app.zoo.datasets").joinpath("digits.csv.gz")
    with resource.open("rb") as raw, gzip.open(raw, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 65:
        raise DataError(f"the shipped digits.csv.gz has shape {table.shape}, expected (1797, 65)")
    return table[:, :64], table[:, 64]


def load_digits() -> Split:
    """All 1,797 digits: ``X`` float32 (1797, 1, 8, 8) in [0, 1] (pixel/16), ``y`` int64 in 0–9."""
    pixels, labels = _digits_arrays()
    X = torch.from_numpy(pixels.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return X, torch.from_numpy(labels.copy())


def _split(X: torch.Tensor, y: torch.Tensor, seed: int, test_fraction: float = 0.2) -> tuple[Split, Split]:
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(X.shape[0], generator=gen)
    n_test = int(round(test_fraction * X.shape[0]))
    test, train = perm[:n_test], perm[n_test:]
    return (X[train], y[train]), (X[test], y[test])


def digits_full(seed: int = 0) -> DataBundle:
    """All 10 digit classes, a seeded 80/20 train/test split (1,438 / 359)."""
    X, y = load_digits()
    train, test = _split(X, y, seed)
    return DataBundle(train, test, 10, "digits")


def digits_pretrain(seed: int = 0) -> DataBundle:
    """Digits 0–4 only, a seeded 80/20 train/test split."""
    X, y = load_digits()
    keep = y < 5
    train, test = _split(X[keep], y[keep], seed)
    return DataBundle(train, test, 5, "digits-pretrain")


def digits_finetune(seed: int = 0, per_class: int = 50) -> DataBundle:
    """Digits 5–9 relabelled 0–4: ``per_class`` seeded samples of each class to train on, all the rest to test.

    The low-sample fine-tuning setting: pre-train on :func:`digits_pretrain` (classes 0–4), then
    fine-tune on few samples of the disjoint classes 5–9.
    """
    X, y = load_digits()
    keep = y >= 5
    X, y = X[keep], y[keep] - 5
    per_class = int(per_class)
    smallest = int(torch.bincount(y, minlength=5).min())
    if not 1 <= per_class < smallest:
        raise DataError(f"digits-finetune: per_class must be in [1, {smallest - 1}] (the smallest class has {smallest} samples), got {per_class}")
    gen = torch.Generator().manual_seed(int(seed))
    train_idx, test_idx = [], []
    for c in range(5):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        train_idx.append(idx[:per_class])
        test_idx.append(idx[per_class:])
    train = torch.cat(train_idx)
    test = torch.cat(test_idx).sort().values
    return DataBundle((X[train], y[train]), (X[test], y[test]), 5, "digits-finetune")


def synthetic_classification(n: int = 256, d: int = 10, num_classes: int = 3, seed: int = 0,
                             separation: float = 2.0) -> DataBundle:
    """A Gaussian mixture: class means ~ N(0, separation²·I_d), unit-variance noise; balanced
    classes, ``n`` samples in all, a seeded 80/20 train/test split. ``X`` is (n, d) float32."""
    if n < 2 * num_classes or d < 1 or num_classes < 2:
        raise DataError(f"synthetic: need n ≥ 2·num_classes, d ≥ 1, num_classes ≥ 2; got n={n}, d={d}, num_classes={num_classes}")
    gen = torch.Generator().manual_seed(int(seed))
    means = separation * torch.randn(num_classes, d, generator=gen)
    y = torch.arange(n) % num_classes
    X = means[y] + torch.randn(n, d, generator=gen)
    train, test = _split(X, y, seed + 1)
    return DataBundle(train, test, num_classes, "synthetic")


BUILTIN_DATA: dict[str, Callable[..., DataBundle]] = {
    "digits": digits_full,
    "digits-pretrain": digits_pretrain,
    "digits-finetune": digits_finetune,
    "synthetic": synthetic_classification,
}


def _parse_options(query: str, spec: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if not query:
        return options
    for item in query.split("&"):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DataError(f"bad option {item!r} in data spec {spec!r}; write builtin:NAME?key=value&key=value")
        for cast in (int, float):
            try:
                options[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            options[key] = value
    return options


def load_data(spec: str) -> DataBundle:
    """Load the data named by ``spec`` (see the module docstring); one-line :class:`DataError` on a bad spec."""
    if isinstance(spec, DataBundle):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise DataError(f"data spec must be 'builtin:NAME' ({', '.join('builtin:' + k for k in BUILTIN_DATA)}) or 'module:function', got {spec!r}")
    if spec.startswith("builtin:"):
        body = spec[len("builtin:"):]
        name, _, query = body.partition("?")
        if name not in BUILTIN_DATA:
            raise DataError(f"unknown builtin dataset {name!r} in {spec!r}; choose one of {', '.join('builtin:' + k for k in BUILTIN_DATA)}")
        options = _parse_options(query, spec)
        try:
            return BUILTIN_DATA[name](**options)
        except TypeError as exc:
            raise DataError(f"bad options for {spec!r}: {exc}") from None
    factory = load_factory(spec, error=DataError)
    try:
        out = factory()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 — the user's loader failed; say so in one line
        raise DataError(f"data loader {spec} raised {type(exc).__name__}: {exc}") from None
    if isinstance(out, DataBundle):
        return out
    if isinstance(out, dict):
        missing = [k for k in ("train", "test", "num_classes") if k not in out]
        if missing:
            raise DataError(f"data loader {spec} returned a dict without {', '.join(missing)}; it needs train, test, num_classes")
        return DataBundle(out["train"], out["test"], out["num_classes"], str(out.get("name", spec)))
    raise DataError(f"data loader {spec} returned {type(out).__name__}; return a DataBundle or a dict with train, test, num_classes")


def batches(X: torch.Tensor, y: torch.Tensor, batch_size: int,
            generator: torch.Generator | None = None) -> list[Split]:
    """Split (X, y) into consecutive mini-batches of ``batch_size``; the last, smaller batch is kept.

    With a ``generator`` the samples are shuffled first (``torch.randperm(..., generator=generator)``).
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} samples but y has {y.shape[0]}")
    n = X.shape[0]
    if generator is not None:
        perm = torch.randperm(n, generator=generator)
        X, y = X[perm], y[perm]
    b = int(batch_size)
    return [(X[i:i + b], y[i:i + b]) for i in range(0, n, b)]
