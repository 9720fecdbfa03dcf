"""Helpers shared by the estimators: operator access in float64 and per-block reductions."""

from __future__ import annotations

import torch

from ..checks import check_open_unit_interval
from ..operators.adapters import as_operator
from ..operators.base import LinearOperator
from ..operators.params import block_numbers


class CountingOperator(LinearOperator):
    """Wrap an operator for one estimator call: count the HVPs it spends, and hand products back in
    float64 (V is cast to the operator's dtype for the product).
    """

    def __init__(self, op):
        self.op = as_operator(op)
        self.dim = int(self.op.dim)
        self.dtype = torch.float64
        self.hvps = 0
        self.device = getattr(self.op, "device", torch.device("cpu"))
        self.blocks = getattr(self.op, "blocks", None)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.op.matmat(V.to(device=self.device, dtype=self.op.dtype)).to(torch.float64)


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
