"""PAC-Bayes certificate (structure, monotonicity, σ choice, KL, bad input), Hessian measures against
dense computations, and an end-to-end certificate of a trained network vs one trained on random labels."""

import math

import pytest
import torch
from helpers import PROBLEMS, batches, nearest_mean_classifier
from torch import nn
from torch.func import functional_call

from hessian_tools import HessianOperator
from hessian_tools.bounds import pacbayes
from hessian_tools.bounds.certificate import default_loss_max, pac_bayes_certificate
from hessian_tools.bounds.measures import hessian_measures
from hessian_tools.estimators.probes import gaussian_rows
from hessian_tools.results import BlockTrace, CertificateResult, HessianMeasuresResult, TraceResult

GRID = (0.02, 0.05, 0.1, 0.2, 0.5)


@pytest.fixture(scope="module")
def separable():
    """Nearest-class-mean classifier and a prior 1e-3 away from it: KL ≈ 0, so the bound is the
    Monte-Carlo bound plus ln K + ln(2√n/δ)."""
    model, bundle, prior = nearest_mean_classifier(n=1500, d=8, prior_seed=7)
    X, y = bundle.train
    return model, X, y, prior


def test_tiny_distance_gives_bound_close_to_mc_bound(separable):
    model, X, y, prior = separable
    r = pac_bayes_certificate(model, (X, y), prior, sigmas=GRID, n_mc=64, delta=0.05, seed=0)
    n, K = X.shape[0], len(GRID)
    assert r.n == n and r.n_mc == 64 and r.grid_size == K and r.dim == 27
    assert r.kl < 1e-2 and r.train_loss < 0.05
    # with KL ≈ 0 the bound is the Seeger bound with only the confidence terms
    no_kl = pacbayes.kl_inverse_upper(
        r.mc_upper, (math.log(K) + math.log(2 * math.sqrt(n) / r.delta_bound)) / n
    )
    assert r.bound == pytest.approx(no_kl, rel=1e-3)
    assert r.mc_error <= r.mc_upper <= r.bound < r.mc_upper + 0.05
    # the same numbers through the calculator: δ_mc/K per σ, δ_bound with ln K
    cert = pacbayes.certificate_bound(
        r.mc_error, 64, r.kl, n, delta=r.delta_bound + r.delta_mc / K, delta_mc=r.delta_mc / K, grid_size=K
    )
    assert r.bound == cert["bound"] and r.mc_upper == cert["emp_risk_upper"] and r.kl_term == cert["kl_term"]
    assert r.delta == 0.05 and r.delta_mc == 0.025 and r.delta_bound == pytest.approx(0.025)
    assert r.delta_mc_per_sigma == pytest.approx(0.025 / K) and r.grid_cost == pytest.approx(math.log(K))
    assert r.evaluations == 1 + K * 64
    assert CertificateResult.from_dict(r.to_dict()) == r


def test_bound_above_mc_error_sigma_is_argmin_and_kl_formula(separable):
    model, X, y, prior = separable
    far = {k: v + 0.05 for k, v in prior.items()}  # a prior further away: KL matters
    r = pac_bayes_certificate(model, (X, y), far, sigmas=GRID, n_mc=32, seed=1)
    w = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    w0 = torch.cat([far[n].reshape(-1).double() for n, _ in model.named_parameters()])
    dist_sq = float(((w - w0) ** 2).sum())
    assert r.dist_sq == pytest.approx(dist_sq, rel=1e-12)
    for s, kl, b, mc, up in zip(r.sigmas, r.grid_kl, r.grid_bounds, r.grid_mc_errors, r.grid_mc_upper):
        assert kl == pytest.approx(pacbayes.isotropic_gaussian_kl(dist_sq, r.dim, s, s), rel=1e-12)
        assert kl == pytest.approx(dist_sq / (2 * s * s), rel=1e-12)
        assert 0 <= mc <= up <= b <= 1
    best = min(range(len(GRID)), key=lambda i: r.grid_bounds[i])
    assert r.sigma_index == best and r.sigma == GRID[best] and r.bound == min(r.grid_bounds)
    assert r.kl == r.grid_kl[best] and r.mc_error == r.grid_mc_errors[best]
    # larger δ → smaller bound (same seed: the same weight draws)
    looser = pac_bayes_certificate(model, (X, y), far, sigmas=GRID, n_mc=32, seed=1, delta=0.2)
    assert looser.grid_mc_errors == r.grid_mc_errors
    assert looser.bound < r.bound and all(a < b for a, b in zip(looser.grid_bounds, r.grid_bounds))


def test_mc_error_is_the_mean_error_of_the_drawn_networks(separable):
    model, X, y, prior = separable
    sigma, M = 0.3, 6
    r = pac_bayes_certificate(model, batches(X, y, 500), prior, sigmas=[sigma], n_mc=M, seed=3, chunk_size=4)
    Z = gaussian_rows(torch.Generator().manual_seed(3), 27, M)
    names = [n for n, _ in model.named_parameters()]
    errors = []
    for z in Z:
        pieces = torch.split(sigma * z.float(), [p.numel() for p in model.parameters()])
        params = {n: p.detach() + d.view_as(p) for (n, p), d in zip(model.named_parameters(), pieces)}
        errors.append(float((functional_call(model, params, (X,)).argmax(1) != y).float().mean()))
    assert names == ["weight", "bias"]
    assert r.mc_error == pytest.approx(sum(errors) / M, abs=1e-6)
    assert r.mc_stderr == pytest.approx(float(torch.tensor(errors).std()) / math.sqrt(M), rel=1e-4, abs=1e-9)


def test_bounded_ce_loss(separable):
    model, X, y, prior = separable
    r = pac_bayes_certificate(model, (X, y), prior, sigmas=[0.1, 1.0], n_mc=8, loss="bounded_ce")
    lmax = default_loss_max(3)
    assert r.loss_max == pytest.approx(2 * math.log(3))
    with torch.no_grad():
        logits = model(X)
    expected = float(nn.functional.cross_entropy(logits, y, reduction="none").clamp(max=lmax).mean() / lmax)
    assert r.train_loss == pytest.approx(expected, rel=1e-5)
    assert all(0 <= m <= 1 for m in r.grid_mc_errors)
    custom = pac_bayes_certificate(
        model, (X, y), prior, sigmas=[0.1], n_mc=8, loss="bounded_ce", loss_max=1.0
    )
    assert custom.loss_max == 1.0


def test_subset_selection_and_model_untouched(separable):
    model, X, y, prior = separable
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="differ from the prior"):
        pac_bayes_certificate(model, (X, y), prior, params=["bias"], sigmas=[0.1], n_mc=4)
    same_weight = dict(prior, weight=model.weight.detach().clone())
    r = pac_bayes_certificate(model, (X, y), same_weight, params=["bias"], sigmas=[0.1], n_mc=4)
    assert r.dim == 3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap.items())


def test_bad_input(separable):
    model, X, y, prior = separable
    run = lambda **kw: pac_bayes_certificate(
        model, (X, y), kw.pop("prior", prior), **{"sigmas": [0.1], "n_mc": 4, **kw}
    )  # noqa: E731
    for delta in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="delta"):
            run(delta=delta)
    with pytest.raises(ValueError, match="delta_mc"):
        run(delta=0.05, delta_mc=0.05)
    for sigmas in ([-0.1], [0.0], [0.1, -1.0], []):
        with pytest.raises(ValueError, match="sigma"):
            run(sigmas=sigmas)
    with pytest.raises(ValueError, match="missing"):
        run(prior={"weight": prior["weight"]})
    with pytest.raises(ValueError, match="shape"):
        run(prior={"weight": prior["weight"], "bias": torch.zeros(4)})
    with pytest.raises(ValueError, match="loss"):
        run(loss="hinge")
    with pytest.raises(ValueError, match="n_mc"):
        run(n_mc=0)
    with pytest.raises(ValueError, match="n ≥ 8"):
        pac_bayes_certificate(model, (X[:5], y[:5]), prior, sigmas=[0.1], n_mc=4)


# --------------------------------------------------------------------------------------------
# Hessian measures (not certificates) against dense computations
# --------------------------------------------------------------------------------------------
def dense_measures(H, blocks, v, n, lam):
    second, dh = 0.0, 0.0
    forms = []
    for b in blocks:
        Hi = H[b.slice, b.slice]
        T = float(torch.trace(Hi))
        d = float(v[b.slice].norm())
        second += d * math.sqrt(max(T, 0.0) / (n * lam))
        evals, U = torch.linalg.eigh(Hi)
        q = float(((U.T @ v[b.slice]) ** 2 * evals.clamp(min=0)).sum())
        forms.append(q)
        dh += math.sqrt(q) / math.sqrt(n)
    radius = math.sqrt(max(float(torch.trace(H)), 0.0) * float(v @ v) / n)
    return second, dh, radius, forms


@pytest.fixture(scope="module")
def tiny_mlp():
    model, loss_fn, X, y = PROBLEMS["mlp"]()
    op = HessianOperator(model, loss_fn, (X, y), dtype=torch.float64)
    w = op.flat_parameters()
    w0 = w + 0.3 * torch.randn(op.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact_trace = {
        "method": "hutchpp",
        "sketch": op.dim,
        "max_hvps": 2 * op.dim + 2,
    }  # Hutch++, full sketch: exact
    return op, op.dense(), w, w0, exact_trace


def test_hessian_measures_match_dense(tiny_mlp):
    op, H, w, w0, exact_trace = tiny_mlp
    n, lam = op.num_samples, 0.5
    r = hessian_measures(op, w0, n=n, lam=lam, quadrature_steps=64, trace_kwargs=exact_trace)
    second, dh, radius, forms = dense_measures(H, op.blocks, w - w0, n, lam)
    assert r.second_order == pytest.approx(second, rel=1e-6)
    assert r.distance_hessian == pytest.approx(dh, rel=1e-6)
    assert r.trace_radius == pytest.approx(radius, rel=1e-6)
    assert [layer.quadratic_form for layer in r.layers] == pytest.approx(forms, rel=1e-6)
    assert all(layer.exhausted for layer in r.layers) and r.distance_hessian_change == 0.0
    # the first layer's block is indefinite: relu matters, and the block's H_i⁺ is not the padded H⁺
    first = op.blocks[0]
    assert float(torch.linalg.eigvalsh(H[first.slice, first.slice])[0]) < -1e-3
    v = torch.zeros(op.dim, dtype=torch.float64)
    v[first.slice] = (w - w0)[first.slice]
    evals, U = torch.linalg.eigh(H)
    padded = float(((U.T @ v) ** 2 * evals.clamp(min=0)).sum())
    assert abs(padded - r.layers[0].quadratic_form) > 0.1 * padded
    # inputs are recorded; the optimal σ_i minimises σ²T/2 + ‖v‖²/(2nλσ²)
    for block, layer in zip(op.blocks, r.layers):
        assert layer.name == block.name and layer.size == block.size
        assert layer.trace == pytest.approx(float(torch.trace(H[block.slice, block.slice])), rel=1e-8)
        assert layer.dist == pytest.approx(float((w - w0)[block.slice].norm()), rel=1e-12)
        objective = lambda s, layer=layer: s * s * layer.trace / 2 + layer.dist**2 / (2 * n * lam * s * s)  # noqa: E731
        assert objective(layer.sigma) == pytest.approx(layer.second_order, rel=1e-9)
        assert objective(layer.sigma) <= min(objective(0.9 * layer.sigma), objective(1.1 * layer.sigma))
    assert r.trace_stderr == 0.0 and r.second_order_stderr == 0.0
    assert r.quadrature_hvps == sum(layer.quadratic_form_steps for layer in r.layers)
    assert r.hvps == r.trace_hvps + r.quadrature_hvps
    assert r.loss == pytest.approx(op.loss_and_gradient()[0])
    assert "not certificates" in r.note
    assert HessianMeasuresResult.from_dict(r.to_dict()) == r


def test_block_view_of_generic_operator_and_trace_clipping(tiny_mlp):
    op, H, w, w0, _ = tiny_mlp

    class Dense:  # any operator with blocks: measures use zero-pad/restrict block views
        dim, blocks, dtype = op.dim, op.blocks, torch.float64

        def matmat(self, V):
            return H @ V.double()

    n = op.num_samples
    T_blocks = [float(torch.trace(H[b.slice, b.slice])) for b in op.blocks]
    T_blocks[3] = -0.2  # a non-positive block estimate is clipped
    tr = TraceResult(
        sum(T_blocks),
        0.01,
        10,
        "given",
        None,
        10,
        blocks=tuple(BlockTrace(b.name, t, 0.01) for b, t in zip(op.blocks, T_blocks)),
    )
    r = hessian_measures(Dense(), w0, n=n, weights=w, trace_result=tr, quadrature_steps=64)
    ref = hessian_measures(op, w0, n=n, trace_result=tr, quadrature_steps=64, with_loss=False)
    assert [layer.quadratic_form for layer in r.layers] == pytest.approx(
        [layer.quadratic_form for layer in ref.layers], rel=1e-8
    )
    clipped = r.layers[3]
    assert clipped.trace_clipped and clipped.second_order == 0.0 and clipped.sigma == math.inf
    assert clipped.second_order_stderr == pytest.approx(clipped.dist * math.sqrt(0.01 / n))
    assert not any(layer.trace_clipped for layer in r.layers[:3])
    assert r.second_order == pytest.approx(
        sum(layer.dist * math.sqrt(layer.trace / n) for layer in r.layers[:3]), rel=1e-12
    )
    assert r.loss is None and r.trace_hvps == 10
    for layer in r.layers[:3]:  # delta method per layer
        assert layer.second_order_stderr == pytest.approx(
            layer.dist * 0.01 / (2 * math.sqrt(n * layer.trace))
        )
    with pytest.raises(ValueError, match="weights"):
        hessian_measures(Dense(), w0, n=n, trace_result=tr)
    bad = TraceResult(1.0, 0.0, 1, "given", None, 1, blocks=(BlockTrace("x", 1.0, 0.0),))
    with pytest.raises(ValueError, match="blocks"):
        hessian_measures(op, w0, n=n, trace_result=bad)
    with pytest.raises(ValueError, match="n must"):
        hessian_measures(op, w0, n=0, trace_result=tr)


# --------------------------------------------------------------------------------------------
# End to end: trained network vs the same network trained on random labels
# --------------------------------------------------------------------------------------------
RANDOM_LABELS = """
import torch
from hessian_tools.app.zoo.data import DataBundle, digits_finetune


def random_label_finetune():
    b = digits_finetune(per_class=170)
    g = torch.Generator().manual_seed(123)
    y = torch.randint(0, 5, (b.train[1].shape[0],), generator=g)
    return DataBundle((b.train[0], y), b.test, 5, "digits-finetune-random-labels")
"""


@pytest.mark.slow
def test_end_to_end_certificate_non_vacuous_and_random_labels_worse(tmp_path):
    """Pre-train an MLP on digits 0–4, fine-tune it on 5–9 (850 samples); the certificate's prior is
    the fine-tune run's init.pt (pre-trained body + seeded fresh head), independent of those samples."""
    from hessian_tools.app.checkpoints import load_state_dict
    from hessian_tools.app.runs import TrainConfig, build_run_model, train
    from hessian_tools.app.zoo.data import load_data

    pre = train(
        TrainConfig(model="mlp", data="builtin:digits-pretrain", epochs=4, lr=0.05, batch_size=32),
        tmp_path / "pre",
    )
    factory = tmp_path / "random_labels.py"
    factory.write_text(RANDOM_LABELS)
    results = {}
    for name, spec in (
        ("true", "builtin:digits-finetune?per_class=170"),
        ("random", f"{factory}:random_label_finetune"),
    ):
        cfg = TrainConfig(
            model="mlp", data=spec, epochs=3, lr=0.01, batch_size=32, init_checkpoint=str(pre / "final.pt")
        )
        run = train(cfg, tmp_path / name)
        model = build_run_model(run, "final.pt")
        X, y = load_data(spec).train
        results[name] = pac_bayes_certificate(
            model,
            (X, y),
            load_state_dict(run / "init.pt"),
            sigmas=(0.03, 0.06, 0.1, 0.18, 0.3),
            n_mc=256,
            seed=0,
        )
    true, rand = results["true"], results["random"]
    for name, r in results.items():
        print(
            f"{name}: bound={r.bound:.3f} sigma={r.sigma:.3g} KL={r.kl:.1f} mc_error={r.mc_error:.3f} "
            f"mc_upper={r.mc_upper:.3f} train_error={r.train_loss:.3f} n={r.n}"
        )
    assert true.n == rand.n == 850
    assert true.bound < 0.85  # non-vacuous (0.78 when written)
    assert rand.bound > true.bound + 0.08  # 0.92 when written
    assert true.mc_error <= true.mc_upper <= true.bound
