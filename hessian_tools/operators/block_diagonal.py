"""Products with the diagonal blocks of H, for vectors that each live in one block.

For a column v supported on block i (zero outside it), ``H_ii v = P_i H v`` where P_i keeps the
coordinates of block i. :class:`BlockColumnsOperator` applies that to every column of a block V
at once — each column restricted to the block it lives in — so K per-layer products cost ONE
data pass of the full operator instead of K passes of K per-layer operators. Lanczos started at
such a column stays in its block, so batched Lanczos over these columns runs K independent
per-layer processes (used for the per-layer quadratic forms v_iᵀ f(H_ii) v_i).
"""

from __future__ import annotations

import torch

from .base import LinearOperator
from .params import block_numbers


class BlockColumnsOperator(LinearOperator):
    """``matmat(V)[:, j] = P_b H V[:, j]`` where b is the block column j is supported on."""

    def __init__(self, op, blocks):
        self.op = op
        self.dim = int(op.dim)
        self.dtype = getattr(op, "dtype", torch.float64)
        self.device = getattr(op, "device", torch.device("cpu"))
        self.blocks = tuple(blocks)
        self.hvps = 0
        self._index = block_numbers(self.blocks, self.dim)

    def block_of_columns(self, V: torch.Tensor) -> torch.Tensor:
        """The block each column is supported on; refuses columns that straddle blocks."""
        support = torch.zeros(len(self.blocks), V.shape[1], dtype=torch.float64)
        support.index_add_(0, self._index, (V.detach().cpu() != 0).to(torch.float64))
        owners = (support > 0).sum(0)
        if bool((owners > 1).any()):
            raise ValueError("each column of V must be supported on a single parameter block")
        return support.argmax(0)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        owner = self.block_of_columns(V)
        mask = (self._index[:, None] == owner[None, :]).to(device=V.device)
        return self.op.matmat(V) * mask
