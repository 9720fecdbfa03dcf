"""``trace(op, method=...)``: one entry point for the trace estimators.

* ``"hutchpp"`` (default) — Hutch++ (:mod:`.meyer2021hutchpp`): exact on a sketched top subspace,
  Hutchinson on the rest; the best default for Hessians, whose spectrum has a few outliers.
* ``"hutchinson"`` — plain Hutchinson (:mod:`.hutchinson`), with the sequential rule under ``rtol``.
* ``"xtrace"`` — XTrace (:mod:`.epperly2024xtrace`): exchangeable, leave-one-out low-rank
  estimator with an error estimate from the spread of its per-probe estimates.
"""
from __future__ import annotations

from ..results import TraceResult
from .hutchinson import hutchinson
from .meyer2021hutchpp import hutchpp

METHODS = ("hutchpp", "hutchinson", "xtrace")


def trace(op, method: str = "hutchpp", rtol: float | None = None, max_hvps: int | None = None, seed: int | None = 0, **options) -> TraceResult:
    """Estimate tr(H) of any operator (``dim`` + ``matmat``).

    ``rtol``: stop once the 95% half-width ≤ rtol·|estimate| (sequential; Hutchinson and Hutch++).
    ``max_hvps``: the HVP budget (default 100 with rtol=None, 1000 with rtol).
    Other keyword options go to the method (``sketch=``, ``block_size=``, ``min_probes=``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown trace method {method!r}; choose one of {', '.join(METHODS)}")
    if max_hvps is None:
        max_hvps = 100 if rtol is None else 1000
    if method == "hutchinson":
        n_probes = options.pop("n_probes", max_hvps)
        return hutchinson(op, n_probes=n_probes, rtol=rtol, max_hvps=max_hvps, seed=seed, **options)
    if method == "hutchpp":
        return hutchpp(op, rtol=rtol, max_hvps=max_hvps, seed=seed, **options)
    from .epperly2024xtrace import xtrace

    if rtol is not None:
        raise ValueError("xtrace has a fixed budget: pass max_hvps, not rtol")
    return xtrace(op, max_hvps=max_hvps, seed=seed, **options)
