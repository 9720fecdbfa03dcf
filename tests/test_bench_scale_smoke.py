"""Smoke test of analysis/bench_scale.py: the --quick settings on the tiny transformer (dict inputs),
every kind of measurement in a fresh process, the end-to-end command, and the report."""

from __future__ import annotations

import json

import pytest
from helpers import import_analysis_script


@pytest.fixture(scope="module")
def bench():
    return import_analysis_script("bench_scale")


def test_quick_run_measures_every_kind_and_writes_the_report(bench, tmp_path):
    results = bench.main(["--quick", "--models", "transformer", "--out", str(tmp_path)])
    report = (tmp_path / "bench_scale.md").read_text()
    assert "| " + " | ".join(bench.ROW_COLUMNS) + " |" in report
    for text in ("## Targets", "## transformer:", "**End to end**", "load average", "torch threads 1"):
        assert text in report, text
    data = json.loads((tmp_path / "bench_scale.json").read_text())
    rows = data["models"]["transformer"]["rows"]
    assert [r["config"]["kind"] for r in rows] == [p.kind for p in bench.QUICK["transformer"].probes]
    for row in rows:
        assert "error" not in row, row
        assert row["peak_mb"] >= row["base_mb"] > 50 and row["threads"] == 1
        assert len(row["times"]) == row["config"]["reps"] and min(row["times"]) > 0
    assert results["models"]["transformer"]["pyhessian_48"]  # the baseline of the end-to-end target
    cli = data["models"]["transformer"]["cli"]
    assert cli["command"].startswith("hessian-tools analyze ") and "--max-hvps 6" in cli["command"]
    # the command either finishes or fails with one plain line (never a traceback)
    assert cli["finished"] or ("error" in cli and "Traceback" not in cli["error"])
    if cli["finished"]:
        assert cli["hvps"] > 0 and cli["peak_mb"] > 50


def test_only_the_analyze_run(bench, tmp_path):
    results = bench.main(["--quick", "--models", "resnet18", "--only", "cli", "--out", str(tmp_path)])
    model = results["models"]["resnet18"]
    assert model["rows"] == [] and not model["cli"].get("skipped")
    assert "**End to end**" in (tmp_path / "bench_scale.md").read_text()
