r"""Noise Stability Optimization (NSO): gradient descent on the noise-smoothed loss.

NSO minimises :math:`F(W) = \mathbb{E}_{U\sim N(0,\sigma^2 I)}[f(W+U)]`. Its gradient
:math:`\nabla F(W) = \mathbb{E}_U[\nabla f(W+U)]` is estimated on each minibatch with k draws
:math:`U_1,\dots,U_k` and, in the two-sided form, *both* signs of every draw:

.. math::

    g = \frac{1}{2k}\sum_{j=1}^{k}\big(\nabla f(W+U_j) + \nabla f(W-U_j)\big).

Why two-sided: Taylor-expanding the gradient around W,

.. math::

    \nabla f(W\pm U) = \nabla f(W) \pm \nabla^2 f(W)\,U + \tfrac12 \nabla^3 f(W)[U,U]
                       \pm \tfrac16 \nabla^4 f(W)[U,U,U] + O(\|U\|^4),

so the odd-order terms cancel in the pair average:
:math:`\tfrac12(\nabla f(W+U)+\nabla f(W-U)) = \nabla f(W) + \tfrac12\nabla^3 f[U,U] + O(\sigma^4)`.
In particular on a quadratic the pair average equals :math:`\nabla f(W)` *exactly* for any U,
and in general the first-order noise term :math:`\nabla^2 f\,U` (zero mean, but variance
:math:`\sigma^2\|\nabla^2 f\|_F^2`) is gone, which makes the two-sided estimator's variance much
smaller than the one-sided one (:math:`\frac1k\sum_j \nabla f(W+U_j)`, ``two_sided=False``).
Both are unbiased for :math:`\nabla F(W)` since U and -U have the same law.

With ``lam`` > 0 the gradient at W is mixed in:
:math:`g_{\text{final}} = \lambda\,\nabla f(W) + (1-\lambda)\,g`.

Cost per step: 2k closure calls (k one-sided), plus one at W when ``lam > 0`` *or* when
``model`` has a BatchNorm layer in training mode — in the latter case with ``lam == 0`` the call
at W is made only so that running statistics update at the unperturbed weights; its gradient is
discarded (so a BatchNorm model costs 2k+1 forward/backward passes per step).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..checks import check_integer, check_positive, check_unit_interval
from .base import Closure, PerturbedOptimizer

__all__ = ["NSO", "SCALES"]

SCALES = ("absolute", "weight_norm")


class NSO(PerturbedOptimizer):
    r"""Noise Stability Optimization wrapped around a base optimizer.

    Args:
        params: parameters or parameter groups (a group may override ``sigma``).
        base_optimizer_cls: the optimizer stepping with the averaged gradient (default SGD).
        model: the trained module, for BatchNorm handling (see :mod:`hessian_tools.optim.base`).
            Without it, BatchNorm running statistics move on every perturbed pass.
        generator: CPU ``torch.Generator`` for the noise (``None`` → a new one seeded 0).
        k: number of noise draws per step (>= 1).
        sigma: noise standard deviation (> 0).
        lam: weight in [0, 1] of the unperturbed gradient; 0 is pure NSO.
        two_sided: evaluate at W+U_j and W-U_j (2k gradients); ``False`` → W+U_j only.
        scale: ``"absolute"`` (default, as in the paper): :math:`U_p \sim N(0, \sigma^2 I)` for
            every tensor p. ``"weight_norm"``: :math:`U_p \sim N(0, \sigma_p^2 I)` with
            :math:`\sigma_p = \sigma\,\|W_p\|_2/\sqrt{\mathrm{numel}(W_p)}` (σ times the RMS of
            the entries of that tensor at the start of the step; an all-zero tensor gets no
            noise).
        **base_kwargs: for the base optimizer (``lr``, ``momentum``, ``weight_decay``, ...).

    Noise: for each draw, one ``torch.randn(p.shape, generator=generator)`` per trainable
    parameter in group order (float64 for float64 parameters, float32 otherwise), drawn on the
    CPU, moved to the parameter's device/dtype, then multiplied by its σ_p.

    The closure is called with grads zeroed by the optimizer; after ``step``, ``p.grad`` holds
    the final gradient the base optimizer used. ``step`` returns the loss at W when it was
    computed (``lam > 0`` or a training-mode BatchNorm model), else the mean perturbed loss.
    """

    def __init__(
        self,
        params,
        base_optimizer_cls: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        model: torch.nn.Module | None = None,
        generator: torch.Generator | None = None,
        k: int = 1,
        sigma: float = 0.01,
        lam: float = 0.0,
        two_sided: bool = True,
        scale: str = "absolute",
        **base_kwargs: Any,
    ) -> None:
        self.k = check_integer("k", k)
        sigma = check_positive("sigma", sigma)
        self.lam = check_unit_interval("lam", lam)
        if not isinstance(two_sided, bool):
            raise ValueError(f"two_sided must be True or False, got {two_sided!r}")
        self.two_sided = two_sided
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}; got {scale!r}")
        self.scale = scale
        super().__init__(
            params,
            base_optimizer_cls,
            model=model,
            generator=generator,
            method_defaults={"sigma": sigma},
            **base_kwargs,
        )

    def _draw_noise(self, params, groups, saved) -> list[torch.Tensor]:
        noise = []
        for p, group, w in zip(params, groups, saved):
            draw_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            z = torch.randn(p.shape, generator=self.generator, dtype=draw_dtype, device="cpu")
            u = z.to(device=p.device, dtype=p.dtype)
            sigma = check_positive("sigma", group["sigma"])
            if self.scale == "weight_norm" and w.numel() > 0:
                rms = torch.linalg.vector_norm(w) / math.sqrt(w.numel())
                u.mul_(rms.to(dtype=u.dtype) * sigma)
            else:
                u.mul_(sigma)
            noise.append(u)
        return noise

    def _estimate_gradient(self, closure: Closure, params: list[torch.Tensor]):
        groups = self._param_groups_of(params)
        center_loss, center_grads = None, None
        if self.lam > 0 or self._has_training_batchnorm():
            center_loss, center_grads = self._evaluate(closure, params, perturbed=False)
        saved = self._snapshot(params)
        signs = (1.0, -1.0) if self.two_sided else (1.0,)
        acc, losses = None, []
        try:
            for _ in range(self.k):
                noise = self._draw_noise(params, groups, saved)
                for sign in signs:
                    self._set_weights(params, saved, noise, sign)
                    loss, grads = self._evaluate(closure, params, perturbed=True)
                    acc = self._accumulate(acc, grads)
                    losses.append(loss)
        finally:
            self._restore(params, saved)

        n = self.k * len(signs)
        lam = self.lam
        final = []
        for i, a in enumerate(acc):
            if a is not None:
                a.div_(n)
            if lam > 0:
                g0 = center_grads[i]
                if a is None:
                    a = None if g0 is None else g0.mul_(lam)
                else:
                    a.mul_(1.0 - lam)
                    if g0 is not None:
                        a.add_(g0, alpha=lam)
            final.append(a)
        loss = center_loss if center_loss is not None else self._mean_loss(losses)
        return loss, final
