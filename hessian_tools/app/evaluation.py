"""Exact loss and accuracy of a classifier on a labelled split (full passes, eval mode)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .zoo.data import batches


@torch.no_grad()
def evaluate(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (X, y), in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for xb, yb in batches(X, y, batch_size):
            logits = model(xb)
            total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return total_loss / X.shape[0], correct / X.shape[0]
