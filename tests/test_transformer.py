"""The zoo's transformer text classifier: Hugging Face-style keyword inputs and outputs, padding that
changes nothing, determinism by default, and an exact Hessian through the operator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian

import hessian_tools as ht
from hessian_tools.app.zoo.data import synthetic_text
from hessian_tools.app.zoo.models import count_parameters
from hessian_tools.app.zoo.transformer import ClassifierOutput, TextClassifier

TINY = dict(vocab_size=13, max_len=6, d_model=8, num_heads=2, num_layers=1, dim_feedforward=16)


def _seeded(**kw) -> TextClassifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TextClassifier(**kw).eval()


def test_default_size_and_keyword_call_return_logits_both_ways():
    model = _seeded(num_classes=3)
    assert 500_000 <= count_parameters(model) <= 2_000_000
    data = synthetic_text(5, vocab_size=2000, min_len=4, max_len=10, num_classes=3)
    out = model(input_ids=data.input_ids, attention_mask=data.attention_mask)
    assert isinstance(out, ClassifierOutput) and out.logits is out["logits"]
    assert out.logits.shape == (5, 3)
    assert torch.allclose(model(**data.inputs).logits, out.logits)
    full = torch.ones_like(data.input_ids)
    assert torch.allclose(model(data.input_ids).logits, model(data.input_ids, full).logits)
    with pytest.raises(ValueError, match="exceed max_len=64"):
        model(torch.ones(1, 65, dtype=torch.long))


def test_padded_positions_change_nothing():
    model = _seeded(**TINY)
    data = synthetic_text(6, vocab_size=13, min_len=2, max_len=6)
    other = data.input_ids.clone()
    other[data.attention_mask == 0] = 7  # different tokens where the mask is 0
    assert bool((data.attention_mask == 0).any())
    a = model(data.input_ids, data.attention_mask).logits
    b = model(other, data.attention_mask).logits
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, model(other, torch.ones_like(other)).logits, atol=1e-4)


def test_train_mode_is_deterministic_with_the_default_dropout():
    model = _seeded(**TINY).train()
    data = synthetic_text(4, vocab_size=13, min_len=2, max_len=6)
    assert torch.equal(model(**data.inputs).logits, model(**data.inputs).logits)


@pytest.mark.parametrize("backend", ["func", "autograd"])
def test_hessian_of_attention_weights_with_dict_inputs_matches_torch_func_hessian(backend):
    model = _seeded(**TINY).double()
    data = synthetic_text(7, vocab_size=13, min_len=2, max_len=6, seed=3)
    parts = data.batches(3)  # uneven: 3 + 3 + 1
    name = "encoder.layers.0.self_attn.in_proj_weight"  # queries, keys and values: 3·8·8 = 192 parameters
    op = ht.HessianOperator(
        model, F.cross_entropy, parts, params=[name], backend=backend, dtype=torch.float64
    )
    weight = dict(model.named_parameters())[name].detach()

    def mean_loss(w):
        total = sum(
            F.cross_entropy(functional_call(model, {name: w}, kwargs=x).logits, y) * y.shape[0]
            for x, y in parts
        )
        return total / data.labels.shape[0]

    exact = hessian(mean_loss)(weight).reshape(weight.numel(), weight.numel()).detach()
    V = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(op.matmat(V), exact @ V, rtol=1e-8, atol=1e-10)
    assert float(exact.abs().max()) > 1e-3  # attention weights do have curvature here
