"""Random probe vectors, drawn from an explicit ``torch.Generator`` (never the global RNG)."""
from __future__ import annotations

import torch


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A CPU generator seeded with ``seed`` (0 when None). Probes are drawn on the CPU and then
    moved, so the same seed gives the same probes on every device and every rank."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(0 if seed is None else int(seed))
    return generator


def rademacher(dim: int, k: int, generator: torch.Generator, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """(dim, k) matrix of independent ±1 entries: E[z zᵀ] = I and Var(zᵀAz) = 2(‖A‖_F² − Σ A_ii²)."""
    signs = torch.randint(0, 2, (dim, k), generator=generator, dtype=torch.int8)
    return (signs.to(dtype) * 2 - 1).to(device)


def gaussian(dim: int, k: int, generator: torch.Generator, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """(dim, k) matrix of independent N(0, 1) entries."""
    return torch.randn(dim, k, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
