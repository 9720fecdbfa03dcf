"""Small statistics shared by the estimators, the bounds and the reports.

Two kinds of error bars appear in this package and both are computed here:

* the standard error of a Monte-Carlo estimate from its i.i.d. samples (probe quadratic forms,
  perturbed losses): ``std(ddof=1)/√n``, and a 95% interval ``estimate ± Z95·stderr``;
* the spread over independent runs (seeds): the Student-t interval ``mean ± t_{0.975, n−1}·sd/√n``,
  and, for comparisons of runs paired by seed, the t-interval of the per-seed relative changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

Z95 = 1.959963984540054  #: two-sided 95% standard normal quantile


def mean_and_stderr(samples) -> tuple[float, float]:
    """Sample mean and its standard error std(ddof=1)/√n (inf for fewer than 2 samples)."""
    values = (
        samples.detach().double().reshape(-1)
        if isinstance(samples, torch.Tensor)
        else torch.as_tensor(np.asarray(samples, dtype=np.float64).reshape(-1))
    )
    n = values.numel()
    mean = float(values.mean()) if n else math.nan
    if n < 2:
        return mean, math.inf
    return mean, float(values.std(unbiased=True)) / math.sqrt(n)


def t95(n: int) -> float:
    """The 0.975 quantile of Student's t with n − 1 degrees of freedom (n ≥ 2 runs)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval over independent runs (seeds); 0 for one run."""
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return float(values.mean()), 0.0
    return float(values.mean()), float(t95(values.size) * values.std(ddof=1) / math.sqrt(values.size))


def column_mean_ci(values) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mean_ci` of every column of ``values`` (runs × points), ignoring non-finite entries
    (e.g. a diverged run); the half-width is NaN where fewer than 2 runs are finite.
    """
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    n = finite.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, np.where(finite, values, 0.0).sum(0) / np.maximum(n, 1), np.nan)
        deviation = np.where(finite, values - mean, 0.0)
        sd = np.sqrt((deviation**2).sum(0) / np.maximum(n - 1, 1))
        t = np.array([t95(int(k)) if k >= 2 else np.nan for k in np.atleast_1d(n)]).reshape(n.shape)
        half = np.where(n >= 2, t * sd / np.sqrt(np.maximum(n, 1)), np.nan)
    return mean, half


def relative_change_ci(new: Sequence[float], base: Sequence[float]) -> tuple[float, float]:
    """mean(new)/mean(base) − 1 and its 95% half-width by the delta method (independent groups):
    se = |ratio|·√((se_new/m_new)² + (se_base/m_base)²).
    """
    m_new, m_base = float(np.mean(new)), float(np.mean(base))
    se_new = float(np.std(new, ddof=1)) / math.sqrt(len(new)) if len(new) > 1 else 0.0
    se_base = float(np.std(base, ddof=1)) / math.sqrt(len(base)) if len(base) > 1 else 0.0
    ratio = m_new / m_base
    se = abs(ratio) * math.sqrt((se_new / m_new) ** 2 + (se_base / m_base) ** 2)
    return ratio - 1.0, Z95 * se


def paired_relative_change(new: Sequence[float], base: Sequence[float]) -> tuple[float, float, int]:
    """Runs paired by seed: the mean of the per-pair changes new_i/base_i − 1, the half-width of its
    95% t-interval over pairs, and how many pairs went down (new_i < base_i).
    """
    new, base = np.asarray(new, dtype=float), np.asarray(base, dtype=float)
    if new.shape != base.shape or new.size == 0:
        raise ValueError(f"need equally many paired values, got {new.size} and {base.size}")
    mean, half = mean_ci(new / base - 1.0)
    return mean, half, int((new < base).sum())
