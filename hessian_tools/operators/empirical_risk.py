"""The empirical risk over a whole dataset: the one data loop of the package.

For parameters θ (the selected ones; all others and every buffer are held fixed) and a dataset in
batches B_1..B_m of sizes n_1..n_m, N = Σ n_b,

    f(θ) = (1/N) Σ_b n_b · ℓ_b(θ),   ℓ_b(θ) = loss_fn(model(inputs_b; θ), targets_b),

with ``loss_fn`` returning the *mean* loss of a batch. Weighting by n_b makes an uneven last batch
exact. Everything that runs over the data — Hessian-vector products, the loss and its gradient, the
perturbed losses of noise stability and of the PAC-Bayes certificate — goes through
:class:`EmpiricalRisk`, so batch weighting, input handling, dtype casting and the train/eval mode
are the same everywhere.

Inputs and outputs of real models. A batch's inputs may be a tensor (``model(x)``), a tuple of
tensors (passed positionally, ``model(*x)``) or a dict of tensors (passed as keyword arguments,
``model(**x)``, as Hugging Face models take ``input_ids``/``attention_mask``); see
:class:`~hessian_tools.operators.data_source.BatchSource` for the batch formats. Model outputs
that are a dict with ``"logits"``, an object with a ``.logits`` tensor, or a tuple whose first item
is a tensor are reduced to that tensor before the loss (:func:`model_output`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..checks import check_choice
from ..errors import NonFiniteError
from .data_source import BatchSource, move_to
from .params import ParameterBlock, computation_mode, flatten, frozen_state, make_blocks, select_parameters

MODES = ("eval", "train")


def model_output(outputs: Any) -> torch.Tensor:
    """The tensor a loss is computed on: ``outputs`` itself, ``outputs["logits"]``, ``outputs.logits``
    or ``outputs[0]`` (the first item of a tuple), in that order of preference.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(
        f"the model returned a {type(outputs).__name__}; expected a tensor, a dict with 'logits', an object "
        "with .logits, or a tuple whose first item is a tensor"
    )


def call_model(model: Callable, inputs: Any) -> Any:
    """``model(inputs)``, ``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a dict."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def functional_model_call(model: nn.Module, state: Mapping[str, torch.Tensor], inputs: Any) -> Any:
    """:func:`torch.func.functional_call` of ``model`` with parameters/buffers ``state``, the inputs
    passed as :func:`call_model` would pass them.
    """
    if isinstance(inputs, Mapping):
        return functional_call(model, state, (), dict(inputs), strict=False)
    if isinstance(inputs, (tuple, list)):
        return functional_call(model, state, tuple(inputs), strict=False)
    return functional_call(model, state, (inputs,), strict=False)


def check_finite(value: torch.Tensor, index: int, what: str) -> None:
    """One-line :class:`NonFiniteError` naming the batch when ``value`` has a NaN or an infinity.

    The sum of the entries is checked first (one read, no boolean temporary: it is NaN or infinite
    whenever an entry is), the entries themselves only when it is not finite (it may have overflowed).
    """
    if not bool(torch.isfinite(value.sum())) and not bool(torch.isfinite(value).all()):
        raise NonFiniteError(
            f"non-finite {what} on batch {index}: check the data, the loss and the checkpoint"
        )


class EmpiricalRisk:
    """f(θ) over all of ``data`` for the selected parameters of ``model`` (see the module docstring).

    Parameters
    ----------
    model: the ``nn.Module``; never modified (train/eval flags and, in train mode, buffers are
        restored after every pass). A ``DistributedDataParallel`` wrapper is unwrapped.
    loss_fn: ``loss_fn(outputs, targets)`` → the batch-mean loss (a scalar tensor); ``outputs`` is
        :func:`model_output` of what the model returns. ``None`` for a risk whose callers score
        their own statistics (:meth:`scalar_loss` with ``statistic=``).
    data: batches, as :class:`~hessian_tools.operators.data_source.BatchSource` accepts them.
    params: ``None`` (all trainable), a regex, names, modules or parameter tensors.
    mode: ``"eval"`` (BatchNorm uses running statistics, dropout off) or ``"train"``.
    dtype: computation dtype (default: the parameters'); another dtype evaluates the model on cast
        copies of its parameters, buffers and floating inputs. Sums over batches are float64.
    device: where to compute (default: the parameters' device).
    allow_empty: accept data without a single sample (one rank's shard of a distributed run).
    max_batch_size: split larger batches into micro-batches of at most this many samples (the
        weighting stays exact: each piece is weighted by its own size).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Any,
        params=None,
        *,
        mode: str = "eval",
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        allow_empty: bool = False,
        max_batch_size: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(outputs, targets) -> scalar batch-mean loss")
        self.mode = check_choice("mode", mode, MODES)
        self.model = model.module if type(model).__name__ == "DistributedDataParallel" else model
        self.loss_fn = loss_fn
        self.source = BatchSource(data, allow_empty=allow_empty, max_batch_size=max_batch_size)
        named = select_parameters(self.model, params)
        self.param_names: list[str] = [n for n, _ in named]
        self.params: list[torch.Tensor] = [p for _, p in named]
        self.blocks: tuple[ParameterBlock, ...] = make_blocks(named)
        self.dim: int = self.blocks[-1].stop
        self.device = torch.device(device) if device is not None else self.params[0].device
        self.dtype = dtype if dtype is not None else self.params[0].dtype
        if not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating point dtype, got {self.dtype}")
        #: the dtype inputs and fixed tensors are cast to (None: the model's own)
        self.input_dtype = self.dtype if self.dtype != self.params[0].dtype else None

    # ------------------------------------------------------------------ parameters and state
    def parameter_values(self) -> dict[str, torch.Tensor]:
        """The selected parameters, detached, on the computation device and dtype."""
        return {
            n: p.detach().to(device=self.device, dtype=self.dtype)
            for n, p in zip(self.param_names, self.params)
        }

    def flat_parameters(self) -> torch.Tensor:
        """The selected parameters as one flat vector (the order of every operator's rows)."""
        return flatten(p.detach() for p in self.params).to(device=self.device, dtype=self.dtype)

    def fixed_state(self) -> dict[str, torch.Tensor]:
        """Every parameter NOT selected and every buffer, as ``functional_call`` expects them; copies
        in train mode (BatchNorm updates its running statistics in place).
        """
        return frozen_state(self.model, self.param_names, self.input_dtype, copy=self.mode == "train")

    def computation_mode(self):
        """Context manager: the model in ``self.mode``, its flags (and train-mode buffers) restored after."""
        return computation_mode(self.model, self.mode)

    # ------------------------------------------------------------------ the data loop
    def batches(self) -> Iterator[tuple[int, Any, torch.Tensor, int]]:
        """``(index, inputs, targets, n)`` for every (micro-)batch, on the device, floats cast."""
        for index, inputs, targets, n in self.source:
            yield index, move_to(inputs, self.device, self.input_dtype), move_to(targets, self.device), n

    def batch_loss(
        self, params: Mapping[str, torch.Tensor], fixed: Mapping[str, torch.Tensor], inputs, targets
    ):
        """ℓ_b at ``params`` (a pure function of them, for torch.func transforms): a scalar tensor."""
        outputs = model_output(functional_model_call(self.model, {**fixed, **params}, inputs))
        return self.scalar_loss(outputs, targets)

    def module_loss(self, model: nn.Module, inputs, targets) -> torch.Tensor:
        """ℓ_b of ``model`` called directly (for the autograd backend): a scalar tensor."""
        return self.scalar_loss(model_output(call_model(model, inputs)), targets)

    def scalar_loss(self, outputs: torch.Tensor, targets, statistic: Callable | None = None) -> torch.Tensor:
        """``statistic(outputs, targets)`` (default: the loss), checked to be a scalar tensor."""
        value = (statistic or self.loss_fn)(outputs, targets)
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"the loss must return a scalar tensor (the batch mean), got {shape}")
        return value

    def weighted_sum(
        self,
        per_batch: Callable[[int, Any, torch.Tensor], torch.Tensor],
        zero: torch.Tensor,
        what: str,
        batches: Iterable[tuple[int, Any, Any, int]] | None = None,
    ) -> tuple[torch.Tensor, int]:
        """(Σ_b n_b · per_batch(b) in float64, Σ_b n_b) over the data; ``zero`` fixes the shape (and is
        returned for data without a sample). Every batch value is checked to be finite. ``batches``:
        ``(index, inputs, targets, n)`` items to run over instead of the data (e.g. what was computed
        from it before); each item is released before the next is drawn.
        """
        total = zero.to(device=self.device, dtype=torch.float64).clone()
        count = 0
        for index, inputs, targets, n in self.batches() if batches is None else batches:
            value = per_batch(index, inputs, targets)
            del inputs, targets
            check_finite(value, index, what)
            total.add_(value.detach().to(torch.float64), alpha=float(n))
            count += n
        return total, count

    def weighted_mean(
        self,
        per_batch: Callable[[int, Any, torch.Tensor], torch.Tensor],
        shape: tuple[int, ...],
        what: str,
        reducer=None,
        batches: Iterable[tuple[int, Any, Any, int]] | None = None,
    ) -> torch.Tensor:
        """(1/N) Σ_b n_b · per_batch(b) over the data, without buffers beyond what the sum needs.

        Data that is one batch: its value itself (no copy, no rounding). Several batches: the sum is
        kept in one float64 buffer, updated in place. With a ``reducer`` (data-parallel use) the
        float64 sum and the count are summed over the ranks first (:meth:`weighted_sum`).
        ``batches``: as for :meth:`weighted_sum`.
        """
        if reducer is not None:
            zero = torch.zeros(shape, dtype=torch.float64)
            total, count = self.weighted_sum(per_batch, zero, what, batches)
            total, count = reducer.sum_block(total, count)
            return total / count
        first, total, count = None, None, 0
        for index, inputs, targets, n in self.batches() if batches is None else batches:
            value = per_batch(index, inputs, targets)
            del inputs, targets
            check_finite(value, index, what)
            value = value.detach()
            if count == 0:
                first = value
            else:
                if total is None:
                    total = first.to(torch.float64).mul_(float(count))
                    first = None
                total.add_(value, alpha=float(n))
            count += n
        if count == 0:
            raise ValueError("the data is empty: no batch with at least one sample")
        return first if total is None else total.div_(count)

    @property
    def num_samples(self) -> int:
        """N, the number of samples of this process's data."""
        return self.source.total
