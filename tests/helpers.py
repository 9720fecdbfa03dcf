"""Shared test helpers: small models whose exact Hessian is computed independently by torch.func.hessian,
known spectra, and batching. Imported by the test modules (``from helpers import ...``)."""

from __future__ import annotations

import importlib
import itertools
import sys
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, hessian

from hessian_tools.operators.adapters import DenseOperator
from hessian_tools.operators.params import ParameterBlock

ANALYSIS = Path(__file__).resolve().parent.parent / "analysis"


def import_analysis_script(name: str):
    """Import analysis/NAME.py (a benchmark script, which imports its sibling modules by name)."""
    sys.path.insert(0, str(ANALYSIS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ANALYSIS))


def exact_hessian(model: nn.Module, loss_fn, X, y, names=None) -> torch.Tensor:
    """∇² of loss_fn(model(X), y) w.r.t. the named parameters, by torch.func.hessian in float64,
    with the model in eval mode. Independent of the operator code under test."""
    model = model.eval()
    params = {n: p.detach().double() for n, p in model.named_parameters() if names is None or n in names}
    frozen = {
        n: t.detach().double() if t.is_floating_point() else t
        for n, t in list(model.named_parameters()) + list(model.named_buffers())
        if n not in params
    }
    sizes = [p.numel() for p in params.values()]

    def loss(flat):
        pieces = torch.split(flat, sizes)
        values = {n: piece.view_as(p) for (n, p), piece in zip(params.items(), pieces)}
        return loss_fn(functional_call(model, {**frozen, **values}, (X.double(),)), y)

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    return hessian(loss)(flat)


class TinyCNN(nn.Module):
    """Conv → BatchNorm → ReLU → pool → linear, for 1×6×6 inputs (BatchNorm in eval mode in tests)."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 2 * 2, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.max_pool2d(x, 2)
        return self.head(x.flatten(1))


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    X = torch.randn(71, 5)
    y = torch.randint(0, 3, (71,))
    return model, nn.functional.cross_entropy, X, y


def _cnn():
    torch.manual_seed(1)
    model = TinyCNN()
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    X = torch.randn(40, 1, 6, 6)
    y = torch.randint(0, 3, (40,))
    return model, nn.functional.cross_entropy, X, y


def _saddle():
    """A deep linear net with squared loss near the origin: the Hessian has negative eigenvalues."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.1)
    X = torch.randn(30, 4)
    y = torch.randn(30, 2)
    return model, nn.functional.mse_loss, X, y


PROBLEMS = {"mlp": _mlp, "cnn_bn": _cnn, "saddle": _saddle}


def batches(X, y, size):
    return [(X[i : i + size], y[i : i + size]) for i in range(0, len(X), size)]


def known_spectrum(dim=300, seed=0):
    """A dense symmetric matrix Q diag(λ) Qᵀ with a few outliers, a bulk and negative eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.cat(
        [
            torch.tensor([50.0, 20.0, 10.0, 5.0, 2.0]),
            torch.rand(dim - 15, generator=g, dtype=torch.float64) * 0.5,
            -torch.rand(10, generator=g, dtype=torch.float64) * 0.3,
        ]
    ).double()
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return (Q * lam) @ Q.T, lam


class BlockedDense(DenseOperator):
    """A dense matrix whose coordinates are split into named blocks b0, b1, … of the given sizes."""

    def __init__(self, matrix, sizes):
        super().__init__(matrix)
        starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        self.blocks = tuple(
            ParameterBlock(f"b{i}", a, b, (b - a,)) for i, (a, b) in enumerate(itertools.pairwise(starts))
        )


def nearest_mean_classifier(n: int, d: int, prior_seed: int, classes: int = 3):
    """A nearest-class-mean linear classifier on a well separated Gaussian mixture (low train error)
    and a prior 1e-3 away from it (KL ≈ 0). Returns (model, bundle, prior state_dict)."""
    from hessian_tools.app.zoo.data import synthetic_classification

    bundle = synthetic_classification(n=n, d=d, num_classes=classes, seed=0, separation=3.0)
    X, y = bundle.train
    means = torch.stack([X[y == c].mean(0) for c in range(classes)])
    model = nn.Linear(d, classes)
    with torch.no_grad():
        model.weight.copy_(means)
        model.bias.copy_(-0.5 * (means * means).sum(1))
    g = torch.Generator().manual_seed(prior_seed)
    prior = {k: v.detach() + 1e-3 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    return model, bundle, prior
