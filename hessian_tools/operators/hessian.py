"""The Hessian of a model's mean loss over a whole dataset, as a linear operator.

For parameters θ (the selected ones; the rest are held fixed) and a dataset split into batches
B_1..B_m of sizes n_1..n_m with N = Σ n_b samples, the operator represents

    H = ∇²_θ L(θ),   L(θ) = (1/N) Σ_b n_b · ℓ_b(θ),

where ``ℓ_b = loss_fn(model(inputs_b), targets_b)`` is the *mean* loss of batch b. Weighting by
n_b makes an uneven last batch exact (averaging the batch Hessians with equal weights is not).

``matmat(V)`` computes H·V for a block of K columns in ONE pass over the data: per batch the
forward pass and the gradient graph are shared by all K columns, either by torch.func
forward-over-reverse (``vmap`` over ``jvp(grad(ℓ_b))``) or by a batched double backward through
autograd (``autograd.grad(∇ℓ_b, θ, V, is_grads_batched=True)``). Data is streamed: memory does
not grow with N.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from ..errors import NondeterminismError, NonFiniteError
from .adapters import _check_block, _check_vector, to_scipy
from .data_source import BatchSource, move_to
from .params import ParameterBlock, computation_mode, flatten, frozen_state, make_blocks, select_parameters

BACKENDS = ("auto", "func", "autograd")
SMALL_BLOCK = 2  # with backend="auto", blocks of at most this many columns use the double backward
# Columns per vmap / batched backward. Larger chunks fall out of cache: measured per probe at K=64,
# as multiples of one gradient, unchunked → chunks of 16: CNN 2.97 → 1.34, ResNet 4.73 → 2.11, MLP 3.03 → 2.33.
DEFAULT_CHUNK = 16
MODES = ("eval", "train")


class HessianOperator:
    """H = ∇²_θ of the sample-weighted mean loss over all of ``data`` (see module docstring).

    Parameters
    ----------
    model: the ``nn.Module``; it is not modified (its train/eval flags and, in train mode, its
        buffers are restored after every pass).
    loss_fn: ``loss_fn(outputs, targets)`` → the *batch mean* loss (a scalar tensor).
    data: a re-iterable of ``(inputs, targets)`` batches (list, DataLoader) or one ``(X, y)`` pair.
    params: ``None`` (all trainable), a regex, names, modules or parameter tensors.
    mode: ``"eval"`` (default: BatchNorm uses running statistics, dropout off) or ``"train"``.
    backend: ``"auto"`` (torch.func, falling back to autograd when the model cannot be traced),
        ``"func"`` or ``"autograd"``.
    dtype: computation dtype; ``torch.float64`` evaluates the model in double precision (on a
        copy of the parameters). Products are always accumulated over batches in float64.
    chunk_size: at most this many probe columns are pushed through one vmap/batched backward at
        once (default 16: faster and bounded memory; ``None`` = all K at once).
    check_determinism: evaluate the first batch twice and refuse the operator if the two losses
        differ (e.g. dropout in train mode): such an "H" is not a fixed matrix.
    reducer: for data-parallel use, an object whose ``sum_block(total, count)`` and
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
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(outputs, targets) -> scalar batch-mean loss")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
        module = getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model
        self.model = module
        self.loss_fn = loss_fn
        self.source = BatchSource(data, allow_empty=reducer is not None)
        self.mode = mode
        self.chunk_size = chunk_size
        self.reducer = reducer
        named = select_parameters(module, params)
        self.param_names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self.blocks: tuple[ParameterBlock, ...] = make_blocks(named)
        self.dim = self.blocks[-1].stop
        self.device = torch.device(device) if device is not None else self._params[0].device
        self.dtype = dtype if dtype is not None else self._params[0].dtype
        if not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating point dtype, got {self.dtype}")
        # BatchNorm in train mode updates running statistics in place, which torch.func's vmap
        # cannot batch: train mode uses the autograd path unless asked otherwise.
        self.backend = "autograd" if (backend == "auto" and mode == "train") else backend
        self._auto = backend == "auto"
        self._func_strategy = "forward-over-reverse"
        self.passes = 0  # full passes over the data made by this operator
        self.hvps = 0  # columns of H·V computed so far
        if check_determinism or self.backend in ("auto", "func"):
            self._probe_first_batch(check_determinism)

    # ------------------------------------------------------------------ public protocol
    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    @property
    def num_samples(self) -> int:
        """N, the number of samples the mean loss runs over (all ranks together when distributed)."""
        local = self.source.total
        return int(self.reducer.sum_count(local)) if self.reducer is not None else local

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector of length ``dim``."""
        return self.matmat(_check_vector(v, self.dim)[:, None])[:, 0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """H V for V of shape (dim, K): one pass over the data for all K columns."""
        V = _check_block(V, self.dim)
        V = V.to(device=self.device, dtype=self.dtype)
        K = V.shape[1]
        if K == 0:
            return V.clone()
        total = torch.zeros(self.dim, K, dtype=torch.float64, device=self.device)
        count = 0
        # One or two columns: vmap's batching overhead outweighs its gain, and the plain double
        # backward is faster (measured 3× on the small ResNet); both compute the same exact product.
        use_autograd = self.backend == "autograd" or (self._auto and K <= SMALL_BLOCK)
        with self._computation_mode():
            params = self._param_values()
            if use_autograd:
                self._sync_autograd_model()
            for index, inputs, targets, n in self.source:
                inputs = move_to(inputs, self.device, self._input_dtype)
                targets = move_to(targets, self.device)
                hv = self._batch_hvp(params, inputs, targets, V, index, use_autograd)
                total.add_(hv.to(torch.float64), alpha=float(n))
                count += n
        if self.reducer is not None:
            total, count = self.reducer.sum_block(total, count)
        self.passes += 1
        self.hvps += K
        return (total / count).to(self.dtype)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out)."""
        return to_scipy(self)

    def dense(self, max_dim: int = 20000, block: int = 256) -> torch.Tensor:
        """The full (dim × dim) matrix, built ``block`` columns per data pass (small models only)."""
        if self.dim > max_dim:
            raise ValueError(f"dense() would build a {self.dim}×{self.dim} matrix; raise max_dim above {max_dim} if you mean it")
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        cols = [self.matmat(eye[:, i : i + block]) for i in range(0, self.dim, block)]
        H = torch.cat(cols, dim=1)
        return (H + H.T) / 2

    def flat_parameters(self) -> torch.Tensor:
        """The selected parameters' current values as one flat vector (same order as H)."""
        return flatten(p.detach() for p in self._params).to(self.dtype)

    def loss_and_gradient(self) -> tuple[float, torch.Tensor]:
        """The full-data mean loss L(θ) and its gradient ∇L (flat, length ``dim``) in one pass."""
        total_grad = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        total_loss, count = 0.0, 0
        with self._computation_mode():
            params = self._param_values()
            for index, inputs, targets, n in self.source:
                inputs = move_to(inputs, self.device, self._input_dtype)
                targets = move_to(targets, self.device)
                g, loss = grad(self._loss_of(inputs, targets), has_aux=True)(params)
                self._check_finite(loss, index, "loss")
                total_grad.add_(flatten(g[k] for k in self.param_names).to(torch.float64), alpha=float(n))
                total_loss += float(loss) * n
                count += n
        if self.reducer is not None:
            packed = torch.cat([total_grad, torch.tensor([total_loss], dtype=torch.float64, device=self.device)])
            packed, count = self.reducer.sum_block(packed[:, None], count)
            total_grad, total_loss = packed[:-1, 0], float(packed[-1, 0])
        self.passes += 1
        return total_loss / count, (total_grad / count).to(self.dtype)

    def __repr__(self) -> str:
        return (
            f"HessianOperator(dim={self.dim}, blocks={len(self.blocks)}, mode={self.mode!r}, "
            f"backend={self.backend!r}, dtype={self.dtype})"
        )

    # ------------------------------------------------------------------ internals
    @property
    def _input_dtype(self) -> torch.dtype | None:
        return self.dtype if self.dtype != self._params[0].dtype else None

    def _param_values(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to(device=self.device, dtype=self.dtype) for n, p in zip(self.param_names, self._params)}

    def _loss_of(self, inputs, targets) -> Callable:
        """θ ↦ (ℓ_b(θ), ℓ_b(θ)) as a pure function (loss, and the loss again as aux)."""
        frozen = frozen_state(self.model, self.param_names, self._input_dtype)
        model, loss_fn = self.model, self.loss_fn

        def loss(params):
            out = functional_call(model, {**frozen, **params}, (inputs,), strict=False)
            value = loss_fn(out, targets)
            if value.ndim != 0:
                raise ValueError(f"loss_fn must return a scalar (the batch mean), got shape {tuple(value.shape)}")
            return value, value.detach()

        return loss

    def _batch_hvp(self, params, inputs, targets, V: torch.Tensor, index: int, use_autograd: bool) -> torch.Tensor:
        if use_autograd:
            hv = self._batch_hvp_autograd(inputs, targets, V, index)
        else:
            hv = self._batch_hvp_func(params, inputs, targets, V, index)
        self._check_finite(hv, index, "Hessian-vector product")
        return hv

    def _batch_hvp_func(self, params, inputs, targets, V: torch.Tensor, index: int) -> torch.Tensor:
        grad_fn = grad(self._loss_of(inputs, targets), has_aux=True)
        names = self.param_names
        K = V.shape[1]
        # V is (dim, K); vmap over the K columns, each split into parameter-shaped tangents.
        cols = [V[b.slice].T.reshape(K, *b.shape) for b in self.blocks]
        if self._func_strategy == "forward-over-reverse":

            def hvp(*columns):
                (_, loss), (hv, _) = jvp(grad_fn, (params,), (dict(zip(names, columns)),))
                return tuple(hv[n] for n in names), loss

            hv, loss = vmap(hvp, chunk_size=self.chunk_size)(*cols)
            self._check_finite(loss[0], index, "loss")
        else:  # reverse-over-reverse: one gradient graph, K vector-Jacobian products
            (_, loss), pullback = vjp(lambda p: grad_fn(p), params)
            self._check_finite(loss, index, "loss")

            def hvp(*columns):
                (hv,) = pullback((dict(zip(names, columns)), torch.zeros_like(loss)))
                return tuple(hv[n] for n in names)

            hv = vmap(hvp, chunk_size=self.chunk_size)(*cols)
        return torch.cat([h.reshape(K, -1) for h in hv], dim=1).T

    def _batch_hvp_autograd(self, inputs, targets, V: torch.Tensor, index: int) -> torch.Tensor:
        model = self._autograd_model()
        selected = set(self.param_names)
        params = [p for n, p in model.named_parameters() if n in selected]  # model order = flat order
        with torch.enable_grad():
            loss = self.loss_fn(model(inputs), targets)
            self._check_finite(loss, index, "loss")
            grads = torch.autograd.grad(loss, params, create_graph=True)
            flat_grad = flatten(grads)
            K = V.shape[1]
            step = self.chunk_size or K
            pieces = []
            for start in range(0, K, step):
                block = V[:, start : start + step].T.contiguous()  # (k, dim)
                try:
                    hv = torch.autograd.grad(flat_grad, params, grad_outputs=block, retain_graph=True, is_grads_batched=True)
                    pieces.append(torch.cat([h.reshape(block.shape[0], -1) for h in hv], dim=1))
                except RuntimeError:
                    # Some ops have no batching rule: fall back to one backward per column.
                    for row in block:
                        hv = torch.autograd.grad(flat_grad, params, grad_outputs=row, retain_graph=True)
                        pieces.append(flatten(hv)[None, :])
        return torch.cat(pieces, dim=0).T.detach()

    def _autograd_model(self) -> nn.Module:
        """The model the autograd backend differentiates: the model itself, or its float64 copy."""
        return self.model if self._input_dtype is None else self._cast_model

    def _sync_autograd_model(self) -> None:
        """For a computation dtype other than the model's, refresh a cast copy with the current weights."""
        if self._input_dtype is None:
            return
        if getattr(self, "_cast_model", None) is None:
            import copy

            self._cast_model = copy.deepcopy(self.model).to(self.dtype)
        with torch.no_grad():
            for mine, theirs in zip(self._cast_model.state_dict().values(), self.model.state_dict().values()):
                mine.copy_(theirs)
        for mine, theirs in zip(self._cast_model.modules(), self.model.modules()):
            mine.training = theirs.training

    @staticmethod
    def _check_finite(value: torch.Tensor, index: int, what: str) -> None:
        if not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"non-finite {what} on batch {index}: check the data, the loss and the checkpoint")

    def _computation_mode(self):
        return computation_mode(self.model, self.mode)

    def _probe_first_batch(self, check_determinism: bool) -> None:
        """Pick the backend (auto) and check determinism on the first batch."""
        try:
            index, inputs, targets, n = next(iter(self.source))
        except StopIteration:  # an empty shard (only allowed with a reducer): nothing to probe
            return
        inputs = move_to(inputs, self.device, self._input_dtype)
        targets = move_to(targets, self.device)
        with self._computation_mode():
            params = self._param_values()
            if check_determinism:
                first, _ = self._loss_of(inputs, targets)(params)
                second, _ = self._loss_of(inputs, targets)(params)
                self._check_finite(first, index, "loss")
                if not torch.equal(first, second):
                    raise NondeterminismError(
                        f"two passes over batch {index} gave different losses ({float(first):.10g} vs "
                        f"{float(second):.10g}): the model is nondeterministic in mode={self.mode!r} "
                        f"(dropout in train mode?); use mode='eval'"
                    )
            if self.backend in ("auto", "func"):
                self._select_func_strategy(params, inputs, targets, index)

    def _select_func_strategy(self, params, inputs, targets, index: int) -> None:
        """Try torch.func forward-over-reverse on a random probe, then reverse-over-reverse (some
        losses, e.g. mse_loss in torch 2.x, break forward-mode AD), then (auto only) autograd."""
        probe = (torch.rand(self.dim, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5)
        probe = probe.to(device=self.device, dtype=self.dtype)
        failure = None
        for strategy in ("forward-over-reverse", "reverse-over-reverse"):
            self._func_strategy = strategy
            try:
                self._batch_hvp_func(params, inputs, targets, probe, index)
                self.backend = "func"
                return
            except (NonFiniteError, NondeterminismError):
                raise
            except Exception as exc:  # noqa: BLE001 - a tracing failure selects the next strategy
                failure = exc
        if self.backend == "func":
            raise TypeError(f"torch.func cannot differentiate this model twice ({str(failure).splitlines()[0][:160]}); use backend='autograd'")
        self.backend = "autograd"
