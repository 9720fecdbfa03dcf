r"""Sharpness-Aware Minimization (SAM, Foret et al. 2021) and Adaptive SAM (ASAM, Kwon et al. 2021).

SAM approximately solves :math:`\min_W \max_{\|\epsilon\|_2\le\rho} f(W+\epsilon)` with one ascent
step: with :math:`g = \nabla f(W)` on the minibatch,

.. math:: \epsilon = \rho\, \frac{g}{\|g\|_2}

(the norm is global, over all trainable parameters together); the base optimizer then steps
from W with :math:`\nabla f(W+\epsilon)`.

ASAM makes the neighbourhood scale-invariant with the diagonal operator
:math:`T_W = \mathrm{diag}(|W| + \eta)` and uses

.. math:: \epsilon = \rho\, \frac{T_W^2\, g}{\|T_W\, g\|_2}.

Here :math:`T = |w| + \eta` is applied to *every* trainable tensor (biases included); the
authors' reference code applies it to parameters whose name contains ``weight`` and uses
:math:`T = 1` for the rest, which needs parameter names this optimizer does not have.

A zero gradient gives :math:`\epsilon = 0` (no division by zero, no NaN). Each step makes two
closure calls: at W (BatchNorm running statistics update here) and at W+ε (BatchNorm buffers of
``model`` restored afterwards). ``step`` returns the loss at W.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import check_nonnegative, check_positive
from .base import Closure, PerturbedOptimizer

__all__ = ["SAM", "ASAM"]


class SAM(PerturbedOptimizer):
    r"""Sharpness-Aware Minimization wrapped around a base optimizer.

    Args:
        params: parameters or parameter groups (a group may override ``rho``).
        base_optimizer_cls: the optimizer stepping with :math:`\nabla f(W+\epsilon)` (default SGD).
        model: the trained module, for BatchNorm handling (see :mod:`hessian_tools.optim.base`).
        generator: unused by SAM itself (it draws no noise); kept for a uniform signature.
        rho: neighbourhood radius (> 0).
        **base_kwargs: for the base optimizer (``lr``, ``momentum``, ...).

    ``closure`` is called twice per step, grads zeroed by the optimizer; after ``step``,
    ``p.grad`` holds :math:`\nabla f(W+\epsilon)`.
    """

    adaptive = False

    def __init__(
        self,
        params,
        base_optimizer_cls: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        model: torch.nn.Module | None = None,
        generator: torch.Generator | None = None,
        rho: float = 0.05,
        **base_kwargs: Any,
    ) -> None:
        self._init(
            params, base_optimizer_cls, model, generator, {"rho": check_positive("rho", rho)}, base_kwargs
        )

    def _init(self, params, base_optimizer_cls, model, generator, method_defaults, base_kwargs) -> None:
        PerturbedOptimizer.__init__(
            self,
            params,
            base_optimizer_cls,
            model=model,
            generator=generator,
            method_defaults=method_defaults,
            **base_kwargs,
        )

    def _scaling(self, w: torch.Tensor, group: dict[str, Any]) -> torch.Tensor | None:
        """The diagonal of T for one tensor (``None``: identity)."""
        return None

    def _perturbation(self, params, groups, saved, grads) -> list[torch.Tensor | None]:
        r""":math:`\epsilon_p = \rho\, T_p^2 g_p / \|T g\|` for each parameter."""
        tg, scalings = [], []
        for w, group, g in zip(saved, groups, grads):
            t = None if g is None else self._scaling(w, group)
            scalings.append(t)
            tg.append(None if g is None else (g if t is None else g * t))
        present = [x for x in tg if x is not None]
        if not present:
            return [None] * len(params)
        dev = present[0].device
        acc_dtype = torch.float64 if any(x.dtype == torch.float64 for x in present) else torch.float32
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(x).to(device=dev, dtype=acc_dtype) for x in present])
        )
        # A zero gradient means Tg = 0, so dividing by 1 instead of 0 gives epsilon = 0 exactly.
        safe_norm = torch.where(norm > 0, norm, torch.ones_like(norm))
        eps = []
        for x, t, group in zip(tg, scalings, groups):
            if x is None:
                eps.append(None)
                continue
            rho = check_positive("rho", group["rho"])
            factor = (rho / safe_norm).to(device=x.device, dtype=x.dtype)
            e = x * factor if t is None else x * t * factor
            eps.append(e)
        return eps

    def _estimate_gradient(self, closure: Closure, params: list[torch.Tensor]):
        groups = self._param_groups_of(params)
        loss, grads = self._evaluate(closure, params, perturbed=False)
        saved = self._snapshot(params)
        eps = self._perturbation(params, groups, saved, grads)
        try:
            self._set_weights(params, saved, eps)
            _, grads_eps = self._evaluate(closure, params, perturbed=True)
        finally:
            self._restore(params, saved)
        return loss, grads_eps


class ASAM(SAM):
    r"""Adaptive SAM: :math:`\epsilon = \rho\, T^2 g/\|T g\|` with :math:`T = |W| + \eta`.

    Args are those of :class:`SAM`, with ``rho`` defaulting to 0.5 (the paper's usual value)
    and ``eta`` (>= 0, default 0.01) keeping T positive at zero weights. Both may be overridden
    per parameter group.
    """

    adaptive = True

    def __init__(
        self,
        params,
        base_optimizer_cls: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        model: torch.nn.Module | None = None,
        generator: torch.Generator | None = None,
        rho: float = 0.5,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        method_defaults = {"rho": check_positive("rho", rho), "eta": check_nonnegative("eta", eta)}
        self._init(params, base_optimizer_cls, model, generator, method_defaults, base_kwargs)

    def _scaling(self, w: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        return w.abs().add_(check_nonnegative("eta", group["eta"]))
