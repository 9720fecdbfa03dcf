"""Paired trace comparisons: several operators' traces estimated with common random numbers.

With the SAME probes z_i for two operators A and B, the per-probe differences
d_i = z_iᵀ B z_i − z_iᵀ A z_i have a much smaller spread than two independent estimates when the
two Hessians are alike, so the difference tr(B) − tr(A) and the relative change tr(B)/tr(A) − 1
come with much tighter confidence intervals (common random numbers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from ..checks import check_choice
from ..results import ComparisonResult, PairedDifference, TraceResult
from ..seeding import resolve_seed
from ..stats import mean_and_stderr
from .trace import trace

#: trace methods whose per-probe samples pair across operators (i.i.d. probes from the same seed)
PAIRED_METHODS = ("hutchpp", "hutchinson")


def paired_difference(name_a: str, a: TraceResult, name_b: str, b: TraceResult) -> PairedDifference:
    """Paired difference of two trace results made with the same seed, method and budget."""
    if (a.seed, a.method, a.n_probes) != (b.seed, b.method, b.n_probes) or not a.samples:
        raise ValueError(
            "a paired comparison needs two results with the same seed, method and number of probes, "
            "with samples kept"
        )
    sa, sb = np.asarray(a.samples), np.asarray(b.samples)
    n = len(sa)
    diff = b.estimate - a.estimate
    _, stderr = mean_and_stderr(sb - sa)
    independent = math.hypot(a.stderr, b.stderr)
    ratio = b.estimate / a.estimate
    influence = (sb - ratio * sa) / a.estimate  # linearisation of B̂/Â around the estimates
    _, rel_stderr = mean_and_stderr(influence)
    return PairedDifference(
        a=name_a,
        b=name_b,
        difference=diff,
        stderr=stderr,
        independent_stderr=independent,
        tightening=independent / stderr if stderr > 0 else math.inf,
        relative_change=ratio - 1.0,
        relative_change_stderr=rel_stderr,
        n_probes=n,
    )


def paired_traces(
    operators: Mapping[str, object],
    *,
    method: str = "hutchpp",
    max_hvps: int = 300,
    seed: int | None = 0,
    progress: Callable[[str], None] | None = None,
) -> ComparisonResult:
    """Estimate every operator's trace with the SAME probes (same seed, fixed budget, no rtol) and
    report each pair's paired difference (the first name is the baseline of every pair).
    """
    check_choice("method", method, PAIRED_METHODS)
    if len(operators) < 2:
        raise ValueError("compare needs at least two checkpoints")
    dims = {op.dim for op in operators.values()}
    if len(dims) != 1:
        raise ValueError(
            f"the checkpoints have different parameter counts {sorted(dims)}: they are not comparable"
        )
    say = progress or (lambda _msg: None)
    seed = resolve_seed(seed)  # one seed for all: the common random numbers
    results = {}
    for name, op in operators.items():
        say(name)
        results[name] = trace(op, method=method, max_hvps=max_hvps, seed=seed)
    names = list(results)
    base = names[0]
    pairs = tuple(paired_difference(base, results[base], other, results[other]) for other in names[1:])
    return ComparisonResult(
        names=tuple(names),
        traces=tuple(results[n] for n in names),
        pairs=pairs,
        seed=seed,
        method=method,
        hvps=sum(r.hvps for r in results.values()),
    )
