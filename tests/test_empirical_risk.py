"""The one data loop: input kinds (tensor, tuple, dict, dict batches with labels), model outputs with
.logits, micro-batching that keeps the exact weighting, and the operator protocol of every operator."""

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from helpers import batches, exact_hessian
from torch import nn

import hessian_tools as ht
from hessian_tools.errors import DataError
from hessian_tools.operators import EmpiricalRisk, LinearOperator
from hessian_tools.operators.block_diagonal import BlockColumnsOperator
from hessian_tools.operators.empirical_risk import model_output
from hessian_tools.stability import PerturbedEvaluator

CE = nn.functional.cross_entropy


class TwoInputNet(nn.Module):
    """f(a, b) = head(tanh(A a + B b)): a model taking two positional tensors."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, a, b):
        return self.head(torch.tanh(self.a(a) + self.b(b)))


class KeywordNet(nn.Module):
    """A Hugging Face-style model: keyword inputs, an output object with .logits."""

    def __init__(self):
        super().__init__()
        self.net = TwoInputNet()

    def forward(self, input_ids=None, attention_mask=None):
        class Output:
            logits = self.net(input_ids, attention_mask)

        return Output()


def _data(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return a, torch.randn(n, 2, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _reference_hessian(model, a, b, y):
    """Exact H of the mean CE over all samples, calling the model positionally (independent of the loop)."""

    class Joined(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x[:, :3], x[:, 3:])

    return exact_hessian(Joined(), CE, torch.cat([a, b], 1), y)


def test_tuple_inputs_give_the_exact_hessian():
    torch.manual_seed(0)
    model = TwoInputNet().double()
    a, b, y = _data()
    data = [((a[i : i + 8], b[i : i + 8]), y[i : i + 8]) for i in range(0, 23, 8)]
    H = ht.HessianOperator(model, CE, data, dtype=torch.float64).dense()
    assert torch.allclose(H, _reference_hessian(model, a, b, y), atol=1e-10)


@pytest.mark.parametrize("as_labels_dict", [False, True])
def test_dict_inputs_and_logits_outputs_give_the_same_hessian(as_labels_dict):
    torch.manual_seed(0)
    model = KeywordNet().double()
    a, b, y = _data()
    if as_labels_dict:
        data = [
            {"input_ids": a[i : i + 8], "attention_mask": b[i : i + 8], "labels": y[i : i + 8]}
            for i in range(0, 23, 8)
        ]
    else:
        data = [
            ({"input_ids": a[i : i + 8], "attention_mask": b[i : i + 8]}, y[i : i + 8])
            for i in range(0, 23, 8)
        ]
    for backend in ("func", "autograd"):
        H = ht.HessianOperator(model, CE, data, dtype=torch.float64, backend=backend).dense()
        assert torch.allclose(H, _reference_hessian(model.net, a, b, y), atol=1e-10), backend


def test_micro_batches_keep_the_sample_weighting_exact():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = torch.randn(37, 4, dtype=torch.float64), torch.randint(0, 3, (37,))
    exact = exact_hessian(model, CE, X, y)
    split = ht.HessianOperator(model, CE, batches(X, y, 20), max_batch_size=6)
    assert [n for *_, n in split.source] == [6, 6, 6, 2, 6, 6, 5]
    assert split.num_samples == 37
    assert torch.allclose(split.dense(), exact, atol=1e-10)
    loss, grad = split.loss_and_gradient()
    assert loss == pytest.approx(float(CE(model(X), y)), rel=1e-12)


def test_perturbed_evaluator_reads_the_same_input_kinds():
    torch.manual_seed(2)
    model = KeywordNet().double()
    a, b, y = _data()
    dict_data = [{"input_ids": a, "attention_mask": b, "labels": y}]
    tuple_model = model.net
    evaluator = PerturbedEvaluator(model, dict_data)
    reference = PerturbedEvaluator(tuple_model, [((a, b), y)])
    offsets = 0.1 * torch.randn(3, evaluator.dim, dtype=torch.float64)
    assert torch.allclose(evaluator.evaluate(CE, offsets), reference.evaluate(CE, offsets), atol=1e-6)


@pytest.mark.parametrize(
    "batch, message",
    [
        ((torch.zeros(2, 3), torch.zeros(2), torch.zeros(2)), "3-element tuple"),
        ({"input_ids": torch.zeros(2, 3)}, "labels"),
    ],
)
def test_malformed_batches_are_refused_with_one_line(batch, message):
    model = nn.Linear(3, 2)
    with pytest.raises(DataError, match=message):
        _ = EmpiricalRisk(model, CE, [batch]).num_samples


def test_model_output_prefers_logits():
    logits = torch.ones(2, 3)
    assert model_output({"logits": logits, "loss": torch.zeros(())}) is logits
    assert model_output((logits, torch.zeros(2))) is logits
    with pytest.raises(TypeError, match="logits"):
        model_output("not a tensor")


def _operators():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    hessian = ht.HessianOperator(model, CE, (X, y))
    H = hessian.dense()
    linop = sla.aslinearoperator(H.numpy())
    return {
        "hessian": (hessian, H),
        "dense": (ht.DenseOperator(H), H),
        "scipy": (ht.as_operator(linop), H),
        "blocks": (BlockColumnsOperator(hessian, hessian.blocks), None),
    }


@pytest.mark.parametrize("name", ["hessian", "dense", "scipy", "blocks"])
def test_every_operator_speaks_the_linear_operator_protocol(name):
    op, H = _operators()[name]
    assert isinstance(op, LinearOperator) and op.shape == (op.dim, op.dim)
    V = torch.zeros(op.dim, 2, dtype=torch.float64)
    V[op.dim - 1, 0], V[0, 1] = 1.0, 1.0  # columns inside one block (the last and the first)
    before = op.hvps
    product = op @ V
    assert op.hvps == before + 2
    assert torch.allclose(op @ V[:, 0], product[:, 0])
    assert np.allclose(op.to_scipy() @ V.numpy(), product.numpy())
    if H is not None:
        assert torch.allclose(product, H @ V, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        op @ torch.zeros(op.dim + 1, 1, dtype=torch.float64)
