r"""Weight perturbation (WP-SGD, noise injection): the gradient at randomly perturbed weights.

Each step draws :math:`U_j \sim N(0, \sigma^2 I)`, j = 1..k, and lets the base optimizer step with
:math:`\frac1k\sum_j \nabla f(W+U_j)`, after restoring W bit for bit. It is an unbiased but
noisier estimate of the smoothed gradient than two-sided NSO (the first-order term
:math:`\nabla^2 f(W)\,U_j` is not cancelled), and is exactly :class:`~hessian_tools.optim.NSO`
with ``two_sided=False`` and ``lam=0`` — which is how it is implemented.
"""

from __future__ import annotations

from typing import Any

import torch

from .nso import NSO

__all__ = ["WeightPerturbation"]


class WeightPerturbation(NSO):
    """One-sided noise injection; ``NSO(two_sided=False, lam=0)``. See :class:`NSO` for args.

    Same noise stream as NSO one-sided for the same generator seed. With a training-mode
    BatchNorm ``model`` an extra closure call at W is made (gradient discarded) so running
    statistics update at the unperturbed weights; then the returned loss is the loss at W,
    otherwise the mean loss at the k perturbed weights.
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
        scale: str = "absolute",
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            base_optimizer_cls,
            model=model,
            generator=generator,
            k=k,
            sigma=sigma,
            lam=0.0,
            two_sided=False,
            scale=scale,
            **base_kwargs,
        )
