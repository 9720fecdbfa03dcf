"""``trace(op, method=...)``: one entry point for the trace estimators.

* ``"hutchpp"`` (default) — Hutch++ (:mod:`.meyer2021hutchpp`): exact on a sketched top subspace,
  Hutchinson on the rest; the best default for Hessians, whose spectrum has a few outliers.
* ``"hutchinson"`` — plain Hutchinson (:mod:`.hutchinson`), with the sequential rule under ``rtol``.
* ``"xtrace"`` — XTrace (:mod:`.epperly2024xtrace`): exchangeable, leave-one-out low-rank
  estimator with an error estimate from the spread of its per-probe estimates.

``control_variate="ggn"`` (or a GGN/Fisher operator): tr(H) = tr(G) + tr(H − G), the Gauss–Newton
trace exact and Hutchinson on the residual only (:mod:`.control_variate`).
"""
from __future__ import annotations

from ..results import TraceResult
from .hutchinson import hutchinson
from .meyer2021hutchpp import hutchpp

METHODS = ("hutchpp", "hutchinson", "xtrace")


def trace(op, method: str | None = None, rtol: float | None = None, max_hvps: int | None = None, seed: int | None = 0,
          control_variate=None, **options) -> TraceResult:
    """Estimate tr(H) of any operator (``dim`` + ``matmat``).

    ``method``: one of ``METHODS`` (default ``"hutchpp"``; ``"hutchinson"`` with a control variate).
    ``control_variate``: ``None``, ``"ggn"`` (the GGN of a HessianOperator's model, loss and data) or
    a GGN/Fisher operator G: returns a ControlVariateTraceResult, exact tr(G) + Hutchinson on H − G
    (``max_hvps`` then counts both products of every residual probe and the exact trace's passes).

    ``rtol``: stop once the 95% half-width ≤ rtol·|estimate| (sequential; Hutchinson and Hutch++).
    ``max_hvps``: the HVP budget (default 100 with rtol=None, 1000 with rtol).
    Other keyword options go to the method (``sketch=``, ``block_size=``, ``min_probes=``).
    """
    if control_variate is not None:
        return _control_variate_trace(op, method, rtol, max_hvps, seed, control_variate, options)
    method = "hutchpp" if method is None else method
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


def _control_variate_trace(op, method, rtol, max_hvps, seed, control_variate, options):
    from .control_variate import control_variate_trace

    if method not in (None, "hutchinson"):
        raise ValueError(f"the control variate runs Hutchinson on H − G; method={method!r} is not supported with it")
    ggn = None if isinstance(control_variate, str) and control_variate == "ggn" else control_variate
    if isinstance(ggn, str):
        raise ValueError(f"unknown control variate {control_variate!r}; use 'ggn' or a GGN/Fisher operator")
    return control_variate_trace(op, ggn, rtol=rtol, max_hvps=max_hvps, seed=seed, **options)
