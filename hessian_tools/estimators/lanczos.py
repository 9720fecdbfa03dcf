"""Batched Lanczos tridiagonalisation and Gauss quadrature from the tridiagonal matrices.

K independent Lanczos processes, one per starting vector (the columns of ``V0``), advance in
lock step: every step applies H ONCE to a (dim, K_active) block, so K probes × m steps cost m
passes over the data instead of K·m. Process k builds an orthonormal basis v_1, v_2, … of the
Krylov space span{v_1, Hv_1, H²v_1, …} and the symmetric tridiagonal matrix

    T_k = tridiag(β_j; α_j; β_j),   α_j = v_jᵀ H v_j,   β_j = ‖H v_j − α_j v_j − β_{j−1} v_{j−1}‖,

with H V_m = V_m T_m + β_m v_{m+1} e_mᵀ. In floating point the three-term recurrence loses
orthogonality as Ritz values converge (ghost eigenvalues); with ``reorthogonalize=True`` every new
vector is re-orthogonalised against the whole basis *of its own process* by classical
Gram–Schmidt applied twice ("twice is enough", Giraud et al. 2005). All K bases live in one
float64 tensor of shape (m, dim, K) and the projections are batched einsums (no loop over K).
Memory: m·dim·K float64 numbers; ``reorthogonalize=False`` keeps only two vectors per process.

Breakdown: when β_j ≤ ``breakdown_tol``·‖H‖ₑₛₜ (‖H‖ₑₛₜ = the largest ‖Hv‖ seen so far, a lower
bound on ‖H‖) the Krylov space of that process is invariant under H: its Gauss rule is exact for
every f, the process stops (``exhausted``) and spends no more HVPs. A process also is exhausted
when its basis reaches ``dim`` vectors. Processes can therefore have different lengths. (For a
float32 operator the residual of an invariant space is ~1e-7·‖H‖, above the default tolerance:
such a breakdown goes undetected and the process continues with round-off directions, which full
reorthogonalisation keeps orthogonal; only the exact-stop saving is lost.)

Gauss quadrature (Golub & Meurant): with T_k = U diag(θ) Uᵀ, for unit v_1

    v_1ᵀ f(H) v_1 ≈ e_1ᵀ f(T_k) e_1 = Σ_i w_i f(θ_i),   w_i = U_{1i}²   (Σ_i w_i = 1),

exact for polynomials f of degree ≤ 2m − 1, and exact for every f once the process is exhausted.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.linalg
import torch

from ..checks import check_integer
from .common import CountingOperator


class Tridiagonal(NamedTuple):
    """Output of :func:`lanczos_tridiagonal` for K processes padded to m = max length.

    ``alphas`` (K, m) and ``betas`` (K, m−1) are float64; entries of process k beyond its length
    (``alphas[k, lengths[k]:]``, ``betas[k, lengths[k]−1:]``) are 0. ``lengths`` (K,) long: the
    number of Lanczos steps process k took (= HVPs it spent). ``exhausted`` (K,) bool: the process
    found an invariant subspace (breakdown, or a full basis of size dim), so its Gauss rule is exact.
    """

    alphas: torch.Tensor
    betas: torch.Tensor
    lengths: torch.Tensor
    exhausted: torch.Tensor


class BatchedLanczos:
    """The state of K Lanczos processes; :meth:`step` advances every active one by one HVP.

    Callers that stop processes early (e.g. on convergence of a quadrature) call :meth:`stop`;
    :func:`lanczos_tridiagonal` simply steps until no process is active.
    """

    def __init__(
        self, H, V0: torch.Tensor, steps: int, *, reorthogonalize: bool = True, breakdown_tol: float = 1e-10
    ):
        self.H = H if isinstance(H, CountingOperator) else CountingOperator(H)
        check_integer("steps", steps)
        if not isinstance(V0, torch.Tensor) or V0.ndim != 2 or V0.shape[0] != self.H.dim:
            shape = tuple(V0.shape) if isinstance(V0, torch.Tensor) else type(V0).__name__
            raise ValueError(f"starting vectors must be a tensor of shape ({self.H.dim}, K), got {shape}")
        if V0.shape[1] < 1:
            raise ValueError("need at least one starting vector (K ≥ 1)")
        V0 = V0.to(device=self.H.device, dtype=torch.float64)
        norms = V0.norm(dim=0)
        if not bool(torch.isfinite(norms).all()) or bool((norms == 0).any()):
            raise ValueError("every starting vector must be finite and nonzero")
        self.dim, self.K = self.H.dim, int(V0.shape[1])
        self.m = min(int(steps), self.dim)  # no process can take more than dim steps
        self.reorthogonalize = bool(reorthogonalize)
        self.breakdown_tol = float(breakdown_tol)
        dev = V0.device
        self.alphas = torch.zeros(self.K, self.m, dtype=torch.float64, device=dev)
        self.betas = torch.zeros(self.K, max(self.m - 1, 0), dtype=torch.float64, device=dev)
        self.lengths = torch.zeros(self.K, dtype=torch.long, device=dev)
        self.exhausted = torch.zeros(self.K, dtype=torch.bool, device=dev)
        self.active = torch.ones(self.K, dtype=torch.bool, device=dev)
        self.norm_estimate = 0.0
        self.j = 0  # steps taken by the longest process
        first = V0 / norms
        if self.reorthogonalize:
            self.basis = torch.zeros(self.m, self.dim, self.K, dtype=torch.float64, device=dev)
            self.basis[0] = first
        else:
            self.basis = None
            self.current, self.previous = first, torch.zeros_like(first)

    @property
    def done(self) -> bool:
        return not bool(self.active.any())

    def stop(self, mask: torch.Tensor) -> None:
        """Deactivate the processes where ``mask`` (K,) is True (they keep their current length)."""
        self.active &= ~mask.to(self.active.device)

    def step(self) -> None:
        """One Lanczos step for every active process: ONE ``H.matmat`` on the active columns."""
        if self.done:
            return
        j = self.j
        V = self.basis[j] if self.reorthogonalize else self.current
        active = self.active
        idx = active.nonzero().squeeze(1)
        HV = self.H.matmat(V[:, idx]).to(V.device)
        self.norm_estimate = max(self.norm_estimate, float(HV.norm(dim=0).max()))
        W = torch.zeros_like(V)
        W[:, idx] = HV
        alpha = (V * W).sum(0)
        W -= V * alpha
        if j > 0:
            previous = self.basis[j - 1] if self.reorthogonalize else self.previous
            W -= previous * self.betas[:, j - 1]
        if self.reorthogonalize:
            basis = self.basis[: j + 1]  # (j+1, dim, K)
            for _ in range(2):  # classical Gram–Schmidt, twice
                coeffs = torch.einsum("jdk,dk->jk", basis, W)
                W -= torch.einsum("jdk,jk->dk", basis, coeffs)
        beta = W.norm(dim=0)
        self.alphas[:, j] = torch.where(active, alpha, self.alphas[:, j])
        self.lengths[active] = j + 1
        broken = active & (beta <= self.breakdown_tol * self.norm_estimate)
        if j + 1 >= self.dim:  # a full basis of R^dim: invariant by definition
            broken = active.clone()
        self.exhausted |= broken
        go_on = active & ~broken
        if j + 1 < self.m:
            self.betas[:, j] = torch.where(go_on, beta, self.betas[:, j])
            safe = torch.where(go_on, beta, torch.ones_like(beta))
            nxt = torch.where(go_on, W / safe, torch.zeros_like(W))
            if self.reorthogonalize:
                self.basis[j + 1] = nxt
            else:
                self.previous, self.current = V, nxt
            self.active = go_on
        else:
            self.active = torch.zeros_like(active)
        self.j = j + 1

    def result(self) -> Tridiagonal:
        m = max(int(self.lengths.max()), 1)
        return Tridiagonal(
            self.alphas[:, :m].clone(),
            self.betas[:, : m - 1].clone(),
            self.lengths.clone(),
            self.exhausted.clone(),
        )


def lanczos_tridiagonal(
    H, V0: torch.Tensor, steps: int, reorthogonalize: bool = True, *, breakdown_tol: float = 1e-10
) -> Tridiagonal:
    """Run K = V0.shape[1] Lanczos processes from the columns of ``V0`` (dim, K) for up to ``steps``
    steps each (at most dim), one batched HVP per step; see the module docstring.

    Returns a :class:`Tridiagonal` ``(alphas (K, m), betas (K, m−1), lengths (K,), exhausted (K,))``
    with m the longest process's length; shorter processes are zero-padded.
    """
    state = BatchedLanczos(H, V0, steps, reorthogonalize=reorthogonalize, breakdown_tol=breakdown_tol)
    while not state.done:
        state.step()
    return state.result()


def gauss_quadrature(
    alphas: torch.Tensor, betas: torch.Tensor, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss rule (nodes, weights) of each tridiagonal: nodes = Ritz values (ascending), weights =
    squared first components of the eigenvectors (each row sums to 1).

    ``alphas`` (K, m), ``betas`` (K, m−1) (or 1-D for one process). ``lengths`` (K,) gives each
    process's actual size (default: m for all). A process of length L < m gets its L true nodes
    followed by m − L padding nodes equal to its α_1 (a Rayleigh quotient, so inside the spectrum's
    range) with weight exactly 0, so Σ_i w_i f(θ_i) is unaffected by padding.
    """
    alphas = torch.as_tensor(alphas, dtype=torch.float64)
    betas = torch.as_tensor(betas, dtype=torch.float64)
    single = alphas.ndim == 1
    if single:
        alphas, betas = alphas[None], betas[None]
    if alphas.ndim != 2 or betas.ndim != 2 or betas.shape != (alphas.shape[0], max(alphas.shape[1] - 1, 0)):
        raise ValueError(
            f"expected alphas (K, m) and betas (K, m−1), got {tuple(alphas.shape)} and {tuple(betas.shape)}"
        )
    K, m = alphas.shape
    if lengths is None:
        lengths = [m] * K
    else:
        lengths = [int(x) for x in torch.as_tensor(lengths).reshape(-1).tolist()]
        if len(lengths) != K or any(not 1 <= x <= m for x in lengths):
            raise ValueError(f"lengths must be K={K} integers in [1, {m}], got {lengths}")
    a, b = alphas.detach().cpu().numpy(), betas.detach().cpu().numpy()
    nodes = np.empty((K, m))
    weights = np.zeros((K, m))
    for k, L in enumerate(lengths):  # O(L²) each; not a hot path (no HVPs here)
        theta, first = _tridiagonal_gauss(a[k, :L], b[k, : L - 1])
        nodes[k, :L], weights[k, :L] = theta, first
        nodes[k, L:] = a[k, 0]
    nodes_t = torch.as_tensor(nodes, dtype=torch.float64, device=alphas.device)
    weights_t = torch.as_tensor(weights, dtype=torch.float64, device=alphas.device)
    return (nodes_t[0], weights_t[0]) if single else (nodes_t, weights_t)


def _tridiagonal_gauss(diagonal: np.ndarray, offdiagonal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if diagonal.shape[0] == 1:
        return diagonal.copy(), np.ones(1)
    theta, U = scipy.linalg.eigh_tridiagonal(diagonal, offdiagonal)
    w = U[0] ** 2
    return theta, w / w.sum()
