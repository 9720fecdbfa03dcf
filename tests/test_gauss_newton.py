"""GGN and Fisher operators, the exact GGN trace and the control-variate trace, against exact matrices
built independently (torch.func.jacrev of the outputs, per-sample gradients, torch.func.hessian)."""

import copy

import pytest
import torch
from helpers import PROBLEMS, batches, exact_hessian
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import hessian_tools as ht
from hessian_tools.operators import FisherOperator, GGNOperator, UnsupportedLossError

CLASSIFIERS = ("mlp", "cnn_bn")


def problem(name):
    model, loss_fn, X, y = PROBLEMS[name]()
    model = copy.deepcopy(model).double().eval()
    return model, loss_fn, X.double(), (y.double() if y.is_floating_point() else y)


def functional(model):
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    return params, lambda p, x: functional_call(model, {**buffers, **p}, (x,))


def output_jacobian(model, X) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs z (N, C), J (N, C, P)) by jacrev, parameters in model order."""
    params, out = functional(model)
    jac = jacrev(out)(params, X)
    J = torch.cat([jac[n].reshape(*jac[n].shape[:2], -1) for n in params], dim=-1)
    return out(params, X).detach(), J


def loss_hessian_on_outputs(loss_fn, z, y) -> torch.Tensor:
    """(N, C, C): ∇²_z of the per-sample loss loss_fn(z_n[None], y_n[None]), by torch.func.hessian."""
    per_sample = lambda zn, yn: loss_fn(zn[None], yn[None])  # noqa: E731
    return vmap(torch.func.hessian(per_sample))(z, y)


def exact_ggn(model, loss_fn, X, y) -> torch.Tensor:
    z, J = output_jacobian(model, X)
    return torch.einsum("ncp,ncd,ndq->pq", J, loss_hessian_on_outputs(loss_fn, z, y), J) / len(X)


def exact_empirical_fisher(model, loss_fn, X, y) -> torch.Tensor:
    params, out = functional(model)

    def sample_loss(p, xn, yn):
        return loss_fn(out(p, xn[None]), yn[None])

    g = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, X, y)
    G = torch.cat([g[n].reshape(len(X), -1) for n in params], dim=1)
    return G.T @ G / len(X)


@pytest.mark.parametrize("name", [*CLASSIFIERS, "saddle"])
def test_ggn_matches_the_jacobian_product_with_an_uneven_last_batch(name):
    model, loss_fn, X, y = problem(name)
    G = exact_ggn(model, loss_fn, X, y)
    op = GGNOperator(model, loss_fn, batches(X, y, 16))  # 71, 40, 30 samples: the last batch is short
    assert torch.allclose(op.dense(), G, atol=1e-12, rtol=1e-10)
    assert torch.linalg.eigvalsh(G).min() > -1e-12  # a GGN of a convex loss is PSD


@pytest.mark.parametrize("name", [*CLASSIFIERS, "saddle"])
def test_empirical_fisher_is_the_mean_outer_product_of_per_sample_gradients(name):
    model, loss_fn, X, y = problem(name)
    op = FisherOperator(model, loss_fn, batches(X, y, 16), kind="empirical")
    assert torch.allclose(op.dense(), exact_empirical_fisher(model, loss_fn, X, y), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", [*CLASSIFIERS, "saddle"])
def test_true_fisher_equals_the_ggn_for_cross_entropy_and_mse(name):
    model, loss_fn, X, y = problem(name)
    true = FisherOperator(model, loss_fn, batches(X, y, 16), kind="true").dense()
    assert torch.allclose(true, exact_ggn(model, loss_fn, X, y), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", ["mlp", "saddle"])
def test_monte_carlo_fisher_is_a_fixed_matrix_whose_trace_is_unbiased_for_the_ggn(name):
    model, loss_fn, X, y = problem(name)
    data = batches(X, y, 16)
    op = FisherOperator(model, loss_fn, data, kind="true", mc_samples=1, seed=3)
    first = op.dense()
    assert torch.equal(first, op.dense())  # the same sampled labels on every product
    assert torch.linalg.eigvalsh(first).min() > -1e-12
    exact = float(torch.trace(exact_ggn(model, loss_fn, X, y)))
    traces = torch.tensor(
        [
            float(
                ht.ggn_trace(FisherOperator(model, loss_fn, data, kind="true", mc_samples=1, seed=s)).estimate
            )
            for s in range(30)
        ]
    )
    assert abs(float(traces.mean()) - exact) <= 4 * float(traces.std()) / 30**0.5
    assert float(traces.std()) > 0  # the labels really are sampled


@pytest.mark.parametrize("name", [*CLASSIFIERS, "saddle"])
def test_ggn_trace_is_exact_and_costs_one_pass_per_output(name):
    model, loss_fn, X, y = problem(name)
    G = exact_ggn(model, loss_fn, X, y)
    result = ht.ggn_trace(ht.HessianOperator(model, loss_fn, batches(X, y, 16)))
    assert result.estimate == pytest.approx(float(torch.trace(G)), rel=1e-10)
    assert result.stderr == 0.0 and result.method == "exact-ggn"
    assert result.hvps == model(X[:1]).shape[1]  # C outputs
    assert sum(b.estimate for b in result.blocks) == pytest.approx(result.estimate, rel=1e-12)
    empirical = ht.ggn_trace(FisherOperator(model, loss_fn, batches(X, y, 16), kind="empirical"))
    assert empirical.estimate == pytest.approx(
        float(torch.trace(exact_empirical_fisher(model, loss_fn, X, y)))
    )
    assert empirical.hvps == 1


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_control_variate_trace_is_within_its_error_bar_of_the_exact_hessian_trace(name):
    model, loss_fn, X, y = problem(name)
    exact = float(torch.trace(exact_hessian(model, loss_fn, X, y)))
    op = ht.HessianOperator(model, loss_fn, batches(X, y, 16))
    result = ht.trace(op, control_variate="ggn", max_hvps=163, seed=1)
    assert isinstance(result, ht.ControlVariateTraceResult) and result.method == "hutchinson+ggn"
    assert abs(result.estimate - exact) <= 4 * result.stderr
    assert result.stderr > 0
    assert result.exact_part == pytest.approx(float(torch.trace(exact_ggn(model, loss_fn, X, y))), rel=1e-10)
    assert result.estimate == pytest.approx(result.exact_part + result.residual_estimate, rel=1e-12)
    assert result.hessian_products == result.ggn_products == result.n_probes == (163 - 3) // 2
    assert result.hvps == 2 * result.n_probes + result.exact_passes == 163
    assert sum(b.estimate for b in result.blocks) == pytest.approx(result.estimate, rel=1e-10)
    assert ht.result_from_dict(result.to_dict()) == result


def test_control_variate_with_rtol_stops_relative_to_the_whole_trace():
    model, loss_fn, X, y = problem("cnn_bn")
    op = ht.HessianOperator(model, loss_fn, batches(X, y, 16))
    result = ht.control_variate_trace(op, rtol=0.05, seed=0)
    assert result.converged and result.relative_halfwidth <= 0.05
    assert result.hvps < 1000


def test_dict_inputs_and_micro_batches_give_the_same_ggn():
    class KeywordMLP(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, features, scale):
            return self.inner(features * scale)

    model, loss_fn, X, y = problem("mlp")
    wrapped = KeywordMLP(model)
    data = [({"features": xb, "scale": torch.full((len(xb), 1), 2.0)}, yb) for xb, yb in batches(X, y, 16)]
    G = exact_ggn(model, loss_fn, 2.0 * X, y)
    assert torch.allclose(GGNOperator(wrapped, loss_fn, data).dense(), G, atol=1e-12, rtol=1e-10)
    micro = GGNOperator(model, loss_fn, batches(2.0 * X, y, 71), max_batch_size=10)
    assert torch.allclose(micro.dense(), G, atol=1e-12, rtol=1e-10)
    trace = ht.ggn_trace(GGNOperator(wrapped, loss_fn, data))
    assert trace.estimate == pytest.approx(float(torch.trace(G)), rel=1e-10)


def test_float32_model_in_float64_and_loss_modules():
    model, _, X, y = PROBLEMS["mlp"]()
    G = exact_ggn(copy.deepcopy(model).double(), nn.functional.cross_entropy, X.double(), y)
    op = GGNOperator(model, nn.CrossEntropyLoss(), batches(X, y, 16), dtype=torch.float64)
    assert torch.allclose(op.dense(), G, atol=1e-12, rtol=1e-10)


def test_bad_input_gives_one_clear_error():
    model, loss_fn, X, y = problem("mlp")
    data = batches(X, y, 16)
    with pytest.raises(UnsupportedLossError, match="cross-entropy and MSE"):
        GGNOperator(model, nn.functional.nll_loss, data)
    with pytest.raises(UnsupportedLossError, match="reduction='mean'"):
        GGNOperator(model, nn.CrossEntropyLoss(label_smoothing=0.1), data)
    with pytest.raises(ValueError, match="mode='eval'"):
        GGNOperator(model, loss_fn, data, mode="train")
    with pytest.raises(ValueError, match="kind='true'"):
        FisherOperator(model, loss_fn, data, kind="empirical", mc_samples=4)
    op = ht.HessianOperator(model, loss_fn, data)
    with pytest.raises(ValueError, match="Hutchinson on H − G"):
        ht.trace(op, method="hutchpp", control_variate="ggn")
    with pytest.raises(ValueError, match="unknown control variate"):
        ht.trace(op, control_variate="fisher")
    with pytest.raises(ValueError, match="fewer than 2 residual probes"):
        ht.trace(op, control_variate="ggn", max_hvps=6)
    with pytest.raises(TypeError, match="needs the model"):
        ht.ggn_trace(ht.DenseOperator(torch.eye(3)))


def test_the_reverse_mode_push_forward_gives_the_same_ggn():
    """For models without forward-mode rules J·V comes from the transpose of the pull-back."""
    model, loss_fn, X, y = problem("cnn_bn")
    op = GGNOperator(model, loss_fn, batches(X, y, 16))
    op.push_strategy = "vjp-transpose"
    assert torch.allclose(op.dense(), exact_ggn(model, loss_fn, X, y), atol=1e-12, rtol=1e-10)
    assert op.push_strategy == "vjp-transpose"
