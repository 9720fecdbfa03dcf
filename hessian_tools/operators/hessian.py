"""The Hessian of a model's mean loss over a whole dataset, as a linear operator.

For the empirical risk f(θ) = (1/N) Σ_b n_b·ℓ_b(θ) of
:class:`~hessian_tools.operators.empirical_risk.EmpiricalRisk` (selected parameters θ, the rest held
fixed; batch-mean losses ℓ_b weighted by their sizes n_b, so an uneven last batch is exact) the
operator represents

    H = ∇²_θ f(θ) = (1/N) Σ_b n_b ∇²ℓ_b(θ).

``matmat(V)`` computes H·V for a block of K columns in ONE pass over the data: per batch the
forward pass and the gradient graph are shared by all K columns, either by torch.func
forward-over-reverse (``vmap`` over ``jvp(grad(ℓ_b))``) or by a batched double backward through
autograd (``autograd.grad(∇ℓ_b, θ, V, is_grads_batched=True)``). Data is streamed: memory does
not grow with N, except that the gradient graphs of all batches are kept across products when
together they fit half the memory budget (``reuse_graphs``; :mod:`.graph_cache`), so that later
products of the double-backward path skip the forward and gradient passes.

Memory. The columns go through the model in chunks, and the chunk comes from a memory budget
(``memory_budget``, by default a quarter of the available memory): on its first product the
operator measures what one more column costs on the first batch and takes as many columns per
chunk as fit, at most ``chunk_size``; a batch that does not fit even one column is split into
micro-batches, with the same exact sample weighting (:mod:`hessian_tools.operators.memory`).
Sums over several batches are kept in float64; the product of data that is one batch is returned
as computed.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import grad, jvp, vjp, vmap

from ..checks import check_choice, check_integer
from ..errors import NondeterminismError, NonFiniteError
from .base import LinearOperator
from .empirical_risk import EmpiricalRisk, check_finite
from .graph_cache import GRAPH_SHARE, BatchGraph, GraphCache, model_state_key
from .memory import ChunkPlanner, PeakMeter, release_freed_memory, resolve_budget, saved_activation_bytes
from .params import flatten

BACKENDS = ("auto", "func", "autograd")
SMALL_BLOCK = 2  # with backend="auto", blocks of at most this many columns use the double backward
# Columns per vmap / batched backward at most (the memory budget may choose fewer). Larger chunks fall
# out of cache: measured per probe at K=64, as multiples of one gradient, unchunked → chunks of 16:
# CNN 2.97 → 1.34, ResNet 4.73 → 2.11, MLP 3.03 → 2.33.
DEFAULT_CHUNK = 16
# backend="auto": vmap is used for blocks only if its second column costs less than this fraction of the
# second column of a shared graph (the lean way); decided by timing products that take at least TIMED_ABOVE_S.
# ResNet-18 (11 M parameters, 128 images, 1 thread): vmap 0.74 s vs 0.58 s per further column, 250 vs 55 MB.
LEAN_BIAS = 0.7
TIMED_ABOVE_S = 0.05
SMALL_SHARE = 1 / 8


def _chunks(columns: int, chunk: int | None):
    """(start, stop) of consecutive column chunks of at most ``chunk`` columns (None: all at once)."""
    step = chunk or max(columns, 1)
    return [(start, min(start + step, columns)) for start in range(0, columns, step)]


class HessianOperator(LinearOperator):
    """H = ∇²_θ of the sample-weighted mean loss over all of ``data`` (see the module docstring).

    Parameters
    ----------
    model, loss_fn, data, params, mode, dtype, device, max_batch_size: as for
        :class:`~hessian_tools.operators.empirical_risk.EmpiricalRisk` (the model is never
        modified; inputs may be tensors, tuples or dicts; ``dtype=torch.float64`` evaluates the model
        in double precision on copies; products are always accumulated over batches in float64).
    backend: ``"auto"`` (torch.func, falling back to autograd when the model cannot be traced),
        ``"func"`` or ``"autograd"``.
    chunk_size: at most this many probe columns are pushed through one vmap/batched backward at
        once (default 16; ``None`` = all K at once); the memory budget may choose fewer.
    memory_budget: bytes the transient memory of one product may take (an int, or a size string
        such as ``"4GB"``, ``"512MB"``, ``"2.5GiB"``); ``"auto"`` (default): a quarter of the memory
        available now (free device memory on CUDA); ``None``: no budget (chunks of ``chunk_size``,
        batches as given). The chosen chunk and micro-batch size are in ``memory_plan``.
    check_determinism: evaluate the first batch twice and refuse the operator if the two losses
        differ (e.g. dropout in train mode): such an "H" is not a fixed matrix.
    reuse_graphs: keep the gradient graphs of all batches across products of the double-backward
        path when, together, they take at most half the memory budget (eval mode only; dropped as
        soon as a parameter or buffer of the model changes): later products then skip the forward
        and gradient passes (:mod:`hessian_tools.operators.graph_cache`). ``graphs.kept`` says
        whether they are kept.
    reducer: for data-parallel use only: an object whose ``sum_block(total, count)`` and
        ``sum_count(n)`` sum the local partial sums over all ranks (see
        :mod:`hessian_tools.operators.distributed`); ``data`` is then this rank's shard and may be
        empty.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Any,
        params=None,
        *,
        mode: str = "eval",
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        chunk_size: int | None = DEFAULT_CHUNK,
        check_determinism: bool = True,
        reducer=None,
        max_batch_size: int | None = None,
        memory_budget: int | str | None = "auto",
        reuse_graphs: bool = True,
    ):
        check_choice("backend", backend, BACKENDS)
        self.chunk_size = None if chunk_size is None else check_integer("chunk_size", chunk_size)
        self.risk = EmpiricalRisk(
            model,
            loss_fn,
            data,
            params,
            mode=mode,
            dtype=dtype,
            device=device,
            allow_empty=reducer is not None,
            max_batch_size=max_batch_size,
        )
        self.reducer = reducer
        self.dim, self.dtype, self.device = self.risk.dim, self.risk.dtype, self.risk.device
        self.hvps = 0  # columns of H·V computed so far
        self.passes = 0  # full passes over the data made by this operator
        # BatchNorm in train mode updates running statistics in place, which torch.func's vmap
        # cannot batch: train mode uses the autograd path unless asked otherwise.
        self.backend = "autograd" if (backend == "auto" and mode == "train") else backend
        self._auto = backend == "auto"
        self._func_strategy = "forward-over-reverse"
        self._cast_model: nn.Module | None = None
        self._graph_is_faster: bool | None = None
        self.graphs = GraphCache(enabled=bool(reuse_graphs) and self.risk.mode == "eval")
        self._cast_key: tuple | None = None
        self.planner = ChunkPlanner(
            resolve_budget(memory_budget, self.device),
            self.risk,
            self.chunk_size,
            self._batch_product,
            self._estimate_costs,
        )
        if check_determinism or self.backend in ("auto", "func"):
            self._probe_first_batch(check_determinism)

    # ------------------------------------------------------------------ what the operator is about
    @property
    def model(self) -> nn.Module:
        return self.risk.model

    @property
    def loss_fn(self) -> Callable:
        return self.risk.loss_fn

    @property
    def mode(self) -> str:
        return self.risk.mode

    @property
    def source(self):
        return self.risk.source

    @property
    def param_names(self) -> list[str]:
        return self.risk.param_names

    @property
    def blocks(self):
        return self.risk.blocks

    @property
    def num_samples(self) -> int:
        """N, the number of samples the mean loss runs over (all ranks together when distributed)."""
        local = self.risk.num_samples
        return int(self.reducer.sum_count(local)) if self.reducer is not None else local

    def flat_parameters(self) -> torch.Tensor:
        """The selected parameters' current values as one flat vector (same order as H)."""
        return self.risk.flat_parameters()

    @property
    def memory_budget(self) -> int | None:
        """The memory budget in bytes (None: none)."""
        return self.planner.budget

    @property
    def memory_plan(self):
        """The :class:`~hessian_tools.operators.memory.MemoryPlan` of the latest product (None before one)."""
        return self.planner.plan

    # ------------------------------------------------------------------ products
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        V = V.to(device=self.device, dtype=self.dtype)
        path = self._path(V.shape[1])
        if path == "func" and self._auto and (self._graphs_fit() or self._shared_graph_is_faster()):
            # kept graphs: a column costs one backward through them, less than a vmapped column (per
            # probe, blocks of 16, in gradients: CNN 1.3 vs 1.5–2.0, ResNet 2.4–2.6 vs 3.2, MLP 2.4 vs 2.5+)
            path, chunk = "autograd", self.planner.loop("autograd")
        else:
            chunk = self.planner.chunk(path, V.shape[1])
        with self.risk.computation_mode():
            if path == "autograd":
                product, batches = self._graph_products(V, chunk)
            else:
                params, fixed = self.risk.parameter_values(), self.risk.fixed_state()
                product = lambda index, inputs, targets: self._batch_hvp_func(
                    params, fixed, inputs, targets, V, index, chunk
                )
                batches = None
            mean = self.risk.weighted_mean(
                product, (self.dim, V.shape[1]), "Hessian-vector product", self.reducer, batches
            )
            self.graphs.end()
        if self.device.type == "cpu":
            release_freed_memory()  # the pass's graph and activations: back to the system, not kept resident
        self.passes += 1
        return mean.to(self.dtype)

    def _path(self, columns: int) -> str:
        """How a block of ``columns`` columns is multiplied: ``"func"`` or ``"autograd"``."""
        # One or two columns: vmap's batching overhead outweighs its gain, and the plain double
        # backward is faster (measured 3× on the small ResNet); both compute the same exact product.
        if self.backend == "autograd" or (self._auto and columns <= SMALL_BLOCK):
            return "autograd"
        return "func"

    def _shared_graph_is_faster(self) -> bool:
        """With ``backend="auto"`` and a budget, for blocks of more than two columns: whether one
        graph per batch with one double backward per column (the leanest way: its columns cost only
        their output) beats vmap. Decided once, from the time the second column adds to a product on
        the first batch by either way; vmap has to be clearly faster (:data:`LEAN_BIAS`), and products
        cheaper than :data:`TIMED_ABOVE_S`, or whose chunks take under :data:`SMALL_SHARE` of the budget,
        keep vmap (their timings are noise; they cost little memory).
        """
        if self._graph_is_faster is None:
            self._graph_is_faster = False
            budget = self.planner.budget
            if budget is not None and self._vmap_block_bytes() > budget * SMALL_SHARE:
                f1 = self.planner.measure("func", 1, 1, timed=True)
                if f1.seconds >= TIMED_ABOVE_S:
                    f2 = self.planner.measure("func", 2, 2, timed=True)
                    a1 = self.planner.measure("autograd", 1, 1, timed=True)
                    a2 = self.planner.measure("autograd", 2, 1, timed=True)
                    self._graph_is_faster = f2.seconds - f1.seconds > LEAN_BIAS * (a2.seconds - a1.seconds)
        return self._graph_is_faster

    def _vmap_block_bytes(self) -> int:
        """What a chunk of the vmap path costs at most (its plan: fixed + chunk·per column)."""
        chunk = self.planner.chunk("func", self.dim if self.chunk_size is None else self.chunk_size)
        plan = self.planner.plans["func"]
        return plan.fixed + chunk * plan.per_column

    def _batch_product(self, path, inputs, targets, index, V, chunk) -> torch.Tensor:
        """H_b·V on one batch by ``path``, ``chunk`` columns at a time, its graph built afresh (the
        memory planner's measuring products; call in computation mode).
        """
        if path == "autograd":
            graph = self._gradient_graph(self._autograd_model(), inputs, targets, index, 0)
            return self._double_backward(graph, V, chunk)
        params, fixed = self.risk.parameter_values(), self.risk.fixed_state()
        return self._batch_hvp_func(params, fixed, inputs, targets, V, index, chunk)

    def _estimate_costs(self, inputs, targets) -> tuple[int, int]:
        """(fixed, per column) bytes of a product on this batch where no peak reading exists: the
        forward and gradient graph hold about twice the saved activations, each column its tangents
        (twice again) and four parameter-sized buffers (the column, its tangent, the product, a copy).
        """
        model = self._autograd_model()
        with torch.enable_grad():
            saved = saved_activation_bytes(lambda: self.risk.module_loss(model, inputs, targets))
        column = self.planner.column_bytes
        return 2 * saved + 2 * column, 2 * saved + 4 * column

    def loss_and_gradient(self) -> tuple[float, torch.Tensor]:
        """The full-data mean loss f(θ) and its gradient ∇f (flat, length ``dim``) in one pass."""

        def loss_and_grad(index, inputs, targets):
            g, loss = grad(self._loss_of(params, fixed, inputs, targets), has_aux=True)(params)
            check_finite(loss, index, "loss")
            return torch.cat([flatten(g[k] for k in self.param_names), loss.reshape(1)])

        with self.risk.computation_mode():
            params, fixed = self.risk.parameter_values(), self.risk.fixed_state()
            total, count = self.risk.weighted_sum(loss_and_grad, torch.zeros(self.dim + 1), "gradient")
        packed = self._mean(total[:, None], count)[:, 0].to(torch.float64)
        return float(packed[-1]), packed[:-1].to(self.dtype)

    def _mean(self, total: torch.Tensor, count: int) -> torch.Tensor:
        """(Σ over ranks of) total / count in the operator's dtype; counts a pass."""
        if self.reducer is not None:
            total, count = self.reducer.sum_block(total, count)
        self.passes += 1
        return (total / count).to(self.dtype)

    def __repr__(self) -> str:
        return (
            f"HessianOperator(dim={self.dim}, blocks={len(self.blocks)}, mode={self.mode!r}, "
            f"backend={self.backend!r}, dtype={self.dtype})"
        )

    # ------------------------------------------------------------------ per-batch products
    def _loss_of(self, params, fixed, inputs, targets) -> Callable:
        """θ ↦ (ℓ_b(θ), ℓ_b(θ)) as a pure function (the loss, and the loss again as aux)."""

        def loss(p):
            value = self.risk.batch_loss(p, fixed, inputs, targets)
            return value, value.detach()

        return loss

    def _batch_hvp_func(
        self, params, fixed, inputs, targets, V: torch.Tensor, index: int, chunk: int | None
    ) -> torch.Tensor:
        grad_fn = grad(self._loss_of(params, fixed, inputs, targets), has_aux=True)
        names = self.param_names
        if self._func_strategy == "forward-over-reverse":

            def hvp(*columns):
                (_, loss), (hv, _) = jvp(grad_fn, (params,), (dict(zip(names, columns)),))
                return tuple(hv[n] for n in names), loss

            def product(cols):
                hv, loss = vmap(hvp)(*cols)
                check_finite(loss[0], index, "loss")
                return hv

        else:  # reverse-over-reverse: one gradient graph, K vector-Jacobian products
            (_, loss), pullback = vjp(grad_fn, params)
            check_finite(loss, index, "loss")

            def hvp(*columns):
                (hv,) = pullback((dict(zip(names, columns)), torch.zeros_like(loss)))
                return tuple(hv[n] for n in names)

            def product(cols):
                return vmap(hvp)(*cols)

        out = torch.empty_like(V)
        for start, stop in _chunks(V.shape[1], chunk):
            # V[:, start:stop] is (dim, k): vmap over its k columns, split into parameter-shaped tangents.
            k = stop - start
            hv = product([V[b.slice, start:stop].T.reshape(k, *b.shape) for b in self.blocks])
            for b, h in zip(self.blocks, hv):
                out[b.slice, start:stop] = h.reshape(k, -1).T
            del hv
        return out

    def _graph_products(self, V: torch.Tensor, chunk: int | None):
        """(per-batch product, batches) of the double-backward path: the kept gradient graphs when
        they are still those of the model's state, else the data, each batch's graph built (and
        kept, when all of them fit the budget) on the way.
        """
        kept = self.graphs.begin(model_state_key(self.model), self._graphs_fit())
        if kept is not None or self.graphs.collecting:
            chunk = 1  # on a kept graph one plain backward per column beats a batched one (and is leanest)
        product = lambda index, graph, _: self._double_backward(graph, V, chunk)  # noqa: E731
        if kept is not None:
            return product, [(g.index, g, None, g.n) for g in kept]
        model = self._autograd_model()

        def built():
            for index, inputs, targets, n in self.risk.batches():
                graph = self._gradient_graph(model, inputs, targets, index, n)
                self.graphs.offer(graph)
                yield index, graph, None, n

        return product, built()

    def _graphs_fit(self) -> bool:
        """Whether the gradient graphs of all the data fit :data:`GRAPH_SHARE` of the budget, taking
        one graph to cost what a one-column product measured on the first batch (n samples) costs,
        scaled by N/n.
        """
        if not self.graphs.enabled or self.planner.budget is None or self.reducer is not None:
            return False
        one = self.planner.measure("autograd", 1, 1)
        if one.batch == 0:
            return False
        return one.bytes * self.risk.num_samples / one.batch <= GRAPH_SHARE * self.planner.budget

    def _gradient_graph(self, model: nn.Module, inputs, targets, index: int, n: int) -> BatchGraph:
        """g_b = ∇ℓ_b w.r.t. the selected parameters of ``model``, with its graph (create_graph)."""
        selected = set(self.param_names)
        params = [p for name, p in model.named_parameters() if name in selected]  # model order = flat order
        with torch.enable_grad():
            loss = self.risk.module_loss(model, inputs, targets)
            check_finite(loss, index, "loss")
            grads = torch.autograd.grad(loss, params, create_graph=True)
        return BatchGraph(index, n, params, grads)

    def _double_backward(self, graph: BatchGraph, V: torch.Tensor, chunk: int | None) -> torch.Tensor:
        """H_b·V = ∂(g_bᵀV)/∂θ by backward passes through the gradient graph, ``chunk`` columns per
        batched pass (one column: a plain backward, no batching machinery).
        """
        out = torch.empty_like(V)
        with torch.enable_grad():
            for start, stop in _chunks(V.shape[1], chunk):
                k = stop - start
                if k > 1:
                    try:
                        rows = [V[b.slice, start:stop].T.reshape(k, *b.shape) for b in self.blocks]
                        hv = torch.autograd.grad(
                            graph.grads, graph.params, rows, retain_graph=True, is_grads_batched=True
                        )
                        for b, h in zip(self.blocks, hv):
                            out[b.slice, start:stop] = h.detach().reshape(k, -1).T
                        continue
                    except RuntimeError:
                        pass  # some ops have no batching rule: one backward per column
                for j in range(start, stop):
                    column = [V[b.slice, j].reshape(b.shape) for b in self.blocks]
                    hv = torch.autograd.grad(graph.grads, graph.params, column, retain_graph=True)
                    for b, h in zip(self.blocks, hv):
                        out[b.slice, j] = h.detach().reshape(-1)
        return out

    def _autograd_model(self) -> nn.Module:
        """The model the autograd backend differentiates: the model itself, or a copy in the
        computation dtype refreshed with the current weights and flags.
        """
        if self.risk.input_dtype is None:
            return self.model
        if self._cast_model is None:
            self._cast_model = copy.deepcopy(self.model).to(self.dtype)
        key = model_state_key(self.model)
        if key != self._cast_key:  # refreshing bumps the copy's versions, which a kept graph checks
            with torch.no_grad():
                for mine, theirs in zip(
                    self._cast_model.state_dict().values(), self.model.state_dict().values()
                ):
                    mine.copy_(theirs)
            for mine, theirs in zip(self._cast_model.modules(), self.model.modules()):
                mine.training = theirs.training
            self._cast_key = key
        return self._cast_model

    # ------------------------------------------------------------------ construction checks
    def _probe_first_batch(self, check_determinism: bool) -> None:
        """Pick the backend (auto) and check determinism on the first batch."""
        first = next(self.risk.batches(), None)
        if first is None:  # an empty shard (only allowed with a reducer): nothing to probe
            return
        index, inputs, targets, _ = first
        with self.risk.computation_mode():
            params, fixed = self.risk.parameter_values(), self.risk.fixed_state()
            if check_determinism:
                loss = self._loss_of(params, fixed, inputs, targets)
                first_loss, _ = loss(params)
                second_loss, _ = loss(params)
                check_finite(first_loss, index, "loss")
                if not torch.equal(first_loss, second_loss):
                    raise NondeterminismError(
                        f"two passes over batch {index} gave different losses ({float(first_loss):.10g} vs "
                        f"{float(second_loss):.10g}): the model is nondeterministic in mode={self.mode!r} "
                        f"(dropout in train mode?); use mode='eval'"
                    )
            if self.backend in ("auto", "func"):
                self._select_func_strategy(params, fixed, inputs, targets, index)

    def _select_func_strategy(self, params, fixed, inputs, targets, index: int) -> None:
        """Try torch.func forward-over-reverse on a random probe, then reverse-over-reverse (some
        losses, e.g. mse_loss in torch 2.x, break forward-mode AD), then (auto only) autograd.
        """
        probe = torch.rand(self.dim, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5
        probe = probe.to(device=self.device, dtype=self.dtype)
        failure = None
        for strategy in ("forward-over-reverse", "reverse-over-reverse"):
            self._func_strategy = strategy
            try:
                meter = PeakMeter(self.device) if self.planner.budget is not None else None
                with meter or contextlib.nullcontext():
                    self._batch_hvp_func(params, fixed, inputs, targets, probe, index, 1)
                self.planner.record("func", 1, 1, meter.peak if meter is not None else None)
                self.backend = "func"
                return
            except (NonFiniteError, NondeterminismError):
                raise
            except Exception as exc:  # noqa: BLE001 - a tracing failure selects the next strategy
                failure = exc
        if self.backend == "func":
            first_line = str(failure).splitlines()[0][:160] if str(failure) else type(failure).__name__
            raise TypeError(
                f"torch.func cannot differentiate this model twice ({first_line}); use backend='autograd'"
            )
        self.backend = "autograd"
