"""Gradient graphs kept across Hessian-vector products: the forward linearisation paid for once.

A product H_b·v by double backward costs three passes through the model: the forward pass, the
backward pass that builds g_b = ∇ℓ_b(θ) with its graph (``create_graph=True``), and one backward
through that graph per column, ∂(g_bᵀv)/∂θ = H_b v. The first two do not depend on v. When the
graphs of all batches together fit :data:`GRAPH_SHARE` of the memory budget, the operator builds them
on its first product and keeps them, so every later product pays only the last pass: on ResNet-18
(128 images, 1 CPU thread) an HVP then costs 2.1 gradients instead of 3.1 (figures/bench_scale.md).

The graphs belong to θ and the buffers as they were when built. They are used only while every
parameter and buffer of the model is the same tensor, at the same storage, with the same version
counter (any in-place change, ``load_state_dict`` included, bumps it), and every module's
train/eval flag is unchanged; otherwise they are dropped and rebuilt on the next product. Graphs
are kept only for all batches or none (a shuffling loader must not mix the samples of two passes),
and only in eval mode (train mode restores the BatchNorm buffers after every pass). The data is read
once, on the product that builds them: data that changes from pass to pass (random augmentation) is
then fixed at that pass's draw, which makes H one fixed matrix; ``reuse_graphs=False`` reads it anew
every product.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

#: the cached graphs may take at most this fraction of the memory budget
GRAPH_SHARE = 0.5


def model_state_key(model: nn.Module) -> tuple:
    """What the graphs depend on: identity, storage and version of every parameter and buffer, and
    every module's training flag.
    """
    tensors = itertools.chain(model.parameters(), model.buffers())
    return (
        tuple((id(t), t.data_ptr(), t._version) for t in tensors),
        tuple(m.training for m in model.modules()),
    )


@dataclass
class BatchGraph:
    """One batch's gradient with its graph: ``grads`` = ∇ℓ_b w.r.t. ``params`` (create_graph),
    ``n`` samples, batch ``index``.
    """

    index: int
    n: int
    params: list[torch.Tensor]
    grads: tuple[torch.Tensor, ...]


@dataclass
class GraphCache:
    """The graphs of every batch for one model state (see the module docstring).

    ``begin(key, affordable)`` starts a pass: it returns the kept graphs when ``key`` matches the
    state they were built for, else drops them and (when ``affordable``) collects the new pass's
    graphs through ``offer``; ``end()`` keeps what was collected.
    """

    enabled: bool = True
    key: tuple | None = None
    graphs: list[BatchGraph] | None = None
    _collecting: list[BatchGraph] | None = field(default=None, repr=False)

    def begin(self, key: tuple, affordable: bool) -> list[BatchGraph] | None:
        if self.graphs is not None and key == self.key:
            return self.graphs
        self.clear()
        if self.enabled and affordable:
            self.key, self._collecting = key, []
        return None

    def offer(self, graph: BatchGraph) -> None:
        if self._collecting is not None:
            self._collecting.append(graph)

    def end(self) -> None:
        if self._collecting is not None and self._collecting:
            self.graphs = self._collecting
        self._collecting = None

    def clear(self) -> None:
        self.key, self.graphs, self._collecting = None, None, None

    @property
    def collecting(self) -> bool:
        return self._collecting is not None

    @property
    def kept(self) -> bool:
        return self.graphs is not None
