"""Random probe vectors, drawn from an explicit ``torch.Generator`` (never the global RNG)."""

from __future__ import annotations

import torch


def rademacher(
    dim: int, k: int, generator: torch.Generator, dtype=torch.float64, device="cpu"
) -> torch.Tensor:
    """(dim, k) matrix of independent ±1 entries: E[z zᵀ] = I and Var(zᵀAz) = 2(‖A‖_F² − Σ A_ii²)."""
    signs = torch.randint(0, 2, (dim, k), generator=generator, dtype=torch.int8)
    return (signs.to(dtype) * 2 - 1).to(device)


#: entries per row chunk when a block of signs is drawn in pieces (:func:`rademacher_blocks`)
_ROW_CHUNK_ENTRIES = 1 << 24


def rademacher_blocks(
    dim: int, k: int, generator: torch.Generator, step: int, dtype=torch.float64, device="cpu"
):
    """The (dim, k) matrix :func:`rademacher` would draw, as consecutive column blocks of at most
    ``step`` columns: yields ``(start, stop, Z[:, start:stop])``, and leaves ``generator`` where one
    draw of the whole matrix leaves it. Only one block is held at a time: its signs are drawn again
    for each block from the saved generator state, in row chunks (the stream is the same however
    the rows are chunked), keeping the block's columns.
    """
    if k <= step:
        yield 0, k, rademacher(dim, k, generator, dtype, device)
        return
    state = generator.get_state()
    rows = max(1, _ROW_CHUNK_ENTRIES // k)
    for start in range(0, k, step):
        stop = min(start + step, k)
        generator.set_state(state)
        block = torch.empty(dim, stop - start, dtype=dtype)
        for first in range(0, dim, rows):
            signs = torch.randint(0, 2, (min(rows, dim - first), k), generator=generator, dtype=torch.int8)
            block[first : first + signs.shape[0]] = signs[:, start:stop].to(dtype) * 2 - 1
        yield start, stop, block.to(device)


def gaussian(dim: int, k: int, generator: torch.Generator, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """(dim, k) matrix of independent N(0, 1) entries."""
    return torch.randn(dim, k, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


def gaussian_rows(generator: torch.Generator, dim: int, count: int) -> torch.Tensor:
    """``count`` standard normal vectors of length ``dim`` as a (count, dim) float64 CPU tensor, one
    ``randn(dim)`` call each, so the stream does not depend on how the draws are grouped into blocks.
    """
    if count == 0:
        return torch.zeros(0, dim, dtype=torch.float64)
    return torch.stack([torch.randn(dim, generator=generator, dtype=torch.float64) for _ in range(count)])
