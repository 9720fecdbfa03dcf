"""Normalise the data argument into a re-iterable stream of ``(inputs, targets, batch_size)``.

The operator never holds the whole dataset: it streams batches on every pass, so memory stays
flat as the data grows. Each batch is weighted by its size, so an uneven last batch is exact.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from ..errors import DataError


def _is_tensorlike(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def batch_size_of(inputs: Any, targets: Any) -> int:
    """Number of samples in a batch: the leading dimension of the targets (else of the inputs)."""
    for obj in (targets, inputs):
        if isinstance(obj, torch.Tensor) and obj.ndim > 0:
            return int(obj.shape[0])
        if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor) and obj[0].ndim > 0:
            return int(obj[0].shape[0])
    raise DataError("cannot tell the batch size: targets and inputs have no leading dimension")


class BatchSource:
    """Wrap ``data`` — a re-iterable of ``(inputs, targets)`` batches or one ``(X, y)`` pair.

    Iterating yields ``(index, inputs, targets, n)``. ``total`` (the number of samples N) is
    counted on the first pass; the mean loss over all samples is ``Σ_b n_b·loss_b / N``.
    Empty data is an error unless ``allow_empty`` (one rank's shard of a distributed operator may
    hold no batch at all; it then contributes a zero sum and a zero count).
    """

    def __init__(self, data: Any, allow_empty: bool = False):
        if isinstance(data, (tuple, list)) and len(data) == 2 and _is_tensorlike(data[0]) and _is_tensorlike(data[1]):
            if data[0].ndim > 0 and data[1].ndim > 0 and data[0].shape[0] == data[1].shape[0]:
                data = [tuple(data)]
        if isinstance(data, Iterator):
            raise DataError(
                "data is a one-shot iterator; pass a re-iterable (a list of batches or a DataLoader): "
                "every Hessian-vector product makes a full pass over it"
            )
        try:
            iter(data)
        except TypeError:
            raise DataError(f"data must be an (X, y) pair or an iterable of (inputs, targets) batches, got {type(data).__name__}") from None
        self.data = data
        self.allow_empty = allow_empty
        self._total: int | None = None
        self._num_batches: int | None = None

    def __iter__(self):
        total, count = 0, 0
        for index, batch in enumerate(self.data):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise DataError(f"batch {index} is not an (inputs, targets) pair")
            inputs, targets = batch[0], batch[1]
            n = batch_size_of(inputs, targets)
            if n == 0:
                continue
            total += n
            count += 1
            yield index, inputs, targets, n
        if count == 0 and not self.allow_empty:
            raise DataError("the data is empty: no batch with at least one sample")
        self._total, self._num_batches = total, count

    @property
    def total(self) -> int:
        if self._total is None:
            for _ in self:
                pass
        return self._total

    @property
    def num_batches(self) -> int:
        if self._num_batches is None:
            self.total
        return self._num_batches


def move_to(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move tensors (and tuples/lists/dicts of them) to ``device``; cast floating tensors to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: move_to(v, device, dtype) for k, v in obj.items()}
    return obj
