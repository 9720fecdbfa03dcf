"""Fixtures shared by the test modules (helpers live in helpers.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import PROBLEMS, exact_hessian

torch.set_num_threads(1)  # tiny models: threads only add contention


@pytest.fixture(params=sorted(PROBLEMS))
def problem(request):
    """(name, model, loss_fn, X, y, exact H) for each small problem."""
    model, loss_fn, X, y = PROBLEMS[request.param]()
    return request.param, model, loss_fn, X, y, exact_hessian(model, loss_fn, X, y)
