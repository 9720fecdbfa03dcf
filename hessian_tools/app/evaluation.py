"""Exact loss (and accuracy, for class labels) of a model on a split: full passes, eval mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..operators.empirical_risk import EmpiricalRisk, call_model, model_output
from .zoo.data import batches


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The batch-mean cross-entropy, the default loss of every command."""
    return F.cross_entropy(outputs, targets)


def has_class_labels(outputs: torch.Tensor, targets: Any) -> bool:
    """True when ``targets`` are class indices for the rows of ``outputs`` (integer (n,) against (n, C))."""
    return (
        isinstance(targets, torch.Tensor)
        and not targets.dtype.is_floating_point
        and targets.ndim == 1
        and isinstance(outputs, torch.Tensor)
        and outputs.ndim == 2
        and outputs.shape[0] == targets.shape[0]
    )


@torch.no_grad()
def evaluate_batches(
    model: torch.nn.Module, data: Any, loss_fn: Callable = cross_entropy
) -> tuple[float, float]:
    """Mean ``loss_fn`` over all samples of ``data`` (batches weighted by their sizes, the data loop
    of :class:`~hessian_tools.operators.empirical_risk.EmpiricalRisk`) and the accuracy
    (argmax of the outputs = label), NaN when the targets are not class labels. Eval mode, restored.
    """
    risk = EmpiricalRisk(model, loss_fn, data)
    labelled = []

    def loss_and_hits(_index, inputs, targets):
        outputs = model_output(call_model(model, inputs))
        loss = risk.scalar_loss(outputs, targets).to(torch.float64)
        labelled.append(has_class_labels(outputs, targets))
        hits = (
            (outputs.argmax(1) == targets).to(torch.float64).mean()
            if labelled[-1]
            else torch.zeros((), dtype=torch.float64)
        )
        return torch.stack([loss, hits.to(loss.device)])

    with risk.computation_mode():
        total, count = risk.weighted_sum(loss_and_hits, torch.zeros(2), "loss")
    loss, accuracy = (total / count).tolist()
    return loss, accuracy if all(labelled) else float("nan")


def evaluate(
    model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (X, y), in eval mode (the mode is restored)."""
    return evaluate_batches(model, batches(X, y, batch_size))
