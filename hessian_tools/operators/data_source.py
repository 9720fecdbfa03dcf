"""Normalise the data argument into a re-iterable stream of ``(index, inputs, targets, batch_size)``.

The operators never hold the whole dataset: they stream batches on every pass, so memory stays flat
as the data grows. Each batch is weighted by its size, so an uneven last batch is exact.

Accepted data: one ``(X, y)`` pair (a single batch), or a re-iterable of batches — a list, a
``torch.utils.data.DataLoader``, any object that can be iterated more than once. A batch is

* an ``(inputs, targets)`` pair (tuple or list of two), where ``inputs`` is a tensor, a tuple of
  tensors (passed to the model positionally) or a dict of tensors (passed as keyword arguments);
* or a dict holding ``"labels"`` (or ``"label"``) and the model's keyword inputs, as Hugging Face
  data collators produce: the labels are the targets, every other entry an input.

The batch size n is the leading dimension of the targets. With ``max_batch_size`` a larger batch is
split into consecutive micro-batches (every tensor of the inputs and the targets is sliced along its
first dimension), each weighted by its own size: the mean loss over all samples is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..checks import check_integer
from ..errors import DataError

#: keys under which a dict batch carries its targets
LABEL_KEYS = ("labels", "label")


def batch_size_of(inputs: Any, targets: Any) -> int:
    """Number of samples in a batch: the leading dimension of the targets (else of the inputs)."""
    for obj in (targets, inputs):
        tensor = _first_tensor(obj)
        if tensor is not None and tensor.ndim > 0:
            return int(tensor.shape[0])
    raise DataError("cannot tell the batch size: targets and inputs have no leading dimension")


def split_batch(inputs: Any, targets: Any, size: int, n: int) -> Iterator[tuple[Any, Any, int]]:
    """Consecutive pieces of at most ``size`` samples of a batch of ``n`` samples."""
    for start in range(0, n, size):
        stop = min(start + size, n)
        yield _slice(inputs, start, stop, n), _slice(targets, start, stop, n), stop - start


class BatchSource:
    """Wrap ``data`` (see the module docstring); iterating yields ``(index, inputs, targets, n)``.

    ``index`` numbers the batches of ``data`` (micro-batches of one batch share its index).
    ``total`` (the number of samples N) is counted on the first pass. Empty data is an error unless
    ``allow_empty`` (one rank's shard of a distributed operator may hold no batch at all; it then
    contributes a zero sum and a zero count).
    """

    def __init__(self, data: Any, allow_empty: bool = False, max_batch_size: int | None = None):
        if is_single_pair(data):
            data = [tuple(data)]
        if isinstance(data, Iterator):
            raise DataError(
                "data is a one-shot iterator; pass a re-iterable (a list of batches or a DataLoader): "
                "every Hessian-vector product makes a full pass over it"
            )
        try:
            iter(data)
        except TypeError:
            raise DataError(
                "data must be an (X, y) pair or an iterable of (inputs, targets) batches, "
                f"got {type(data).__name__}"
            ) from None
        self.data = data
        self.allow_empty = allow_empty
        self.max_batch_size = (
            None if max_batch_size is None else check_integer("max_batch_size", max_batch_size)
        )
        self._total: int | None = None
        self._num_batches: int | None = None

    def __iter__(self):
        total, count = 0, 0
        for index, batch in enumerate(self.data):
            inputs, targets = unpack_batch(batch, index)
            n = batch_size_of(inputs, targets)
            if n == 0:
                continue
            total += n
            count += 1
            if self.max_batch_size is None or n <= self.max_batch_size:
                yield index, inputs, targets, n
            else:
                for piece_inputs, piece_targets, size in split_batch(inputs, targets, self.max_batch_size, n):
                    yield index, piece_inputs, piece_targets, size
        if count == 0 and not self.allow_empty:
            raise DataError("the data is empty: no batch with at least one sample")
        self._total, self._num_batches = total, count

    def first(self) -> tuple[int, Any, Any, int] | None:
        """The first (micro-)batch, or None for empty data."""
        return next(iter(self), None)

    @property
    def total(self) -> int:
        if self._total is None:
            for _ in self:
                pass
        return self._total

    @property
    def num_batches(self) -> int:
        if self._num_batches is None:
            _ = self.total  # one pass counts the samples and the batches
        return self._num_batches


def unpack_batch(batch: Any, index: int) -> tuple[Any, Any]:
    """``(inputs, targets)`` of one batch in any of the accepted formats (module docstring)."""
    if isinstance(batch, Mapping):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        if key is None:
            raise DataError(
                f"batch {index} is a dict without {' or '.join(map(repr, LABEL_KEYS))}: "
                "give (inputs, targets) pairs or dicts that carry their labels"
            )
        return {k: v for k, v in batch.items() if k != key}, batch[key]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    shown = (
        f"a {len(batch)}-element {type(batch).__name__}"
        if isinstance(batch, (tuple, list))
        else type(batch).__name__
    )
    raise DataError(
        f"batch {index} is {shown}, not an (inputs, targets) pair; several input tensors go in a tuple: "
        "((x1, x2), y)"
    )


def move_to(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move tensors (and tuples/lists/dicts of them) to ``device``; cast floating tensors to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(o, device, dtype) for o in obj)
    if isinstance(obj, Mapping):
        return {k: move_to(v, device, dtype) for k, v in obj.items()}
    return obj


def is_single_pair(data: Any) -> bool:
    """True for one ``(X, y)`` pair of tensors with equal leading dimensions (a single batch)."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
        and data[0].ndim > 0
        and data[1].ndim > 0
        and data[0].shape[0] == data[1].shape[0]
    )


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def _slice(obj: Any, start: int, stop: int, n: int) -> Any:
    """``obj[start:stop]`` for every tensor with leading dimension n inside ``obj``; others unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.ndim > 0 and obj.shape[0] == n else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_slice(o, start, stop, n) for o in obj)
    if isinstance(obj, Mapping):
        return {k: _slice(v, start, stop, n) for k, v in obj.items()}
    return obj
