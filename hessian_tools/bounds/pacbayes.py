"""PAC-Bayes calculator: pure float64 functions, no torch.

Common setting of every bound below (call it **(A)**):

* a loss bounded in ``[0, 1]``;
* ``n`` training samples drawn i.i.d. from an unknown distribution;
* a prior ``P`` over weights chosen *before* seeing those ``n`` samples (it may depend on other,
  independent data, e.g. the initialisation or a held-out split);
* any posterior ``Q`` (it may depend on the data);
* ``L̂ = E_{w~Q} L̂_S(w)`` the empirical risk of the stochastic predictor on the ``n`` samples,
  ``L = E_{w~Q} L_D(w)`` its true risk, ``KL = KL(Q‖P)``;
* "with probability at least ``1 − δ`` over the draw of the sample, simultaneously for all Q".

Every bound is an upper bound on ``L``. The elementary bounds may exceed 1, which makes them
vacuous (``L ≤ 1`` trivially); they are returned unclipped so that one can see by how much.

Notation: ``kl(q‖p)`` is the KL divergence between Bernoulli(q) and Bernoulli(p)
(:func:`binary_kl`), and ``kl⁻¹(q, c)`` its upper inverse (:func:`kl_inverse_upper`).

Bad input raises :class:`ValueError` with one line naming the argument.
"""

from __future__ import annotations

import math

import numpy as np

from ..checks import (
    check_integer,
    check_nonnegative,
    check_number,
    check_open_unit_interval,
    check_positive_array,
    check_unit_interval,
)

__all__ = [
    "binary_kl",
    "split_delta",
    "kl_inverse_upper",
    "kl_inverse_lower",
    "maurer_complexity",
    "seeger_bound",
    "mcallester_bound",
    "catoni_bound",
    "quad_bound",
    "lambda_bound",
    "optimal_lambda",
    "all_bounds",
    "gaussian_kl",
    "isotropic_gaussian_kl",
    "prior_grid_cost",
    "dziugaite_roy_prior_scale",
    "mc_risk_upper",
    "certificate_bound",
    "DEFAULT_CATONI_GRID",
    "MIN_N_MAURER",
]

#: Smallest sample size for which Maurer (2004) proves ``E exp(n kl(L̂‖L)) ≤ 2√n``.
MIN_N_MAURER = 8

#: Default grid of Catoni's inverse temperature ``C`` (fixed before seeing the data): 33 values,
#: geometric from 0.05 to 20. The union bound over it costs ``ln 33 ≈ 3.5`` nats.
DEFAULT_CATONI_GRID = tuple(float(c) for c in np.geomspace(0.05, 20.0, 33))

_MAX_BISECT = 2200  # enough to reach adjacent doubles anywhere in [0, 1]


# --------------------------------------------------------------------------------------------
# validation (the package's one family of checks, named for what they check here)
# --------------------------------------------------------------------------------------------
def _real(name, x):
    return check_number(name, x, finite=False)


def _n_maurer(n):
    return check_integer(
        "n",
        n,
        MIN_N_MAURER,
        integral_floats=True,
        why=" (Maurer's bound E exp(n kl) <= 2 sqrt(n) is proved for n >= 8)",
    )


# --------------------------------------------------------------------------------------------
# binary kl and its inverses
# --------------------------------------------------------------------------------------------
def binary_kl(q, p):
    """Binary KL divergence ``kl(q‖p) = q ln(q/p) + (1−q) ln((1−q)/(1−p))``, in nats.

    Conventions: ``0 ln 0 = 0`` (so ``kl(0‖p) = −ln(1−p)``, ``kl(1‖p) = −ln p``) and
    ``kl(q‖p) = +inf`` when ``p ∈ {0, 1}`` and ``q ≠ p``. Vectorised: ``q`` and ``p`` broadcast as
    numpy arrays (float64); a Python float comes back for scalar input.

    Raises ValueError when an entry of ``q`` or ``p`` lies outside ``[0, 1]`` or is NaN.
    """
    qa = np.asarray(q, dtype=np.float64)
    pa = np.asarray(p, dtype=np.float64)
    for name, a in (("q", qa), ("p", pa)):
        if np.any(np.isnan(a)) or np.any(a < 0.0) or np.any(a > 1.0):
            raise ValueError(f"{name} must lie in [0, 1] (a probability), got {q if name == 'q' else p!r}")
    qa, pa = np.broadcast_arrays(qa, pa)
    # kl = q·φ(x) + (1−q)·φ(y) with φ(t) = t − ln(1+t) ≥ 0, x = (p−q)/q, y = (q−p)/(1−q)
    # (q·x + (1−q)·y = 0, so the first-order terms cancel exactly instead of in floating point).
    # ln(1+x) = ln p − ln q and ln(1+y) = ln(1−p) − ln(1−q); log1p is used when |t| < 1/2.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = pa - qa
        x = d / qa
        y = -d / (1.0 - qa)
        nx, ny = np.abs(x) < 0.5, np.abs(y) < 0.5
        xs, ys = np.where(nx, x, 0.0), np.where(ny, y, 0.0)
        # near: q·φ(x) without cancellation; far: q·x − q·ln(p/q) = d − q·ln(p/q) (x may overflow)
        t1 = np.where(nx, qa * (xs - np.log1p(xs)), d - qa * (np.log(pa) - np.log(qa)))
        t2 = np.where(ny, (1.0 - qa) * (ys - np.log1p(ys)), -d - (1.0 - qa) * (np.log1p(-pa) - np.log1p(-qa)))
        # q = 0 or q = 1: the surviving term in closed form
        t1 = np.where(qa == 0.0, 0.0, t1)
        t2 = np.where(qa == 0.0, -np.log1p(-pa), t2)
        t1 = np.where(qa == 1.0, -np.log(pa), t1)
        t2 = np.where(qa == 1.0, 0.0, t2)
    out = np.maximum(t1, 0.0) + np.maximum(t2, 0.0)
    # p on the boundary with q != p: +inf (t1 or t2 already is +inf; make it explicit).
    out = np.where(((pa == 0.0) | (pa == 1.0)) & (qa != pa), np.inf, out)
    out = np.where(qa == pa, 0.0, out)
    if out.ndim == 0:
        return float(out)
    return out


def _kl_scalar(q, p):
    """Scalar binary kl without validation (internal, hot loop)."""
    if p <= 0.0:
        return 0.0 if q == 0.0 else math.inf
    if p >= 1.0:
        return 0.0 if q == 1.0 else math.inf
    if q == 0.0:
        return -math.log1p(-p)
    if q == 1.0:
        return -math.log(p)
    d = p - q
    x = d / q
    y = -d / (1.0 - q)
    t1 = q * (x - math.log1p(x)) if abs(x) < 0.5 else d - q * (math.log(p) - math.log(q))
    t2 = (
        (1.0 - q) * (y - math.log1p(y))
        if abs(y) < 0.5
        else -d - (1.0 - q) * (math.log1p(-p) - math.log1p(-q))
    )
    return max(t1, 0.0) + max(t2, 0.0)


def _vectorise(func, q, c, **kw):
    if np.ndim(q) == 0 and np.ndim(c) == 0:
        return func(q, c, **kw)
    qa, ca = np.broadcast_arrays(np.asarray(q, dtype=np.float64), np.asarray(c, dtype=np.float64))
    out = np.empty(qa.shape, dtype=np.float64)
    for idx in np.ndindex(qa.shape):
        out[idx] = func(float(qa[idx]), float(ca[idx]), **kw)
    return out


def _kl_inv_upper_scalar(q, c, tol):
    q = check_unit_interval("q", q)
    c = _real("c", c)
    if c < 0.0:
        raise ValueError(f"c must be >= 0, got {c!r}")
    if c == 0.0 or q == 1.0:
        return q
    if not math.isfinite(c):
        return 1.0
    if q == 0.0:
        return -math.expm1(-c)  # kl(0‖p) = −ln(1−p) = c  ⇔  p = 1 − e^{−c}
    # Invariant: kl(q‖lo) ≤ c < kl(q‖hi); kl(q‖·) is increasing on [q, 1].
    lo, hi = q, 1.0
    for _ in range(_MAX_BISECT):
        if hi - lo <= tol and _kl_scalar(q, hi) - c <= tol:
            break
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:  # adjacent doubles: cannot do better
            break
        if _kl_scalar(q, mid) > c:
            hi = mid
        else:
            lo = mid
    return hi


def kl_inverse_upper(q, c, tol=1e-12):
    """Upper inverse of the binary kl: ``kl⁻¹(q, c) = max{p ∈ [q, 1] : kl(q‖p) ≤ c}``.

    ``kl(q‖·)`` is continuous and strictly increasing on ``[q, 1]`` (from 0 to +inf for
    ``q < 1``), so the maximiser is the unique root of ``kl(q‖p) = c`` there. It is found by a
    safeguarded bisection keeping ``kl(q‖lo) ≤ c < kl(q‖hi)`` and returning the **upper** end
    ``hi`` of the final bracket, so the result is never below the exact value (up to the rounding
    of one kl evaluation) — the safe side for an upper bound on a risk. The loop stops when the
    bracket is narrower than ``tol`` *and* ``kl(q‖hi) ≤ c + tol``, or when ``lo`` and ``hi`` are
    adjacent doubles (then ``hi`` is the smallest double above the root; near ``p = 1`` that can
    be ``1.0`` itself).

    Closed forms: ``c = 0 → q``; ``q = 0 → 1 − e^{−c}``; ``q = 1 → 1``; ``c = +inf → 1``.
    Scalars give a float; arrays broadcast and give an array.

    Raises ValueError for ``q ∉ [0, 1]``, ``c < 0`` or NaN.
    """
    tol = _real("tol", tol)
    if not tol > 0.0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    return _vectorise(_kl_inv_upper_scalar, q, c, tol=tol)


def _kl_inv_lower_scalar(q, c, tol):
    q = check_unit_interval("q", q)
    c = _real("c", c)
    if c < 0.0:
        raise ValueError(f"c must be >= 0, got {c!r}")
    if c == 0.0 or q == 0.0:
        return q
    if not math.isfinite(c):
        return 0.0
    if q == 1.0:
        return math.exp(-c)  # kl(1‖p) = −ln p = c
    # Invariant: kl(q‖lo) > c ≥ kl(q‖hi); kl(q‖·) is decreasing on [0, q].
    lo, hi = 0.0, q
    for _ in range(_MAX_BISECT):
        if hi - lo <= tol and _kl_scalar(q, lo) - c <= tol:
            break
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if _kl_scalar(q, mid) > c:
            lo = mid
        else:
            hi = mid
    return lo


def kl_inverse_lower(q, c, tol=1e-12):
    """Lower inverse of the binary kl: ``min{p ∈ [0, q] : kl(q‖p) ≤ c}``.

    Mirror image of :func:`kl_inverse_upper` (bisection on ``[0, q]`` returning the **lower**
    end of the final bracket, so never above the exact value). Closed forms: ``c = 0 → q``,
    ``q = 0 → 0``, ``q = 1 → e^{−c}``, ``c = +inf → 0``. Useful for lower bounds on a risk
    (e.g. ``kl(L̂‖L) ≤ c`` also gives ``L ≥ kl_inverse_lower(L̂, c)``).
    """
    tol = _real("tol", tol)
    if not tol > 0.0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    return _vectorise(_kl_inv_lower_scalar, q, c, tol=tol)


# --------------------------------------------------------------------------------------------
# bounds on the true risk
# --------------------------------------------------------------------------------------------
def maurer_complexity(kl, n, delta):
    """``(KL + ln(2√n/δ)) / n``: the right-hand side of the PAC-Bayes-kl bound (see
    :func:`seeger_bound`). Requires ``n ≥ 8``, ``δ ∈ (0, 1)``, ``KL ≥ 0``.
    """
    kl = check_nonnegative("kl", kl)
    n = _n_maurer(n)
    delta = check_open_unit_interval("delta", delta)
    return (kl + math.log(2.0 * math.sqrt(n)) - math.log(delta)) / n


def seeger_bound(emp_risk, kl, n, delta):
    """PAC-Bayes-kl bound (Langford & Seeger 2001; Seeger 2002; Maurer 2004, Theorem 5).

    Under (A) and ``n ≥ 8``, with probability ≥ 1 − δ, for all Q:

        kl(L̂ ‖ L) ≤ (KL(Q‖P) + ln(2√n/δ)) / n,   hence   L ≤ kl⁻¹(L̂, (KL + ln(2√n/δ))/n).

    Maurer proves ``E exp(n kl(L̂‖L)) ≤ 2√n`` for ``n ≥ 8`` and losses in [0, 1] (not only 0-1).
    The value is at most 1 and is the tightest of the bounds here that share its complexity term
    (:func:`mcallester_bound`, :func:`quad_bound`, :func:`lambda_bound` are relaxations of it).
    """
    emp_risk = check_unit_interval("emp_risk", emp_risk)
    return float(kl_inverse_upper(emp_risk, maurer_complexity(kl, n, delta)))


def mcallester_bound(emp_risk, kl, n, delta):
    """McAllester-type bound in Maurer's form.

    Under (A) and ``n ≥ 8``, with probability ≥ 1 − δ, for all Q:

        L ≤ L̂ + √((KL + ln(2√n/δ)) / (2n)).

    It follows from :func:`seeger_bound` and Pinsker's inequality ``kl(q‖p) ≥ 2(p − q)²``, so it
    is never smaller than the Seeger bound. May exceed 1 (vacuous).
    """
    emp_risk = check_unit_interval("emp_risk", emp_risk)
    return emp_risk + math.sqrt(maurer_complexity(kl, n, delta) / 2.0)


def catoni_bound(emp_risk, kl, n, delta, grid=DEFAULT_CATONI_GRID):
    """Catoni's bound (Catoni 2007, Theorem 1.2.6), minimised over a finite grid of ``C``.

    Under (A) (``n ≥ 1``), for one ``C > 0`` fixed in advance, with probability ≥ 1 − δ', for
    all Q:

        L ≤ (1 − exp(−C·L̂ − (KL + ln(1/δ'))/n)) / (1 − e^{−C}).

    (Stated by Catoni for the 0-1 loss; it holds for losses in [0, 1] because
    ``e^{−Cx} ≤ 1 − x(1 − e^{−C})`` on [0, 1].) To pick the best ``C`` after seeing the data, the
    bound is taken at every ``C`` of ``grid`` (which must be fixed before seeing the data) with
    ``δ' = δ / len(grid)``; by the union bound all of them hold together with probability
    ≥ 1 − δ, and the minimum over the grid is returned. Over *all* ``C`` the infimum of the
    right-hand side equals ``kl⁻¹(L̂, (KL + ln(1/δ'))/n)``, so the result is never below that.
    May exceed 1 (vacuous) on a coarse grid.
    """
    emp_risk = check_unit_interval("emp_risk", emp_risk)
    kl = check_nonnegative("kl", kl)
    n = check_integer("n", n, integral_floats=True)
    delta = check_open_unit_interval("delta", delta)
    g = np.asarray(grid, dtype=np.float64).ravel()
    if g.size == 0:
        raise ValueError("grid must contain at least one value of C")
    if not np.all(np.isfinite(g)) or np.any(g <= 0.0):
        raise ValueError(f"grid values C must be finite and > 0, got {grid!r}")
    comp = (kl + math.log(g.size) - math.log(delta)) / n
    vals = -np.expm1(-g * emp_risk - comp) / -np.expm1(-g)
    return float(np.min(vals))


def quad_bound(emp_risk, kl, n, delta):
    """PAC-Bayes-quadratic bound (Rivasplata et al. 2019; Pérez-Ortiz et al. 2021).

    Under (A) and ``n ≥ 8``, with probability ≥ 1 − δ, for all Q, with
    ``ε = (KL + ln(2√n/δ)) / (2n)``:

        L ≤ (√(L̂ + ε) + √ε)².

    Follows from :func:`seeger_bound` and the refined Pinsker inequality
    ``kl(q‖p) ≥ (p − q)²/(2p)`` for ``q ≤ p``; it equals :func:`lambda_bound` at
    :func:`optimal_lambda`. May exceed 1 (vacuous).
    """
    emp_risk = check_unit_interval("emp_risk", emp_risk)
    eps = maurer_complexity(kl, n, delta) / 2.0
    return (math.sqrt(emp_risk + eps) + math.sqrt(eps)) ** 2


def _lam(lam):
    return check_number("lam", lam, minimum=0.0, maximum=2.0, open_minimum=True, open_maximum=True)


def lambda_bound(emp_risk, kl, n, delta, lam):
    """PAC-Bayes-λ bound (Thiemann, Igel, Wintenberger & Seldin 2017, Theorem 3).

    Under (A) and ``n ≥ 8``, with probability ≥ 1 − δ, for all Q **and all λ ∈ (0, 2)
    simultaneously**:

        L ≤ L̂ / (1 − λ/2) + (KL + ln(2√n/δ)) / (n λ (1 − λ/2)).

    Because it holds for all λ at once (it is a deterministic consequence of the kl bound), λ may
    be chosen after seeing the data, e.g. by :func:`optimal_lambda`, at no extra cost.
    May exceed 1 (vacuous).
    """
    emp_risk = check_unit_interval("emp_risk", emp_risk)
    lam = _lam(lam)
    comp = maurer_complexity(kl, n, delta)
    return (emp_risk + comp / lam) / (1.0 - lam / 2.0)


def optimal_lambda(emp_risk, kl, n, delta):
    """Minimiser of :func:`lambda_bound` over λ ∈ (0, 2), in closed form (Thiemann et al. 2017):

        λ* = 2 / (√(2n L̂ / (KL + ln(2√n/δ)) + 1) + 1).

    At λ* the λ-bound equals :func:`quad_bound`. (With ``c = (KL + ln(2√n/δ))/n`` and
    ``s = √(2L̂/c + 1)``, both are ``c (s + 1)² / 2``.)
    """
    emp_risk = check_unit_interval("emp_risk", emp_risk)
    comp = maurer_complexity(kl, n, delta)
    return 2.0 / (math.sqrt(2.0 * emp_risk / comp + 1.0) + 1.0)


def all_bounds(emp_risk, kl, n, delta):
    """Every bound at once, by name: ``seeger``, ``mcallester``, ``catoni`` (default grid),
    ``quad``, ``lambda`` (at ``optimal_lambda``, also returned as ``lambda_star``).

    Each entry is a separate statement holding with probability ≥ 1 − δ; reporting the minimum of
    several would need a union bound (δ/k each). Requires ``n ≥ 8``.
    """
    emp_risk = check_unit_interval("emp_risk", emp_risk)
    kl = check_nonnegative("kl", kl)
    n = _n_maurer(n)
    delta = check_open_unit_interval("delta", delta)
    lam = optimal_lambda(emp_risk, kl, n, delta)
    return {
        "seeger": seeger_bound(emp_risk, kl, n, delta),
        "mcallester": mcallester_bound(emp_risk, kl, n, delta),
        "catoni": catoni_bound(emp_risk, kl, n, delta),
        "quad": quad_bound(emp_risk, kl, n, delta),
        "lambda": lambda_bound(emp_risk, kl, n, delta, lam),
        "lambda_star": lam,
    }


# --------------------------------------------------------------------------------------------
# KL between Gaussians, prior grids
# --------------------------------------------------------------------------------------------
def _r_minus_1_minus_log_r(x, log_r):
    """``r − 1 − ln r`` given ``x = r − 1`` (accurate near r = 1) and ``ln r`` (for far r)."""
    near = np.abs(x) < 0.5
    safe_x = np.where(near, x, 0.0)
    val = np.where(near, safe_x - np.log1p(safe_x), x - log_r)
    return np.maximum(val, 0.0)


def gaussian_kl(mu_q, var_q, mu_p, var_p):
    """``KL(N(μ_q, diag var_q) ‖ N(μ_p, diag var_p))`` in nats; arguments broadcast.

        KL = ½ Σ_i [ var_q/var_p + (μ_q − μ_p)²/var_p − 1 + ln(var_p/var_q) ].

    Computed as ½ Σ [(r − 1 − ln r) + (μ_q − μ_p)²/var_p] with ``r = var_q/var_p`` (each term
    ≥ 0; rounding is clipped at 0). Variances (not standard deviations) must be > 0.
    """
    vq = check_positive_array("var_q", var_q)
    vp = check_positive_array("var_p", var_p)
    mq = np.asarray(mu_q, dtype=np.float64)
    mp = np.asarray(mu_p, dtype=np.float64)
    if not (np.all(np.isfinite(mq)) and np.all(np.isfinite(mp))):
        raise ValueError("mu_q and mu_p must be finite")
    mq, vq, mp, vp = np.broadcast_arrays(mq, vq, mp, vp)
    x = (vq - vp) / vp
    log_r = np.log(vq) - np.log(vp)
    terms = _r_minus_1_minus_log_r(x, log_r) + (mq - mp) ** 2 / vp
    return 0.5 * float(np.sum(terms))


def isotropic_gaussian_kl(dist_sq, dim, sigma_q, sigma_p):
    """``KL(N(w, σ_q² I_d) ‖ N(w₀, σ_p² I_d))`` with ``dist_sq = ‖w − w₀‖²`` and ``d = dim``:

        KL = ½ [ d (σ_q²/σ_p² − 1 − ln(σ_q²/σ_p²)) + ‖w − w₀‖²/σ_p² ].

    ``sigma_q`` and ``sigma_p`` are standard deviations (> 0).
    """
    dist_sq = _real("dist_sq", dist_sq)
    if dist_sq < 0.0 or not math.isfinite(dist_sq):
        raise ValueError(f"dist_sq must be finite and >= 0, got {dist_sq!r}")
    dim = check_integer("dim", dim, integral_floats=True)
    sq = float(check_positive_array("sigma_q", _real("sigma_q", sigma_q)))
    sp = float(check_positive_array("sigma_p", _real("sigma_p", sigma_p)))
    x = (sq - sp) * (sq + sp) / (sp * sp)
    log_r = 2.0 * (math.log(sq) - math.log(sp))
    per_dim = float(_r_minus_1_minus_log_r(np.float64(x), np.float64(log_r)))
    return 0.5 * (dim * per_dim + dist_sq / (sp * sp))


def prior_grid_cost(num_choices):
    """``ln K``: the price, in nats added to KL, of picking one of ``K`` priors (or prior/posterior
    scales) fixed before seeing the data, after seeing it.

    Union bound: run the bound with ``δ/K`` for each of the K choices; all K statements then hold
    together with probability ≥ 1 − δ. Since every bound here contains ``ln(·/δ)``, using ``δ/K``
    is the same as adding ``ln K`` to KL.
    """
    return math.log(check_integer("num_choices", num_choices, integral_floats=True))


def dziugaite_roy_prior_scale(b, c, j):
    """Prior scale ``λ_j = c · exp(−j/b)`` of Dziugaite & Roy (2017, Sec. 4), and its cost.

    A countable grid ``j = 1, 2, …`` fixed before seeing the data; statement ``j`` is run at
    confidence ``δ_j = 6δ/(π² j²)`` (Σ_j δ_j = δ, a union bound), so the choice of ``j`` after
    seeing the data costs

        cost = 2 ln j + ln(π²/6) = 2 ln(b ln(c/λ_j)) + ln(π²/6)   nats added to KL.

    Dziugaite & Roy put the grid on the prior *variance* (b = 100, c = 0.1); the helper does not
    care what ``λ`` scales — use it consistently. Returns ``(scale, cost)``.
    Requires ``b > 0``, ``c > 0`` and an integer ``j ≥ 1``.
    """
    b = _real("b", b)
    c = _real("c", c)
    if not (b > 0.0 and math.isfinite(b)):
        raise ValueError(f"b must be finite and > 0, got {b!r}")
    if not (c > 0.0 and math.isfinite(c)):
        raise ValueError(f"c must be finite and > 0, got {c!r}")
    j = check_integer("j", j, integral_floats=True)
    return c * math.exp(-j / b), 2.0 * math.log(j) + math.log(math.pi**2 / 6.0)


# --------------------------------------------------------------------------------------------
# Monte-Carlo step and the full certificate
# --------------------------------------------------------------------------------------------
def mc_risk_upper(mc_mean, m, delta_mc):
    """Upper bound on the stochastic predictor's empirical risk from ``m`` weight samples
    (Langford & Caruana 2002, Theorem 2.5; used by Dziugaite & Roy 2017).

    ``L̂(Q) = E_{w~Q} L̂_S(w)`` cannot be computed exactly; draw ``w_1..w_m`` i.i.d. from Q
    (independently of anything else, the sample S held fixed) and let
    ``mc_mean = (1/m) Σ_k L̂_S(w_k) ∈ [0, 1]``. Then with probability ≥ 1 − δ_mc over the draw of
    the weights:

        kl(mc_mean ‖ L̂(Q)) ≤ ln(2/δ_mc) / m,   so   L̂(Q) ≤ kl⁻¹(mc_mean, ln(2/δ_mc)/m).

    (A one-sided Chernoff bound would allow ln(1/δ_mc); ln(2/δ_mc) is the published, conservative
    form.) Combined with a PAC-Bayes bound at δ_bound, the total confidence is
    1 − (δ_bound + δ_mc) by a union bound — see :func:`certificate_bound`.
    """
    mc_mean = check_unit_interval("mc_mean", mc_mean)
    m = check_integer("m", m, integral_floats=True)
    delta_mc = check_open_unit_interval("delta_mc", delta_mc)
    return float(kl_inverse_upper(mc_mean, (math.log(2.0) - math.log(delta_mc)) / m))


def split_delta(delta, delta_mc=None) -> tuple[float, float, float]:
    """Split the total failure probability δ = δ_bound + δ_mc between the PAC-Bayes bound and the
    Monte-Carlo estimate of the stochastic predictor's risk (a union bound); δ_mc defaults to δ/2
    and must lie in (0, δ). Returns ``(delta, delta_bound, delta_mc)``.
    """
    delta = check_open_unit_interval("delta", delta)
    if delta_mc is None:
        delta_mc = delta / 2.0
    delta_mc = check_open_unit_interval("delta_mc", delta_mc)
    if not delta_mc < delta:
        raise ValueError(
            f"delta_mc must be < delta (delta = delta_bound + delta_mc), got {delta_mc!r} >= {delta!r}"
        )
    return delta, delta - delta_mc, delta_mc


def certificate_bound(mc_mean, m, kl, n, delta, delta_mc=None, grid_size=1):
    """Full certificate on the true risk of the stochastic predictor Q, at total confidence 1 − δ.

    Steps (the two failure events are joined by a union bound, δ = δ_bound + δ_mc):

    1. ``emp_risk_upper = mc_risk_upper(mc_mean, m, δ_mc)`` bounds L̂(Q) from ``m`` weight
       samples (probability ≥ 1 − δ_mc over the weights).
    2. ``kl_term = (KL + ln(grid_size) + ln(2√n/δ_bound)) / n``: the Maurer complexity with the
       price ``ln(grid_size)`` of choosing among ``grid_size`` priors/scales fixed in advance
       (equivalently δ_bound/grid_size; see :func:`prior_grid_cost`).
    3. ``bound = kl⁻¹(emp_risk_upper, kl_term)`` (Seeger bound, probability ≥ 1 − δ_bound over the
       sample). kl⁻¹ is non-decreasing in its first argument, so plugging in an upper bound on L̂
       is valid.

    ``delta_mc`` defaults to ``δ/2``; it must lie in (0, δ). Returns a dict with every
    intermediate: ``mc_mean, m, emp_risk_upper, kl, grid_size, grid_cost, n, kl_term, delta,
    delta_bound, delta_mc, bound``.
    """
    mc_mean = check_unit_interval("mc_mean", mc_mean)
    m = check_integer("m", m, integral_floats=True)
    kl = check_nonnegative("kl", kl)
    n = _n_maurer(n)
    delta, delta_bound, delta_mc = split_delta(delta, delta_mc)
    grid_cost = prior_grid_cost(grid_size)
    emp_upper = mc_risk_upper(mc_mean, m, delta_mc)
    kl_term = maurer_complexity(kl + grid_cost, n, delta_bound)
    bound = float(kl_inverse_upper(emp_upper, kl_term))
    return {
        "mc_mean": mc_mean,
        "m": m,
        "emp_risk_upper": emp_upper,
        "kl": kl,
        "grid_size": int(grid_size),
        "grid_cost": grid_cost,
        "n": n,
        "kl_term": kl_term,
        "delta": delta,
        "delta_bound": delta_bound,
        "delta_mc": delta_mc,
        "bound": bound,
    }
