"""Helpers shared by the estimators: operator access (in float64, or in the operator's own precision
for estimators whose stored bases scale with the dimension) and per-block reductions.
"""

from __future__ import annotations

import torch

from ..checks import check_open_unit_interval
from ..operators.adapters import as_operator
from ..operators.base import LinearOperator
from ..operators.params import block_numbers


def working_dtype(dtype) -> torch.dtype:
    """The precision an estimator stores dim-sized bases in for an operator of ``dtype``: float64 for
    float64 (and non-torch) operators, float32 for float32 and half-precision ones. An operator's
    products carry no more precision than its dtype, so storing them in it loses nothing but memory.
    """
    if dtype == torch.float64 or not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return torch.float64
    return torch.float32


class CountingOperator(LinearOperator):
    """Wrap an operator for one estimator call: count the HVPs it spends, and hand products back in
    float64 (V is cast to the operator's dtype for the product). With ``native=True`` products come
    back in :func:`working_dtype` of the operator instead (float32 for a float32 model), for
    estimators that keep dim × m bases.
    """

    def __init__(self, op, native: bool = False):
        self.op = as_operator(op)
        self.dim = int(self.op.dim)
        self.dtype = working_dtype(self.op.dtype) if native else torch.float64
        self.hvps = 0
        self.device = getattr(self.op, "device", torch.device("cpu"))
        self.blocks = getattr(self.op, "blocks", None)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.op.matmat(V.to(device=self.device, dtype=self.op.dtype)).to(self.dtype)


#: bytes of one block of probe columns an estimator streams through the operator at a time (the
#: block and its product each take this much, 128 MiB: 3 columns of ResNet-18; at least one column, at
#: most the estimator's block)
STREAM_BYTES = 1 << 27


def columns_per_pass(H, most: int) -> int:
    """How many probe columns of ``H`` (a :class:`CountingOperator`) to multiply at once: the most whose
    block fits :data:`STREAM_BYTES` in ``H``'s precision, between 1 and ``most``. Splitting a block of
    probes this way changes neither the probes nor the estimates, only the memory they take.
    """
    column = H.dim * torch.empty((), dtype=H.dtype).element_size()
    return max(1, min(int(most), STREAM_BYTES // max(column, 1)))


#: rows per chunk of :func:`inner`: float64 chunks of a tall matrix, float32 partial sums of a row buffer
#: (twice as many for a single column)
_INNER_ROWS = 1 << 16
_PARTIAL_ROWS = 1 << 12


def inner(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Aᵀ B (float64) for tall A (dim × j) and B (dim × b), accurate at any dim: a float32 BLAS
    product sums its dim terms in float32, which at dim ≈ 10⁷ is off by up to a few percent (measured
    1.5% for the squared norm of a unit vector). Tall A: chunks of rows cast to float64. A that is the
    transpose of a row-major buffer (a basis stored by rows): float32 products of 4096 rows (8192 for
    a single column B), their partial sums added in float64: relative to ‖a‖‖b‖, 1e-8 to 8e-8 in the
    worst case of all-positive terms and ~1e-9 for random signs (measured at dim 1e6 and 1.1e7), at
    about the speed of one float32 product.
    """
    out = torch.zeros(A.shape[1], B.shape[1], dtype=torch.float64, device=A.device)
    if A.dtype == torch.float64 or A.shape[0] <= _PARTIAL_ROWS:
        return out.add_(A.T.double() @ B.double())
    if A.stride(0) == 1 and A.shape[1] > 1:  # rows of a buffer: fast float32 partial sums
        # one float32 product per chunk of rows, written into a small buffer of partial sums, which
        # are added in float64 at the end (torch.bmm over the chunks measured 3-4x slower than this)
        step = _PARTIAL_ROWS if B.shape[1] > 1 else 2 * _PARTIAL_ROWS  # a matrix-vector product: 8192 rows
        chunks = zip(A.T.split(step, dim=1), B.split(step, dim=0))
        partial = torch.empty(-(-A.shape[0] // step), A.shape[1], B.shape[1], dtype=A.dtype, device=A.device)
        for p, (a, b) in zip(partial, chunks):
            torch.mm(a, b, out=p)
        return out.add_(partial.sum(0, dtype=torch.float64))
    for start in range(0, A.shape[0], _INNER_ROWS):
        rows = slice(start, start + _INNER_ROWS)
        a = A[rows].double()
        out += a.T @ (a if B is A else B[rows].double())
    return out


def subtract_product(Z: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Z − Q C in place (Z: dim × b, Q: dim × j, C: j × b), in chunks of rows: no dim × b temporary."""
    C = C.to(Z.dtype)
    for start in range(0, Z.shape[0], _INNER_ROWS):
        rows = slice(start, start + _INNER_ROWS)
        Z[rows].addmm_(Q[rows], C, alpha=-1)
    return Z


def orthonormal_columns(Y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis Q (dim × m) of the range of Y, with the first j columns of Q spanning the
    first j of Y. Float64: Householder QR (a copy). Otherwise Y itself is overwritten by shifted
    Cholesky QR3 (Fukaya, Kannan, Nakatsukasa, Zhang & Yamamoto 2020), its Gram matrices summed in
    float64 by :func:`inner` — LAPACK's float32 QR of a 10⁷-row matrix loses orthogonality to ~1e-3.
    """
    if Y.dtype == torch.float64:
        return torch.linalg.qr(Y)[0]
    n, m = Y.shape
    eps = torch.finfo(torch.float64).eps
    for attempt in range(3):
        G = inner(Y, Y)
        scale = float(torch.linalg.matrix_norm(G, ord=2)) if m else 0.0
        if scale == 0.0:
            return torch.linalg.qr(Y.double())[0].to(Y.dtype)
        shift = 11 * (m * (m + 1) + n * m) * eps * scale if attempt == 0 else 0.0
        L, info = torch.linalg.cholesky_ex(G + shift * torch.eye(m, dtype=torch.float64, device=G.device))
        if int(info) != 0:
            return torch.linalg.qr(Y.double())[0].to(Y.dtype)
        eye = torch.eye(m, dtype=torch.float64, device=G.device)
        R_inv = torch.linalg.solve_triangular(L.T, eye, upper=True)
        for start in range(0, n, _INNER_ROWS):
            rows = slice(start, start + _INNER_ROWS)
            Y[rows] = (Y[rows].double() @ R_inv).to(Y.dtype)
    return Y


def block_index(blocks, dim: int, device=None) -> tuple[list[str], torch.Tensor] | tuple[None, None]:
    """Names and a (dim,) tensor mapping each coordinate to its block number."""
    if not blocks:
        return None, None
    return [b.name for b in blocks], block_numbers(blocks, dim, device)


def block_sums(values: torch.Tensor, index: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """(dim, K) → (n_blocks, K): the sum of each block's rows (one scatter, no Python loop)."""
    out = torch.zeros(n_blocks, values.shape[1], dtype=values.dtype, device=values.device)
    return out.index_add_(0, index, values)


def check_rtol(rtol) -> float | None:
    """A relative tolerance in (0, 1), or None (no tolerance: a fixed budget)."""
    return None if rtol is None else check_open_unit_interval("rtol", rtol)
