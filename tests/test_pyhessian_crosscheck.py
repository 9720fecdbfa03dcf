"""Cross-check against PyHessian (a test extra): same model, same uneven batches.

PyHessian's ``dataloader_hv_product`` weights each batch by its size, like ours, so the two
Hessian-vector products must agree to float32 rounding; the two trace estimates must agree
within their combined error bars.
"""

import math

import numpy as np
import pytest
import torch
from helpers import TinyCNN, batches

import hessian_tools as ht

pyhessian = pytest.importorskip("pyhessian")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(5)
    model = TinyCNN().eval()
    X, y = torch.randn(90, 1, 6, 6), torch.randint(0, 3, (90,))
    return model, torch.nn.CrossEntropyLoss(), batches(X, y, 32)  # 32 + 32 + 26


def test_hvp_equals_pyhessian_dataloader_hvp(setup):
    model, criterion, data = setup
    op = ht.HessianOperator(model, criterion, data)
    theirs = pyhessian.hessian(model, criterion, dataloader=data, cuda=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(op.dim, generator=g)
        pieces = [v[b.slice].view(b.shape).clone() for b in op.blocks]
        _, Hv = theirs.dataloader_hv_product(pieces)
        torch.testing.assert_close(op.matvec(v), torch.cat([h.reshape(-1) for h in Hv]), rtol=1e-4, atol=1e-6)


def test_trace_estimates_agree_within_error_bars(setup):
    model, criterion, data = setup
    ours = ht.trace(ht.HessianOperator(model, criterion, data), method="hutchinson", max_hvps=100, seed=0)
    torch.manual_seed(0)  # PyHessian draws from the global RNG
    samples = pyhessian.hessian(model, criterion, dataloader=data, cuda=False).trace(maxIter=100, tol=0.0)
    theirs, theirs_se = float(np.mean(samples)), float(np.std(samples, ddof=1) / math.sqrt(len(samples)))
    assert len(samples) == 100
    assert abs(ours.estimate - theirs) <= 3 * math.hypot(ours.stderr, theirs_se)
