"""Operator wrappers that watch the products an estimator asks for: a log that can be replayed
(to resume an interrupted computation with exactly the same numbers) and a progress monitor.

Both forward every other attribute (``param_names``, ``num_samples``, ``loss_and_gradient``, ...)
to the wrapped operator, so an estimator sees the operator it was given.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import torch

from ..errors import HessianToolsError
from .base import LinearOperator

__all__ = ["RecordingOperator", "MonitoredOperator", "ReplayMismatchError", "block_fingerprint"]


class ReplayMismatchError(HessianToolsError, ValueError):
    """A replayed product was asked for with another input block than the one recorded."""


def block_fingerprint(V: torch.Tensor) -> str:
    """SHA-256 of a block's shape, dtype and exact bytes: equal only for bit-identical blocks."""
    data = V.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    header = f"{tuple(V.shape)}|{V.dtype}|".encode()
    return hashlib.sha256(header + data).hexdigest()


class _Wrapper(LinearOperator):
    def __init__(self, op: LinearOperator):
        self.op = op
        self.dim, self.dtype, self.device = op.dim, op.dtype, op.device
        self.hvps = 0

    def __getattr__(self, name: str):
        if name == "op":  # not yet set (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.op, name)


class RecordingOperator(_Wrapper):
    """``op`` that records every ``matmat``: ``log`` holds ``(fingerprint of V, A·V)`` in call order.

    Given a ``log`` (from an earlier, interrupted run), the first ``len(log)`` products are
    replayed instead of computed: the i-th call must come with the very block recorded i-th
    (checked by :func:`block_fingerprint`; :class:`ReplayMismatchError` otherwise), and returns the
    recorded product bit for bit. A deterministic estimator with the same seed then takes the same
    path as the uninterrupted run and ends with the same numbers. ``computed`` counts the columns
    actually multiplied by ``op`` (``hvps`` counts replayed ones too). ``on_record(self)`` is called
    after every newly computed product (e.g. to save the log now and then).
    """

    def __init__(self, op: LinearOperator, log: list | None = None, on_record: Callable | None = None):
        super().__init__(op)
        self.log: list[tuple[str, torch.Tensor]] = list(log or [])
        self.cursor = 0
        self.computed = 0
        self.on_record = on_record

    @property
    def replaying(self) -> bool:
        return self.cursor < len(self.log)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        fingerprint = block_fingerprint(V)
        if self.replaying:
            expected, product = self.log[self.cursor]
            if fingerprint != expected:
                raise ReplayMismatchError(
                    f"product {self.cursor + 1} of the recorded log was computed for another input block"
                )
            self.cursor += 1
            return product.to(self.device).clone()
        product = self.op.matmat(V)
        self.log.append((fingerprint, product.detach().to("cpu").clone()))
        self.cursor += 1
        self.computed += V.shape[1]
        if self.on_record is not None:
            self.on_record(self)
        return product


class MonitoredOperator(_Wrapper):
    """``op`` that reports after its products: ``report(done, rate, seconds_left)`` with the columns
    multiplied so far, the rate in HVPs/s since the first call, and an estimate of the time until
    ``budget`` HVPs (None without a budget or a rate yet). ``done`` starts at ``offset`` (products
    already spent elsewhere, e.g. replayed from a log; they do not enter the rate). Reports come at
    most every ``every`` seconds (and after the first product).
    """

    def __init__(
        self,
        op: LinearOperator,
        report: Callable,
        budget: int | None = None,
        every: float = 2.0,
        offset: int = 0,
    ):
        super().__init__(op)
        self.report, self.budget, self.every, self.offset = report, budget, float(every), int(offset)
        self._start: float | None = None
        self._last: float | None = None

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        now = time.perf_counter()
        if self._start is None:
            self._start = now
        product = self.op.matmat(V)
        own = self.hvps + V.shape[1]
        now = time.perf_counter()
        if self._last is None or now - self._last >= self.every:
            self._last = now
            elapsed = now - self._start
            rate = own / elapsed if elapsed > 0 else None
            done = self.offset + own
            left = None if rate is None or self.budget is None else max(self.budget - done, 0) / rate
            self.report(done, rate, left)
        return product
