"""The linear-operator protocol every operator of the package speaks, as a small base class.

An operator represents a square, symmetric matrix A of side ``dim`` acting on flat parameter vectors
(torch tensors). It mirrors ``scipy.sparse.linalg.LinearOperator`` (``shape``, ``dtype``,
``matvec``, ``matmat``, ``@``) and curvlinops' ``PyTorchLinearOperator``, so every estimator runs
unchanged on a Hessian, a Gauss–Newton or Fisher matrix, a dense test matrix or a scipy operator:

* ``matmat(V)`` — V of shape (dim, K) → A V, one pass over the data for all K columns;
* ``matvec(v)`` — v of shape (dim,) → A v;
* ``A @ X`` — either of the two, by the number of dimensions of X;
* ``to_scipy()`` — a float64 ``scipy.sparse.linalg.LinearOperator`` view (for ``eigsh`` and friends);
* ``dense()`` — the full matrix, built block by block (small operators only);
* ``hvps`` — the number of columns multiplied so far (one matrix-vector product each).

Subclasses implement ``_matmat(V)`` on a validated (dim, K) block; the base class checks shapes,
counts products and provides the rest.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as sla
import torch

#: operators refuse ``dense()`` above this side length unless asked for more
DENSE_MAX_DIM = 20000


class LinearOperator:
    """Base class of the package's operators (see the module docstring).

    Subclasses set ``dim``, ``dtype`` and ``device`` and implement :meth:`_matmat`.
    """

    dim: int
    dtype: torch.dtype = torch.float64
    device: torch.device = torch.device("cpu")
    hvps: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """A V for V of shape (dim, K)."""
        V = check_block(V, self.dim)
        if V.shape[1] == 0:
            return torch.zeros(self.dim, 0, dtype=self.dtype, device=self.device)
        out = self._matmat(V)
        self.hvps += V.shape[1]
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """A v for a flat vector of length ``dim``."""
        return self.matmat(check_vector(v, self.dim)[:, None])[:, 0]

    def __matmul__(self, X: torch.Tensor) -> torch.Tensor:
        if isinstance(X, torch.Tensor) and X.ndim == 1:
            return self.matvec(X)
        return self.matmat(X)

    def to_scipy(self) -> sla.LinearOperator:
        """A float64 scipy ``LinearOperator`` (numpy in and out) computing the same products."""
        return to_scipy(self)

    def dense(self, max_dim: int = DENSE_MAX_DIM, block: int = 256) -> torch.Tensor:
        """The full (dim × dim) matrix, ``block`` columns per product, symmetrised (small operators only)."""
        if self.dim > max_dim:
            raise ValueError(
                f"dense() would build a {self.dim}×{self.dim} matrix; "
                f"raise max_dim above {max_dim} if you mean it"
            )
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        A = torch.cat([self.matmat(eye[:, i : i + block]) for i in range(0, self.dim, block)], dim=1)
        return (A + A.T) / 2

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, dtype={self.dtype})"


def to_scipy(op) -> sla.LinearOperator:
    """A float64 scipy ``LinearOperator`` view of any operator with ``dim`` and ``matmat``."""
    dim = int(op.dim)
    device = getattr(op, "device", torch.device("cpu"))
    dtype = getattr(op, "dtype", torch.float64)

    def matmat(X):
        X = np.asarray(X, dtype=np.float64)
        squeeze = X.ndim == 1
        V = torch.as_tensor(X.reshape(dim, -1), dtype=dtype, device=device)
        out = op.matmat(V).detach().to("cpu", torch.float64).numpy()
        return out[:, 0] if squeeze else out

    return sla.LinearOperator((dim, dim), matvec=matmat, matmat=matmat, rmatvec=matmat, dtype=np.float64)


def check_block(V: torch.Tensor, dim: int) -> torch.Tensor:
    """``V`` if it is a torch tensor of shape (dim, K), else a one-line error."""
    if not isinstance(V, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of shape ({dim}, K), got {type(V).__name__}")
    if V.ndim != 2 or V.shape[0] != dim:
        raise ValueError(f"expected a block of shape ({dim}, K), got {tuple(V.shape)}")
    return V


def check_vector(v: torch.Tensor, dim: int) -> torch.Tensor:
    """``v`` if it is a torch tensor of shape (dim,), else a one-line error."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of length {dim}, got {type(v).__name__}")
    if v.ndim != 1 or v.shape[0] != dim:
        shown = v.numel() if v.ndim == 1 else tuple(v.shape)
        raise ValueError(f"vector has length {shown}, the operator expects {dim}")
    return v
