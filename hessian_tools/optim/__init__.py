"""Weight-perturbing optimizers in the torch.optim wrapper idiom, and a factory.

Every optimizer here wraps a base optimizer (``base_optimizer_cls``, default SGD) and is used as

.. code-block:: python

    def closure():
        loss = loss_fn(model(x), y)  # forward on the current minibatch
        loss.backward()              # no zero_grad needed: the optimizer zeroes before each call
        return loss

    loss = optimizer.step(closure)

``make_optimizer("sgd", ...)`` returns a plain torch optimizer, whose ``step(closure)`` also
works (it calls the closure once; there the closure must zero the grads itself, or the loop must
call ``optimizer.zero_grad()`` before ``step``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import check_integer, check_nonnegative, check_positive, check_unit_interval
from .base import PerturbedOptimizer
from .nso import NSO
from .sam import ASAM, SAM
from .wp import WeightPerturbation

__all__ = [
    "NSO",
    "WeightPerturbation",
    "SAM",
    "ASAM",
    "PerturbedOptimizer",
    "make_optimizer",
    "METHODS",
    "BASES",
]

# The options each method accepts (anything else passed as not-None is an error); its keys are the
# methods, in the order the command line lists them.
_METHOD_OPTIONS = {
    "sgd": (),
    "nso": ("sigma", "k", "lam", "two_sided"),
    "wp": ("sigma", "k"),
    "sam": ("rho",),
    "asam": ("rho",),
}
METHODS = tuple(_METHOD_OPTIONS)
BASES = ("sgd", "adam", "adamw")


def make_optimizer(
    method: str,
    params,
    *,
    model: torch.nn.Module | None = None,
    base: str = "sgd",
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    generator: torch.Generator | None = None,
    sigma: float | None = None,
    k: int | None = None,
    lam: float | None = None,
    two_sided: bool | None = None,
    rho: float | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer for ``method`` in {"sgd", "nso", "wp", "sam", "asam"}.

    ``base`` picks the base optimizer: ``"sgd"`` → ``SGD(lr, momentum, weight_decay)``;
    ``"adam"`` / ``"adamw"`` → ``Adam`` / ``AdamW(lr, betas=(momentum, 0.999), weight_decay)``
    (``momentum`` is Adam's β₁; the default 0.9 is Adam's default). For ``method="sgd"`` the base
    optimizer itself is returned. Method options left as ``None`` take the class defaults
    (σ=0.01, k=1, λ=0, two-sided; ρ=0.05 for SAM, 0.5 for ASAM). An option that the method does
    not use (e.g. ``rho`` for ``"nso"``), an unknown method/base or an out-of-range value raises
    ``ValueError``.
    """
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"unknown optimization method {method!r}; expected one of {', '.join(METHODS)}")
    if not isinstance(base, str) or base.lower() not in BASES:
        raise ValueError(f"unknown base optimizer {base!r}; expected one of {', '.join(BASES)}")
    method, base = method.lower(), base.lower()
    lr = check_nonnegative("lr", lr)
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    momentum = check_nonnegative("momentum", momentum)

    given = {"sigma": sigma, "k": k, "lam": lam, "two_sided": two_sided, "rho": rho}
    unused = [
        name for name, value in given.items() if value is not None and name not in _METHOD_OPTIONS[method]
    ]
    if unused:
        raise ValueError(f"option(s) {', '.join(unused)} do not apply to method {method!r}")
    if sigma is not None:
        check_positive("sigma", sigma)
    if k is not None:
        check_integer("k", k)
    if lam is not None:
        check_unit_interval("lam", lam)
    if rho is not None:
        check_positive("rho", rho)

    if base == "sgd":
        base_cls: type[torch.optim.Optimizer] = torch.optim.SGD
        base_kwargs: dict[str, Any] = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    else:
        if momentum >= 1:
            raise ValueError(f"momentum (Adam's beta1) must be in [0, 1), got {momentum!r}")
        base_cls = torch.optim.Adam if base == "adam" else torch.optim.AdamW
        base_kwargs = {"lr": lr, "betas": (momentum, 0.999), "weight_decay": weight_decay}

    if method == "sgd":
        return base_cls(params, **base_kwargs)
    options = {name: value for name, value in given.items() if value is not None}
    cls = {"nso": NSO, "wp": WeightPerturbation, "sam": SAM, "asam": ASAM}[method]
    return cls(params, base_cls, model=model, generator=generator, **options, **base_kwargs)
