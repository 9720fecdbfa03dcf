"""Tests of hessian_tools.bounds.pacbayes against independently derived values (scipy, torch, closed
forms, simulation) and against the inequalities that relate the bounds in the literature."""

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq, minimize_scalar
from scipy.special import rel_entr

from hessian_tools.bounds import pacbayes as pb

SETTINGS = settings(max_examples=150, deadline=None)

unit = st.floats(0.0, 1.0, allow_nan=False)
cost = st.floats(0.0, 5.0, allow_nan=False)
klv = st.floats(0.0, 1e4, allow_nan=False)
nn = st.integers(8, 10**7)
dd = st.floats(1e-8, 0.99, allow_nan=False)


def kl_ref(q, p):
    """Binary kl from scipy's rel_entr (independent of the module)."""
    return float(rel_entr(q, p) + rel_entr(1.0 - q, 1.0 - p))


def kl_mp(q, p):
    """Binary kl in 50-digit arithmetic (mpmath; a dependency of torch through sympy), so that
    brentq's root is exact to double precision even where kl ~ 1e-12 and float64 cancels."""
    with mpmath.workdps(50):
        q, p = mpmath.mpf(q), mpmath.mpf(p)
        t1 = q * mpmath.log(q / p) if q > 0 else 0
        t2 = (1 - q) * mpmath.log((1 - q) / (1 - p)) if q < 1 else 0
        return t1 + t2


def root_ref(q, c):
    """Exact upper root of kl(q‖p) = c by brentq; None when it lies above 1 − 1e-15."""
    hi = 1.0 - 1e-15
    if kl_mp(q, hi) <= c:
        return None
    return brentq(lambda p: float(kl_mp(q, p) - c), q, hi, xtol=1e-16, rtol=8.9e-16, maxiter=500)


def comp_ref(kl, n, delta):
    return (kl + math.log(2 * math.sqrt(n) / delta)) / n


# ------------------------------------------------------------------------------ binary kl
@pytest.mark.parametrize("q", [0.0, 1e-9, 0.1, 0.5, 0.73, 1 - 1e-9, 1.0])
@pytest.mark.parametrize("p", [1e-12, 0.01, 0.3, 0.5, 0.99, 1 - 1e-12])
def test_binary_kl_matches_rel_entr(q, p):
    assert pb.binary_kl(q, p) == pytest.approx(kl_ref(q, p), rel=1e-10, abs=1e-15)


def test_binary_kl_vectorised_and_conventions():
    q = np.linspace(0, 1, 11)[:, None]
    p = np.linspace(0.05, 0.95, 7)[None, :]
    out = pb.binary_kl(q, p)
    assert out.shape == (11, 7)
    np.testing.assert_allclose(out, rel_entr(q, p) + rel_entr(1 - q, 1 - p), rtol=1e-12, atol=1e-15)
    assert pb.binary_kl(0.0, 0.0) == 0.0 and pb.binary_kl(1.0, 1.0) == 0.0
    assert pb.binary_kl(0.3, 0.3) == 0.0
    for q_, p_ in [(0.5, 0.0), (0.5, 1.0), (0.0, 1.0), (1.0, 0.0), (1e-300, 0.0)]:
        assert pb.binary_kl(q_, p_) == math.inf
    assert pb.binary_kl(0.0, 0.4) == pytest.approx(-math.log(0.6), rel=1e-14)
    assert pb.binary_kl(1.0, 0.4) == pytest.approx(-math.log(0.4), rel=1e-14)
    assert isinstance(pb.binary_kl(0.2, 0.4), float)


# ------------------------------------------------------------------------------ kl inverse
@pytest.mark.parametrize("q", [1e-6, 0.01, 0.1, 0.37, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("c", [1e-8, 1e-3, 0.05, 0.5, 2.0])
def test_kl_inverse_upper_matches_brentq(q, c):
    p = pb.kl_inverse_upper(q, c)
    r = root_ref(q, c)
    if r is None:
        assert p >= 1 - 1e-15
    else:
        assert r - 1e-13 <= p <= r + 2e-12


@pytest.mark.parametrize("c", [0.0, 1e-10, 0.1, 1.0, 10.0, 40.0])
def test_kl_inverse_upper_closed_forms(c):
    assert pb.kl_inverse_upper(0.0, c) == pytest.approx(-math.expm1(-c), rel=1e-14, abs=1e-300)
    assert pb.kl_inverse_upper(1.0, c) == 1.0
    assert pb.kl_inverse_lower(1.0, c) == pytest.approx(math.exp(-c), rel=1e-14)
    assert pb.kl_inverse_lower(0.0, c) == 0.0


def test_kl_inverse_zero_and_infinite_c_and_arrays():
    for q in [0.0, 0.2, 0.8, 1.0]:
        assert pb.kl_inverse_upper(q, 0.0) == q
        assert pb.kl_inverse_lower(q, 0.0) == q
        assert pb.kl_inverse_upper(q, math.inf) == 1.0
        assert pb.kl_inverse_lower(q, math.inf) == 0.0
    qs = np.array([0.0, 0.1, 0.5, 1.0])
    out = pb.kl_inverse_upper(qs, 0.2)
    assert out.shape == (4,)
    np.testing.assert_array_equal(out, [pb.kl_inverse_upper(float(q), 0.2) for q in qs])
    # root within one ulp of 1: the safe answer is 1.0 itself
    assert pb.kl_inverse_upper(0.99, 2.0) == 1.0


@pytest.mark.parametrize("q", [0.001, 0.2, 0.5, 0.95])
@pytest.mark.parametrize("c", [1e-4, 0.1, 1.0])
def test_kl_inverse_lower_matches_brentq_and_mirror(q, c):
    p = pb.kl_inverse_lower(q, c)
    if kl_mp(q, 1e-300) <= c:
        assert p <= 1e-12
    else:
        r = brentq(lambda x: float(kl_mp(q, x) - c), 1e-300, q, xtol=1e-18, rtol=8.9e-16)
        assert r - 2e-12 <= p <= r + 1e-13
    assert p == pytest.approx(1 - pb.kl_inverse_upper(1 - q, c), abs=5e-12)


@SETTINGS
@given(q1=unit, q2=unit, c=cost)
def test_kl_inverse_upper_monotone_in_q(q1, q2, c):
    lo, hi = sorted((q1, q2))
    assert pb.kl_inverse_upper(lo, c) <= pb.kl_inverse_upper(hi, c) + 2e-12


@SETTINGS
@given(q=unit, c1=cost, c2=cost)
def test_kl_inverse_upper_monotone_in_c(q, c1, c2):
    lo, hi = sorted((c1, c2))
    assert pb.kl_inverse_upper(q, lo) <= pb.kl_inverse_upper(q, hi) + 2e-12


@SETTINGS
@given(q=st.floats(0.0, 1.0, exclude_max=True), c=st.floats(1e-12, 5.0))
def test_kl_inverse_upper_never_below_root_and_feasible(q, c):
    p = pb.kl_inverse_upper(q, c)
    assert q <= p <= 1.0
    r = root_ref(q, c)
    if r is None:
        assert p >= 1 - 1e-15
        return
    assert p >= r - 1e-13  # never below the exact root (brentq slack only)
    assert p <= r + 2e-12  # and not far above it
    assume(r < 1 - 1e-6)  # closer to 1, no double is within 1e-9 of the root in kl
    assert kl_ref(q, p) <= c + 1e-9


# ------------------------------------------------------------------------------ bounds
@SETTINGS
@given(emp=unit, kl=klv, n=nn, delta=dd)
def test_every_bound_at_least_emp_risk_and_ordering(emp, kl, n, delta):
    b = pb.all_bounds(emp, kl, n, delta)
    for name in ("seeger", "mcallester", "catoni", "quad", "lambda"):
        assert b[name] >= emp - 1e-12, name
    assert b["seeger"] <= 1.0
    # Pinsker kl(q‖p) ≥ 2(p−q)² ⇒ Seeger ≤ McAllester; refined Pinsker ⇒ Seeger ≤ quad.
    assert b["seeger"] <= b["mcallester"] + 1e-12
    assert b["seeger"] <= b["quad"] + 1e-12
    assert b["lambda"] == pytest.approx(b["quad"], rel=1e-9)


@SETTINGS
@given(emp=unit, kl=klv, n=nn, delta=dd)
def test_formulas_against_direct_evaluation(emp, kl, n, delta):
    c = comp_ref(kl, n, delta)
    assert pb.mcallester_bound(emp, kl, n, delta) == pytest.approx(emp + math.sqrt(c / 2), rel=1e-12)
    eps = c / 2
    assert pb.quad_bound(emp, kl, n, delta) == pytest.approx(
        (math.sqrt(emp + eps) + math.sqrt(eps)) ** 2, rel=1e-12
    )
    lam = 0.7
    assert pb.lambda_bound(emp, kl, n, delta, lam) == pytest.approx(
        emp / (1 - lam / 2) + c / (lam * (1 - lam / 2)), rel=1e-12
    )
    r = root_ref(emp, c) if emp < 1 else 1.0
    s = pb.seeger_bound(emp, kl, n, delta)
    if r is not None:
        assert r - 1e-12 <= s <= r + 3e-12


@SETTINGS
@given(emp=unit, kl=st.floats(0.0, 1e3), n=nn, delta=dd)
def test_optimal_lambda_minimises_lambda_bound(emp, kl, n, delta):
    lam = pb.optimal_lambda(emp, kl, n, delta)
    assert 0 < lam <= 1.0
    best = pb.lambda_bound(emp, kl, n, delta, lam)
    assert best == pytest.approx(pb.quad_bound(emp, kl, n, delta), rel=1e-9)
    num = minimize_scalar(
        lambda x: pb.lambda_bound(emp, kl, n, delta, x),
        bounds=(1e-9, 2 - 1e-9),
        method="bounded",
        options={"xatol": 1e-12},
    )
    assert best <= num.fun * (1 + 1e-9)


@SETTINGS
@given(emp=unit, kl=klv, n=st.integers(1, 10**7), delta=dd)
def test_catoni_never_below_kl_inverse_and_close_on_fine_grid(emp, kl, n, delta):
    grid = pb.DEFAULT_CATONI_GRID
    # inf over all C of Catoni's bound = kl⁻¹(L̂, (KL + ln(1/δ'))/n), δ' = δ/|grid|
    floor = pb.kl_inverse_upper(emp, (kl + math.log(len(grid) / delta)) / n)
    assert pb.catoni_bound(emp, kl, n, delta) >= floor - 1e-12
    fine = np.geomspace(1e-3, 1e3, 4001)
    cfine = pb.catoni_bound(emp, kl, n, delta, grid=fine)
    floor_fine = pb.kl_inverse_upper(emp, (kl + math.log(fine.size / delta)) / n)
    assert floor_fine - 1e-12 <= cfine
    assume(floor_fine < 0.99)  # C up to 1e3 reaches the infimum unless the bound is ~vacuous
    assert cfine <= floor_fine + 2e-3 * max(floor_fine, 1e-2)


def test_catoni_single_C_formula():
    emp, kl, n, delta, C = 0.1, 20.0, 1000, 0.05, 2.0
    want = (1 - math.exp(-C * emp - (kl + math.log(1 / delta)) / n)) / (1 - math.exp(-C))
    assert pb.catoni_bound(emp, kl, n, delta, grid=[C]) == pytest.approx(want, rel=1e-14)
    # union bound over two values: δ/2 each
    want2 = (1 - math.exp(-C * emp - (kl + math.log(2 / delta)) / n)) / (1 - math.exp(-C))
    assert pb.catoni_bound(emp, kl, n, delta, grid=[C, 1e-3]) == pytest.approx(want2, rel=1e-14)


def test_edge_values():
    b = pb.all_bounds(0.0, 0.0, 8, 0.5)
    assert all(v > 0 for v in b.values())
    assert pb.seeger_bound(1.0, 3.0, 100, 0.05) == 1.0
    assert pb.optimal_lambda(0.0, 1.0, 100, 0.1) == 1.0
    assert pb.lambda_bound(0.0, 1.0, 100, 0.1, 1.0) == pytest.approx(4 * comp_ref(1.0, 100, 0.1) / 2)


def test_seeger_bound_covers_in_simulation():
    """KL = 0 (Q = P = a point mass): L̂ ~ Binomial(n, L)/n; the bound must fail ≤ δ of the time."""
    rng = np.random.default_rng(0)
    n, delta = 20, 0.2
    for L in (0.05, 0.3, 0.6):
        emp = rng.binomial(n, L, size=1500) / n
        fails = np.mean([pb.seeger_bound(e, 0.0, n, delta) < L for e in emp])
        assert fails <= delta
        mc = np.mean([pb.mc_risk_upper(e, n, delta) < L for e in emp])
        assert mc <= delta


# ------------------------------------------------------------------------------ Gaussians
def torch_kl(mq, vq, mp, vp):
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))
    Q = torch.distributions.Independent(torch.distributions.Normal(t(mq), t(vq).sqrt()), 1)
    P = torch.distributions.Independent(torch.distributions.Normal(t(mp), t(vp).sqrt()), 1)
    return float(torch.distributions.kl_divergence(Q, P))


@pytest.mark.parametrize("seed", range(5))
def test_gaussian_kl_matches_torch(seed):
    rng = np.random.default_rng(seed)
    d = 50
    mq, mp = rng.normal(size=d), rng.normal(size=d) * 0.1
    vq, vp = rng.uniform(1e-4, 3, size=d), rng.uniform(1e-3, 2, size=d)
    assert pb.gaussian_kl(mq, vq, mp, vp) == pytest.approx(torch_kl(mq, vq, mp, vp), rel=1e-12)
    # scalar prior broadcast
    assert pb.gaussian_kl(mq, vq, 0.0, 0.5) == pytest.approx(
        torch_kl(mq, vq, np.zeros(d), np.full(d, 0.5)), rel=1e-12
    )
    assert pb.gaussian_kl(mq, vq, mq, vq) == 0.0
    assert pb.gaussian_kl(0.0, 1e-30, 0.0, 1.0) == pytest.approx(
        0.5 * (1e-30 - 1 + math.log(1e30)), rel=1e-14
    )


@pytest.mark.parametrize(
    "dim,sq,sp,dist",
    [(1, 1.0, 1.0, 0.0), (10, 0.1, 0.2, 3.0), (1000, 0.03, 0.01, 12.5), (7, 1.0, 1.0 + 1e-9, 0.0)],
)
def test_isotropic_equals_diagonal(dim, sq, sp, dist):
    w0 = np.zeros(dim)
    w = np.full(dim, math.sqrt(dist / dim))
    diag = pb.gaussian_kl(w, sq**2, w0, sp**2)
    iso = pb.isotropic_gaussian_kl(dist, dim, sq, sp)
    assert iso == pytest.approx(diag, rel=1e-10, abs=1e-20)
    assert iso == pytest.approx(
        torch_kl(w, np.full(dim, sq**2), w0, np.full(dim, sp**2)), rel=1e-10, abs=1e-14
    )
    if sq == sp:
        assert iso == pytest.approx(dist / (2 * sp**2))


# ------------------------------------------------------------------------------ grids, MC, certificate
def test_prior_grid_cost_and_dziugaite_roy():
    assert pb.prior_grid_cost(1) == 0.0
    assert pb.prior_grid_cost(20) == pytest.approx(math.log(20))
    b, c = 100.0, 0.1
    for j in (1, 5, 300):
        lam, cost_j = pb.dziugaite_roy_prior_scale(b, c, j)
        assert lam == pytest.approx(c * math.exp(-j / b))
        assert cost_j == pytest.approx(2 * math.log(b * math.log(c / lam)) + math.log(math.pi**2 / 6))
    # the weights exp(−cost_j) = 6/(π² j²) sum to at most 1 (a valid union bound)
    total = sum(math.exp(-pb.dziugaite_roy_prior_scale(b, c, j)[1]) for j in range(1, 20001))
    assert 0.9999 < total <= 1.0


def test_mc_risk_upper_formula():
    for mean, m, d in [(0.0, 10, 0.01), (0.08, 1000, 0.01), (0.5, 1, 0.5), (1.0, 5, 0.1)]:
        c = math.log(2 / d) / m
        want = 1.0 if mean == 1.0 else (1 - math.exp(-c) if mean == 0 else root_ref(mean, c))
        assert pb.mc_risk_upper(mean, m, d) == pytest.approx(want, abs=3e-12)


def test_certificate_composes():
    out = pb.certificate_bound(0.03, 1000, 2500.0, 50000, 0.05, delta_mc=0.01, grid_size=30)
    assert out["delta_bound"] == pytest.approx(0.04) and out["delta_mc"] == 0.01
    assert out["delta_bound"] + out["delta_mc"] == pytest.approx(out["delta"])
    assert out["emp_risk_upper"] == pb.mc_risk_upper(0.03, 1000, 0.01)
    assert out["emp_risk_upper"] > 0.03
    assert out["grid_cost"] == pytest.approx(math.log(30))
    assert out["kl_term"] == pytest.approx(comp_ref(2500.0 + math.log(30), 50000, 0.04), rel=1e-14)
    # ln K in the KL term is the same as δ_bound/K
    assert out["bound"] == pytest.approx(
        pb.seeger_bound(out["emp_risk_upper"], 2500.0, 50000, 0.04 / 30), abs=3e-12
    )
    assert out["bound"] > pb.seeger_bound(0.03, 2500.0, 50000, 0.05)
    default = pb.certificate_bound(0.03, 1000, 2500.0, 50000, 0.05)
    assert default["delta_mc"] == pytest.approx(0.025) and default["grid_size"] == 1


# ------------------------------------------------------------------------------ bad input
BAD = [
    (pb.binary_kl, (1.2, 0.5)),
    (pb.binary_kl, (0.5, -0.1)),
    (pb.binary_kl, (np.nan, 0.5)),
    (pb.kl_inverse_upper, (-0.1, 1.0)),
    (pb.kl_inverse_upper, (0.5, -1.0)),
    (pb.kl_inverse_upper, (0.5, np.nan)),
    (pb.kl_inverse_upper, (0.5, 1.0, 0.0)),
    (pb.kl_inverse_lower, (1.5, 1.0)),
    (pb.kl_inverse_lower, (0.5, -1e-9)),
    (pb.seeger_bound, (0.1, 1.0, 100, 0.0)),
    (pb.seeger_bound, (0.1, 1.0, 100, 1.0)),
    (pb.seeger_bound, (0.1, 1.0, 7, 0.05)),
    (pb.seeger_bound, (0.1, 1.0, 0, 0.05)),
    (pb.seeger_bound, (0.1, 1.0, 100.5, 0.05)),
    (pb.seeger_bound, (1.1, 1.0, 100, 0.05)),
    (pb.seeger_bound, (-0.1, 1.0, 100, 0.05)),
    (pb.seeger_bound, (0.1, -1.0, 100, 0.05)),
    (pb.seeger_bound, (0.1, math.inf, 100, 0.05)),
    (pb.seeger_bound, (0.1, 1.0, True, 0.05)),
    (pb.mcallester_bound, (0.1, 1.0, 100, 1.5)),
    (pb.mcallester_bound, (0.1, 1.0, 5, 0.1)),
    (pb.mcallester_bound, (2.0, 1.0, 100, 0.1)),
    (pb.mcallester_bound, (0.1, -0.5, 100, 0.1)),
    (pb.catoni_bound, (0.1, 1.0, 0, 0.1)),
    (pb.catoni_bound, (0.1, 1.0, 10, -0.1)),
    (pb.catoni_bound, (0.1, 1.0, 10, 0.1, [])),
    (pb.catoni_bound, (0.1, 1.0, 10, 0.1, [1.0, -2.0])),
    (pb.catoni_bound, (1.01, 1.0, 10, 0.1)),
    (pb.catoni_bound, (0.1, -1.0, 10, 0.1)),
    (pb.quad_bound, (0.1, 1.0, 4, 0.1)),
    (pb.quad_bound, (0.1, -1.0, 100, 0.1)),
    (pb.lambda_bound, (0.1, 1.0, 100, 0.1, 0.0)),
    (pb.lambda_bound, (0.1, 1.0, 100, 0.1, 2.0)),
    (pb.lambda_bound, (0.1, 1.0, 100, 0.1, -1.0)),
    (pb.lambda_bound, (0.1, 1.0, 100, 0.1, np.nan)),
    (pb.optimal_lambda, (0.1, 1.0, 100, 0.0)),
    (pb.all_bounds, (0.1, 1.0, 3, 0.1)),
    (pb.all_bounds, (0.1, 1.0, 100, 1.0)),
    (pb.all_bounds, (-1e-3, 1.0, 100, 0.1)),
    (pb.gaussian_kl, (0.0, -1.0, 0.0, 1.0)),
    (pb.gaussian_kl, (0.0, 1.0, 0.0, 0.0)),
    (pb.gaussian_kl, ([0.0, 1.0], [1.0, -1.0], 0.0, 1.0)),
    (pb.gaussian_kl, (np.nan, 1.0, 0.0, 1.0)),
    (pb.isotropic_gaussian_kl, (1.0, 10, -0.1, 1.0)),
    (pb.isotropic_gaussian_kl, (1.0, 10, 0.1, 0.0)),
    (pb.isotropic_gaussian_kl, (-1.0, 10, 0.1, 1.0)),
    (pb.isotropic_gaussian_kl, (1.0, 0, 0.1, 1.0)),
    (pb.prior_grid_cost, (0,)),
    (pb.prior_grid_cost, (2.5,)),
    (pb.dziugaite_roy_prior_scale, (100, 0.1, 0)),
    (pb.dziugaite_roy_prior_scale, (-1, 0.1, 1)),
    (pb.dziugaite_roy_prior_scale, (100, -0.1, 1)),
    (pb.mc_risk_upper, (0.1, 0, 0.01)),
    (pb.mc_risk_upper, (1.1, 10, 0.01)),
    (pb.mc_risk_upper, (0.1, 10, 1.0)),
    (pb.mc_risk_upper, (-0.1, 10, 0.01)),
    (pb.certificate_bound, (0.1, 0, 1.0, 100, 0.05)),
    (pb.certificate_bound, (0.1, 10, 1.0, 100, 0.05, 0.05)),
    (pb.certificate_bound, (0.1, 10, 1.0, 100, 0.05, 0.0)),
    (pb.certificate_bound, (0.1, 10, 1.0, 100, 0.05, None, 0)),
    (pb.certificate_bound, (0.1, 10, 1.0, 7, 0.05)),
    (pb.certificate_bound, (0.1, 10, -1.0, 100, 0.05)),
    (pb.certificate_bound, (1.5, 10, 1.0, 100, 0.05)),
    (pb.certificate_bound, (0.1, 10, 1.0, 100, 1.0)),
]


@pytest.mark.parametrize("func,args", BAD, ids=[f"{f.__name__}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_input_raises_one_line_value_error(func, args):
    with pytest.raises(ValueError) as info:
        func(*args)
    msg = str(info.value)
    assert msg and "\n" not in msg
