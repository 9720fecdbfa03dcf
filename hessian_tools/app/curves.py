"""Sharpness curves: trace and λmax of every epoch's checkpoint of a training run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..estimators import eigenvalues, trace
from .analyses import trace_method_for
from .io import atomic_write_json, read_json
from .pipeline import AnalysisSettings, make_operator
from .runs import build_run_model, load_run
from .zoo.data import DataBundle, load_data


def sharpness_curve(
    run_dir: str | Path,
    bundle: DataBundle,
    settings: AnalysisSettings = AnalysisSettings(),
    *,
    every: int = 1,
    rtol: float = 0.05,
    eig_tol: float = 1e-3,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """One point per analysed epoch (every ``every``-th and the last): the trace (``settings.trace_method``,
    stopped at 95% half-width ≤ rtol·|trace|) with its stderr, λmax with its residual, the HVPs
    spent, the seed, and the epoch's recorded train/test loss and accuracy.
    """
    run_dir = Path(run_dir)
    meta, checkpoints = load_run(run_dir)
    records = {int(r["epoch"]): r for r in meta.get("epochs", [])}
    epochs = [int(p.stem.split("_")[1]) for p in checkpoints]
    points = []
    for epoch, path in zip(epochs, checkpoints):
        if epoch % every and epoch != epochs[-1]:
            continue
        if progress:
            progress(f"{run_dir.name} epoch {epoch}")
        op = make_operator(build_run_model(meta, path), bundle, settings)
        method = trace_method_for(settings, op.dim)
        tr = trace(op, method=method, rtol=rtol, max_hvps=settings.trace_max_hvps, seed=settings.seed)
        top = eigenvalues(op, k=1, tol=eig_tol, seed=settings.seed, max_hvps=settings.eig_max_hvps)
        record = {k: v for k, v in records.get(epoch, {}).items() if k != "epoch"}
        points.append(
            {
                "epoch": epoch,
                "trace": tr.estimate,
                "trace_stderr": tr.stderr,
                "trace_hvps": tr.hvps,
                "lambda_max": float(top.values[0]),
                "lambda_max_residual": float(top.residuals[0]),
                "hvps": tr.hvps + top.hvps,
                "seed": settings.seed,
                **record,
            }
        )
    return points


def run_curve(
    runs: Sequence[str],
    *,
    every: int = 1,
    rtol: float = 0.05,
    seed: int = 0,
    batch_size: int = 512,
    out: str | None = None,
    resume: bool = False,
    progress=None,
    distributed: bool = False,
    device: str = "cpu",
    loss: str = "cross_entropy",
    memory_budget: int | str | None = "auto",
) -> tuple[dict, list]:
    """Curves of several run folders on their own training data; with ``out``, each run's curve is
    saved atomically as it finishes (``resume`` reuses saved ones) and the figure is drawn
    (by rank 0 alone when ``distributed``).
    """
    from ..operators.distributed import is_main_process

    settings = AnalysisSettings(
        seed=seed,
        batch_size=batch_size,
        distributed=distributed,
        device=device,
        loss=loss,
        memory_budget=memory_budget,
    )
    if not is_main_process():
        out = None
    curves = {}
    for run in runs:
        name = Path(run).name
        saved = Path(out) / f"curve-{name}.json" if out else None
        if resume and saved is not None and saved.is_file():
            curves[name] = read_json(saved)
            continue
        meta, _ = load_run(run)
        curves[name] = sharpness_curve(
            run, load_data(meta["config"]["data"]), settings, every=every, rtol=rtol, progress=progress
        )
        if saved is not None:
            atomic_write_json(saved, curves[name])
    figures = []
    if out:
        from .plots import plot_sharpness_curves

        figures = plot_sharpness_curves(
            [{"name": n, "method": _method_of(n, runs), "seed": 0, "curve": c} for n, c in curves.items()],
            out,
        )
    return curves, figures


def _method_of(name: str, runs: Sequence[str]) -> str:
    for run in runs:
        if Path(run).name == name:
            try:
                return read_json(Path(run) / "run.json")["config"]["method"]
            except (OSError, KeyError, ValueError):
                break
    return name
