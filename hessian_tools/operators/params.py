"""Parameter selection and the named blocks of the flat parameter vector.

A selection is a list of (name, tensor) pairs; the flat vector concatenates them in that order.
Each :class:`ParameterBlock` records one tensor's slice of the flat vector, so per-layer results
(block traces, per-layer bounds) can be read off any flat vector.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import HessianToolsError


class ParameterSelectionError(HessianToolsError, ValueError):
    """A parameter selection that is malformed or matches nothing."""


@dataclasses.dataclass(frozen=True)
class ParameterBlock:
    """One parameter tensor's place in the flat vector: ``flat[start:stop].view(shape)``."""

    name: str
    start: int
    stop: int
    shape: tuple

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)


def select_parameters(model: nn.Module, params=None) -> list[tuple[str, nn.Parameter]]:
    """Resolve a parameter selection into ``[(name, parameter), ...]`` in model order.

    ``params`` may be ``None`` (all parameters with ``requires_grad``), a regular expression
    (``str``, matched with ``re.search`` against the dotted names), a list of names, a list of
    modules (all their trainable parameters), or a list of parameter tensors of ``model``.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        chosen = named
    elif isinstance(params, str):
        try:
            pattern = re.compile(params)
        except re.error as exc:
            raise ParameterSelectionError(f"parameter regex {params!r} is invalid: {exc}") from None
        chosen = [(n, p) for n, p in named if pattern.search(n)]
        if not chosen:
            raise ParameterSelectionError(
                f"parameter regex {params!r} matches none of the {len(named)} trainable parameters "
                f"(first names: {', '.join(n for n, _ in named[:4])})"
            )
    elif isinstance(params, nn.Module):
        return select_parameters(model, [params])
    elif isinstance(params, Iterable):
        items = list(params)
        if not items:
            raise ParameterSelectionError("the parameter selection is an empty list")
        if all(isinstance(x, str) for x in items):
            lookup = dict(named)
            unknown = [x for x in items if x not in lookup]
            if unknown:
                raise ParameterSelectionError(
                    f"unknown or frozen parameter name(s): {', '.join(unknown[:4])}"
                )
            wanted = set(items)
            chosen = [(n, p) for n, p in named if n in wanted]
        elif all(isinstance(x, nn.Module) for x in items):
            ids = {id(p) for m in items for p in m.parameters() if p.requires_grad}
            chosen = [(n, p) for n, p in named if id(p) in ids]
        elif all(isinstance(x, torch.Tensor) for x in items):
            ids = {id(p) for p in items}
            chosen = [(n, p) for n, p in named if id(p) in ids]
            if len(chosen) != len(ids):
                raise ParameterSelectionError(
                    "some selected tensors are not trainable parameters of the model"
                )
        else:
            raise ParameterSelectionError(
                "a parameter selection list must hold only names, modules or parameters"
            )
        if not chosen:
            raise ParameterSelectionError("the parameter selection matches no trainable parameter")
    else:
        raise ParameterSelectionError(
            "params must be None, a regex string, or a list of names/modules/parameters, "
            f"got {type(params).__name__}"
        )
    return chosen


def make_blocks(named: Sequence[tuple[str, torch.Tensor]]) -> tuple[ParameterBlock, ...]:
    blocks, start = [], 0
    for name, tensor in named:
        stop = start + tensor.numel()
        blocks.append(ParameterBlock(name, start, stop, tuple(tensor.shape)))
        start = stop
    return tuple(blocks)


def block_numbers(blocks: Sequence[ParameterBlock], dim: int, device=None) -> torch.Tensor:
    """A (dim,) long tensor holding, for every coordinate of the flat vector, the number of its block."""
    index = torch.empty(dim, dtype=torch.long, device=device)
    for number, block in enumerate(blocks):
        index[block.start : block.stop] = number
    return index


def flatten(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector (row-major)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def frozen_state(
    model: nn.Module, selected, dtype: torch.dtype | None = None, copy: bool = False
) -> dict[str, torch.Tensor]:
    """The parameters NOT in ``selected`` and all buffers, detached, as ``functional_call`` expects.

    Floating tensors are cast to ``dtype`` when given; ``copy=True`` clones them (in train mode
    BatchNorm updates its running statistics in place, which must not reach the real model).
    """
    selected = set(selected)
    out = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name in selected:
            continue
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name] = tensor.clone() if copy else tensor
    return out


@contextlib.contextmanager
def computation_mode(model: nn.Module, mode: str):
    """Put ``model`` in eval (``mode="eval"``) or train mode for a computation; afterwards restore
    every module's training flag and, in train mode, every buffer (BatchNorm running statistics
    move in train mode and must not leak into the caller's model).
    """
    flags = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()] if mode == "train" else []
    model.train(mode == "train")
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
