"""Adapters that let dense matrices, scipy operators and duck-typed objects speak the operator protocol.

:func:`as_operator` accepts a :class:`~hessian_tools.operators.base.LinearOperator` (returned as it
is), a dense ``torch.Tensor``/``numpy.ndarray``, a scipy ``LinearOperator``, or any object with
``dim`` and ``matmat`` (or only ``matvec``), and returns something every estimator can use.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as sla
import torch

from .base import LinearOperator, to_scipy

__all__ = ["DenseOperator", "ScipyOperator", "as_operator", "to_scipy"]


class DenseOperator(LinearOperator):
    """A dense symmetric matrix as an operator (for tests, small models, known spectra)."""

    def __init__(self, matrix: torch.Tensor | np.ndarray):
        matrix = torch.as_tensor(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a dense operator needs a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.hvps = 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V.to(device=self.device, dtype=self.dtype)

    def dense(self, *args, **kwargs) -> torch.Tensor:
        return self.matrix.clone()


class ScipyOperator(LinearOperator):
    """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out) in the torch protocol."""

    def __init__(self, linop: sla.LinearOperator):
        if linop.shape[0] != linop.shape[1]:
            raise ValueError(f"a Hessian operator must be square, got shape {linop.shape}")
        self.linop = linop
        self.dim = int(linop.shape[0])
        self.dtype = torch.float64
        self.device = torch.device("cpu")
        self.hvps = 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.linop.matmat(V.detach().cpu().double().numpy())
        return torch.as_tensor(np.asarray(out), dtype=torch.float64)


class _DuckOperator(LinearOperator):
    """Any object with ``dim`` and ``matmat`` or ``matvec`` (column by column) behind the base class."""

    def __init__(self, op):
        self.op = op
        self.dim = int(op.dim)
        self.dtype = getattr(op, "dtype", torch.float64)
        self.device = getattr(op, "device", torch.device("cpu"))
        self.blocks = getattr(op, "blocks", None)
        self.hvps = 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if hasattr(self.op, "matmat"):
            return self.op.matmat(V)
        return torch.stack([self.op.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)


def as_operator(obj) -> LinearOperator:
    """``obj`` as a :class:`~hessian_tools.operators.base.LinearOperator` (see the module docstring)."""
    if isinstance(obj, LinearOperator):
        return obj
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return DenseOperator(obj)
    if isinstance(obj, sla.LinearOperator):
        return ScipyOperator(obj)
    if hasattr(obj, "dim") and (hasattr(obj, "matmat") or hasattr(obj, "matvec")):
        return _DuckOperator(obj)
    raise TypeError(
        f"expected an operator (an object with .dim and .matmat), a square tensor/array or a scipy "
        f"LinearOperator, got {type(obj).__name__}"
    )
