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
* :func:`synthetic_text` (no spec: its inputs are dicts, see :class:`TextData`) — seeded token
  sequences with padding masks for the transformer classifier of :mod:`.transformer`;
* options as a query string: ``builtin:digits-finetune?per_class=20&seed=1``;
* ``module:function`` (or ``path/file.py:function``) — ``function()`` returns what
  :func:`bundle_from_factory` accepts (see there): a :class:`DataBundle`, a dict
  ``{"train": ..., "test": ..., "num_classes": int}``, a ``(train, test)`` pair of datasets/loaders,
  or the training data alone, each split an ``(X, y)`` pair of tensors, a
  ``torch.utils.data.Dataset``, a ``DataLoader`` or any re-iterable of batches.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ...errors import DataError
from ...operators.data_source import BatchSource
from .models import load_factory

__all__ = [
    "DataBundle",
    "load_digits",
    "digits_full",
    "digits_pretrain",
    "digits_finetune",
    "synthetic_classification",
    "synthetic_text",
    "TextData",
    "Batches",
    "bundle_from_factory",
    "load_data",
    "batches",
    "BUILTIN_DATA",
]

Split = tuple[Any, torch.Tensor]

ONE_SHOT = (
    "cannot be passed over twice, but every Hessian-vector product makes a full pass over the data: "
    "return a re-iterable instead (a list of batches, a Dataset or a DataLoader)"
)


class Batches:
    """A split given as batches rather than tensors: a ``torch.utils.data.Dataset`` (batched by a
    ``DataLoader`` at the analysis' batch size, in order), a ``DataLoader`` (used as it is) or any
    re-iterable of batches (a list, an object whose ``__iter__`` starts afresh).

    A batch is ``(inputs, targets)`` or a dict holding ``labels`` with the model's keyword inputs;
    inputs are a tensor, a tuple of tensors (passed positionally) or a dict of tensors (keyword
    arguments, e.g. ``input_ids``/``attention_mask``); see
    :mod:`hessian_tools.operators.data_source`. A one-shot iterator is refused.
    """

    def __init__(self, source: Any, where: str):
        if isinstance(source, Iterator):
            raise DataError(f"{where} is a one-shot iterator that {ONE_SHOT}")
        try:
            iter(source)
        except TypeError:
            if not isinstance(source, torch.utils.data.Dataset):
                raise DataError(
                    f"{where} is a {type(source).__name__}, not data: give (X, y) tensors, a Dataset, "
                    "a DataLoader or a list of batches"
                ) from None
        self.source = source
        self.where = where
        self._total: int | None = None

    def batched(self, batch_size: int) -> Any:
        """The re-iterable of batches the data loop streams."""
        if isinstance(self.source, torch.utils.data.Dataset) and not isinstance(
            self.source, torch.utils.data.DataLoader
        ):
            return torch.utils.data.DataLoader(self.source, batch_size=int(batch_size), shuffle=False)
        return self.source

    def count(self, batch_size: int = 512) -> int:
        """The number of samples (one pass over the data, remembered)."""
        if self._total is None:
            try:
                self._total = BatchSource(self.batched(batch_size)).total
            except DataError as exc:
                raise DataError(f"{self.where}: {exc}") from None
        return self._total


def is_batches(split: Any) -> bool:
    """True for what :class:`Batches` wraps (as opposed to one ``(X, y)`` pair of arrays)."""
    if isinstance(split, (Batches, torch.utils.data.Dataset, Iterator)):
        return True
    if isinstance(split, (tuple, list)):
        return not (len(split) == 2 and _is_targets(split[1]))
    return hasattr(split, "__iter__") and not _is_array(split)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value; compare by identity
class DataBundle:
    """Train and test data of a task.

    Each split is an ``(X, y)`` pair — ``X`` a tensor (cast to float32), a tuple or a dict of
    tensors (kept as they are: token ids stay integers) sharing the leading dimension, ``y`` the
    targets — or :class:`Batches`. With ``num_classes`` (an integer ≥ 2) tensor targets are class
    labels, int64 in [0, num_classes); ``num_classes=None`` leaves the targets as they are (e.g.
    regression targets for ``--loss mse``). ``test`` may be None (no held-out data).
    """

    train: Any
    test: Any
    num_classes: int | None
    name: str = "data"

    def __post_init__(self):
        if self.num_classes is not None:
            if int(self.num_classes) != self.num_classes or int(self.num_classes) < 2:
                raise DataError(f"{self.name}: num_classes must be an integer ≥ 2, got {self.num_classes!r}")
            object.__setattr__(self, "num_classes", int(self.num_classes))
        train = _as_split(self.train, "train", self.name, self.num_classes)
        test = None if self.test is None else _as_split(self.test, "test", self.name, self.num_classes)
        object.__setattr__(self, "train", train)
        object.__setattr__(self, "test", test)
        if (
            isinstance(train[0] if isinstance(train, tuple) else None, torch.Tensor)
            and isinstance(test, tuple)
            and isinstance(test[0], torch.Tensor)
            and train[0].shape[1:] != test[0].shape[1:]
        ):
            raise DataError(
                f"{self.name}: train samples have shape {tuple(train[0].shape[1:])} "
                f"but test samples {tuple(test[0].shape[1:])}"
            )

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The shape of one sample (e.g. ``(1, 8, 8)``); None unless the training inputs are one tensor."""
        if isinstance(self.train, tuple) and isinstance(self.train[0], torch.Tensor):
            return tuple(int(s) for s in self.train[0].shape[1:])
        return None

    def train_batches(self, batch_size: int) -> Any:
        """The training data as a re-iterable of batches of (at most) ``batch_size`` samples for
        tensors and Datasets; a DataLoader or list of batches keeps its own batches.
        """
        return _batched(self.train, batch_size)

    def test_batches(self, batch_size: int) -> Any:
        """The test data like :meth:`train_batches`; None without test data."""
        return None if self.test is None else _batched(self.test, batch_size)

    @property
    def n_train(self) -> int:
        return _count(self.train)

    @property
    def n_test(self) -> int:
        return 0 if self.test is None else _count(self.test)


def _batched(split: Any, batch_size: int) -> Any:
    return split.batched(batch_size) if isinstance(split, Batches) else batches(*split, batch_size)


def _count(split: Any) -> int:
    return split.count() if isinstance(split, Batches) else int(split[1].shape[0])


def _is_array(obj: Any) -> bool:
    return isinstance(obj, (torch.Tensor, np.ndarray))


def _is_targets(obj: Any) -> bool:
    """Targets of an (X, y) pair: an array, or a list of numbers (a batch would be a tuple or dict)."""
    if _is_array(obj):
        return True
    return isinstance(obj, list) and (not obj or isinstance(obj[0], (int, float, np.number)))


def _as_split(split: Any, which: str, name: str, num_classes: int | None) -> Any:
    if isinstance(split, Batches):
        return split
    if is_batches(split):
        return Batches(split, f"{name}: the {which} data")
    X, y = split
    try:
        y = _tensor(y)
        X = (
            {k: _tensor(v) for k, v in X.items()}
            if isinstance(X, Mapping)
            else tuple(_tensor(v) for v in X)
            if isinstance(X, tuple)
            else _tensor(X)
        )
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name}: {which} (X, y) cannot be turned into tensors ({exc})") from None
    _check_samples(X, y, which, name)
    if num_classes is not None:
        y = _labels(y, which, name, num_classes)
    if isinstance(X, torch.Tensor):
        X = X.to(torch.float32)
        if not torch.isfinite(X).all():
            raise DataError(f"{name}: {which} X contains NaN or infinite values")
    return X, y


def _tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def _check_samples(X: Any, y: torch.Tensor, which: str, name: str) -> None:
    columns = X.items() if isinstance(X, Mapping) else enumerate(X) if isinstance(X, tuple) else [(None, X)]
    if y.ndim < 1 or y.shape[0] == 0:
        raise DataError(
            f"{name}: the {which} split is empty" if y.ndim else f"{name}: {which} y has no sample dimension"
        )
    for key, column in columns:
        where = "X" if key is None else f"X[{key!r}]"
        if column.ndim < (2 if key is None else 1):
            raise DataError(
                f"{name}: {which} {where} must have a batch dimension and features, "
                f"got shape {tuple(column.shape)}"
            )
        if column.shape[0] != y.shape[0]:
            raise DataError(f"{name}: {which} y must have shape ({column.shape[0]},), got {tuple(y.shape)}")


def _labels(y: torch.Tensor, which: str, name: str, num_classes: int) -> torch.Tensor:
    if y.ndim != 1:
        raise DataError(f"{name}: {which} class labels y must have shape (n,), got {tuple(y.shape)}")
    if y.dtype.is_floating_point and not torch.equal(y, y.round()):
        raise DataError(f"{name}: {which} labels must be integers (class indices)")
    y = y.to(torch.int64)
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise DataError(
            f"{name}: {which} labels span [{int(y.min())}, {int(y.max())}], outside [0, {num_classes - 1}]"
        )
    return y


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
    """Digits 5–9 relabelled 0–4: ``per_class`` seeded samples of each class to train on, all the rest to
    test.

    The low-sample fine-tuning setting: pre-train on :func:`digits_pretrain` (classes 0–4), then
    fine-tune on few samples of the disjoint classes 5–9.
    """
    X, y = load_digits()
    keep = y >= 5
    X, y = X[keep], y[keep] - 5
    per_class = int(per_class)
    smallest = int(torch.bincount(y, minlength=5).min())
    if not 1 <= per_class < smallest:
        raise DataError(
            f"digits-finetune: per_class must be in [1, {smallest - 1}] "
            f"(the smallest class has {smallest} samples), got {per_class}"
        )
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


def synthetic_classification(
    n: int = 256, d: int = 10, num_classes: int = 3, seed: int = 0, separation: float = 2.0
) -> DataBundle:
    """A Gaussian mixture: class means ~ N(0, separation²·I_d), unit-variance noise; balanced
    classes, ``n`` samples in all, a seeded 80/20 train/test split. ``X`` is (n, d) float32.
    """
    if n < 2 * num_classes or d < 1 or num_classes < 2:
        raise DataError(
            "synthetic: need n ≥ 2·num_classes, d ≥ 1, num_classes ≥ 2; "
            f"got n={n}, d={d}, num_classes={num_classes}"
        )
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
            raise DataError(
                f"bad option {item!r} in data spec {spec!r}; write builtin:NAME?key=value&key=value"
            )
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
    """Load the data named by ``spec`` (see the module docstring); one-line :class:`DataError` on a bad
    spec.
    """
    if isinstance(spec, DataBundle):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise DataError(
            f"data spec must be 'builtin:NAME' ({', '.join('builtin:' + k for k in BUILTIN_DATA)}) "
            f"or 'module:function', got {spec!r}"
        )
    if spec.startswith("builtin:"):
        body = spec[len("builtin:") :]
        name, _, query = body.partition("?")
        if name not in BUILTIN_DATA:
            raise DataError(
                f"unknown builtin dataset {name!r} in {spec!r}; "
                f"choose one of {', '.join('builtin:' + k for k in BUILTIN_DATA)}"
            )
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
    return bundle_from_factory(out, spec)


def bundle_from_factory(out: Any, spec: str) -> DataBundle:
    """The :class:`DataBundle` of what a ``--data module:function`` factory returned.

    Accepted: a :class:`DataBundle`; a dict ``{"train": split, "test": split, "num_classes": C}``
    (``test`` optional for batched splits; ``num_classes`` optional for them, and None for
    non-class targets); a ``(train, test)`` pair of Datasets/DataLoaders; or the training data
    alone (a Dataset, a DataLoader or a list/re-iterable of batches; no test data then). A split is
    an ``(X, y)`` pair of tensors (``X`` a tensor, or a tuple/dict of tensors) or batches as
    :class:`Batches` describes them. A generator's one-shot iterator is refused: it cannot be
    passed over twice.
    """
    where = f"data loader {spec}"
    if isinstance(out, DataBundle):
        return out
    if isinstance(out, Iterator):
        raise DataError(f"{where} returned a {type(out).__name__}, a one-shot iterator that {ONE_SHOT}")
    if isinstance(out, Mapping):
        return _bundle_from_dict(out, spec)
    if _is_loader_pair(out):
        return DataBundle(out[0], out[1], None, spec)
    if is_batches(out) and not isinstance(out, (str, bytes)):
        return DataBundle(Batches(out, f"{where}: the training data"), None, None, spec)
    raise DataError(
        f"{where} returned {type(out).__name__}; return a DataBundle, a dict with train, test, "
        "num_classes, a Dataset, a DataLoader or a list of batches"
    )


def _bundle_from_dict(out: Mapping, spec: str) -> DataBundle:
    if "train" not in out:
        raise DataError(
            f"data loader {spec} returned a dict without train; it needs train, test, num_classes"
        )
    required = () if is_batches(out["train"]) else ("test", "num_classes")
    missing = [k for k in required if k not in out]
    if missing:
        raise DataError(
            f"data loader {spec} returned a dict without {', '.join(missing)}; "
            "it needs train, test, num_classes"
        )
    return DataBundle(out["train"], out.get("test"), out.get("num_classes"), str(out.get("name", spec)))


def _is_loader_pair(out: Any) -> bool:
    """A ``(train, test)`` tuple of Datasets/DataLoaders (not one batch nor a list of batches)."""
    return (
        isinstance(out, tuple)
        and len(out) == 2
        and all(
            isinstance(part, torch.utils.data.Dataset) or isinstance(part, torch.utils.data.DataLoader)
            for part in out
        )
    )


def batches(
    X: torch.Tensor | tuple | dict[str, torch.Tensor],
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> list[tuple[Any, torch.Tensor]]:
    """Split (X, y) into consecutive mini-batches of ``batch_size``; the last, smaller batch is kept.

    ``X`` is a tensor, or a dict of tensors sharing the leading (sample) dimension — model inputs
    passed as keyword arguments, as ``{"input_ids": ..., "attention_mask": ...}`` — and every batch
    then holds a dict of the same keys — or a tuple of tensors (positional inputs), and every batch
    then holds a tuple. With a ``generator`` the samples are shuffled first
    (``torch.randperm(..., generator=generator)``).
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = y.shape[0]
    columns = X if isinstance(X, Mapping) else dict(enumerate(X)) if isinstance(X, tuple) else {None: X}
    for key, column in columns.items():
        if column.shape[0] != n:
            where = "" if key is None else f"[{key!r}]"
            raise ValueError(f"X{where} has {column.shape[0]} samples but y has {n}")
    if generator is not None:
        perm = torch.randperm(n, generator=generator)
        columns, y = {k: v[perm] for k, v in columns.items()}, y[perm]
    b = int(batch_size)

    def rows(start: int):
        piece = {k: v[start : start + b] for k, v in columns.items()}
        if isinstance(X, Mapping):
            return piece
        return tuple(piece.values()) if isinstance(X, tuple) else piece[None]

    return [(rows(i), y[i : i + b]) for i in range(0, n, b)]


@dataclasses.dataclass(frozen=True, eq=False)
class TextData:
    """Token sequences padded to one length: ``input_ids`` and ``attention_mask`` (N, L) int64,
    ``labels`` (N,) int64 in [0, num_classes). Padding is token 0 with mask 0.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        """The model's keyword arguments for all N samples."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> list[tuple[dict, torch.Tensor]]:
        """``[({"input_ids": ..., "attention_mask": ...}, labels), ...]``, see :func:`batches`."""
        return batches(self.inputs, self.labels, batch_size, generator)


def synthetic_text(
    n: int = 256,
    vocab_size: int = 2000,
    min_len: int = 8,
    max_len: int = 64,
    num_classes: int = 2,
    seed: int = 0,
) -> TextData:
    """Seeded random token sequences with a rule a bag-of-words model can learn.

    Lengths are uniform in [min_len, max_len]; tokens uniform in [1, vocab_size) (0 is padding).
    Token t belongs to group t mod num_classes, and a sequence's label is the group with the most
    tokens in it (ties go to the lowest group), so mean-pooled token embeddings determine it.
    """
    if not (2 <= num_classes < vocab_size and 1 <= min_len <= max_len and n >= 1):
        raise DataError(
            f"synthetic text: need 2 ≤ num_classes < vocab_size, 1 ≤ min_len ≤ max_len, n ≥ 1; "
            f"got n={n}, vocab_size={vocab_size}, min_len={min_len}, max_len={max_len}, "
            f"num_classes={num_classes}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    lengths = torch.randint(int(min_len), int(max_len) + 1, (int(n),), generator=gen)
    mask = (torch.arange(int(max_len))[None, :] < lengths[:, None]).to(torch.int64)
    ids = torch.randint(1, int(vocab_size), (int(n), int(max_len)), generator=gen) * mask
    groups = torch.nn.functional.one_hot(ids % num_classes, num_classes) * mask[..., None]
    labels = groups.sum(1).argmax(1)  # argmax returns the first maximum: ties go to the lowest group
    return TextData(ids, mask, labels, int(num_classes))
