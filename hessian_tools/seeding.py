"""Seeds and generators: every random draw of the package comes from an explicit ``torch.Generator``.

:func:`seeded_generator` is the one way to turn a seed into random numbers. The generator lives on
the CPU (draws are moved to the operator's device afterwards), so the same seed gives the same
draws on every device and on every rank of a distributed run. ``seed=None`` means "pick a fresh
seed": one is drawn from the operating system's entropy and *returned*, so a result can always
record the seed that reproduces it.
"""

from __future__ import annotations

import secrets

import torch

from .checks import check_integer

#: seeds are drawn below this bound (torch accepts 64-bit seeds; 63 bits keep them JSON-safe integers)
MAX_SEED = 2**63


def resolve_seed(seed: int | None) -> int:
    """``seed`` as a non-negative int, or a fresh one drawn from OS entropy when ``seed`` is None."""
    if seed is None:
        return secrets.randbelow(MAX_SEED)
    return check_integer("seed", seed, 0)


def seeded_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """A CPU ``torch.Generator`` seeded with ``seed`` (see :func:`resolve_seed`) and the seed used."""
    seed = resolve_seed(seed)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator, seed
