"""Smoke test of analysis/bench_peers.py: the --quick settings, ours only (peers skipped), every
section, and the report written with the expected tables and columns."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ANALYSIS = Path(__file__).resolve().parent.parent / "analysis"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ANALYSIS))
    try:
        import bench_peers
    finally:
        sys.path.remove(str(ANALYSIS))
    return bench_peers


def test_quick_run_writes_the_report(bench, tmp_path):
    results = bench.main(["--quick", "--no-peers", "--out", str(tmp_path), "--cache", ""])
    report = (tmp_path / "bench_peers.md").read_text()
    header = "| " + " | ".join(bench.TRACE_COLUMNS) + " |"
    assert header in report
    for title in ("## Ground truth", "## Targets", "## 1. Trace", "## 2. Top eigenvalues", "## 3. One block of K HVPs",
                  "## 4. Peak memory", "## 5. Time per HVP"):
        assert title in report, title
    assert "| " + " | ".join(bench.EIGEN_COLUMNS) + " |" in report
    for name in ("trace", "eigen", "hvp", "memory", "scaling"):
        assert (tmp_path / f"bench_{name}.png").stat().st_size > 1000
    data = json.loads((tmp_path / "bench_peers.json").read_text())
    assert set(data["truth"]) == set(bench.QUICK.models)
    # the exact trace (GGN identity) agrees with the dense Hessian's trace on the small models
    for info in data["truth"].values():
        if info["check"].startswith("dense"):
            assert "rel. diff" in info["check"] and float(info["check"].split("rel. diff ")[1].rstrip(")")) < 1e-10
    # only our rows without peers, and ours reaches the easy eigenvalue target
    assert all(row["tool"].startswith("ours") for row in results["trace"]["rows"])
    assert any(row[1e-6] is not None for row in results["eigen"]["rows"])
