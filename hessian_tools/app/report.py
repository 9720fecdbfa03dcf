"""Markdown and terminal tables from results (never from models or operators)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..stats import Z95, mean_ci, paired_relative_change, relative_change_ci
from .analyses import REGISTRY, certificate_violated, prior_label
from .formatting import as_dict, fmt, markdown_table, pm, text_table


# --------------------------------------------------------------------------- one checkpoint
def analysis_rows(analysis: Mapping) -> list[list[str]]:
    """Rows (quantity, value ± 95% half-width, what the error bar is, HVPs, seed) for one analysis:
    the exact losses, then each analysis of the registry that has results, then the totals.
    """
    a = as_dict(analysis)
    loss = a.get("settings", {}).get("loss", "cross_entropy")
    loss_note = "" if loss == "cross_entropy" else f", loss {loss}"
    rows = [
        ["parameters", str(a["dim"]), "", "", ""],
        [
            "train loss / acc",
            f"{fmt(a['train_loss'])} / {fmt(a['train_acc'])}",
            f"exact, n={a['n_train']}{loss_note}",
            "",
            "",
        ],
    ]
    if a["n_test"]:
        rows.append(
            [
                "test loss / acc",
                f"{fmt(a['test_loss'])} / {fmt(a['test_acc'])}",
                f"exact, n={a['n_test']}{loss_note}",
                "",
                "",
            ]
        )
    for analysis_kind in REGISTRY.values():
        rows += analysis_kind.rows(a)
    rows.append(["total HVPs / wall time", f"{a['hvps']} / {a['wall_time_s']:.1f} s", "", "", ""])
    return rows


def analysis_text(analysis: Mapping) -> str:
    a = as_dict(analysis)
    return f"{a['name']}\n" + text_table(
        ["quantity", "value", "error bar / notes", "HVPs", "seed"], analysis_rows(a)
    )


# --------------------------------------------------------------------------- comparisons and curves
def comparison_rows(comparison: Mapping, bounds: Mapping[str, Mapping] | None = None) -> list[list[str]]:
    """One row per checkpoint (its trace) and per pair (the paired difference); with ``bounds`` (name →
    certificate) also each checkpoint's bound, posterior test error and KL, and each pair's bound
    difference (one certificate per checkpoint: no error bar).
    """
    c = as_dict(comparison)
    rows = [
        [name, pm(t["estimate"], Z95 * t["stderr"]), "", "", "", str(t["hvps"])]
        for name, t in zip(c["names"], c["traces"])
    ]
    for p in c["pairs"]:
        rows.append(
            [
                f"{p['b']} − {p['a']}",
                pm(p["difference"], Z95 * p["stderr"]),
                f"{100 * p['relative_change']:+.1f}% ± {100 * Z95 * p['relative_change_stderr']:.1f}%",
                fmt(Z95 * p["independent_stderr"], 2),
                f"{float(p['tightening']):.1f}×",
                "",
            ]
        )
    if bounds is None:
        return rows
    parts = {name: as_dict(b) for name, b in bounds.items()}
    for row, name in zip(rows, c["names"]):
        row += _bound_cells(parts[name])
    for row, p in zip(rows[len(c["names"]) :], c["pairs"]):
        a, b = parts[p["a"]], parts[p["b"]]
        row += [f"{b['bound'] - a['bound']:+.4f}", "", "", ""]
    return rows


def _bound_cells(c: Mapping) -> list[str]:
    measured = c.get("posterior_test_error")
    posterior = pm(measured, Z95 * (c.get("posterior_test_stderr") or 0.0)) if measured is not None else "–"
    return [fmt(c["bound"]), posterior, fmt(c["kl"]), str(c["n"])]


COMPARISON_HEADER = [
    "checkpoint / pair",
    "trace or difference (95% CI)",
    "relative change (95% CI)",
    "unpaired half-width",
    "paired CI tighter by",
    "HVPs",
]
BOUND_HEADER = ["bound (or difference)", "posterior test error (95% CI)", "KL", "n"]


def comparison_header(with_bounds: bool = False) -> list[str]:
    return COMPARISON_HEADER + (BOUND_HEADER if with_bounds else [])


def bound_note(bounds: Mapping[str, Mapping], settings) -> str:
    """One line: the certificates' posterior, prior and confidence (the same for every checkpoint)."""
    first = as_dict(next(iter(bounds.values())))
    if first.get("kind") == "posterior_certificate":
        prior = prior_label(first, getattr(settings, "prior_epochs", None))
        posterior = f"optimised posterior, {prior}"
    else:
        posterior = "isotropic posterior N(W, σ²I)"
    return f"{posterior}; each holds w.p. ≥ {1 - first['delta']:.2f}, seed {first['seed']}"


def curve_rows(name: str, points: Sequence[Mapping]) -> list[list[str]]:
    return [
        [
            name,
            str(p["epoch"]),
            pm(p["trace"], Z95 * p["trace_stderr"]),
            fmt(p["lambda_max"], 6),
            fmt(p.get("test_acc")),
            str(p.get("hvps", "")),
        ]
        for p in points
    ]


CURVE_HEADER = ["run", "epoch", "trace (95% CI)", "λmax", "test acc", "HVPs"]


# --------------------------------------------------------------------------- the demo report
def _metric(run: Mapping, key: str) -> float | None:
    a = as_dict(run["analysis"])
    if key == "test_acc":
        return a["test_acc"]
    if key == "trace":
        return a["trace"]["estimate"] if a.get("trace") else None
    if key == "lambda_max":
        return float(a["top"]["values"][0]) if a.get("top") else None
    if key == "lambda_min":
        return float(a["bottom"]["values"][0]) if a.get("bottom") else None
    if key == "bound":
        return as_dict(a["certificate"]).get("bound") if a.get("certificate") else None
    raise KeyError(key)


METRICS = (
    ("test_acc", "test accuracy"),
    ("trace", "Hessian trace"),
    ("lambda_max", "λmax"),
    ("lambda_min", "λmin"),
    ("bound", "PAC-Bayes bound"),
)


def method_summary(runs: Sequence[Mapping]) -> dict[str, dict[str, tuple[float, float, list[float]]]]:
    """Method → metric → (mean, 95% half-width over seeds, per-seed values)."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        out[method] = {}
        for key, _ in METRICS:
            values = [v for v in (_metric(r, key) for r in mine) if v is not None]
            if values:
                out[method][key] = (*mean_ci(values), values)
    return out


def demo_markdown(results: Mapping, figures: Sequence[str] = ()) -> str:
    """The demo's report.md: per-method table (mean ± 95% CI over seeds), NSO's reductions, per-run
    details.
    """
    runs = results["runs"]
    summary = method_summary(runs)
    cfg = results["config"]
    seeds = len(cfg["seeds"])
    lines = [
        "# hessian-tools demo: does NSO flatten a fine-tuned ResNet?",
        "",
        f"Model: small ResNet (`{cfg['model']}`), pre-trained on digits 0–4 "
        f"(final test accuracy {fmt(results['pretrain']['test_acc'])}), fine-tuned on digits 5–9 with "
        f"{cfg['per_class']} images per class (n = {results['data']['n_train']}; "
        f"test n = {results['data']['n_test']}), {cfg['finetune_epochs']} epochs, lr {cfg['lr']} "
        f"({cfg.get('schedule', 'constant')}), batch {cfg['batch_size']}; "
        f"NSO σ = {cfg['sigma']}, k = {cfg['k']}; "
        f"SAM ρ = {cfg['rho']}. {seeds} seeds per method. Curvature of the training cross-entropy over the "
        f"whole fine-tuning set (BatchNorm in eval mode). Wall time {results['wall_time_s']:.0f} s.",
        "",
        *_violation_banner(runs),
        "## Per method (mean ± 95% CI over seeds)",
        "",
        markdown_table(
            ["method"] + [label for _, label in METRICS],
            [[m] + [pm(*s[k][:2]) if k in s else "–" for k, _ in METRICS] for m, s in summary.items()],
        ),
        "",
    ]
    if "nso" in summary:
        rows = [
            [f"NSO vs {base.upper()}", label, *_paired_change(runs, "nso", base, key)]
            for base in summary
            if base != "nso"
            for key, label in (("trace", "trace"), ("lambda_max", "λmax"), ("test_acc", "test accuracy"))
        ]
        lines += [
            "## NSO's change vs the baselines (95% CI)",
            "",
            markdown_table(["comparison", "quantity", "paired by seed", "seeds NSO lower", "unpaired"], rows),
            "",
            "Negative = NSO is lower (flatter, for curvature). *Paired by seed*: runs with the same seed "
            "share the head initialisation and the data order, so the per-seed ratio NSO/baseline − 1 "
            "removes most of the seed-to-seed spread; mean ± t-interval over seeds. *Unpaired*: ratio of "
            "the means, delta method. Both intervals include each estimate's own error bar through the "
            "seed-to-seed spread.",
            "",
        ]
    lines += _certificate_section(runs, cfg)
    lines += [
        "## Per run (each number with its own error bar, seed and HVPs)",
        "",
        markdown_table(
            ["run", "test acc", "trace (95% CI)", "λmax (residual)", "λmin", "bound", "HVPs"],
            [_run_row(r) for r in runs],
        ),
        "",
    ]
    if figures:
        lines += ["## Figures", ""] + [f"![{_figure_caption(f)}]({f})" for f in figures] + [""]
    lines += ["## How each number was measured", "", MEASUREMENT_NOTES, ""]
    return "\n".join(lines)


def _paired_change(runs: Sequence[Mapping], method: str, base: str, key: str) -> list[str]:
    """Relative change of ``key`` from ``base`` to ``method``: paired by seed (mean ± t-CI of the
    per-seed ratios − 1), how many seeds went down, and unpaired (ratio of means, delta method).
    """
    by_seed = {m: {r["seed"]: _metric(r, key) for r in runs if r["method"] == m} for m in (method, base)}
    seeds = sorted(set(by_seed[method]) & set(by_seed[base]))
    pairs = [
        (by_seed[method][s], by_seed[base][s])
        for s in seeds
        if by_seed[method][s] is not None and by_seed[base][s] is not None
    ]
    if not pairs:
        return ["–", "–", "–"]
    new, old = [p[0] for p in pairs], [p[1] for p in pairs]
    mean, half, lower = paired_relative_change(new, old)
    change, unpaired_half = relative_change_ci(new, old)
    return [
        f"{100 * mean:+.1f}% ± {100 * half:.1f}%",
        f"{lower}/{len(pairs)}",
        f"{100 * change:+.1f}% ± {100 * unpaired_half:.1f}%",
    ]


def _figure_caption(path: str) -> str:
    return path.rsplit("/", 1)[-1].rsplit(".", 1)[0].replace("_", " ")


def _run_row(run: Mapping) -> list[str]:
    a = as_dict(run["analysis"])
    tr, top, bottom = a.get("trace"), a.get("top"), a.get("bottom")
    return [
        run["name"],
        fmt(a["test_acc"]),
        pm(tr["estimate"], Z95 * tr["stderr"]) if tr else "–",
        f"{fmt(top['values'][0], 6)} ({fmt(top['residuals'][0], 2)})" if top else "–",
        fmt(bottom["values"][0], 4) if bottom else "–",
        fmt(_metric(run, "bound")),
        str(a["hvps"]),
    ]


# --------------------------------------------------------------------------- the demo's certificates
def _certificate(run: Mapping) -> Mapping | None:
    c = as_dict(run["analysis"]).get("certificate")
    return as_dict(c) if c else None


CERTIFICATE_HEADER = [
    "run",
    "bound",
    "posterior train error (MC, ≤ upper)",
    "KL (nats)",
    "n",
    "δ (sample + MC)",
    "λ",
    "posterior test error (95% CI)",
    "checkpoint test error",
    "Monte-Carlo seed",
    "time (s)",
]


def certificate_rows(runs: Sequence[Mapping]) -> list[list[str]]:
    """One row per run with a certificate: the bound and its parts (see :data:`CERTIFICATE_HEADER`)."""
    rows = []
    for run in runs:
        c = _certificate(run)
        if c is None:
            continue
        measured = c.get("posterior_test_error")
        posterior = pm(measured, Z95 * c["posterior_test_stderr"]) if measured is not None else "–"
        lambdas = c.get("lambdas") or ([c["sigma"]] if c.get("sigma") is not None else [])
        checkpoint_error = c.get("test_error")
        if checkpoint_error is None:
            checkpoint_error = 1.0 - as_dict(run["analysis"])["test_acc"]
        wall = c.get("wall_time_s")
        rows.append(
            [
                run["name"],
                fmt(c["bound"]),
                f"{fmt(c['mc_error'])} (≤ {fmt(c['mc_upper'])})",
                fmt(c["kl"]),
                str(c["n"]),
                f"{fmt(c['delta_bound'], 2)} + {fmt(c['delta_mc'], 2)}",
                ", ".join(fmt(x, 3) for x in lambdas),
                posterior,
                fmt(checkpoint_error),
                str(c.get("seed", "")),
                f"{wall:.1f}" if wall is not None else "–",
            ]
        )
    return rows


def paired_bound_difference(
    runs: Sequence[Mapping], method: str, base: str
) -> tuple[float, float, int, int] | None:
    """Runs paired by seed: the mean of bound(method) − bound(base) over the seeds both have, the
    half-width of its 95% t-interval over those seeds (0 for one seed), how many seeds ``method`` is
    lower on, and the number of pairs; None without a pair.
    """
    by_seed = {m: {r["seed"]: _metric(r, "bound") for r in runs if r["method"] == m} for m in (method, base)}
    seeds = sorted(
        seed
        for seed in set(by_seed[method]) & set(by_seed[base])
        if by_seed[method][seed] is not None and by_seed[base][seed] is not None
    )
    if not seeds:
        return None
    differences = [by_seed[method][seed] - by_seed[base][seed] for seed in seeds]
    mean, half = mean_ci(differences)
    return mean, half, sum(d < 0 for d in differences), len(differences)


def violated_certificates(runs: Sequence[Mapping]) -> list[str]:
    """The runs whose posterior's measured test error exceeds their bound (a failed certificate)."""
    return [run["name"] for run in runs if (c := _certificate(run)) is not None and certificate_violated(c)]


def _certificate_section(runs: Sequence[Mapping], config: Mapping) -> list[str]:
    rows = certificate_rows(runs)
    if not rows:
        return []
    first = next(c for r in runs if (c := _certificate(r)) is not None)
    if first.get("kind") == "posterior_certificate":
        what = (
            f"Optimised diagonal-Gaussian posterior, {prior_label(first, config.get('prior_epochs'))} "
            f"(n_prior and n per run in its analysis). "
        )
    else:
        what = (
            "Isotropic posterior N(W, σ²I) around the checkpoint, pre-trained prior (vacuous on fine-tuned "
            "networks). "
        )
    lines = [
        "## PAC-Bayes certificates (every run)",
        "",
        what + f"Each bound holds with probability ≥ 1 − δ = {1 - first['delta']:.2f} over the bound samples "
        "and the Monte-Carlo weight draws, for the test error of a network drawn from the posterior; the "
        "posterior's own test error is measured next to it (Monte-Carlo 95% CI) and must not exceed it.",
        "",
        markdown_table(CERTIFICATE_HEADER, rows),
        "",
    ]
    pairs = [
        (m, b)
        for m in ("nso",)
        for b in ("sgd", "sam")
        if any(r["method"] == m for r in runs) and any(r["method"] == b for r in runs)
    ]
    table = []
    for method, base in pairs:
        result = paired_bound_difference(runs, method, base)
        if result is not None:
            mean, half, lower, count = result
            table.append([f"{method.upper()} − {base.upper()}", pm(mean, half), f"{lower}/{count}"])
    if table:
        header = ["bound difference", "paired by seed (95% t-CI)", "seeds NSO lower"]
        lines += [
            markdown_table(header, table),
            "",
            "Negative = NSO certifies a lower test error. The interval is over seeds (one certificate "
            "per run).",
            "",
        ]
    return lines


def _violation_banner(runs: Sequence[Mapping]) -> list[str]:
    violated = violated_certificates(runs)
    if not violated:
        return []
    return [
        f"**CERTIFICATE VIOLATED on {', '.join(violated)}: the posterior's measured test error exceeds "
        "its bound. A bound that fails is a bug (or the δ event); do not trust these bounds.**",
        "",
    ]


MEASUREMENT_NOTES = """\
- **Trace**: XTrace (Epperly et al. 2024), exchangeable low-rank sketch + Hutchinson, grown until the
  95% half-width ≤ rtol·|estimate|; the error bar is the jackknife over probes (conservative).
- **λmax, λmin**: thick-restart Lanczos with full reorthogonalisation; the residual ‖Hv − λv‖ bounds
  the distance to a true eigenvalue.
- **Density**: stochastic Lanczos quadrature (Ubaru et al. 2017; Ghorbani et al. 2019), Gaussian-smoothed.
- **Noise stability**: E[f(W+U)] − f(W), U ~ N(0, σ²I), antithetic pairs, next to σ²/2·Tr(H).
- **PAC-Bayes bound**: a certificate on the test error of a network drawn from a Gaussian posterior
  Q = N(μ, diag s²), s per parameter tensor, fitted to the bound (Dziugaite & Roy 2017; Pérez-Ortiz et al.
  2021), against a prior N(W0, λ²I) with λ from a fixed grid paid by a union bound. With a data-dependent
  prior, W0 is trained with the run's own recipe on part of the fine-tuning set and the bound uses only the
  rest (n); μ is optimised from W0. The training error of Q is estimated from Monte-Carlo draws and bounded
  by kl inversion, then the Seeger/Maurer bound gives the certificate; it holds with probability ≥ 1 − δ.
  It certifies Q, not the checkpoint itself. The Hessian *measures* are not certificates."""
