"""The analyses a checkpoint can get, each defined once: its ``--what`` name, the result parts it
fills, what it needs first, how it is computed (from the library) and how its rows read in a report.

Adding an analysis means adding one :class:`Analysis` to :data:`REGISTRY` (and, if it has options,
their fields to :class:`~hessian_tools.app.pipeline.AnalysisSettings`): the command line's
``--what``, the pipeline, the JSON form of a :class:`~hessian_tools.app.pipeline.CheckpointAnalysis`
and the report table all read this registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..estimators.eigen import BOTH_ENDS
from ..estimators.trace import METHODS as LIBRARY_TRACE_METHODS
from ..results import Result
from ..stats import Z95
from .formatting import fmt, pm

#: trace methods of the application: the library's and ``"auto"`` (see :func:`trace_method_for`)
TRACE_METHODS = ("auto", *LIBRARY_TRACE_METHODS)
#: dim-sized float64 columns XTrace holds per probe at its peak, with a margin: Ω, Y, Z and Q in row
#: buffers (measured 4.2 per probe at dim 2.8 M, 24 probes: 2.2 GB above the operator's memory)
XTRACE_COLUMNS_PER_PROBE = 5

Row = list[str]


@dataclasses.dataclass(frozen=True)
class Analysis:
    """One analysis: ``compute(context)`` returns its result parts (``{part: Result}``); ``rows(parts)``
    turns those parts (in their JSON dict form; the whole analysis dict, so its ``settings`` too) into
    report rows (quantity, value ± 95%, error bar / notes, HVPs, seed). ``needs`` are analyses whose
    parts it reads (computed first, reported only if asked for); ``default`` False: only on request.
    """

    name: str
    parts: tuple[str, ...]
    progress: str
    compute: Callable[[Any], dict[str, Result | None]]
    rows: Callable[[Mapping[str, Any]], list[Row]]
    needs: tuple[str, ...] = ()
    default: bool = True  # run when no ``--what`` is given
    #: ``budget(settings, dim)``: the most HVPs it may spend (for progress reports; None if unknown)
    budget: Callable[[Any, int], int | None] = lambda settings, dim: None


# --------------------------------------------------------------------------- compute
def trace_method_for(settings, dim: int) -> str:
    """``settings.trace_method`` with ``"auto"`` resolved for an operator of dimension ``dim``: XTrace
    when its sketch, XTRACE_COLUMNS_PER_PROBE · dim · ⌈trace_max_hvps/2⌉ float64 numbers, fits in the
    memory budget (always when there is none), else Hutch++, which streams its probes in bounded blocks
    (ResNet-18 at 48 HVPs: XTrace would hold ≈ 11 GB).
    """
    from ..operators.memory import resolve_budget

    if settings.trace_method != "auto":
        return settings.trace_method
    budget = resolve_budget(settings.memory_budget, settings.device)
    probes = -(-settings.trace_max_hvps // 2)
    sketch_bytes = XTRACE_COLUMNS_PER_PROBE * dim * probes * 8
    return "xtrace" if budget is None or sketch_bytes <= budget else "hutchpp"


def _trace(ctx) -> dict:
    from ..estimators import trace

    s, op = ctx.settings, ctx.operator
    method = trace_method_for(s, op.dim)
    return {"trace": trace(op, method=method, rtol=s.trace_rtol, max_hvps=s.trace_max_hvps, seed=s.seed)}


def _eigs(ctx) -> dict:
    """The top ``eig_k`` and the smallest eigenvalue from one Lanczos run over both ends of the
    spectrum (budget: ``eig_max_hvps`` for each end, 2 × in all); for a model too small for that, two
    runs. The eigenvectors (k × the model's size) are dropped: the reports use values and residuals.
    """
    from ..estimators import eigenvalues, extreme_eigenvalues

    s, op = ctx.settings, ctx.operator
    common = {"tol": s.eig_tol, "seed": s.seed}
    if s.eig_k + 1 <= op.dim:
        top, bottom = extreme_eigenvalues(op, s.eig_k, 1, max_hvps=2 * s.eig_max_hvps, **common)
    else:
        top = eigenvalues(op, k=op.dim, which="LA", max_hvps=s.eig_max_hvps, **common)
        bottom = eigenvalues(op, k=1, which="SA", max_hvps=s.eig_max_hvps, **common)
    return {
        "top": dataclasses.replace(top, vectors=None),
        "bottom": dataclasses.replace(bottom, vectors=None),
    }


def _density(ctx) -> dict:
    from ..estimators import density

    s = ctx.settings
    return {
        "density": density(
            ctx.operator, n_probes=s.density_probes, steps=min(s.density_steps, ctx.operator.dim), seed=s.seed
        )
    }


def _stability(ctx) -> dict:
    from ..stability import stability_curve

    s = ctx.settings
    return {
        "stability": stability_curve(
            ctx.model,
            ctx.loss_fn,
            ctx.train_batches,
            list(s.sigmas),
            ctx.parts["trace"],
            n_samples=s.stability_samples,
            seed=s.seed,
            params=s.params,
        )
    }


#: the posteriors of the PAC-Bayes certificate, and their default Monte-Carlo weight draws
POSTERIORS = ("optimised", "isotropic")
DEFAULT_CERTIFICATE_SAMPLES = {"optimised": 1000, "isotropic": 20}


def _bound(ctx) -> dict:
    from ..bounds.measures import hessian_measures

    if ctx.prior_state is None:
        return {"certificate": None, "measures": None}
    _require_class_labels(ctx.train_batches)
    s, op = ctx.settings, ctx.operator
    result = certificate(ctx)
    measures = hessian_measures(
        op, _flat_prior(op, ctx.prior_state), n=op.num_samples, trace_result=ctx.parts["trace"], seed=s.seed
    )
    return {"certificate": result, "measures": measures}


def certificate(ctx) -> Result:
    """The PAC-Bayes certificate of ``ctx.model`` with the posterior ``ctx.settings.posterior``."""
    return _optimised(ctx) if ctx.settings.posterior == "optimised" else _isotropic(ctx)


def _samples(settings) -> int:
    chosen = settings.certificate_samples
    return DEFAULT_CERTIFICATE_SAMPLES[settings.posterior] if chosen is None else chosen


def _isotropic(ctx):
    from ..bounds.certificate import pac_bayes_certificate

    s = ctx.settings
    return pac_bayes_certificate(
        ctx.model,
        ctx.train_batches,
        ctx.prior_state,
        sigmas=s.certificate_sigmas,
        n_mc=_samples(s),
        delta=s.delta,
        seed=s.seed,
        params=s.params,
    )


def _optimised(ctx):
    """The optimised diagonal-Gaussian posterior. With a data-dependent prior (``prior_split``) its mean
    is optimised too, starting from the prior: the setting that certifies fine-tuned networks
    (analysis/bench_bound.py); with the pre-trained prior the mean stays at the checkpoint.
    """
    from ..bounds.posterior import optimised_certificate

    s = ctx.settings
    data_dependent = s.prior_split is not None
    if data_dependent and ctx.prior_trainer is None:
        raise ValueError(
            "a data-dependent prior (--prior-split) is trained with the checkpoint's own "
            "recipe: point the command at a run folder (its run.json holds the recipe)"
        )
    if s.params is not None:
        raise ValueError(
            "the optimised certificate covers every parameter; drop --params (or use --posterior isotropic)"
        )
    return optimised_certificate(
        ctx.model,
        ctx.bundle.train,
        ctx.prior_state,
        test_data=ctx.bundle.test,
        delta=s.delta,
        steps=s.certificate_steps,
        n_mc=_samples(s),
        n_mc_test=s.certificate_test_samples,
        optimise_mean=data_dependent,
        mean_start="prior" if data_dependent else "checkpoint",
        prior_split=s.prior_split,
        prior_trainer=ctx.prior_trainer if data_dependent else None,
        seed=s.seed,
    )


def _diagonal(ctx) -> dict:
    from ..estimators.diagonal import diagonal

    s = ctx.settings
    return {"diagonal": diagonal(ctx.operator, method=s.diag_method, max_hvps=s.diag_max_hvps, seed=s.seed)}


def _require_class_labels(data) -> None:
    """The certificate bounds the 0-1 classification error: refuse, in one line, targets that are not
    labels.
    """
    from ..errors import DataError
    from ..operators.data_source import BatchSource

    first = BatchSource(data).first()
    targets = first[2] if first is not None else None
    if not (isinstance(targets, torch.Tensor) and targets.ndim == 1 and not targets.dtype.is_floating_point):
        shown = (
            f"{targets.dtype} of shape {tuple(targets.shape)}"
            if isinstance(targets, torch.Tensor)
            else type(targets).__name__
        )
        raise DataError(
            f"the PAC-Bayes bound certifies the 0-1 classification error, so it needs integer class labels "
            f"of shape (n,) as targets, got {shown}; leave bound out of --what"
        )


def _flat_prior(op, prior_state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    missing = [n for n in op.param_names if n not in prior_state]
    if missing:
        raise ValueError(
            f"the prior weights lack {len(missing)} analysed parameter(s), first: {', '.join(missing[:3])}"
        )
    return torch.cat([prior_state[n].reshape(-1).to(op.dtype) for n in op.param_names])


# --------------------------------------------------------------------------- report rows
def trace_rows(parts: Mapping) -> list[Row]:
    tr = parts.get("trace")
    if not tr:
        return []
    residual = "residual " if tr["method"] == "hutchpp" else ""
    return [
        [
            "Hessian trace",
            pm(tr["estimate"], Z95 * tr["stderr"]),
            f"95% CI, {tr['method']}, {tr['n_probes']} {residual}probes",
            str(tr["hvps"]),
            str(tr["seed"]),
        ]
    ]


def eig_rows(parts: Mapping) -> list[Row]:
    rows = []
    for key, label in (("top", "top eigenvalues"), ("bottom", "smallest eigenvalue")):
        e = parts.get(key)
        if e:
            values = ", ".join(fmt(v, 6) for v in e["values"])
            note = f"|error| ≤ residual ≤ {fmt(max(e['residuals']), 2)}" + (
                "" if e["converged"] else " (NOT converged)"
            )
            shared = key == "bottom" and e.get("method") == BOTH_ENDS  # its HVPs are the top row's
            rows.append([label, values, note, "(same run)" if shared else str(e["hvps"]), str(e["seed"])])
    return rows


def density_rows(parts: Mapping) -> list[Row]:
    d = parts.get("density")
    if not d:
        return []
    m = d["moments"]
    return [
        [
            "trace from SLQ density",
            pm(m.get("trace"), Z95 * m.get("trace_stderr", 0.0)),
            f"95% CI, {d['n_probes']} probes × {d['steps']} steps",
            str(d["hvps"]),
            str(d["seed"]),
        ]
    ]


def stability_rows(parts: Mapping) -> list[Row]:
    """One row per σ: measured E[f(W+U)] − f(W) ± 95% next to σ²/2·Tr(H), and their ratio."""
    s = parts.get("stability")
    if not s:
        return []
    rows = []
    for i, sigma in enumerate(s["sigmas"]):
        holds = "" if s["taylor_holds"][i] else "; Taylor breaks down"
        rows.append(
            [
                f"noise stability σ={fmt(sigma, 2)}",
                f"{pm(s['measured'][i], Z95 * s['measured_stderr'][i])} "
                f"(σ²/2·Tr H = {fmt(s['predicted'][i])})",
                f"95% CI, {s['n_samples']} evaluations{' antithetic' if s['antithetic'] else ''}, "
                f"ratio {fmt(s['ratio'][i], 3)}{holds}",
                "",
                str(s.get("seed", "")),
            ]
        )
    return rows


MEASURE_LABELS = (
    ("second_order", "measure: 2nd-order bound"),
    ("distance_hessian", "measure: Ju–Li–Zhang Σ√(vᵀH⁺v)/√n"),
    ("trace_radius", "measure: √(Tr H·‖W−W0‖²/n)"),
)


def bound_rows(parts: Mapping) -> list[Row]:
    """The certificate's parts (bound, posterior train error by Monte Carlo with its upper confidence
    value, KL, n, δ, λ, posterior vs checkpoint test error, wall time), then the Hessian measures.
    """
    rows = []
    c = parts.get("certificate")
    if c and c.get("kind") == "posterior_certificate":
        rows += posterior_certificate_rows(c, parts.get("settings", {}).get("prior_epochs"))
    elif c:
        rows.append(
            [
                "PAC-Bayes bound (test error)",
                fmt(c.get("bound")),
                f"holds w.p. ≥ {1 - c.get('delta', float('nan')):.2f}; isotropic posterior "
                f"N(W, σ²I), σ={fmt(c.get('sigma'), 2)}, KL={fmt(c.get('kl'))}, MC error "
                f"{fmt(c.get('mc_error'))} ({c.get('n_mc', '')} draws); vacuous on fine-tuned networks: "
                "use the optimised posterior",
                "",
                str(c.get("seed", "")),
            ]
        )
    m = parts.get("measures")
    if m:
        for key, label in MEASURE_LABELS:
            if m.get(key) is not None:
                rows.append(
                    [
                        label,
                        fmt(m[key]),
                        "a measure, not a certificate",
                        str(m.get("hvps", "")),
                        str(m.get("seed", "")),
                    ]
                )
    return rows


def prior_label(c: Mapping, prior_epochs: int | None = None) -> str:
    """Which prior the certificate used and which samples it is on, in words."""
    if c.get("prior") == "data-dependent":
        share = c["prior_split"]
        plural = "s" if prior_epochs != 1 else ""
        epochs = f", {prior_epochs} epoch{plural} of the run's recipe" if prior_epochs else ""
        return (
            f"data-dependent prior: trained on {100 * share:.0f}% of the training set "
            f"(n_prior={c['n_prior']}{epochs}); bound on the other {100 * (1 - share):.0f}%, n={c['n']}"
        )
    return f"pre-trained prior (the fine-tuning start); bound on the training set, n={c['n']}"


def certificate_violated(c: Mapping) -> bool:
    """True when the measured test error of the posterior exceeds its bound: a failed certificate
    (probability ≤ δ if everything is right, so in practice a bug).
    """
    measured = c.get("posterior_test_error")
    return measured is not None and c.get("bound") is not None and measured > c["bound"]


def posterior_certificate_rows(c: Mapping, prior_epochs: int | None = None) -> list[Row]:
    seed = str(c.get("seed", ""))
    mean = "optimised mean μ (from the prior)" if c.get("optimise_mean") else "mean at the checkpoint"
    lambdas = ", ".join(fmt(x, 3) for x in c["lambdas"])
    rows = [
        [
            "PAC-Bayes bound (test error of Q)",
            fmt(c["bound"]),
            f"holds w.p. ≥ {1 - c['delta']:.2f} (δ = {fmt(c['delta_bound'], 2)} sample + "
            f"{fmt(c['delta_mc'], 2)} MC); " + prior_label(c, prior_epochs),
            "",
            seed,
        ],
        [
            "posterior train error (MC)",
            f"{fmt(c['mc_error'])} (≤ {fmt(c['mc_upper'])})",
            f"{c['n_mc']} weight draws on the n={c['n']} bound samples; upper = kl⁻¹ at δ_mc",
            "",
            seed,
        ],
        [
            "KL(Q‖P)",
            fmt(c["kl"]),
            f"nats; λ = {lambdas} (+{fmt(c['grid_cost'], 3)} nats for the grid); posterior N(μ, diag s²), "
            f"s per {c['variance']}, {mean}",
            "",
            seed,
        ],
    ]
    if c.get("posterior_test_error") is not None:
        mean_error = "" if c.get("mean_test_error") is None else f"; network μ {fmt(c['mean_test_error'])}"
        measured = pm(c["posterior_test_error"], Z95 * c["posterior_test_stderr"])
        rows.append(
            [
                "posterior test error vs checkpoint",
                f"{measured} vs {fmt(c['test_error'])}",
                f"95% CI over {c['n_mc_test']} draws, n_test={c['n_test']}{mean_error}",
                "",
                seed,
            ]
        )
    rows.append(
        [
            "certificate wall time",
            f"{c['wall_time_s']:.1f} s",
            f"{c['steps']} optimisation steps, {c['evaluations']} data passes",
            "",
            seed,
        ]
    )
    if certificate_violated(c):
        rows.append(
            [
                "CERTIFICATE VIOLATED",
                f"bound {fmt(c['bound'])} < measured {fmt(c['posterior_test_error'])}",
                "the posterior's test error exceeds its bound: a bug, or the δ event",
                "",
                seed,
            ]
        )
    return rows


def diagonal_rows(parts: Mapping) -> list[Row]:
    """Per parameter block: Σ_i H_ii ± 95% CI, mean |d̂_i|, the range of d̂_i and the RMS per-coordinate
    standard error; then the total (the trace the same probes give).
    """
    d = parts.get("diagonal")
    if not d:
        return []
    rows = [
        [
            f"diag(H) {b['name']} ({b['size']})",
            pm(b["sum"], Z95 * b["sum_stderr"]),
            f"Σ H_ii, 95% CI; mean |d̂| {fmt(b['mean_abs'], 3)}, range [{fmt(b['min'], 3)}, "
            f"{fmt(b['max'], 3)}], RMS stderr {fmt(b['rms_stderr'], 2)}",
            "",
            str(d["seed"]),
        ]
        for b in d["blocks"]
    ]
    rows.append(
        [
            "diag(H) total (= trace)",
            pm(d["trace"], Z95 * d["trace_stderr"]),
            f"95% CI, {d['method']}, {d['n_probes']} probes, sketch {d['sketch']}",
            str(d["hvps"]),
            str(d["seed"]),
        ]
    )
    return rows


REGISTRY: dict[str, Analysis] = {
    a.name: a
    for a in (
        Analysis("trace", ("trace",), "trace", _trace, trace_rows, budget=lambda s, dim: s.trace_max_hvps),
        Analysis(
            "eigs",
            ("top", "bottom"),
            "top and smallest eigenvalues",
            _eigs,
            eig_rows,
            budget=lambda s, dim: 2 * s.eig_max_hvps,
        ),
        Analysis(
            "density",
            ("density",),
            "density",
            _density,
            density_rows,
            budget=lambda s, dim: s.density_probes * min(s.density_steps, dim),
        ),
        Analysis(
            "stability", ("stability",), "noise stability", _stability, stability_rows, needs=("trace",)
        ),
        Analysis(
            "bound",
            ("certificate", "measures"),
            "PAC-Bayes certificate and Hessian measures",
            _bound,
            bound_rows,
            needs=("trace",),
        ),
        Analysis("diag", ("diagonal",), "Hessian diagonal", _diagonal, diagonal_rows, default=False),
    )
}

#: the ``--what`` names, in the order analyses run and are reported
ANALYSES = tuple(REGISTRY)

#: what runs when no ``--what`` is given
DEFAULT_ANALYSES = tuple(name for name, analysis in REGISTRY.items() if analysis.default)

#: every result part a checkpoint analysis can hold
PARTS = tuple(part for analysis in REGISTRY.values() for part in analysis.parts)


def plan(what) -> list[Analysis]:
    """The analyses to run for ``what`` (their needs first), in registry order."""
    unknown = [w for w in what if w not in REGISTRY]
    if unknown:
        raise ValueError(
            f"unknown analysis {', '.join(map(repr, unknown))}; choose from {', '.join(ANALYSES)}"
        )
    wanted = set(what)
    for name in list(wanted):
        wanted.update(REGISTRY[name].needs)
    return [a for a in REGISTRY.values() if a.name in wanted]
