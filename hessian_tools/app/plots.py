"""Figures drawn from RESULTS (plain dicts as written to JSON, or Result objects), never from models.

Every function takes results, an output folder and a base ``name``, writes ``name.png`` (150 dpi)
and ``name.pdf`` atomically (rendered in memory, then :func:`hessian_tools.io.atomic_write_bytes`)
and returns the two paths. Matplotlib is used through :class:`matplotlib.figure.Figure` only (no
pyplot, no global state, no display needed). Malformed input raises ``ValueError`` with one line
saying what is wrong and where.

Aggregation over seeds (independent runs): the line / bar is the mean and the band / error bar the
95% t-interval ``mean ± t_{0.975, n−1}·sd/√n``. With a single seed there is no spread to show, so
the estimator's own error bar is drawn instead: ``±1.96·stderr`` for stochastic estimates (trace,
noise stability) and ``±residual`` for λmax (the Bauer–Fike bound: an eigenvalue lies within the
Lanczos residual norm of the Ritz value).

Colours: :data:`METHOD_COLORS` gives one colour per optimisation method, used by every figure.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..estimators.density import smoothed_density
from ..stats import Z95, column_mean_ci
from .io import atomic_write_bytes

__all__ = [
    "METHOD_COLORS",
    "METHOD_LABELS",
    "DPI",
    "DENSITY_FLOOR",
    "method_color",
    "method_label",
    "plot_sharpness_curves",
    "plot_density",
    "plot_stability",
    "plot_trace_lambda_bars",
    "plot_matrix_sensing",
    "plot_bound_vs_trace",
    "plot_demo",
]

#: One colour per method, shared by every figure of the package.
METHOD_COLORS: dict[str, str] = {
    "sgd": "#d62728",  # red
    "gd": "#8c564b",  # brown
    "sam": "#2ca02c",  # green
    "asam": "#9467bd",  # purple
    "wp": "#ff7f0e",  # orange
    "wp-gd": "#ff7f0e",  # the same method (weight-perturbed GD) under its long name
    "nso": "#1f77b4",  # blue
}
METHOD_LABELS: dict[str, str] = {
    "sgd": "SGD",
    "gd": "GD",
    "sam": "SAM",
    "asam": "ASAM",
    "wp": "WP-GD",
    "wp-gd": "WP-GD",
    "nso": "NSO",
}
_EXTRA_COLORS = ("#e377c2", "#bcbd22", "#17becf", "#7f7f7f", "#393b79", "#637939")

DPI = 150
DENSITY_FLOOR = 1e-5  # log-scale floor of the eigenvalue density plot
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def method_color(method: str) -> str:
    """The colour of ``method`` (known methods fixed; others get a stable colour from their name)."""
    key = str(method).lower()
    if key in METHOD_COLORS:
        return METHOD_COLORS[key]
    return _EXTRA_COLORS[sum(key.encode()) % len(_EXTRA_COLORS)]


def method_label(method: str) -> str:
    return METHOD_LABELS.get(str(method).lower(), str(method))


# --------------------------------------------------------------------------- input helpers
def _plain(obj: Any) -> Any:
    """A Result object → its ``to_dict()`` form; anything else unchanged."""
    return obj.to_dict() if hasattr(obj, "to_dict") else obj


def _num(value: Any, where: str) -> float:
    """A float from a number or a JSON non-finite marker ("nan", "inf", "-inf")."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, str):
        if value in ("nan", "inf", "-inf", "NaN", "Infinity", "-Infinity"):
            return float(value.replace("Infinity", "inf"))
        raise ValueError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number, got {value!r}") from None


def _nums(values: Any, where: str) -> np.ndarray:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise ValueError(f"{where}: expected a list of numbers, got {type(values).__name__}")
    return np.asarray([_num(v, f"{where}[{i}]") for i, v in enumerate(values)], dtype=float)


def _get(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(d).__name__}")
    if key not in d or d[key] is None:
        raise ValueError(f"{where}: missing {key!r}")
    return d[key]


def _runs_list(runs: Any, where: str = "runs") -> list[dict]:
    """The demo's run list (or a demo results dict holding one), each run as a plain dict."""
    runs = _plain(runs)
    if isinstance(runs, Mapping) and "runs" in runs:
        runs = runs["runs"]
    if isinstance(runs, (str, bytes)) or not isinstance(runs, Sequence) or len(runs) == 0:
        raise ValueError(f"{where}: expected a non-empty list of runs")
    out = []
    for i, run in enumerate(runs):
        run = _plain(run)
        if not isinstance(run, Mapping):
            raise ValueError(f"{where}[{i}]: expected a dict, got {type(run).__name__}")
        method = _get(run, "method", f"{where}[{i}]")
        if not isinstance(method, str) or not method:
            raise ValueError(f"{where}[{i}]: 'method' must be a non-empty string, got {method!r}")
        out.append(dict(run))
    return out


def _group(items: Sequence[tuple[str, Any]]) -> dict[str, list]:
    """Group (method, item) pairs by method, keeping the order of first appearance."""
    groups: dict[str, list] = {}
    for method, item in items:
        groups.setdefault(method, []).append(item)
    return groups


def _by_method(analyses_by_method: Any, where: str) -> dict[str, list[dict]]:
    """``{method: analysis | [analyses]}`` → ``{method: [plain dicts]}`` (non-empty)."""
    if not isinstance(analyses_by_method, Mapping) or len(analyses_by_method) == 0:
        raise ValueError(f"{where}: expected a non-empty dict {{method: [analyses]}}")
    out: dict[str, list[dict]] = {}
    for method, items in analyses_by_method.items():
        if not isinstance(method, str) or not method:
            raise ValueError(f"{where}: method names must be non-empty strings, got {method!r}")
        items = _plain(items)
        if isinstance(items, Mapping):
            items = [items]
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or len(items) == 0:
            raise ValueError(f"{where}[{method!r}]: expected an analysis or a non-empty list of analyses")
        plain = [_plain(a) for a in items]
        for i, a in enumerate(plain):
            if not isinstance(a, Mapping):
                raise ValueError(f"{where}[{method!r}][{i}]: expected a result dict, got {type(a).__name__}")
        out[method] = plain
    return out


def _sub_result(analysis: Mapping, kind: str, key: str, where: str) -> dict:
    """The ``kind`` sub-result of a CheckpointAnalysis dict, or ``analysis`` itself if it is one."""
    if analysis.get("kind") == kind:
        return dict(analysis)
    sub = _plain(analysis.get(key))
    if not isinstance(sub, Mapping):
        raise ValueError(
            f"{where}: no {key!r} result (expected a {kind!r} result or a checkpoint analysis holding one)"
        )
    return dict(sub)


def _aggregate(values: np.ndarray, own_halfwidth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds (axis 0) and the 95% half-width: t-interval over seeds when n ≥ 2, else the
    estimator's own half-width. NaNs (e.g. a diverged seed) are ignored per point.
    """
    values = np.asarray(values, dtype=float)
    if values.shape[0] == 1:
        return values[0], np.asarray(own_halfwidth, dtype=float)[0]
    return column_mean_ci(values)


# --------------------------------------------------------------------------- saving
def _save(fig: Figure, out_dir, name: str) -> list[Path]:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"name must be a plain file stem (letters, digits, '_', '-', '.'), got {name!r}")
    out = Path(out_dir)
    paths = []
    for fmt, extra in (("png", {"dpi": DPI}), ("pdf", {"metadata": {"CreationDate": None}})):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, **extra)
        paths.append(atomic_write_bytes(out / f"{name}.{fmt}", buffer.getvalue()))
    return paths


def _caption(fig: Figure, text: str) -> None:
    """A grey note under the axes, wrapped to the figure width, with room reserved for it."""
    width_in, height_in = fig.get_size_inches()
    per_line = max(40, int(width_in * 72 / 4.6))  # ~4.6 pt per character at 8 pt
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > per_line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    fig.text(0.5, 0.005, "\n".join(lines), ha="center", va="bottom", fontsize=8, color="0.3")
    reserved = (len(lines) * 10.5 + 4) / (height_in * 72)
    fig.get_layout_engine().set(rect=(0, reserved, 1, 1 - reserved))


def _mean_note(counts: Mapping[str, int], what: str) -> str:
    return f"{what}: mean over seeds; " if max(counts.values()) > 1 else "one seed per method; "


def _seeds_note(counts: Mapping[str, int], many: str, single: str) -> str:
    ns = set(counts.values())
    if ns == {1}:
        return single
    if 1 in ns:
        return f"{many}; methods with n=1: {single}"
    return many


# --------------------------------------------------------------------------- 1. sharpness curves
def _curve_arrays(run: dict, where: str) -> dict[str, np.ndarray]:
    curve = run.get("curve")
    if isinstance(curve, (str, bytes)) or not isinstance(curve, Sequence) or len(curve) == 0:
        raise ValueError(f"{where}: missing or empty 'curve' (a list of per-epoch points)")
    cols: dict[str, list] = {
        "epoch": [],
        "trace": [],
        "trace_stderr": [],
        "lambda_max": [],
        "lambda_max_residual": [],
    }
    for j, point in enumerate(curve):
        point = _plain(point)
        for key in ("epoch", "trace", "lambda_max"):
            cols[key].append(_num(_get(point, key, f"{where}.curve[{j}]"), f"{where}.curve[{j}].{key}"))
        for key in ("trace_stderr", "lambda_max_residual"):
            cols[key].append(
                _num(point[key], f"{where}.curve[{j}].{key}") if point.get(key) is not None else 0.0
            )
    arrays = {k: np.asarray(v, dtype=float) for k, v in cols.items()}
    if np.any(np.diff(arrays["epoch"]) <= 0):
        raise ValueError(f"{where}.curve: epochs must be strictly increasing, got {arrays['epoch'].tolist()}")
    return arrays


def plot_sharpness_curves(runs, out_dir, name: str = "sharpness_curves") -> list[Path]:
    """Hessian trace and λmax vs epoch (two panels); one line per method = mean over seeds, band =
    95% t-interval over seeds (one seed: ±1.96·stderr of the trace, ±residual of λmax).

    ``runs``: a list of ``{"method", "seed", "curve": [{"epoch", "trace", "trace_stderr",
    "lambda_max", "lambda_max_residual", ...}]}`` (the demo's runs), or the demo results dict.
    """
    runs = _runs_list(runs)
    groups = _group(
        [
            (r["method"], (_curve_arrays(r, f"runs[{i}] ({r.get('name', r['method'])})")))
            for i, r in enumerate(runs)
        ]
    )
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = (
        (axes[0], "trace", "trace_stderr", Z95, r"Hessian trace $\mathrm{tr}(H)$"),
        (axes[1], "lambda_max", "lambda_max_residual", 1.0, r"top eigenvalue $\lambda_{\max}(H)$"),
    )
    counts = {m: len(c) for m, c in groups.items()}
    for ax, key, err_key, scale, title in panels:
        all_values = []
        for method, curves in groups.items():
            epochs = curves[0]["epoch"]
            for c in curves[1:]:
                epochs = np.intersect1d(epochs, c["epoch"])
            if epochs.size == 0:
                raise ValueError(f"method {method!r}: its seeds share no epoch, cannot average the curves")
            rows = [c[key][np.isin(c["epoch"], epochs)] for c in curves]
            errs = [scale * c[err_key][np.isin(c["epoch"], epochs)] for c in curves]
            mean, half = _aggregate(np.vstack(rows), np.vstack(errs))
            color = method_color(method)
            ax.plot(
                epochs,
                mean,
                color=color,
                marker="o",
                markersize=3.5,
                linewidth=1.6,
                label=f"{method_label(method)} (n={len(curves)})",
            )
            ok = np.isfinite(half)
            if ok.any():
                ax.fill_between(
                    epochs[ok], (mean - half)[ok], (mean + half)[ok], color=color, alpha=0.18, linewidth=0
                )
            all_values.append(mean[np.isfinite(mean)])
        values = np.concatenate(all_values) if all_values else np.array([])
        if values.size and values.min() > 0 and values.max() / values.min() > 30:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(
            title.split(" $")[0] + " (loss units per parameter²)"
            if key == "trace"
            else r"$\lambda_{\max}$ (loss units per parameter²)"
        )
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.legend(
        handles=axes[0].get_legend_handles_labels()[0],
        loc="outside right upper",
        fontsize=9,
        title="method (seeds)",
        title_fontsize=8,
    )
    fig.suptitle("Sharpness during fine-tuning (H = Hessian of the training loss)", fontsize=11)
    _caption(
        fig,
        _mean_note(counts, "lines")
        + _seeds_note(
            counts,
            "bands: 95% t-interval over seeds",
            r"bands: $\pm1.96\,$stderr of the trace estimate, "
            r"$\pm$ Lanczos residual bound of $\lambda_{\max}$",
        ),
    )
    return _save(fig, out_dir, name)


# --------------------------------------------------------------------------- 2. eigenvalue density
def _density_parts(result: Mapping, where: str) -> tuple[np.ndarray, np.ndarray, float]:
    d = _sub_result(result, "density", "density", where)
    nodes = np.atleast_2d(np.asarray(_nested(_get(d, "nodes", where), f"{where}.nodes"), dtype=float))
    weights = np.atleast_2d(np.asarray(_nested(_get(d, "weights", where), f"{where}.weights"), dtype=float))
    sigma = _num(_get(d, "sigma", where), f"{where}.sigma")
    if nodes.shape != weights.shape or nodes.size == 0:
        raise ValueError(
            f"{where}: nodes {nodes.shape} and weights {weights.shape} must have the same non-empty shape"
        )
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"{where}: sigma must be a positive number, got {sigma!r}")
    keep = (weights > 0) & np.isfinite(nodes) & np.isfinite(weights)
    if not keep.any():
        raise ValueError(f"{where}: no quadrature node has positive weight")
    return nodes[keep], weights[keep] / keep.any(1).sum(), sigma  # each probe's weights sum to 1


def _nested(values: Any, where: str) -> list:
    """A (nested) list of numbers with JSON non-finite markers converted."""
    if isinstance(values, np.ndarray):
        return values.astype(float).tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{where}: expected a list of numbers, got {type(values).__name__}")
    return [
        _nested(v, f"{where}[{i}]")
        if isinstance(v, (Sequence, np.ndarray)) and not isinstance(v, str)
        else _num(v, f"{where}[{i}]")
        for i, v in enumerate(values)
    ]


def plot_density(
    analyses_by_method, out_dir, name: str = "density", *, floor: float = DENSITY_FLOOR, max_grid: int = 20000
) -> list[Path]:
    """Hessian eigenvalue density per method (SLQ, Gaussian-smoothed), log-scale y clipped at ``floor``.

    ``analyses_by_method``: ``{method: [CheckpointAnalysis or DensityResult (objects or dicts)]}``.
    Each result's quadrature nodes/weights are re-smoothed with its own sigma on one common grid
    (fine enough for the smallest sigma) and the densities of a method's seeds are averaged.
    """
    groups = _by_method(analyses_by_method, "analyses_by_method")
    parts = {
        m: [_density_parts(a, f"analyses_by_method[{m!r}][{i}]") for i, a in enumerate(items)]
        for m, items in groups.items()
    }
    flat = [p for ps in parts.values() for p in ps]
    sig_max = max(p[2] for p in flat)
    sig_min = min(p[2] for p in flat)
    lo = min(p[0].min() for p in flat) - 5 * sig_max
    hi = max(p[0].max() for p in flat) + 5 * sig_max
    size = int(min(max(1000, math.ceil(3 * (hi - lo) / sig_min)), max_grid))
    grid = np.linspace(lo, hi, size)
    spacing = grid[1] - grid[0]
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.subplots()
    widened = False
    top = floor
    for method, ps in parts.items():
        curves = []
        for nodes, weights, sigma in ps:
            if sigma < spacing / 2:  # too narrow for the common grid: widen so that mass is not lost
                sigma, widened = spacing / 2, True
            curves.append(smoothed_density(grid, nodes, weights, sigma))
        rho = np.mean(curves, axis=0)
        top = max(top, float(rho.max()))
        sig = np.array([p[2] for p in ps])
        sig_txt = (
            f"σ={sig.mean():.2g}" if sig.max() <= 1.1 * sig.min() else f"σ={sig.min():.2g}–{sig.max():.2g}"
        )
        ax.plot(
            grid,
            np.maximum(rho, floor),
            color=method_color(method),
            linewidth=1.4,
            label=f"{method_label(method)} (n={len(ps)}, {sig_txt})",
        )
    ax.set_yscale("log")
    ax.set_ylim(floor, top * 3)
    ax.set_xlim(lo, hi)
    ax.set_xlabel(r"eigenvalue $\lambda$ of $H$ (loss units per parameter²)")
    ax.set_ylabel(r"spectral density (per unit $\lambda$)")
    ax.set_title(
        "Hessian eigenvalue density (stochastic Lanczos quadrature, Gaussian smoothing)", fontsize=11
    )
    ax.grid(True, which="major", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=9, title="method (seeds,\nsmoothing σ)", title_fontsize=8)
    note = (
        "mean density over seeds on a common grid; " if max(len(p) for p in parts.values()) > 1 else ""
    ) + f"each result re-smoothed with its own σ; values below {floor:g} drawn at {floor:g}"
    if widened:
        note += f"; σ below {spacing / 2:.2g} widened to the grid resolution"
    _caption(fig, note)
    return _save(fig, out_dir, name)


# --------------------------------------------------------------------------- 3. noise stability
def _stability_arrays(analysis: Mapping, where: str) -> dict[str, np.ndarray]:
    s = _sub_result(analysis, "stability_curve", "stability", where)
    out = {k: _nums(_get(s, k, where), f"{where}.{k}") for k in ("sigmas", "measured")}
    n = out["sigmas"].size
    if n == 0:
        raise ValueError(f"{where}: empty 'sigmas'")
    se = s.get("measured_stderr")
    out["measured_stderr"] = _nums(se, f"{where}.measured_stderr") if se is not None else np.zeros(n)
    if any(v.size != n for v in out.values()):
        raise ValueError(f"{where}: sigmas, measured and measured_stderr must have the same length")
    if not np.all(out["sigmas"] > 0) or np.any(np.diff(out["sigmas"]) <= 0):
        raise ValueError(
            f"{where}: sigmas must be positive and strictly increasing, got {out['sigmas'].tolist()}"
        )
    if s.get("trace") is not None:
        trace, trace_se = (
            _num(s["trace"], f"{where}.trace"),
            _num(s.get("trace_stderr", 0.0), f"{where}.trace_stderr"),
        )
    else:  # fall back on the checkpoint's own trace result
        t = _sub_result(analysis, "trace", "trace", where)
        trace, trace_se = (
            _num(_get(t, "estimate", where), f"{where}.trace.estimate"),
            _num(t.get("stderr", 0.0), f"{where}.trace.stderr"),
        )
    out["trace"], out["trace_stderr"] = np.array(trace), np.array(trace_se)
    return out


def plot_stability(analyses_by_method, out_dir, name: str = "stability") -> list[Path]:
    """Measured noise stability E[f(W+U)] − f(W), U ~ N(0, σ²I), with 95% error bars vs σ, next to the
    second-order prediction σ²/2·Tr(H) (dashed); log-log axes, one panel per method.

    ``analyses_by_method``: ``{method: [CheckpointAnalysis or StabilityCurveResult (objects or dicts)]}``.
    Seeds of a method must share the σ grid; points are means over seeds (error bar: 95% t-interval,
    one seed: ±1.96·stderr). Non-positive means cannot be drawn on a log axis: they are marked ▼ at the
    bottom of the panel.
    """
    groups = _by_method(analyses_by_method, "analyses_by_method")
    data = {}
    for method, items in groups.items():
        arrays = [_stability_arrays(a, f"analyses_by_method[{method!r}][{i}]") for i, a in enumerate(items)]
        for i, a in enumerate(arrays[1:], start=1):
            if a["sigmas"].shape != arrays[0]["sigmas"].shape or not np.allclose(
                a["sigmas"], arrays[0]["sigmas"]
            ):
                raise ValueError(
                    f"analyses_by_method[{method!r}][{i}]: its σ grid differs from the first seed's"
                )
        data[method] = arrays
    n = len(data)
    fig = Figure(figsize=(min(4.2 * n, 13), 4.4) if n > 1 else (5.6, 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n, sharex=True, sharey=True, squeeze=False)[0])
    positives, sig_all = [], []
    for arrays in data.values():
        sig_all.extend(arrays[0]["sigmas"].tolist())
        for a in arrays:
            positives.extend(a["measured"][a["measured"] > 0].tolist())
            positives.extend((a["sigmas"] ** 2 / 2 * a["trace"]).tolist() if a["trace"] > 0 else [])
    positives = [p for p in positives if math.isfinite(p) and p > 0]
    if not positives:
        raise ValueError(
            "analyses_by_method: no positive measured stability or prediction to draw on log axes"
        )
    y_bottom = min(positives) / 5
    counts = {m: len(a) for m, a in data.items()}
    for ax, (method, arrays) in zip(axes, data.items()):
        color = method_color(method)
        sig = arrays[0]["sigmas"]
        mean, half = _aggregate(
            np.vstack([a["measured"] for a in arrays]),
            np.vstack([Z95 * a["measured_stderr"] for a in arrays]),
        )
        traces = np.array([float(a["trace"]) for a in arrays])
        trace_mean, trace_half = _aggregate(
            traces[:, None], Z95 * np.array([[float(a["trace_stderr"])] for a in arrays])
        )
        trace_mean, trace_half = float(trace_mean[0]), float(trace_half[0])
        pos = np.isfinite(mean) & (mean > 0)
        lower = np.minimum(half, mean - y_bottom * 1.0001)  # clip bars at the axis bottom, not below 0
        handles = [
            ax.errorbar(
                sig[pos],
                mean[pos],
                yerr=np.vstack([np.where(np.isfinite(lower), lower, 0), np.nan_to_num(half)])[:, pos],
                fmt="o",
                color=color,
                markersize=5,
                capsize=3,
                linewidth=1.2,
                label=r"measured $\mathbb{E}[f(W{+}U)]-f(W)$",
            )
        ]
        if (~pos & np.isfinite(mean)).any():
            handles += ax.plot(
                sig[~pos & np.isfinite(mean)],
                np.full((~pos & np.isfinite(mean)).sum(), y_bottom * 1.3),
                "v",
                color=color,
                markerfacecolor="none",
                markersize=6,
                label="measured ≤ 0 (not on log scale)",
            )
        fine = np.geomspace(sig.min() / 1.5, sig.max() * 1.5, 100)
        if trace_mean > 0:
            handles += ax.plot(
                fine,
                fine**2 / 2 * trace_mean,
                "--",
                color=color,
                linewidth=1.3,
                label=r"prediction $\frac{\sigma^2}{2}\,\mathrm{tr}(H)$",
            )
            if np.isfinite(trace_half) and trace_half > 0:
                lo_t = max(trace_mean - trace_half, trace_mean * 1e-3)
                ax.fill_between(
                    fine,
                    fine**2 / 2 * lo_t,
                    fine**2 / 2 * (trace_mean + trace_half),
                    color=color,
                    alpha=0.12,
                    linewidth=0,
                )
        else:
            ax.text(
                0.5,
                0.9,
                f"no prediction: tr(H) = {trace_mean:.3g} is not positive",
                transform=ax.transAxes,
                ha="center",
                fontsize=8,
                color=color,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(
            f"{method_label(method)} (n={len(arrays)}, " + r"$\mathrm{tr}(H)$" + f" = {trace_mean:.3g})",
            fontsize=10,
        )
        ax.set_xlabel(r"noise scale $\sigma$ (parameter units)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(handles=handles, fontsize=8, loc="upper left")
    axes[0].set_ylabel("loss increase (loss units)")
    axes[0].set_ylim(bottom=y_bottom)
    fig.suptitle(
        r"Noise stability vs. its second-order prediction, $U\sim\mathcal{N}(0,\sigma^2 I)$", fontsize=11
    )
    _caption(
        fig,
        _mean_note(counts, "points")
        + _seeds_note(
            counts,
            "error bars: 95% t-interval over seeds",
            r"error bars: $\pm1.96\,$stderr of the Monte-Carlo estimate",
        )
        + "; shading around the dashed line: 95% interval of tr(H)",
    )
    return _save(fig, out_dir, name)


# --------------------------------------------------------------------------- 4. bar chart
def _final_values(run: dict, where: str) -> tuple[float, float, float, float]:
    """(trace, trace stderr, λmax, λmax residual) of a run's final checkpoint analysis."""
    analysis = _plain(run.get("analysis"))
    if not isinstance(analysis, Mapping):
        raise ValueError(f"{where}: missing 'analysis' (the final checkpoint's analysis)")
    t = _sub_result(analysis, "trace", "trace", f"{where}.analysis")
    top = _sub_result(analysis, "eigen", "top", f"{where}.analysis")
    values = _nums(_get(top, "values", f"{where}.analysis.top"), f"{where}.analysis.top.values")
    if values.size == 0:
        raise ValueError(f"{where}.analysis.top: no eigenvalues")
    res = top.get("residuals")
    residual = _nums(res, f"{where}.analysis.top.residuals")[0] if res is not None and len(res) else 0.0
    return (
        _num(_get(t, "estimate", f"{where}.analysis.trace"), f"{where}.analysis.trace.estimate"),
        _num(t.get("stderr", 0.0), f"{where}.analysis.trace.stderr"),
        float(values.max()),
        residual,
    )


def plot_trace_lambda_bars(runs, out_dir, name: str = "trace_lambda_bars") -> list[Path]:
    """Bar chart of the final Hessian trace and λmax per method (mean over seeds) with 95% error bars
    (t-interval over seeds; one seed: ±1.96·stderr / ±residual) and each seed as a dot.

    ``runs``: the demo's runs (each with ``"method"``, ``"seed"`` and ``"analysis"``), or the demo dict.
    """
    runs = _runs_list(runs)
    groups = _group(
        [
            (r["method"], _final_values(r, f"runs[{i}] ({r.get('name', r['method'])})"))
            for i, r in enumerate(runs)
        ]
    )
    fig = Figure(figsize=(max(7.5, 1.6 * len(groups) + 4.5), 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    methods = list(groups)
    x = np.arange(len(methods))
    counts = {m: len(v) for m, v in groups.items()}
    rng = np.random.default_rng(0)  # deterministic jitter of the seed dots
    for ax, idx, scale, title in (
        (axes[0], 0, Z95, r"Hessian trace $\mathrm{tr}(H)$"),
        (axes[1], 2, 1.0, r"top eigenvalue $\lambda_{\max}(H)$"),
    ):
        for j, method in enumerate(methods):
            vals = np.array([v[idx] for v in groups[method]])
            own = np.array([scale * v[idx + 1] for v in groups[method]])
            mean, half = _aggregate(vals[:, None], own[:, None])
            color = method_color(method)
            ax.bar(j, mean[0], width=0.6, color=color, alpha=0.45, edgecolor=color, linewidth=1.2)
            if np.isfinite(half[0]):
                ax.errorbar(j, mean[0], yerr=half[0], color="black", capsize=6, linewidth=1.3)
            jitter = 0.14 + (rng.uniform(-0.05, 0.05, size=vals.size) if vals.size > 1 else np.zeros(1))
            ax.scatter(j + jitter, vals, s=22, color=color, edgecolor="black", linewidth=0.6, zorder=3)
        ax.set_xticks(x, [f"{method_label(m)}\n(n={counts[m]})" for m in methods])
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_title(title)
        ax.set_ylabel(("trace" if idx == 0 else r"$\lambda_{\max}$") + " (loss units per parameter²)")
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Curvature of the final checkpoints", fontsize=11)
    _caption(
        fig,
        _mean_note(counts, "bars")
        + "dots: individual seeds; "
        + _seeds_note(
            counts,
            "error bars: 95% t-interval over seeds",
            r"error bars: $\pm1.96\,$stderr (trace), $\pm$ Lanczos residual ($\lambda_{\max}$)",
        ),
    )
    return _save(fig, out_dir, name)


# --------------------------------------------------------------------------- 4b. bound vs trace
def _bound_and_trace(run: dict, where: str) -> tuple[float, float, float] | None:
    """(trace, trace stderr, bound) of a run's final checkpoint, None when it has no certificate."""
    analysis = _plain(run.get("analysis"))
    if not isinstance(analysis, Mapping) or not analysis.get("certificate") or not analysis.get("trace"):
        return None
    t, c = analysis["trace"], analysis["certificate"]
    return (
        _num(_get(t, "estimate", f"{where}.analysis.trace"), f"{where}.analysis.trace.estimate"),
        _num(t.get("stderr", 0.0), f"{where}.analysis.trace.stderr"),
        _num(_get(c, "bound", f"{where}.analysis.certificate"), f"{where}.analysis.certificate.bound"),
    )


def plot_bound_vs_trace(runs, out_dir, name: str = "bound_vs_trace") -> list[Path]:
    """The PAC-Bayes bound of every run against its Hessian trace (±1.96·stderr as a horizontal bar),
    one colour per method. ``runs``: the demo's runs, or the demo dict; runs without a certificate are
    left out (ValueError when none has one).
    """
    runs = _runs_list(runs)
    points = [
        (r["method"], v)
        for i, r in enumerate(runs)
        if (v := _bound_and_trace(r, f"runs[{i}] ({r.get('name', r['method'])})")) is not None
    ]
    if not points:
        raise ValueError("runs: no run has both a trace and a PAC-Bayes certificate")
    groups = _group(points)
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    for method, values in groups.items():
        trace, stderr, bound = (np.array(column) for column in zip(*values))
        color = method_color(method)
        ax.errorbar(
            trace,
            bound,
            xerr=Z95 * stderr,
            fmt="o",
            color=color,
            markeredgecolor="black",
            markeredgewidth=0.6,
            capsize=3,
            label=f"{method_label(method)} (n={len(values)})",
        )
    ax.set_xlabel(r"Hessian trace $\mathrm{tr}(H)$ of the final checkpoint")
    ax.set_ylabel("PAC-Bayes bound on the test error")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("Certified test error vs curvature, every run", fontsize=11)
    _caption(
        fig,
        "one dot per run (method and seed); horizontal bars: the trace's 95% interval; the bound "
        "holds with probability ≥ 1 − δ",
    )
    return _save(fig, out_dir, name)


# --------------------------------------------------------------------------- 5. matrix sensing
def plot_matrix_sensing(data, out_dir, name: str = "matrix_sensing") -> list[Path]:
    """Training and validation loss vs step (log y), one line per method: mean over seeds with a
    min–max band, plus the paper's final validation losses (dotted) when given.

    ``data``: the JSON written by ``analysis/matrix_sensing.py`` — ``{"runs": [{"method", "seed",
    "curve": {"step", "train_loss", "val_loss"}}], "config"?, "paper_val_loss"?}``.
    """
    data = _plain(data)
    if not isinstance(data, Mapping):
        raise ValueError(f"data: expected the matrix-sensing results dict, got {type(data).__name__}")
    runs = _runs_list(data.get("runs"), "data['runs']")
    curves = []
    for i, run in enumerate(runs):
        where = f"data['runs'][{i}]"
        curve = _get(run, "curve", where)
        arrays = {
            k: _nums(_get(curve, k, f"{where}.curve"), f"{where}.curve.{k}")
            for k in ("step", "train_loss", "val_loss")
        }
        if (
            not (arrays["step"].size == arrays["train_loss"].size == arrays["val_loss"].size)
            or arrays["step"].size == 0
        ):
            raise ValueError(
                f"{where}.curve: step, train_loss and val_loss must be non-empty lists of one length"
            )
        curves.append((run["method"], arrays))
    groups = _group(curves)
    paper = data.get("paper_val_loss") if isinstance(data.get("paper_val_loss"), Mapping) else {}
    fig = Figure(figsize=(12.5, 4.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, title in (
        (axes[0], "train_loss", "training loss"),
        (axes[1], "val_loss", "validation loss"),
    ):
        for method, cs in groups.items():
            n = min(c["step"].size for c in cs)
            steps = cs[0]["step"][:n]
            ys = np.vstack([c[key][:n] for c in cs])
            ys = np.where(np.isfinite(ys) & (ys > 0), ys, np.nan)
            color = method_color(method)
            with np.errstate(invalid="ignore"), _quiet():
                mean = np.nanmean(ys, 0)
                ax.plot(
                    steps, mean, color=color, linewidth=1.6, label=f"{method_label(method)} (n={len(cs)})"
                )
                if len(cs) > 1:
                    ax.fill_between(
                        steps, np.nanmin(ys, 0), np.nanmax(ys, 0), color=color, alpha=0.2, linewidth=0
                    )
            if key == "val_loss" and method in paper and paper[method] is not None:
                ax.axhline(
                    _num(paper[method], f"data['paper_val_loss'][{method!r}]"),
                    color=color,
                    linestyle=":",
                    linewidth=1.2,
                    label=f"{method_label(method)}: paper's final value",
                )
        ax.set_yscale("log")
        ax.set_xlabel("step (full-batch update)")
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel(
        r"relative loss  $\mathrm{mean}\,(\langle A,UU^\top\rangle-y)^2\,/\,\mathrm{mean}\,y^2$"
    )
    fig.legend(handles=axes[1].get_legend_handles_labels()[0], loc="outside right upper", fontsize=8)
    cfg = data.get("config") if isinstance(data.get("config"), Mapping) else {}
    seeds = sorted({r.get("seed") for r in runs if r.get("seed") is not None})
    bits = [f"{k}={cfg[k]}" for k in ("d", "r", "m", "sigma", "lr", "steps") if k in cfg]
    fig.suptitle(
        "Matrix sensing" + (": " + ", ".join(bits) if bits else "") + (f", seeds {seeds}" if seeds else ""),
        fontsize=11,
    )
    if any(len(cs) > 1 for cs in groups.values()):
        _caption(fig, "lines: mean over seeds; bands: min–max over seeds")
    return _save(fig, out_dir, name)


class _quiet:
    """Silence numpy's 'all-NaN slice' warnings (a step where every seed diverged)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# --------------------------------------------------------------------------- 6. the demo
def plot_demo(results, out_dir) -> list[Path]:
    """Figures 1–5 for the demo results dict (``hessian_tools.demo.run_demo``): sharpness curves,
    eigenvalue density, noise stability, the trace/λmax bars and the bound vs the trace. The density and
    stability figures are skipped when no run's analysis holds that result (the analysis settings left it
    out).
    """
    results = _plain(results)
    if not isinstance(results, Mapping) or "runs" not in results:
        raise ValueError("results: expected the demo results dict (with a 'runs' list)")
    runs = _runs_list(results["runs"], "results['runs']")
    paths = []
    if any(r.get("curve") for r in runs):
        paths += plot_sharpness_curves([r for r in runs if r.get("curve")], out_dir)
    analyses = [(r["method"], _plain(r.get("analysis"))) for r in runs]
    analyses = [(m, a) for m, a in analyses if isinstance(a, Mapping)]
    for key, fn in (("density", plot_density), ("stability", plot_stability)):
        have = _group([(m, a) for m, a in analyses if a.get(key) is not None])
        if have:
            paths += fn(have, out_dir)
    if analyses:
        paths += plot_trace_lambda_bars(
            [r for r in runs if isinstance(_plain(r.get("analysis")), Mapping)], out_dir
        )
    if any(a.get("certificate") and a.get("trace") for _, a in analyses):
        paths += plot_bound_vs_trace(runs, out_dir)
    if not paths:
        raise ValueError("results: no run has a sharpness curve or an analysis to draw")
    return paths
