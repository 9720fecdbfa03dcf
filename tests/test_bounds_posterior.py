"""Optimised-posterior PAC-Bayes certificate: KL against torch.distributions, the bound's arithmetic
rebuilt by hand from its parts, union-bound bookkeeping, BatchNorm folding, a synthetic case where the
optimised posterior must beat the isotropic certificate, and the bound staying above measured test error."""

import math

import pytest
import torch
from helpers import TinyCNN, exact_hessian, nearest_mean_classifier
from torch import nn
from torch.distributions import Normal, kl_divergence

from hessian_tools.app.zoo.data import synthetic_classification
from hessian_tools.bounds import DEFAULT_LAMBDA_GRID, fold_batchnorm, optimised_certificate, split_for_prior
from hessian_tools.bounds import posterior as post
from hessian_tools.bounds.certificate import pac_bayes_certificate
from hessian_tools.errors import CheckpointError
from hessian_tools.results import PosteriorCertificateResult, result_from_dict

FAST = {"steps": 60, "n_mc": 64, "n_mc_test": 16}


def _binary_kl(q, p):
    """Binary kl written out, independent of the package's implementation."""
    terms = 0.0
    if q > 0:
        terms += q * math.log(q / p)
    if q < 1:
        terms += (1 - q) * math.log((1 - q) / (1 - p))
    return terms


@pytest.fixture(scope="module")
def separable():
    """Nearest-class-mean linear classifier on a separated mixture, a prior 1e-3 away."""
    model, bundle, prior = nearest_mean_classifier(n=600, d=6, prior_seed=3)
    return model, bundle.train, bundle.test, prior


def test_diagonal_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, prior = (
        torch.randn(40, generator=g, dtype=torch.float64),
        torch.randn(40, generator=g, dtype=torch.float64),
    )
    log_s = 0.3 * torch.randn(40, generator=g, dtype=torch.float64) - 1.0
    group = torch.tensor([0] * 15 + [1] * 25)
    lam = torch.tensor([0.4, 1.7], dtype=torch.float64)
    expected = kl_divergence(Normal(mu, log_s.exp()), Normal(prior, lam[group])).sum()
    assert float(post._kl_torch(mu, log_s, prior, lam**2, group)) == pytest.approx(float(expected), rel=1e-12)
    # the profiled λ² is the per-group minimiser: nudging it either way raises the KL
    lam2 = post._profile_lam2(mu, log_s, prior, group, 2, (1e-6, 1e6))
    best = float(post._kl_torch(mu, log_s, prior, lam2, group))
    for factor in (0.97, 1.03):
        for g_ in range(2):
            nudged = lam2.clone()
            nudged[g_] *= factor
            assert float(post._kl_torch(mu, log_s, prior, nudged, group)) > best
    # the final per-group grid choice is the exact argmin over the grid
    grid = torch.tensor(DEFAULT_LAMBDA_GRID, dtype=torch.float64).numpy()
    kls, index = post._grid_kl(mu, log_s.exp(), prior, group, 2, grid)
    for g_ in range(2):
        sel = group == g_
        brute = [
            float(kl_divergence(Normal(mu[sel], log_s.exp()[sel]), Normal(prior[sel], lam_)).sum())
            for lam_ in grid
        ]
        assert index[g_] == min(range(len(grid)), key=brute.__getitem__)
        assert kls[g_] == pytest.approx(min(brute), rel=1e-10)


def test_bound_is_rebuilt_from_its_parts_by_hand(separable):
    model, data, test, prior = separable
    r = optimised_certificate(model, data, prior, test_data=test, delta=0.05, seed=0, **FAST)
    n, K = data[1].shape[0], len(DEFAULT_LAMBDA_GRID)
    assert (
        r.n == n
        and r.n_mc == 64
        and r.delta_mc == pytest.approx(0.01)
        and r.delta_bound == pytest.approx(0.04)
    )
    assert r.grid_cost == pytest.approx(math.log(K))
    assert r.kl_term == pytest.approx((r.kl + math.log(K) + math.log(2 * math.sqrt(n) / 0.04)) / n, rel=1e-12)
    # each kl-inverse lands on its level set, from above
    assert _binary_kl(r.mc_error, r.mc_upper) == pytest.approx(math.log(2 / 0.01) / 64, rel=1e-6)
    assert _binary_kl(r.mc_upper, r.bound) == pytest.approx(r.kl_term, rel=1e-6)
    assert r.mc_error <= r.mc_upper <= r.bound <= 1
    assert r.kl == pytest.approx(sum(r.group_kl)) and r.kl_mean <= r.kl and 0 <= r.kl_floor <= r.kl
    assert r.lambdas == tuple(DEFAULT_LAMBDA_GRID[i] for i in r.lambda_indices)
    # a prior 1e-3 away, an accurate classifier: KL is small and the certificate is tight
    assert r.kl < 5 and r.kl_term < (5 + math.log(K) + math.log(2 * math.sqrt(n) / 0.04)) / n
    assert r.evaluations == 60 + 64 + 16 and r.n_test == test[1].shape[0]
    assert result_from_dict(r.to_dict()) == r


@pytest.mark.parametrize(
    "groups, expected",
    [(None, ("all",)), ("layer", ("weight", "bias")), ({"weight": "w", "bias": "b"}, ("w", "b"))],
)
def test_each_prior_group_pays_ln_k(separable, groups, expected):
    model, data, _, prior = separable
    grid = (0.01, 0.1, 1.0)
    r = optimised_certificate(model, data, prior, prior_groups=groups, lambda_grid=grid, seed=1, **FAST)
    assert r.prior_groups == expected and len(r.lambdas) == len(expected)
    assert r.grid_cost == pytest.approx(len(expected) * math.log(3))
    assert set(r.lambdas) <= set(grid)
    n = data[1].shape[0]
    assert r.kl_term == pytest.approx((r.kl + r.grid_cost + math.log(2 * math.sqrt(n) / r.delta_bound)) / n)


def test_fold_batchnorm_keeps_the_function_and_the_model():
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X = torch.randn(20, 1, 6, 6)
    folded, names = fold_batchnorm(model)
    assert names == ("bn",) and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    assert torch.allclose(folded(X), model(X), atol=1e-5)
    assert torch.equal(folded.bn.running_mean, torch.zeros(3))


def test_running_statistics_are_paid_for():
    """A prior that differs from the checkpoint only in BatchNorm running statistics gives KL > 0:
    statistics computed on the training data are part of what is certified."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    X, y = torch.randn(64, 1, 6, 6), torch.randint(0, 3, (64,))
    same = {k: v.clone() for k, v in model.state_dict().items()}
    moved = dict(same, **{"bn.running_mean": same["bn.running_mean"] + 0.5})
    grid = (0.05, 0.1)
    at_same = optimised_certificate(model, (X, y), same, lambda_grid=grid, seed=0, **FAST)
    at_moved = optimised_certificate(model, (X, y), moved, lambda_grid=grid, seed=0, **FAST)
    assert at_moved.kl_mean > at_same.kl_mean + 1.0
    assert at_same.dist == 0.0 and at_moved.dist_checkpoint > 0.1
    with pytest.raises(CheckpointError, match="running_var"):
        optimised_certificate(model, (X, y), {k: v for k, v in same.items() if k != "bn.running_var"}, **FAST)


def _two_scale_problem():
    """Logits = A·x_big + B·x_tiny: 6 weights A on strong features (noise there destroys the
    classifier), 150 weights B on features of size 1e-3 (noise there is harmless), and the prior far
    from the posterior mean only in B. An isotropic posterior must choose between noise that ruins A
    and a KL that explodes on B; per-tensor variances need neither."""
    g = torch.Generator().manual_seed(0)
    n, C = 1500, 3
    y = torch.randint(0, C, (n,), generator=g)
    centres = torch.tensor([[3.0, 0.0], [-1.5, 2.6], [-1.5, -2.6]])
    x_big = centres[y] + 0.5 * torch.randn(n, 2, generator=g)
    x_tiny = 1e-3 * torch.randn(n, 50, generator=g)
    X = torch.cat([x_big, x_tiny], 1)

    class TwoScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(centres.T.clone() / 10.0)
            self.b = nn.Parameter(0.6 * torch.randn(50, C, generator=g))

        def forward(self, x):
            return x[:, :2] @ self.a + x[:, 2:] @ self.b

    model = TwoScale()
    prior = {"a": model.a.detach() + 1e-3, "b": torch.zeros(50, C)}
    return model, (X, y), prior


def test_optimised_posterior_beats_the_isotropic_certificate():
    model, data, prior = _two_scale_problem()
    iso = pac_bayes_certificate(model, data, prior, sigmas=tuple(DEFAULT_LAMBDA_GRID[::4]), n_mc=128, seed=0)
    opt = optimised_certificate(model, data, prior, steps=300, n_mc=128, seed=0)
    assert iso.bound > 0.5  # noise on A or a huge KL: nothing in between
    assert opt.bound < 0.25 and opt.bound < iso.bound - 0.3
    sigma = dict(zip(opt.layers, opt.layer_sigma))
    assert sigma["b"] > 10 * sigma["a"]  # the insensitive tensor takes the noise


def _trained_tiny_cnn(seed=0):
    torch.manual_seed(seed)
    bundle = synthetic_classification(n=400, d=36, num_classes=3, seed=seed, separation=2.0)
    X, y = bundle.train
    X = X.view(-1, 1, 6, 6)
    Xt, yt = bundle.test
    model = TinyCNN()
    prior = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
    return model.eval(), (X, y), (Xt.view(-1, 1, 6, 6), yt), prior


@pytest.mark.parametrize(
    "options",
    [{}, {"optimise_mean": True, "mean_lr": 3e-3}, {"variance": "parameter", "prior_groups": "layer"}],
)
def test_bound_never_falls_below_the_measured_test_error(options):
    model, data, test, prior = _trained_tiny_cnn()
    r = optimised_certificate(
        model, data, prior, test_data=test, steps=150, n_mc=200, n_mc_test=100, seed=0, **options
    )
    assert r.posterior_test_error <= r.bound and r.test_error < 0.2
    assert r.optimise_mean == options.get("optimise_mean", False)
    if r.optimise_mean:
        assert r.mean_shift > 0 and r.mean_test_error is not None and "optimised mean" in r.label
    else:
        assert r.mean_shift == 0 and r.mean_test_error is None


def test_data_dependent_prior_trains_on_its_part_only():
    model, data, test, prior = _trained_tiny_cnn()
    seen = {}

    def trainer(part, start):
        seen["part"], seen["start"] = part, start
        return {k: v + 0.01 for k, v in model.state_dict().items()}

    r = optimised_certificate(
        model, data, prior, test_data=test, prior_split=0.5, prior_trainer=trainer, seed=4, **FAST
    )
    half = data[1].shape[0] // 2
    assert r.prior == "data-dependent" and r.n_prior == half and r.n == half and r.prior_split == 0.5
    assert seen["part"][1].shape[0] == half and seen["start"] is prior
    # the split is the one split_for_prior makes, and the parts are disjoint
    seed_of_split = int(__import__("numpy").random.SeedSequence(4).generate_state(4)[3])
    prior_part, bound_part = split_for_prior(data, 0.5, seed_of_split)
    assert torch.equal(prior_part[0], seen["part"][0])
    rows = {tuple(x.flatten().tolist()) for x in prior_part[0]}
    assert not any(tuple(x.flatten().tolist()) in rows for x in bound_part[0])
    assert r.posterior_test_error <= r.bound


def test_hessian_diagonal_starts_small_variances_where_curvature_is_large():
    model, (X, y), _, prior = _trained_tiny_cnn()
    h = torch.diagonal(exact_hessian(model, nn.functional.cross_entropy, X, y))
    names = [n for n, _ in model.named_parameters()]
    index = torch.arange(h.numel())
    log_s = post._initial_log_sigma(h.abs(), index, h.numel(), 0.01, None, 0.1, 1e6)
    var = torch.exp(2 * log_s)
    c = float(h.abs().mean())
    assert 0.5 * float((h.abs() * var).sum()) == pytest.approx(0.1, rel=1e-6)  # the noise budget
    ratio = var * (h.abs() + c)
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-6)  # s_i² ∝ 1/(|H_ii| + c)
    r = optimised_certificate(model, (X, y), prior, hessian_diagonal=h, seed=0, **FAST)
    assert r.hessian_init and len(r.layer_sigma) == len(names)
    with pytest.raises(ValueError, match="hessian_diagonal"):
        optimised_certificate(model, (X, y), prior, hessian_diagonal=h[:-1], **FAST)


def test_model_is_untouched_and_run_is_reproducible(separable):
    model, data, _, prior = separable
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = optimised_certificate(model, data, prior, seed=5, optimise_mean=True, **FAST)
    b = optimised_certificate(model, data, prior, seed=5, optimise_mean=True, **FAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert a.bound == b.bound and a.layer_sigma == b.layer_sigma and a.mean_shift == b.mean_shift


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"delta": 0.0}, "delta"),
        ({"delta": 0.05, "delta_mc": 0.05}, "delta_mc"),
        ({"variance": "block"}, "variance"),
        ({"objective": "catoni"}, "objective"),
        ({"lambda_grid": ()}, "lambda_grid"),
        ({"steps": 0}, "steps"),
        ({"prior_split": 0.5}, "prior_trainer"),
        ({"prior_trainer": lambda p, s: s}, "prior_split"),
        ({"mean_start": "prior"}, "optimise_mean"),
        ({"prior_groups": "head"}, "head"),
        ({"prior_split": 1.5, "prior_trainer": lambda p, s: s}, "prior_split"),
    ],
)
def test_bad_input_gives_one_clear_error(separable, kwargs, match):
    model, data, _, prior = separable
    with pytest.raises(ValueError, match=match):
        optimised_certificate(model, data, prior, **{**FAST, **kwargs})


def test_result_round_trips_through_json(separable):
    model, data, test, prior = separable
    r = optimised_certificate(model, data, prior, test_data=test, **FAST)
    back = PosteriorCertificateResult.from_dict(__import__("json").loads(r.to_json()))
    assert back == r
