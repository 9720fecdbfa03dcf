"""Tests of hessian_tools.optim: NSO, WeightPerturbation, SAM, ASAM and make_optimizer."""

import copy

import pytest
import torch

from hessian_tools.optim import ASAM, NSO, SAM, WeightPerturbation, make_optimizer

F64 = torch.float64


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _quadratic(n=6, seed=0):
    g = _gen(seed)
    m = torch.randn(n, n, generator=g, dtype=F64)
    a = (m + m.T) / 2
    b = torch.randn(n, generator=g, dtype=F64)
    w0 = torch.randn(n, generator=g, dtype=F64)
    return a, b, w0


def _closure(w, fn, counter=None):
    def closure():
        if counter is not None:
            counter.append(1)
        loss = fn(w)
        loss.backward()
        return loss

    return closure


def _draws(seed, n, k, sigma, dtype=F64):
    g = _gen(seed)
    return [torch.randn(n, generator=g, dtype=dtype) * sigma for _ in range(k)]


def _sgd1():
    return {"lr": 1.0, "momentum": 0.0}


# ---------------------------------------------------------------- NSO estimator math
def test_two_sided_nso_is_exact_on_quadratic_for_large_sigma():
    a, b, w0 = _quadratic()
    w = torch.nn.Parameter(w0.clone())
    opt = NSO([w], sigma=5.0, k=3, generator=_gen(1), **_sgd1())
    opt.step(_closure(w, lambda v: 0.5 * v @ a @ v + b @ v))
    expected = w0 - (a @ w0 + b)
    assert torch.allclose(w.detach(), expected, atol=1e-10, rtol=0)
    # The one-sided estimate is far off at this sigma (the test above can fail).
    w1 = torch.nn.Parameter(w0.clone())
    NSO([w1], sigma=5.0, k=3, two_sided=False, generator=_gen(1), **_sgd1()).step(
        _closure(w1, lambda v: 0.5 * v @ a @ v + b @ v)
    )
    assert (w1.detach() - expected).abs().max() > 1e-2


def test_nso_returns_mean_perturbed_loss_on_quadratic():
    a, b, w0 = _quadratic()
    w = torch.nn.Parameter(w0.clone())
    opt = NSO([w], sigma=0.3, k=1, generator=_gen(4), lr=0.0)
    loss = opt.step(_closure(w, lambda v: 0.5 * v @ a @ v + b @ v))
    (u,) = _draws(4, 6, 1, 0.3)
    f0 = 0.5 * w0 @ a @ w0 + b @ w0
    assert torch.allclose(loss, f0 + 0.5 * u @ a @ u, atol=1e-12, rtol=0)


@pytest.mark.parametrize("k", [1, 2])
def test_two_sided_nso_on_cubic_matches_hand_computation(k):
    n, sigma = 5, 0.7
    c = torch.randn(n, generator=_gen(7), dtype=F64)
    w0 = torch.randn(n, generator=_gen(8), dtype=F64)
    w = torch.nn.Parameter(w0.clone())
    opt = NSO([w], sigma=sigma, k=k, generator=_gen(123), **_sgd1())
    opt.step(_closure(w, lambda v: (c * v**3).sum()))
    us = _draws(123, n, k, sigma)
    # grad f(W±U) = 3c(W±U)^2, the pair average is 3c(W^2 + U^2) = grad f(W) + 1/2 grad^3 f[U,U].
    g = sum(3 * c * (w0**2 + u**2) for u in us) / k
    assert torch.allclose(w.grad, g, atol=1e-12, rtol=0)
    assert torch.allclose(w.detach(), w0 - g, atol=1e-12, rtol=0)


def test_lam_mixes_in_the_unperturbed_gradient_on_cubic():
    n, sigma, lam = 5, 0.7, 0.3
    c = torch.randn(n, generator=_gen(7), dtype=F64)
    w0 = torch.randn(n, generator=_gen(8), dtype=F64)
    w = torch.nn.Parameter(w0.clone())
    calls = []
    opt = NSO([w], sigma=sigma, lam=lam, generator=_gen(9), **_sgd1())
    loss = opt.step(_closure(w, lambda v: (c * v**3).sum(), calls))
    (u,) = _draws(9, n, 1, sigma)
    expected = lam * 3 * c * w0**2 + (1 - lam) * 3 * c * (w0**2 + u**2)
    assert torch.allclose(w.grad, expected, atol=1e-12, rtol=0)
    assert len(calls) == 3
    assert torch.allclose(loss, (c * w0**3).sum(), atol=1e-14, rtol=0)  # loss at W


def test_one_sided_nso_and_wp_on_cubic():
    n, sigma = 5, 0.4
    c = torch.randn(n, generator=_gen(7), dtype=F64)
    w0 = torch.randn(n, generator=_gen(8), dtype=F64)
    (u,) = _draws(5, n, 1, sigma)
    for cls, kw in ((NSO, {"two_sided": False}), (WeightPerturbation, {})):
        w = torch.nn.Parameter(w0.clone())
        calls = []
        cls([w], sigma=sigma, generator=_gen(5), **kw, **_sgd1()).step(
            _closure(w, lambda v: (c * v**3).sum(), calls)
        )
        assert torch.allclose(w.grad, 3 * c * (w0 + u) ** 2, atol=1e-12, rtol=0)
        assert len(calls) == 1


def test_weight_norm_scale_uses_rms_of_each_tensor():
    sigma = 0.2
    c1, c2 = torch.randn(4, generator=_gen(1), dtype=F64), torch.randn(3, generator=_gen(2), dtype=F64)
    w1_0 = torch.randn(4, generator=_gen(3), dtype=F64) * 10
    w2_0 = torch.randn(3, generator=_gen(4), dtype=F64) * 0.1
    w1, w2 = torch.nn.Parameter(w1_0.clone()), torch.nn.Parameter(w2_0.clone())
    opt = NSO([w1, w2], sigma=sigma, two_sided=False, scale="weight_norm", generator=_gen(6), **_sgd1())
    opt.step(_closure((w1, w2), lambda ws: (c1 * ws[0] ** 3).sum() + (c2 * ws[1] ** 3).sum()))
    g = _gen(6)
    z1, z2 = torch.randn(4, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    u1 = z1 * sigma * w1_0.norm() / 2.0
    u2 = z2 * sigma * w2_0.norm() / 3.0**0.5
    assert torch.allclose(w1.grad, 3 * c1 * (w1_0 + u1) ** 2, atol=1e-10, rtol=1e-12)
    assert torch.allclose(w2.grad, 3 * c2 * (w2_0 + u2) ** 2, atol=1e-12, rtol=1e-12)


def test_two_sided_variance_much_smaller_than_one_sided():
    a, _, w0 = _quadratic(n=8, seed=3)

    def fn(v):
        return torch.cos(a @ v).sum() + 0.1 * (v**4).sum()

    def grads(two_sided):
        w = torch.nn.Parameter(w0.clone())
        opt = NSO([w], sigma=0.01, two_sided=two_sided, generator=_gen(11), lr=0.0)
        out = []
        for _ in range(200):
            opt.step(_closure(w, fn))
            out.append(w.grad.clone())
        return torch.stack(out)

    var_one = grads(False).var(dim=0).sum()
    var_two = grads(True).var(dim=0).sum()
    assert var_one / var_two > 10


# ---------------------------------------------------------------- SAM / ASAM
def test_sam_step_matches_hand_computation():
    a, b, w0 = _quadratic(seed=2)
    rho, lr = 0.3, 0.1
    w = torch.nn.Parameter(w0.clone())
    calls = []
    loss = SAM([w], rho=rho, lr=lr, momentum=0.0).step(_closure(w, lambda v: 0.5 * v @ a @ v + b @ v, calls))
    g = a @ w0 + b
    eps = rho * g / g.norm()
    expected = w0 - lr * (a @ (w0 + eps) + b)
    assert torch.allclose(w.detach(), expected, atol=1e-12, rtol=0)
    assert len(calls) == 2
    assert torch.allclose(loss, 0.5 * w0 @ a @ w0 + b @ w0, atol=1e-14, rtol=0)


def test_asam_step_matches_hand_computation():
    a, b, w0 = _quadratic(seed=5)
    rho, eta, lr = 0.5, 0.01, 0.1
    w = torch.nn.Parameter(w0.clone())
    ASAM([w], rho=rho, eta=eta, lr=lr, momentum=0.0).step(_closure(w, lambda v: 0.5 * v @ a @ v + b @ v))
    g = a @ w0 + b
    t = w0.abs() + eta
    eps = rho * t * t * g / (t * g).norm()
    expected = w0 - lr * (a @ (w0 + eps) + b)
    assert torch.allclose(w.detach(), expected, atol=1e-12, rtol=0)
    # ASAM differs from SAM here (the test can fail).
    sam_eps = rho * g / g.norm()
    assert (expected - (w0 - lr * (a @ (w0 + sam_eps) + b))).abs().max() > 1e-4


@pytest.mark.parametrize("cls", [SAM, ASAM])
def test_sam_zero_gradient_gives_no_nan(cls):
    w = torch.nn.Parameter(torch.randn(4, generator=_gen(0)))
    unused = torch.nn.Parameter(torch.ones(2))
    w0 = w.detach().clone()
    opt = cls([w, unused], lr=0.1, momentum=0.9)
    for _ in range(2):  # W is the minimiser: g = 0 there, nonzero anywhere else
        loss = opt.step(_closure(w, lambda v: ((v - w0) ** 2).sum() + 1.0))
    assert torch.isfinite(loss)
    assert torch.equal(w.detach(), w0)
    assert torch.equal(unused.detach(), torch.ones(2))


# ---------------------------------------------------------------- restore bit for bit
def _mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(5, 16)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(16))
    layers += [torch.nn.Tanh(), torch.nn.Linear(16, 1)]
    return torch.nn.Sequential(*layers)


def _batch(seed=0, n=32):
    g = _gen(seed)
    return torch.randn(n, 5, generator=g), torch.randn(n, 1, generator=g)


def _model_closure(model, x, y, counter=None):
    def closure():
        if counter is not None:
            counter.append(1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


_METHODS = [
    (NSO, {"sigma": 0.05, "k": 2}),
    (NSO, {"sigma": 0.05, "lam": 0.5, "two_sided": False}),
    (WeightPerturbation, {"sigma": 0.05}),
    (SAM, {"rho": 0.05}),
    (ASAM, {"rho": 0.5}),
]


@pytest.mark.parametrize("cls,kw", _METHODS)
def test_weights_restored_bit_for_bit(cls, kw):
    model = _mlp()
    x, y = _batch()
    base = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = cls(model.parameters(), torch.optim.SGD, generator=_gen(3), **kw, **base)
    opt.step(_model_closure(model, x, y))
    # Replaying only the base step from W with the final gradient gives the same weights, bitwise.
    replay = [w.clone().requires_grad_() for w in w0]
    for q, p in zip(replay, model.parameters()):
        q.grad = p.grad.clone()
    torch.optim.SGD(replay, **base).step()
    for q, p in zip(replay, model.parameters()):
        assert torch.equal(q.detach(), p.detach())


@pytest.mark.parametrize("cls,kw", _METHODS)
def test_lr_zero_leaves_weights_unchanged(cls, kw):
    model = _mlp(seed=1)
    x, y = _batch(1)
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = cls(model.parameters(), torch.optim.SGD, **kw, lr=0.0, momentum=0.9)
    for _ in range(3):
        opt.step(_model_closure(model, x, y))
    for w, p in zip(w0, model.parameters()):
        assert torch.equal(w, p.detach())


# ---------------------------------------------------------------- BatchNorm
@pytest.mark.parametrize(
    "cls,kw,calls",
    [
        (NSO, {"sigma": 0.1, "k": 2}, 5),
        (NSO, {"sigma": 0.1, "lam": 0.5}, 3),
        (WeightPerturbation, {"sigma": 0.1}, 2),
        (SAM, {"rho": 0.1}, 2),
        (ASAM, {"rho": 0.5}, 2),
    ],
)
def test_batchnorm_stats_move_only_at_unperturbed_weights(cls, kw, calls):
    model = _mlp(seed=2, bn=True)
    ref = copy.deepcopy(model)
    x, y = _batch(2)
    with torch.no_grad():
        ref(x)
    bn, ref_bn = model[1], ref[1]
    counter = []
    opt = cls(model.parameters(), model=model, lr=0.1, momentum=0.9, **kw)
    opt.step(_model_closure(model, x, y, counter))
    assert len(counter) == calls
    assert torch.equal(bn.running_mean, ref_bn.running_mean)
    assert torch.equal(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == 1
    for _ in range(2):
        opt.step(_model_closure(model, x, y))
    assert int(bn.num_batches_tracked) == 3


def test_batchnorm_stats_move_on_perturbed_passes_without_model():
    model = _mlp(seed=2, bn=True)
    ref = copy.deepcopy(model)
    x, y = _batch(2)
    with torch.no_grad():
        ref(x)
    NSO(model.parameters(), sigma=0.1, k=2, lr=0.1).step(_model_closure(model, x, y))
    assert int(model[1].num_batches_tracked) == 4
    assert not torch.equal(model[1].running_mean, ref[1].running_mean)


def test_eval_mode_batchnorm_needs_no_extra_pass():
    model = _mlp(seed=2, bn=True).eval()
    x, y = _batch(2)
    counter = []
    NSO(model.parameters(), model=model, sigma=0.1, k=2, lr=0.1).step(_model_closure(model, x, y, counter))
    assert len(counter) == 4
    assert int(model[1].num_batches_tracked) == 0


# ---------------------------------------------------------------- randomness
def _trajectory(cls, seed, steps=4, **kw):
    model = _mlp(seed=4)
    x, y = _batch(4)
    opt = cls(model.parameters(), generator=None if seed is None else _gen(seed), lr=0.05, momentum=0.9, **kw)
    out = []
    for _ in range(steps):
        opt.step(_model_closure(model, x, y))
        out.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return torch.stack(out)


@pytest.mark.parametrize("cls", [NSO, WeightPerturbation])
def test_same_seed_same_trajectory_different_seed_different(cls):
    a = _trajectory(cls, 17, sigma=0.05)
    assert torch.equal(a, _trajectory(cls, 17, sigma=0.05))
    assert not torch.equal(a, _trajectory(cls, 18, sigma=0.05))
    assert torch.equal(_trajectory(cls, None, sigma=0.05), _trajectory(cls, 0, sigma=0.05))


def test_wp_is_one_sided_nso():
    assert torch.equal(
        _trajectory(WeightPerturbation, 3, sigma=0.05, k=2),
        _trajectory(NSO, 3, sigma=0.05, k=2, two_sided=False),
    )


def test_global_rng_untouched():
    torch.manual_seed(1234)
    model = _mlp(seed=4)
    x, y = _batch(4)
    state = torch.get_rng_state()
    NSO(model.parameters(), sigma=0.05, lr=0.1).step(_model_closure(model, x, y))
    assert torch.equal(state, torch.get_rng_state())


def test_state_dict_round_trip_resumes_identically():
    x, y = _batch(6)
    model = _mlp(seed=6)
    opt = NSO(model.parameters(), generator=_gen(2), sigma=0.05, lr=0.05, momentum=0.9)
    for _ in range(2):
        opt.step(_model_closure(model, x, y))
    model2 = copy.deepcopy(model)
    opt2 = NSO(model2.parameters(), generator=_gen(99), sigma=0.05, lr=0.05, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.base_optimizer.param_groups is opt2.param_groups
    for _ in range(2):
        opt.step(_model_closure(model, x, y))
        opt2.step(_model_closure(model2, x, y))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_add_param_group_is_shared_once():
    w, v = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = NSO([w], sigma=0.1, lr=0.1)
    opt.add_param_group({"params": [v], "sigma": 0.2})
    assert len(opt.param_groups) == 2 and opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[1]["lr"] == 0.1 and opt.param_groups[1]["sigma"] == 0.2


# ---------------------------------------------------------------- factory and validation
def test_make_optimizer_builds_each_method():
    model = _mlp()
    x, y = _batch()
    assert type(make_optimizer("sgd", model.parameters(), lr=0.1)) is torch.optim.SGD
    assert type(make_optimizer("sgd", model.parameters(), base="adam", lr=0.1)) is torch.optim.Adam
    for method, cls in (("nso", NSO), ("wp", WeightPerturbation), ("sam", SAM), ("asam", ASAM)):
        opt = make_optimizer(
            method, model.parameters(), model=model, base="adamw", lr=1e-3, weight_decay=0.01
        )
        assert type(opt) is cls and isinstance(opt.base_optimizer, torch.optim.AdamW)
        assert torch.isfinite(opt.step(_model_closure(model, x, y)))
    opt = make_optimizer("nso", model.parameters(), lr=0.1, sigma=0.2, k=3, lam=0.1, two_sided=False)
    assert (opt.k, opt.lam, opt.two_sided, opt.param_groups[0]["sigma"]) == (3, 0.1, False, 0.2)
    assert make_optimizer("asam", model.parameters(), lr=0.1).param_groups[0]["rho"] == 0.5
    assert make_optimizer("sam", model.parameters(), lr=0.1, rho=0.2).param_groups[0]["rho"] == 0.2
    plain = make_optimizer("sgd", model.parameters(), lr=0.1)
    plain.zero_grad()
    assert torch.isfinite(plain.step(_model_closure(model, x, y)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "adagrad"}, "sgd, nso, wp, sam, asam"),
        ({"base": "rmsprop"}, "sgd, adam, adamw"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -1.0}, "sigma"),
        ({"k": 0}, "k"),
        ({"k": 1.5}, "k"),
        ({"lam": 1.5}, "lam"),
        ({"lam": -0.1}, "lam"),
        ({"method": "sam", "rho": 0.0}, "rho"),
        ({"method": "sam", "sigma": 0.1}, "sigma"),
        ({"rho": 0.1}, "rho"),
    ],
)
def test_make_optimizer_rejects_bad_options(kwargs, match):
    kwargs = {"method": "nso", **kwargs}
    with pytest.raises(ValueError, match=match):
        make_optimizer(kwargs.pop("method"), [torch.nn.Parameter(torch.ones(2))], lr=0.1, **kwargs)


@pytest.mark.parametrize(
    "build",
    [
        lambda p: NSO(p, sigma=0),
        lambda p: NSO(p, k=0),
        lambda p: NSO(p, k=True),
        lambda p: NSO(p, lam=2.0),
        lambda p: NSO(p, scale="relative"),
        lambda p: WeightPerturbation(p, sigma=-1),
        lambda p: SAM(p, rho=0),
        lambda p: ASAM(p, rho=-1.0),
        lambda p: ASAM(p, eta=-0.1),
    ],
)
def test_constructors_reject_bad_options(build):
    with pytest.raises(ValueError):
        build([torch.nn.Parameter(torch.ones(2))])


def test_constructor_type_errors():
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(TypeError, match="generator"):
        NSO(p, generator=0)
    with pytest.raises(TypeError, match="model"):
        SAM(p, model="net")
    with pytest.raises(TypeError, match="base_optimizer_cls"):
        NSO(p, base_optimizer_cls="sgd")


@pytest.mark.parametrize("cls", [NSO, WeightPerturbation, SAM, ASAM])
def test_step_without_closure_raises(cls):
    with pytest.raises(ValueError, match="closure"):
        cls([torch.nn.Parameter(torch.ones(2))], lr=0.1).step()
