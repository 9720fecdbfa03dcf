"""Shared machinery of the weight-perturbing optimizers (NSO, WP, SAM, ASAM).

Every optimizer here follows the torch.optim wrapper idiom of the well-known SAM code: it is a
:class:`torch.optim.Optimizer` that *shares* its ``param_groups`` with an inner
``self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)`` (SGD, Adam, AdamW,
...). A step

1. evaluates ``closure`` at one or more perturbed copies of the weights W (and possibly at W),
2. restores W bit for bit (from a saved copy, never by subtracting the perturbation back),
3. writes the combined gradient into ``p.grad`` and calls ``self.base_optimizer.step()``.

After ``step`` returns, ``p.grad`` holds exactly the gradient the base optimizer used, so the
gradient estimate can be inspected (or the step reproduced by hand).

``closure`` contract
--------------------
``closure()`` runs forward and backward on the *current* minibatch and returns the loss tensor.
It must not zero the gradients itself: the optimizer sets every ``p.grad`` to ``None`` before
each closure call (so the closure may, but need not, call ``zero_grad``). It is called with
gradients enabled, even though ``step`` itself runs under ``torch.no_grad()``. The closure must
be deterministic apart from the weights (no dropout randomness you care to control, same batch).

BatchNorm
---------
Running statistics should only move at the unperturbed weights. When ``model`` is given, every
closure call at perturbed weights runs inside :meth:`PerturbedOptimizer._frozen_batchnorm`,
which snapshots ``running_mean``, ``running_var`` and ``num_batches_tracked`` of each
``torch.nn.modules.batchnorm._BatchNorm`` in ``model`` and restores them afterwards (the
*forward* still normalises with the batch statistics of the perturbed activations, as in
training). Without ``model``, the optimizer cannot see the BatchNorm buffers and they WILL be
updated on every perturbed pass (k or 2k extra momentum updates per step).

Randomness
----------
All noise is drawn with ``generator`` (a CPU :class:`torch.Generator`; a fresh one seeded 0 when
``None``), never the global RNG, on the CPU, then moved to each parameter's device and dtype.
The generator state is part of :meth:`state_dict`, so a resumed run continues the same stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

Closure = Callable[[], Any]

__all__ = ["PerturbedOptimizer", "Closure"]


class PerturbedOptimizer(torch.optim.Optimizer):
    """Base class: a wrapper optimizer whose step evaluates the closure at perturbed weights.

    Subclasses implement :meth:`_estimate_gradient`; everything else (weight snapshot/restore,
    BatchNorm freezing, the closure loop, gradient accumulation, the base step, state dicts)
    lives here.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        base_optimizer_cls: the optimizer class that takes the actual step (default SGD).
        model: the module being trained; only used to freeze its BatchNorm running statistics
            during perturbed passes (and to detect BatchNorm layers in training mode).
        generator: CPU ``torch.Generator`` for every random draw; ``None`` → seeded 0.
        method_defaults: per-group options of the method (e.g. ``sigma``, ``rho``).
        **base_kwargs: passed to ``base_optimizer_cls`` (``lr``, ``momentum``, ...).
    """

    def __init__(
        self,
        params,
        base_optimizer_cls: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        model: torch.nn.Module | None = None,
        generator: torch.Generator | None = None,
        method_defaults: dict[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not (
            isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, torch.optim.Optimizer)
        ):
            raise TypeError(
                f"base_optimizer_cls must be a torch.optim.Optimizer subclass, got {base_optimizer_cls!r}"
            )
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        if generator is None:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(0)
        elif not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        elif generator.device.type != "cpu":
            raise ValueError(
                "generator must be a CPU torch.Generator (noise is drawn on the CPU), "
                f"got device {generator.device}"
            )
        self._method_defaults = dict(method_defaults or {})
        defaults = {**self._method_defaults, **base_kwargs}
        super().__init__(params, defaults)
        self.model = model
        self.generator = generator
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        # One list of group dicts, shared by both optimizers (lr schedulers act on either).
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    # ------------------------------------------------------------------ torch.optim plumbing
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # during Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        # Appends to the shared list exactly once.
        self.base_optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        sd["generator_state"] = self.generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        base_sd = state_dict.pop("base_optimizer", None)
        gen_state = state_dict.pop("generator_state", None)
        super().load_state_dict(state_dict)
        if base_sd is not None:
            self.base_optimizer.load_state_dict(base_sd)
        self.base_optimizer.param_groups = self.param_groups
        if gen_state is not None:
            self.generator.set_state(gen_state)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Closure | None = None):  # type: ignore[override]
        """One step: estimate the gradient with perturbed closure calls, restore W, base step.

        Returns the loss at the unperturbed weights when it was computed during the step, else
        the mean loss over the perturbed evaluations (a detached tensor).
        """
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step needs a closure that runs forward + backward "
                "and returns the loss"
            )
        params = self._params()
        loss, grads = self._estimate_gradient(closure, params)
        for p, g in zip(params, grads):
            p.grad = g
        self.base_optimizer.step()
        return loss

    def _estimate_gradient(self, closure: Closure, params: list[torch.Tensor]):
        """Return ``(loss, grads)``, ``grads`` aligned with ``params``; W must be left as found."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for subclasses
    def _params(self) -> list[torch.Tensor]:
        """Trainable parameters in group order (frozen ones are neither perturbed nor stepped)."""
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _param_groups_of(self, params: list[torch.Tensor]) -> list[dict[str, Any]]:
        """The group dict of each parameter in ``params``."""
        where = {id(p): group for group in self.param_groups for p in group["params"]}
        return [where[id(p)] for p in params]

    def _batchnorm_modules(self) -> list[_BatchNorm]:
        if self.model is None:
            return []
        return [m for m in self.model.modules() if isinstance(m, _BatchNorm)]

    def _has_training_batchnorm(self) -> bool:
        """True when ``model`` has a BatchNorm layer that would update running statistics."""
        return any(m.training and m.track_running_stats for m in self._batchnorm_modules())

    @contextlib.contextmanager
    def _frozen_batchnorm(self) -> Iterator[None]:
        """Snapshot all BatchNorm buffers of ``model`` and restore them on exit."""
        saved = []
        for m in self._batchnorm_modules():
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buf = getattr(m, name, None)
                if buf is not None:
                    saved.append((buf, buf.detach().clone()))
        try:
            yield
        finally:
            with torch.no_grad():
                for buf, copy in saved:
                    buf.copy_(copy)

    @staticmethod
    def _snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    @staticmethod
    def _restore(params: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)

    @staticmethod
    def _set_weights(params, saved, delta, sign: float = 1.0) -> None:
        """``p = saved + sign * delta`` (computed from the saved copy, so ±delta are symmetric)."""
        with torch.no_grad():
            for p, w, d in zip(params, saved, delta):
                if d is None:
                    p.copy_(w)
                else:
                    p.copy_(w).add_(d, alpha=sign)

    def _evaluate(self, closure: Closure, params: list[torch.Tensor], *, perturbed: bool):
        """Zero grads, call ``closure`` with grad enabled, and hand back ``(loss, grads)``.

        At perturbed weights (``perturbed=True``) BatchNorm buffers of ``model`` are restored
        afterwards. The returned gradient tensors are owned by the caller (``p.grad`` is reset
        to ``None`` before the next call, so they are never overwritten).
        """
        for p in params:
            p.grad = None
        ctx = self._frozen_batchnorm() if perturbed else contextlib.nullcontext()
        with ctx, torch.enable_grad():
            loss = closure()
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        return loss, grads

    @staticmethod
    def _accumulate(acc: list[torch.Tensor | None] | None, grads: list[torch.Tensor | None]):
        """In-place running sum of gradient lists (a missing gradient counts as zero)."""
        if acc is None:
            return list(grads)
        for i, g in enumerate(grads):
            if g is None:
                continue
            if acc[i] is None:
                acc[i] = g
            else:
                acc[i].add_(g)
        return acc

    @staticmethod
    def _mean_loss(losses: list[Any]):
        losses = [loss for loss in losses if loss is not None]
        if not losses:
            return None
        if all(isinstance(loss, torch.Tensor) for loss in losses):
            return torch.stack([loss.reshape(()) for loss in losses]).mean()
        return sum(float(loss) for loss in losses) / len(losses)
