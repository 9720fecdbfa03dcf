"""Spectral density by stochastic Lanczos quadrature (SLQ).

References: Ubaru, Chen & Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature"
(SIMAX 2017); Ghorbani, Krishnan & Xiao, "An investigation into neural net optimization via
Hessian eigenvalue density" (ICML 2019).

The spectral density of H (dim × dim, eigenpairs (λ_k, u_k)) is φ(x) = (1/dim) Σ_k δ(x − λ_k).
For a probe v uniform-ish on the unit sphere with E[v vᵀ] = I/dim,

    E[vᵀ f(H) v] = (1/dim) tr f(H) = ∫ f dφ,

and Lanczos started at v turns vᵀ f(H) v into the Gauss rule Σ_i w_i f(θ_i) (see
:mod:`.lanczos`). Here the probes are Rademacher vectors scaled to unit norm (z/√dim, so
E[vvᵀ] = I/dim exactly); all ``n_probes`` Lanczos processes run at once, each step being ONE
HVP block, so the cost is ``steps`` data passes and n_probes × (steps actually taken) HVPs.

The estimated measure is (1/n_probes) Σ_j Σ_i w_ji δ(x − θ_ji); ``density`` smooths it with a
Gaussian of standard deviation ``sigma`` on ``grid``:

    ρ(x) = (1/n_probes) Σ_j Σ_i w_ji N(x; θ_ji, σ²).

Default sigma = (λ̂max − λ̂min)/200 (λ̂ = the extreme Ritz values over all probes), floored at
1e-8·max(1, max|θ|) so that it is positive for a one-point spectrum. The default grid has
``grid_size`` points spanning [λ̂min − 5σ, λ̂max + 5σ], wide and fine enough that ρ integrates to 1
up to ~1e-6 (a user-given sigma far below the grid spacing, or a narrow user grid, breaks that).

Moments. For each probe, m1_j = Σ_i w_ji θ_ji = vⱼᵀHvⱼ (= α₁, exact) and
m2_j = Σ_i w_ji θ_ji² = ‖Hvⱼ‖² (exact once steps ≥ 2 or the process is exhausted; with a single
non-exhausted step it underestimates). Their probe means estimate (1/dim)·tr(H) and
(1/dim)·tr(H²) = ‖H‖_F²/dim without bias; the standard errors are the sample standard deviations
over probes / √n_probes (inf for one probe). In particular ``moments["trace"]`` = dim·m1 is
Hutchinson's trace estimate with these n_probes Rademacher probes (same variance), a free
by-product of the density.
"""

from __future__ import annotations

import math

import numpy as np

from ..checks import check_integer, check_positive
from ..results import DensityResult
from ..seeding import seeded_generator
from ..stats import mean_and_stderr
from .common import CountingOperator
from .lanczos import gauss_quadrature, lanczos_tridiagonal
from .probes import rademacher

SIGMA_FRACTION = 1 / 200  # default sigma as a fraction of the Ritz-value range
GRID_PAD_SIGMAS = 5.0  # the default grid extends this many sigmas beyond the extreme Ritz values


def density(
    op,
    *,
    n_probes: int = 10,
    steps: int = 80,
    seed: int | None = 0,
    grid_size: int = 1000,
    sigma: float | None = None,
    grid=None,
    reorthogonalize: bool = True,
) -> DensityResult:
    """Spectral density of H by SLQ with ``n_probes`` unit Rademacher probes and ``steps`` batched
    Lanczos steps (see the module docstring). ``grid`` (1-D, increasing) overrides the default grid;
    ``sigma`` overrides the default smoothing width.
    """
    check_integer("n_probes", n_probes)
    check_integer("steps", steps)
    check_integer("grid_size", grid_size, 2)
    if sigma is not None:
        sigma = check_positive("sigma", sigma)
    if grid is not None:
        grid = np.asarray(grid, dtype=float)
        if grid.ndim != 1 or grid.size < 2 or not np.all(np.isfinite(grid)) or not np.all(np.diff(grid) > 0):
            raise ValueError("grid must be a 1-D strictly increasing array of at least 2 finite points")
    H = CountingOperator(op)
    generator, seed = seeded_generator(seed)
    Z = rademacher(H.dim, n_probes, generator) / math.sqrt(H.dim)
    tri = lanczos_tridiagonal(H, Z, steps, reorthogonalize=reorthogonalize)
    nodes_t, weights_t = gauss_quadrature(tri.alphas, tri.betas, tri.lengths)
    nodes, weights = nodes_t.cpu().numpy(), weights_t.cpu().numpy()

    m1 = (weights_t * nodes_t).sum(1)
    m2 = (weights_t * nodes_t**2).sum(1)
    m1_mean, m1_se = mean_and_stderr(m1)
    m2_mean, m2_se = mean_and_stderr(m2)
    moments = {
        "m1": m1_mean,
        "m1_stderr": m1_se,
        "m2": m2_mean,
        "m2_stderr": m2_se,
        "trace": m1_mean * H.dim,
        "trace_stderr": m1_se * H.dim,
    }

    real = weights > 0  # padding nodes carry weight 0
    lo, hi = float(nodes[real].min()), float(nodes[real].max())
    if sigma is None:
        sigma = max((hi - lo) * SIGMA_FRACTION, 1e-8 * max(1.0, abs(lo), abs(hi)))
    sigma = float(sigma)
    if grid is None:
        pad = GRID_PAD_SIGMAS * sigma
        grid = np.linspace(lo - pad, hi + pad, grid_size)
    values = smoothed_density(grid, nodes, weights, sigma)
    return DensityResult(
        nodes=nodes,
        weights=weights,
        grid=grid,
        density=values,
        sigma=sigma,
        dim=H.dim,
        moments=moments,
        hvps=H.hvps,
        seed=seed,
        n_probes=n_probes,
        steps=steps,
        lengths=tuple(int(x) for x in tri.lengths.tolist()),
    )


def smoothed_density(grid, nodes, weights, sigma: float, chunk: int = 4096) -> np.ndarray:
    """ρ(x) = mean over probes of Σ_i w_i N(x; θ_i, σ²) on ``grid``.

    ``nodes``/``weights`` are (n_probes, m) with each row of weights summing to 1, so dividing by
    the total weight is the mean over probes.
    """
    grid = np.asarray(grid, dtype=float)
    nodes = np.asarray(nodes, dtype=float).reshape(-1)
    weights = np.asarray(weights, dtype=float).reshape(-1)
    keep = weights > 0
    nodes, weights = nodes[keep], weights[keep]
    total = weights.sum()
    out = np.empty_like(grid)
    for start in range(0, grid.size, chunk):
        x = grid[start : start + chunk, None]
        out[start : start + chunk] = (np.exp(-0.5 * ((x - nodes[None]) / sigma) ** 2) * weights[None]).sum(1)
    return out / (sigma * math.sqrt(2 * math.pi) * total)
