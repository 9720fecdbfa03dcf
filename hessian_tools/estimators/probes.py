"""Random probe vectors, drawn from an explicit ``torch.Generator`` (never the global RNG)."""

from __future__ import annotations

import torch


def rademacher(
    dim: int, k: int, generator: torch.Generator, dtype=torch.float64, device="cpu"
) -> torch.Tensor:
    """(dim, k) matrix of independent ±1 entries: E[z zᵀ] = I and Var(zᵀAz) = 2(‖A‖_F² − Σ A_ii²)."""
    signs = torch.randint(0, 2, (dim, k), generator=generator, dtype=torch.int8)
    return (signs.to(dtype) * 2 - 1).to(device)


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
