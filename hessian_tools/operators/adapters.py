"""The operator protocol, and adapters that let dense matrices and scipy operators speak it.

An *operator* here is any object with

* ``dim`` — the side length n of the square, symmetric matrix H it represents;
* ``matmat(V)`` — ``V`` a torch tensor of shape (n, K) → ``H @ V``, same shape;
* optionally ``matvec(v)``, ``dtype`` and ``device``.

This mirrors ``scipy.sparse.linalg.LinearOperator`` (``shape``, ``matvec``, ``matmat``) but
works on torch tensors. :func:`as_operator` accepts a :class:`~hessian_tools.HessianOperator`,
a dense ``torch.Tensor``/``numpy.ndarray``, or a scipy ``LinearOperator`` and returns something
with that protocol, so every estimator runs unchanged on any of them.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as sla
import torch


class DenseOperator:
    """A dense symmetric matrix as an operator (for tests, small models, known spectra)."""

    def __init__(self, matrix: torch.Tensor | np.ndarray):
        matrix = torch.as_tensor(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a dense operator needs a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.dtype = matrix.dtype
        self.device = matrix.device

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        V = _check_block(V, self.dim)
        return self.matrix @ V.to(self.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(_check_vector(v, self.dim)[:, None])[:, 0]

    def dense(self) -> torch.Tensor:
        return self.matrix.clone()


class ScipyOperator:
    """Wrap a ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in/out) into the torch protocol."""

    def __init__(self, linop: sla.LinearOperator):
        if linop.shape[0] != linop.shape[1]:
            raise ValueError(f"a Hessian operator must be square, got shape {linop.shape}")
        self.linop = linop
        self.dim = int(linop.shape[0])
        self.dtype = torch.float64
        self.device = torch.device("cpu")

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        V = _check_block(V, self.dim)
        out = self.linop.matmat(V.detach().cpu().double().numpy())
        return torch.as_tensor(np.asarray(out), dtype=torch.float64)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(_check_vector(v, self.dim)[:, None])[:, 0]


def to_scipy(op) -> sla.LinearOperator:
    """A float64 scipy ``LinearOperator`` view of any operator (for ``eigsh`` and friends)."""
    dim = op.dim
    device = getattr(op, "device", torch.device("cpu"))
    dtype = getattr(op, "dtype", torch.float64)

    def matmat(X):
        X = np.asarray(X, dtype=np.float64)
        squeeze = X.ndim == 1
        V = torch.as_tensor(X.reshape(dim, -1), dtype=dtype, device=device)
        out = op.matmat(V).detach().to("cpu", torch.float64).numpy()
        return out[:, 0] if squeeze else out

    return sla.LinearOperator((dim, dim), matvec=matmat, matmat=matmat, rmatvec=matmat, dtype=np.float64)


def as_operator(obj):
    """Return ``obj`` as an object with ``dim`` and a torch ``matmat`` (see module docstring)."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return DenseOperator(obj)
    if isinstance(obj, sla.LinearOperator):
        return ScipyOperator(obj)
    if hasattr(obj, "dim") and (hasattr(obj, "matmat") or hasattr(obj, "matvec")):
        if not hasattr(obj, "matmat"):
            return _MatvecOnly(obj)
        return obj
    raise TypeError(
        f"expected an operator (an object with .dim and .matmat), a square tensor/array or a scipy "
        f"LinearOperator, got {type(obj).__name__}"
    )


class _MatvecOnly:
    """Give an operator that only has ``matvec`` a column-by-column ``matmat``."""

    def __init__(self, op):
        self.op = op
        self.dim = op.dim
        self.dtype = getattr(op, "dtype", torch.float64)
        self.device = getattr(op, "device", torch.device("cpu"))

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        V = _check_block(V, self.dim)
        return torch.stack([self.op.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def matvec(self, v):
        return self.op.matvec(v)


def _check_block(V: torch.Tensor, dim: int) -> torch.Tensor:
    if not isinstance(V, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of shape ({dim}, K), got {type(V).__name__}")
    if V.ndim != 2 or V.shape[0] != dim:
        raise ValueError(f"expected a block of shape ({dim}, K), got {tuple(V.shape)}")
    return V


def _check_vector(v: torch.Tensor, dim: int) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of length {dim}, got {type(v).__name__}")
    if v.ndim != 1 or v.shape[0] != dim:
        raise ValueError(f"vector has length {v.numel() if v.ndim == 1 else tuple(v.shape)}, the operator expects {dim}")
    return v
