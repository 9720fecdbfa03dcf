"""Random probe vectors, drawn from an explicit ``torch.Generator`` (never the global RNG)."""

from __future__ import annotations

import torch


def rademacher(
    dim: int, k: int, generator: torch.Generator, dtype=torch.float64, device="cpu"
) -> torch.Tensor:
    """(dim, k) matrix of independent ±1 entries: E[z zᵀ] = I and Var(zᵀAz) = 2(‖A‖_F² − Σ A_ii²)."""
    signs = torch.randint(0, 2, (dim, k), generator=generator, dtype=torch.int8)
    return (signs.to(dtype) * 2 - 1).to(device)


#: entries per row chunk of signs drawn and packed by :func:`rademacher_blocks` (small: its temporaries add
#: to the peak)
_PACK_CHUNK_ENTRIES = 1 << 20


def rademacher_blocks(
    dim: int, k: int, generator: torch.Generator, step: int, dtype=torch.float64, device="cpu"
):
    """The (dim, k) matrix :func:`rademacher` would draw, as consecutive column blocks of at most
    ``step`` columns: yields ``(start, stop, Z[:, start:stop])``, and leaves ``generator`` where one
    draw of the whole matrix leaves it. Only one block is held at a time: the signs are drawn once,
    in row chunks (the stream is the same however the rows are chunked), and kept packed eight rows
    to a byte (dim·k/8 bytes); each block unpacks its columns.
    """
    if k <= step:
        yield 0, k, rademacher(dim, k, generator, dtype, device)
        return
    rows = max(8, _PACK_CHUNK_ENTRIES // k // 8 * 8)  # a multiple of 8: chunks pack into whole bytes
    shifts = torch.arange(8, dtype=torch.uint8)[:, None]
    packed = torch.zeros(-(-dim // 8), k, dtype=torch.uint8)  # bit b of byte i: the sign of row 8i + b
    for first in range(0, dim, rows):
        signs = torch.randint(0, 2, (min(rows, dim - first), k), generator=generator, dtype=torch.int8)
        count = signs.shape[0] // 8
        bits = signs[: 8 * count].view(count, 8, k).to(torch.uint8) << shifts
        packed[first // 8 : first // 8 + count] = bits.sum(1, dtype=torch.uint8)  # distinct bits: an OR
        for b, row in enumerate(signs[8 * count :]):  # the last few rows of the matrix
            packed[first // 8 + count] |= row.to(torch.uint8) << b
    for start in range(0, k, step):
        stop = min(start + step, k)
        block = torch.empty(dim, stop - start, dtype=dtype)
        for first in range(0, dim, rows):
            n = min(rows, dim - first)
            part = packed[first // 8 : (first + n + 7) // 8, start:stop]
            bits = (part[:, None, :] >> shifts) & 1  # (bytes, 8, columns)
            block[first : first + n] = bits.reshape(-1, stop - start)[:n].to(dtype) * 2 - 1
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
