"""Helpers shared by the estimators: operator access (in float64, or in the operator's own precision
for estimators whose stored bases scale with the dimension) and per-block reductions.
"""

from __future__ import annotations

import torch

from ..checks import check_open_unit_interval
from ..operators.adapters import as_operator
from ..operators.base import LinearOperator
from ..operators.params import block_numbers


def working_dtype(dtype) -> torch.dtype:
    """The precision an estimator stores dim-sized bases in for an operator of ``dtype``: float64 for
    float64 (and non-torch) operators, float32 for float32 and half-precision ones. An operator's
    products carry no more precision than its dtype, so storing them in it loses nothing but memory.
    """
    if dtype == torch.float64 or not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return torch.float64
    return torch.float32


class CountingOperator(LinearOperator):
    """Wrap an operator for one estimator call: count the HVPs it spends, and hand products back in
    float64 (V is cast to the operator's dtype for the product). With ``native=True`` products come
    back in :func:`working_dtype` of the operator instead (float32 for a float32 model), for
    estimators that keep dim × m bases.
    """

    def __init__(self, op, native: bool = False):
        self.op = as_operator(op)
        self.dim = int(self.op.dim)
        self.dtype = working_dtype(self.op.dtype) if native else torch.float64
        self.hvps = 0
        self.device = getattr(self.op, "device", torch.device("cpu"))
        self.blocks = getattr(self.op, "blocks", None)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.op.matmat(V.to(device=self.device, dtype=self.op.dtype)).to(self.dtype)


#: bytes of one block of probe columns an estimator streams through the operator at a time (the
#: block and its product each take this much; at least one column, at most the estimator's block)
STREAM_BYTES = 1 << 28


def columns_per_pass(H, most: int) -> int:
    """How many probe columns of ``H`` (a :class:`CountingOperator`) to multiply at once: the most whose
    block fits :data:`STREAM_BYTES` in ``H``'s precision, between 1 and ``most``. Splitting a block of
    probes this way changes neither the probes nor the estimates, only the memory they take.
    """
    column = H.dim * torch.empty((), dtype=H.dtype).element_size()
    return max(1, min(int(most), STREAM_BYTES // max(column, 1)))


def block_index(blocks, dim: int, device=None) -> tuple[list[str], torch.Tensor] | tuple[None, None]:
    """Names and a (dim,) tensor mapping each coordinate to its block number."""
    if not blocks:
        return None, None
    return [b.name for b in blocks], block_numbers(blocks, dim, device)


def block_sums(values: torch.Tensor, index: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """(dim, K) → (n_blocks, K): the sum of each block's rows (one scatter, no Python loop)."""
    out = torch.zeros(n_blocks, values.shape[1], dtype=values.dtype, device=values.device)
    return out.index_add_(0, index, values)


def check_rtol(rtol) -> float | None:
    """A relative tolerance in (0, 1), or None (no tolerance: a fixed budget)."""
    return None if rtol is None else check_open_unit_interval("rtol", rtol)
