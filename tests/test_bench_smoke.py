"""Smoke test of analysis/bench_peers.py: the --quick settings, ours only (peers skipped), every
section, and the report written with the expected tables and columns."""

from __future__ import annotations

import json

import pytest
from helpers import import_analysis_script


@pytest.fixture(scope="module")
def bench():
    return import_analysis_script("bench_peers")


def test_quick_run_writes_the_report(bench, tmp_path):
    results = bench.main(["--quick", "--no-peers", "--out", str(tmp_path), "--cache", ""])
    report = (tmp_path / "bench_peers.md").read_text()
    header = "| " + " | ".join(bench.TRACE_COLUMNS) + " |"
    assert header in report
    for title in (
        "## Ground truth",
        "## Targets",
        "## 1. Trace",
        "## 2. Top eigenvalues",
        "## 3. One block of K HVPs",
        "## 4. Peak memory",
        "## 5. Time per HVP",
    ):
        assert title in report, title
    assert "| " + " | ".join(bench.EIGEN_COLUMNS) + " |" in report
    for name in ("trace", "eigen", "hvp", "memory", "scaling"):
        assert (tmp_path / f"bench_{name}.png").stat().st_size > 1000
    data = json.loads((tmp_path / "bench_peers.json").read_text())
    assert set(data["truth"]) == set(bench.QUICK.models)
    # the exact trace (GGN identity) agrees with the dense Hessian's trace on the small models
    for info in data["truth"].values():
        if info["check"].startswith("dense"):
            assert (
                "rel. diff" in info["check"]
                and float(info["check"].split("rel. diff ")[1].rstrip(")")) < 1e-10
            )
    # only our rows without peers, and ours reaches the easy eigenvalue target
    assert all(row["tool"].startswith("ours") for row in results["trace"]["rows"])
    assert any(row[1e-6] is not None for row in results["eigen"]["rows"])


def test_diagonal_accuracy_quick_run(tmp_path):
    """analysis/diagonal_accuracy.py --quick: both models, the tables written, and the Gauss–Newton
    identity the ResNet's exact diagonal relies on checked against the full Hessian on the CNN."""
    diagonal_accuracy = import_analysis_script("diagonal_accuracy")
    results = diagonal_accuracy.main(["--quick", "--out", str(tmp_path)])
    cnn, resnet = results["problems"]
    assert (cnn["model"], cnn["dim"], resnet["model"], resnet["dim"]) == ("cnn", 1898, "resnet", 5037)
    assert cnn["ggn_max_relative_deviation"] < 1e-10
    assert {row["method"] for row in resnet["rows"]} == set(diagonal_accuracy.METHODS)
    report = (tmp_path / "diagonal_accuracy.md").read_text()
    assert "## cnn — 1898 parameters" in report and "## resnet — 5037 parameters" in report
    assert json.loads((tmp_path / "diagonal_accuracy.json").read_text())["seeds"] == [0, 1]


@pytest.mark.slow
def test_bound_benchmark_quick_run_writes_its_table(tmp_path):
    bench_bound = import_analysis_script("bench_bound")
    bench_bound.main(
        [
            "--quick",
            "--settings",
            "fixed50,dd50",
            "--methods",
            "sgd",
            "--out",
            str(tmp_path),
            "--cache",
            str(tmp_path / "runs"),
        ]
    )
    rows = json.loads((tmp_path / "bench_bound.json").read_text())["rows"]
    assert [(r["setting"], r["method"], r["seed"]) for r in rows] == [
        ("fixed50", "sgd", 0),
        ("dd50", "sgd", 0),
    ]
    assert rows[1]["result"]["prior"] == "data-dependent" and rows[1]["result"]["n"] == 125
    for row in rows:
        assert row["result"]["posterior_test_error"] <= row["result"]["bound"] <= 1
    report = (tmp_path / "bench_bound.md").read_text()
    assert "| fixed50 | 50/class" in report and "| dd50 | sgd | 0 | 125 |" in report


def test_control_variate_benchmark_quick_run(tmp_path):
    """analysis/bench_control_variate.py --quick (MLP only): the tables written, the residual mean is
    zero within its error bar (tr(H) = tr(G) for a ReLU MLP), and the cost counts both products."""
    bench = import_analysis_script("bench_control_variate")
    results = bench.main(["--quick", "--models", "mlp", "--out", str(tmp_path)])
    report = (tmp_path / "bench_control_variate.md").read_text()
    assert "| " + " | ".join(bench.COLUMNS) + " |" in report
    assert "| " + " | ".join(bench.RUN_COLUMNS) + " |" in report
    (row,) = results["rows"]
    assert abs(row["residual_mean"]) <= 4 * row["residual_se"]
    assert row["hvps_cv"] == row["C"] + 2 * row["residual_probes"]
    assert all(run["hvps"] == row["C"] + 2 * run["probes"] for run in row["runs"])
