"""Fixtures shared by the test modules (helpers live in helpers.py)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from helpers import PROBLEMS, exact_hessian

torch.set_num_threads(1)  # tiny models: threads only add contention

ANALYSIS = Path(__file__).resolve().parent.parent / "analysis"


def import_analysis_script(name: str):
    """Import analysis/NAME.py (a benchmark script, which imports its sibling modules by name)."""
    sys.path.insert(0, str(ANALYSIS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ANALYSIS))


@pytest.fixture(params=sorted(PROBLEMS))
def problem(request):
    """(name, model, loss_fn, X, y, exact H) for each small problem."""
    model, loss_fn, X, y = PROBLEMS[request.param]()
    return request.param, model, loss_fn, X, y, exact_hessian(model, loss_fn, X, y)
