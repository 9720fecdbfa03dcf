"""Figures from results: every function writes a non-empty PNG and PDF, handles one seed / one
method, and refuses malformed input with a ValueError. Results are made by the real estimators on
small dense matrices (the density, trace and top eigenvalue) or by hand (curves, stability)."""

from __future__ import annotations

import copy
import json
import math
import struct

import numpy as np
import pytest
import torch

from hessian_tools import DenseOperator, eigenvalues, trace
from hessian_tools.app.pipeline import CheckpointAnalysis
from hessian_tools.app.plots import (
    METHOD_COLORS,
    method_color,
    plot_demo,
    plot_density,
    plot_matrix_sensing,
    plot_sharpness_curves,
    plot_stability,
    plot_trace_lambda_bars,
)
from hessian_tools.estimators.density import density
from hessian_tools.results import StabilityCurveResult

METHODS = {"sgd": 4.0, "sam": 2.0, "nso": 1.0}  # method → curvature scale of its synthetic Hessian
SIGMAS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def _matrix(scale: float, seed: int, dim: int = 60) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lam = (
        torch.cat(
            [
                torch.tensor([20.0, 8.0, 3.0]),
                torch.rand(dim - 6, generator=g) * 0.4,
                -torch.rand(3, generator=g) * 0.1,
            ]
        ).double()
        * scale
    )
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return (Q * lam) @ Q.T


def _stability(tr: float, tr_se: float, seed: int) -> StabilityCurveResult:
    rng = np.random.default_rng(seed)
    s = np.asarray(SIGMAS)
    predicted = s**2 / 2 * tr
    measured = predicted * (1 + 3 * s) + rng.normal(0, 2e-6, s.size)  # higher-order terms at large σ
    measured[0] = -1e-6 if seed == 0 else measured[0]  # a non-positive point (noise at tiny σ)
    se = np.abs(measured) * 0.1 + 1e-6
    ratio = measured / predicted
    return StabilityCurveResult(
        sigmas=tuple(s),
        measured=tuple(measured),
        measured_stderr=tuple(se),
        one_sided_stderr=tuple(3 * se),
        predicted=tuple(predicted),
        predicted_stderr=tuple(s**2 / 2 * tr_se),
        ratio=tuple(ratio),
        ratio_stderr=tuple(0.1 * np.abs(ratio)),
        taylor_holds=tuple([True] * s.size),
        breakdown_index=None,
        breakdown_sigma=None,
        trace=tr,
        trace_stderr=tr_se,
        band=(0.8, 1.25),
        n_samples=16,
        antithetic=True,
        seed=seed,
        evaluations=1 + 16 * s.size,
        hvps=0,
        base_loss=0.1,
    )


def _analysis(method: str, seed: int) -> CheckpointAnalysis:
    op = DenseOperator(_matrix(METHODS[method], seed))
    tr = trace(op, method="hutchpp", max_hvps=30, seed=seed)
    top = eigenvalues(op, k=2, tol=1e-6, seed=seed)
    bottom = eigenvalues(op, k=1, which="SA", tol=1e-6, seed=seed)
    dens = density(op, n_probes=3, steps=25, seed=seed)
    return CheckpointAnalysis(
        name=f"{method}-s{seed}",
        dim=op.dim,
        n_train=250,
        n_test=500,
        train_loss=0.05,
        train_acc=1.0,
        test_loss=0.4,
        test_acc=0.9,
        seed=seed,
        hvps=tr.hvps + top.hvps + dens.hvps,
        wall_time_s=0.1,
        parts={
            "trace": tr,
            "top": top,
            "bottom": bottom,
            "density": dens,
            "stability": _stability(tr.estimate, tr.stderr, seed),
        },
    )


def _curve(method: str, seed: int, epochs: int = 6) -> list[dict]:
    rng = np.random.default_rng(100 + seed)
    out = []
    for epoch in range(1, epochs + 1):
        tr = METHODS[method] * 30 * (1 + 2 * math.exp(-epoch / 2)) * (1 + 0.05 * rng.standard_normal())
        lm = METHODS[method] * 20 * (1 + math.exp(-epoch / 2)) * (1 + 0.05 * rng.standard_normal())
        out.append(
            {
                "epoch": epoch,
                "trace": tr,
                "trace_stderr": 0.02 * tr,
                "lambda_max": lm,
                "lambda_max_residual": 1e-3 * lm,
                "hvps": 60,
                "seed": 0,
                "train_loss": 0.1,
                "train_acc": 1.0,
                "test_loss": 0.5,
                "test_acc": 0.9,
                "wall_time_s": 0.5,
            }
        )
    return out


@pytest.fixture(scope="module")
def demo_results():
    """A demo results dict as JSON would hold it (3 methods × 2 seeds)."""
    runs = [
        {
            "name": f"{m}-s{s}",
            "method": m,
            "seed": s,
            "run_dir": f"runs/{m}-s{s}",
            "analysis": _analysis(m, s),
            "curve": _curve(m, s),
        }
        for m in METHODS
        for s in (0, 1)
    ]
    results = {"kind": "demo", "config": {}, "pretrain": {}, "data": {}, "runs": runs, "wall_time_s": 1.0}
    from hessian_tools.results import _to_jsonable

    return json.loads(json.dumps(_to_jsonable(results)))  # the JSON round trip: plain dicts only


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _check_written(paths, tmp_path, name):
    assert [p.name for p in paths] == [f"{name}.png", f"{name}.pdf"]
    for p in paths:
        assert p.parent == tmp_path and p.stat().st_size > 5_000
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers
    return _png_size(paths[0])


def _by_method(results, seeds=(0, 1), methods=tuple(METHODS)):
    return {
        m: [r["analysis"] for r in results["runs"] if r["method"] == m and r["seed"] in seeds]
        for m in methods
    }


def test_demo_writes_all_four_figures(demo_results, tmp_path):
    paths = plot_demo(demo_results, tmp_path)
    assert sorted(p.name for p in paths) == sorted(
        f"{n}.{e}"
        for n in ("sharpness_curves", "density", "stability", "trace_lambda_bars")
        for e in ("png", "pdf")
    )
    for p in paths:
        assert p.stat().st_size > 5_000
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_rendering_is_deterministic(demo_results, tmp_path):
    first = plot_trace_lambda_bars(demo_results, tmp_path / "a")
    second = plot_trace_lambda_bars(demo_results["runs"], tmp_path / "b")  # the run list alone works too
    assert _png_size(first[0]) == _png_size(second[0])
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()  # byte-identical re-render (no dates in the PDF)


def test_single_seed_single_method_and_result_objects(demo_results, tmp_path):
    one = [r for r in demo_results["runs"] if r["method"] == "nso" and r["seed"] == 0]
    _check_written(plot_sharpness_curves(one, tmp_path, name="c1"), tmp_path, "c1")
    _check_written(plot_trace_lambda_bars(one, tmp_path, name="b1"), tmp_path, "b1")
    analysis = _analysis("nso", 0)  # Result objects, not dicts
    _check_written(plot_density({"nso": analysis.density}, tmp_path, name="d1"), tmp_path, "d1")
    _check_written(plot_stability({"nso": [analysis]}, tmp_path, name="s1"), tmp_path, "s1")


def test_density_mixes_sigmas_on_a_common_grid(demo_results, tmp_path):
    by_method = _by_method(demo_results)
    by_method["sgd"][0] = copy.deepcopy(by_method["sgd"][0])
    by_method["sgd"][0]["density"]["sigma"] *= 0.01  # far narrower than the others
    _check_written(plot_density(by_method, tmp_path, name="dm"), tmp_path, "dm")


def test_matrix_sensing_from_json(tmp_path):
    runs = []
    for method, rate in (("gd", 1e-4), ("wp", 1e-3), ("nso", 2e-3)):
        for seed in (0, 1):
            steps = list(range(0, 1001, 50))
            train = [float(np.exp(-rate * s) * (1 + 0.1 * seed)) for s in steps]
            val = [t * 1.5 + 1e-4 for t in train]
            runs.append(
                {
                    "method": method,
                    "seed": seed,
                    "curve": {"step": steps, "train_loss": train, "val_loss": val},
                }
            )
    runs[-1]["curve"]["val_loss"][-1] = "inf"  # a diverged point, as JSON writes it
    data = {
        "experiment": "matrix_sensing",
        "config": {"d": 20, "r": 2, "m": 200, "sigma": 0.08, "lr": 1e-3, "steps": 1000},
        "paper_val_loss": {"gd": 1.7, "wp": 2.5e-3, "nso": 5.5e-4},
        "runs": runs,
    }
    _check_written(plot_matrix_sensing(data, tmp_path), tmp_path, "matrix_sensing")
    _check_written(plot_matrix_sensing({"runs": runs[:1]}, tmp_path, name="ms1"), tmp_path, "ms1")


def test_colours_are_one_per_method():
    assert method_color("NSO") == METHOD_COLORS["nso"]
    assert method_color("wp") == method_color("wp-gd")
    assert method_color("mystery") == method_color("mystery")  # stable fallback
    core = ["sgd", "gd", "sam", "asam", "wp", "nso"]
    assert len({METHOD_COLORS[m] for m in core}) == len(core)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d, p: plot_sharpness_curves([], p), "non-empty list of runs"),
        (lambda d, p: plot_sharpness_curves([{"seed": 0, "curve": []}], p), "missing 'method'"),
        (lambda d, p: plot_sharpness_curves([{"method": "sgd", "curve": []}], p), "empty 'curve'"),
        (
            lambda d, p: plot_sharpness_curves(
                [{"method": "sgd", "curve": [{"epoch": 1, "trace": "x", "lambda_max": 1}]}], p
            ),
            "expected a number",
        ),
        (
            lambda d, p: plot_sharpness_curves(
                [
                    {
                        "method": "sgd",
                        "curve": [
                            {"epoch": 2, "trace": 1, "lambda_max": 1},
                            {"epoch": 1, "trace": 1, "lambda_max": 1},
                        ],
                    }
                ],
                p,
            ),
            "strictly increasing",
        ),
        (lambda d, p: plot_trace_lambda_bars([{"method": "sgd", "seed": 0}], p), "missing 'analysis'"),
        (lambda d, p: plot_density({}, p), "non-empty dict"),
        (lambda d, p: plot_density({"sgd": [{"kind": "trace"}]}, p), "no 'density' result"),
        (
            lambda d, p: plot_density(
                {"sgd": [{"kind": "density", "nodes": [[1, 2]], "weights": [[1]], "sigma": 0.1}]}, p
            ),
            "same non-empty shape",
        ),
        (
            lambda d, p: plot_stability(
                {
                    "sgd": [
                        {"kind": "stability_curve", "sigmas": [0.1, 0.01], "measured": [1, 2], "trace": 1.0}
                    ]
                },
                p,
            ),
            "strictly increasing",
        ),
        (
            lambda d, p: plot_stability(
                {"sgd": [{"kind": "stability_curve", "sigmas": [0.1], "measured": [1, 2], "trace": 1.0}]}, p
            ),
            "same length",
        ),
        (
            lambda d, p: plot_matrix_sensing(
                {"runs": [{"method": "gd", "curve": {"step": [0, 1], "train_loss": [1]}}]}, p
            ),
            "missing 'val_loss'",
        ),
        (lambda d, p: plot_matrix_sensing([1, 2], p), "matrix-sensing results dict"),
        (lambda d, p: plot_demo({"kind": "demo"}, p), "'runs' list"),
        (lambda d, p: plot_sharpness_curves(d["runs"], p, name="../escape"), "plain file stem"),
    ],
)
def test_malformed_input_is_refused(demo_results, tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(demo_results, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written
