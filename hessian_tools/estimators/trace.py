"""``trace(op, method=...)``: one entry point for the trace estimators.

* ``"xtrace"`` (default) — XTrace (:mod:`.epperly2024xtrace`): every probe serves both the low-rank
  sketch and the residual estimate; with ``rtol`` the sketch grows in stages (reusing every HVP)
  until its jackknife 95% half-width meets the tolerance. Measured the cheapest to a given accuracy
  on Hessians and dense test spectra, with a conservative error bar.
* ``"hutchpp"`` — Hutch++ (:mod:`.meyer2021hutchpp`): exact on a sketched top subspace, Hutchinson
  on the rest (sequential rule on the residual probes under ``rtol``); its per-probe samples pair
  across operators (:mod:`.paired`).
* ``"hutchinson"`` — plain Hutchinson (:mod:`.hutchinson`), with the sequential rule under ``rtol``.
``control_variate="ggn"`` (or a GGN/Fisher operator): tr(H) = tr(G) + tr(H − G), the Gauss–Newton
trace exact and Hutchinson on the residual only (:mod:`.control_variate`).
"""

from __future__ import annotations

from ..results import TraceResult
from .epperly2024xtrace import xtrace
from .hutchinson import hutchinson
from .meyer2021hutchpp import hutchpp

METHODS = ("xtrace", "hutchpp", "hutchinson")
DEFAULT_METHOD = "xtrace"


def trace(
    op,
    method: str | None = None,
    rtol: float | None = None,
    max_hvps: int | None = None,
    seed: int | None = 0,
    control_variate=None,
    **options,
) -> TraceResult:
    """Estimate tr(H) of any operator (``dim`` + ``matmat``).

    ``method``: one of ``METHODS`` (default ``DEFAULT_METHOD``, adaptive XTrace; ``"hutchinson"`` with a
    control variate).
    ``control_variate``: ``None``, ``"ggn"`` (the GGN of a HessianOperator's model, loss and data) or
    a GGN/Fisher operator G: returns a ControlVariateTraceResult, exact tr(G) + Hutchinson on H − G
    (``max_hvps`` then counts both products of every residual probe and the exact trace's passes).

    ``rtol``: stop once the 95% half-width ≤ rtol·|estimate| (every method adapts).
    ``max_hvps``: the HVP budget (default 100 with rtol=None, 1000 with rtol).
    Other keyword options go to the method (``min_probes=``, ``error_bar=`` for XTrace; ``sketch=``,
    ``block_size=`` for Hutch++ / Hutchinson).
    """
    if control_variate is not None:
        return _control_variate_trace(op, method, rtol, max_hvps, seed, control_variate, options)
    method = DEFAULT_METHOD if method is None else method
    if method not in METHODS:
        raise ValueError(f"unknown trace method {method!r}; choose one of {', '.join(METHODS)}")
    if max_hvps is None:
        max_hvps = 100 if rtol is None else 1000
    if method == "hutchinson":
        n_probes = options.pop("n_probes", max_hvps)
        return hutchinson(op, n_probes=n_probes, rtol=rtol, max_hvps=max_hvps, seed=seed, **options)
    if method == "hutchpp":
        return hutchpp(op, rtol=rtol, max_hvps=max_hvps, seed=seed, **options)
    return xtrace(op, rtol=rtol, max_hvps=max_hvps, seed=seed, **options)


def _control_variate_trace(op, method, rtol, max_hvps, seed, control_variate, options):
    from .control_variate import control_variate_trace

    if method not in (None, "hutchinson"):
        raise ValueError(
            f"the control variate runs Hutchinson on H − G; method={method!r} is not supported with it"
        )
    ggn = None if isinstance(control_variate, str) and control_variate == "ggn" else control_variate
    if isinstance(ggn, str):
        raise ValueError(f"unknown control variate {control_variate!r}; use 'ggn' or a GGN/Fisher operator")
    return control_variate_trace(op, ggn, rtol=rtol, max_hvps=max_hvps, seed=seed, **options)
