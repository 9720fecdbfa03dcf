"""The statistics behind every report: hand-computed values, and the paired comparison's promise that common
random numbers give a tighter interval than two independent estimates."""

import math

import numpy as np
import pytest
import torch
from helpers import known_spectrum

import hessian_tools as ht
from hessian_tools.estimators.paired import paired_difference
from hessian_tools.stats import (
    Z95,
    column_mean_ci,
    mean_and_stderr,
    mean_ci,
    paired_relative_change,
    relative_change_ci,
    t95,
)


def test_mean_and_stderr_by_hand():
    mean, stderr = mean_and_stderr(torch.tensor([1.0, 2.0, 4.0, 9.0]))
    assert mean == 4.0
    assert stderr == pytest.approx(math.sqrt(((9 + 4 + 0 + 25) / 3) / 4))
    assert mean_and_stderr([3.0]) == (3.0, math.inf)


def test_t_interval_by_hand():
    # values 1, 2, 6: mean 3, sd √7, t_{0.975, 2} = 4.302652729749464
    mean, half = mean_ci([1.0, 2.0, 6.0])
    assert t95(3) == pytest.approx(4.302652729749464, rel=1e-12)
    assert (mean, half) == pytest.approx((3.0, 4.302652729749464 * math.sqrt(7) / math.sqrt(3)), rel=1e-12)
    assert mean_ci([5.0]) == (5.0, 0.0)


def test_column_intervals_skip_non_finite_runs():
    values = np.array([[1.0, 10.0], [2.0, np.nan], [6.0, 12.0]])
    mean, half = column_mean_ci(values)
    assert mean[0] == pytest.approx(3.0) and half[0] == pytest.approx(mean_ci([1, 2, 6])[1])
    assert mean[1] == pytest.approx(11.0) and half[1] == pytest.approx(mean_ci([10, 12])[1])


def test_paired_and_unpaired_relative_changes_by_hand():
    base, new = [100.0, 200.0, 400.0], [90.0, 176.0, 364.0]  # per-seed changes −10%, −12%, −9%
    mean, half, lower = paired_relative_change(new, base)
    assert mean == pytest.approx(-31 / 300) and lower == 3
    assert half == pytest.approx(t95(3) * np.std([-0.10, -0.12, -0.09], ddof=1) / math.sqrt(3), rel=1e-12)
    change, unpaired = relative_change_ci(new, base)
    ratio = np.mean(new) / np.mean(base)
    se = ratio * math.hypot(
        np.std(new, ddof=1) / math.sqrt(3) / np.mean(new), np.std(base, ddof=1) / math.sqrt(3) / np.mean(base)
    )
    assert change == pytest.approx(ratio - 1) and unpaired == pytest.approx(Z95 * se)
    # the seed-to-seed spread is large, the per-seed change is not: pairing is what resolves the effect
    assert half < unpaired / 10


def test_paired_difference_by_hand():
    a = ht.TraceResult(10.0, 0.5, 4, "hutchinson", 0, 4, samples=(9.0, 10.0, 11.0, 10.0))
    b = ht.TraceResult(11.0, 0.5, 4, "hutchinson", 0, 4, samples=(10.0, 11.5, 11.5, 11.0))
    d = paired_difference("a", a, "b", b)
    diffs = np.array([1.0, 1.5, 0.5, 1.0])
    assert d.difference == pytest.approx(1.0)
    assert d.stderr == pytest.approx(np.std(diffs, ddof=1) / 2)
    assert d.independent_stderr == pytest.approx(math.hypot(0.5, 0.5))
    influence = (np.array(b.samples) - 1.1 * np.array(a.samples)) / 10.0
    assert d.relative_change == pytest.approx(0.1)
    assert d.relative_change_stderr == pytest.approx(np.std(influence, ddof=1) / 2)
    with pytest.raises(ValueError, match="same seed"):
        paired_difference("a", a, "c", ht.TraceResult(1.0, 0.1, 4, "hutchinson", 1, 4, samples=(1.0,) * 4))


def test_common_probes_give_a_tighter_interval_than_independent_ones():
    """Two Hessians 1% apart: with the same probes the difference's interval is far tighter than the
    two estimates' combined error bars, and it covers the exact difference."""
    H, _ = known_spectrum(dim=200, seed=4)
    g = torch.Generator().manual_seed(7)
    E = torch.randn(200, 200, generator=g, dtype=torch.float64)
    H2 = H + 0.01 * (E + E.T) / 2 + 0.05 * torch.eye(200, dtype=torch.float64)
    comparison = ht.paired_traces(
        {"a": ht.DenseOperator(H), "b": ht.DenseOperator(H2)}, method="hutchinson", max_hvps=100, seed=3
    )
    pair = comparison.pairs[0]
    exact = float(torch.trace(H2) - torch.trace(H))
    assert pair.tightening > 5
    assert abs(pair.difference - exact) <= 3 * pair.stderr
