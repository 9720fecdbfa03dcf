"""The command line through its real entry point (a subprocess), on tiny settings.

Each test checks the output's content, not just the exit code, and every bad input must give
exactly one clear line on stderr and a non-zero exit — never a traceback.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "hessian_tools", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def assert_one_line_error(proc, code, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, proc.stderr
    for needle in needles:
        assert needle in error_lines[0], (needle, error_lines[0])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mlp-sgd"
    proc = run(
        "train",
        "--model",
        "mlp",
        "--data",
        "builtin:synthetic",
        "--epochs",
        "2",
        "--lr",
        "0.1",
        "--out",
        str(out),
        "--quiet",
    )
    assert "run folder" in proc.stdout
    return out


def test_train_writes_a_run_folder(run_dir):
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "finished" and len(meta["epochs"]) == 2
    for name in ("init.pt", "epoch_001.pt", "epoch_002.pt", "final.pt"):
        torch.load(run_dir / name, weights_only=True)


def test_analyze_run_folder_prints_table_and_json(run_dir, tmp_path):
    out = tmp_path / "a.json"
    proc = run(
        "analyze",
        str(run_dir),
        "--what",
        "trace,eigs,density",
        "--json",
        str(out),
        "--quiet",
        "--max-hvps",
        "200",
    )
    assert "Hessian trace" in proc.stdout and "top eigenvalues" in proc.stdout and "95% CI" in proc.stdout
    result = json.loads(out.read_text())
    assert result["kind"] == "checkpoint_analysis" and result["dim"] == 899
    assert result["trace"]["hvps"] > 0 and result["trace"]["seed"] == 0
    assert len(result["top"]["values"]) == 5 and result["top"]["values"][0] >= result["top"]["values"][1]
    assert result["density"]["n_probes"] > 0
    # the top and the smallest eigenvalues come from one Lanczos run, whose HVPs are counted once
    assert result["bottom"]["method"] == "lanczos (both ends)" and result["bottom"]["values"][0] < 0
    assert result["bottom"]["hvps"] == result["top"]["hvps"]
    spent = result["trace"]["hvps"] + result["top"]["hvps"] + result["density"]["hvps"]
    assert result["hvps"] == spent
    assert "(same run)" in next(line for line in proc.stdout.splitlines() if "smallest eigenvalue" in line)


def test_analyze_checkpoint_file_with_model_and_data(run_dir):
    proc = run(
        "analyze",
        str(run_dir / "final.pt"),
        "--model",
        "mlp",
        "--data",
        "builtin:synthetic",
        "--what",
        "trace",
        "--params",
        "weight",
        "--json",
        "-",
        "--quiet",
    )
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert [b["name"] for b in result["trace"]["blocks"]] and all(
        "weight" in b["name"] for b in result["trace"]["blocks"]
    )


def test_compare_reports_a_paired_difference(run_dir, tmp_path):
    out = tmp_path / "c.json"
    proc = run(
        "compare",
        str(run_dir / "epoch_001.pt"),
        str(run_dir / "final.pt"),
        "--model",
        "mlp",
        "--data",
        "builtin:synthetic",
        "--max-hvps",
        "60",
        "--json",
        str(out),
        "--quiet",
    )
    assert "paired CI tighter by" in proc.stdout and "same probes" in proc.stdout
    result = json.loads(out.read_text())
    pair = result["pairs"][0]
    assert pair["stderr"] > 0 and pair["independent_stderr"] > 0
    assert pair["difference"] == pytest.approx(
        result["traces"][1]["estimate"] - result["traces"][0]["estimate"]
    )


def test_curve_gives_one_point_per_epoch(run_dir, tmp_path):
    proc = run("curve", str(run_dir), "--json", str(tmp_path / "curve.json"), "--quiet")
    curves = json.loads((tmp_path / "curve.json").read_text())
    points = curves[run_dir.name]
    assert [p["epoch"] for p in points] == [1, 2]
    assert all(p["lambda_max"] > 0 and p["trace_stderr"] >= 0 for p in points)
    assert "λmax" in proc.stdout


def test_help_has_examples(capsys):
    from hessian_tools.app.cli import main

    for command in ("demo", "analyze", "compare", "curve", "bound", "train"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "examples:" in capsys.readouterr().out, command


def test_missing_checkpoint(tmp_path):
    proc = run(
        "analyze", str(tmp_path / "nope.pt"), "--model", "mlp", "--data", "builtin:synthetic", check=False
    )
    assert_one_line_error(proc, 1, "not found")


def test_checkpoint_of_another_architecture(run_dir):
    proc = run(
        "analyze",
        str(run_dir / "final.pt"),
        "--model",
        "cnn",
        "--data",
        "builtin:digits",
        "--what",
        "trace",
        check=False,
    )
    assert_one_line_error(proc, 1, "does not fit the model")
    assert "mismatch" in proc.stderr or "missing" in proc.stderr


def test_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("hello, I am not a checkpoint")
    proc = run("analyze", str(bad), "--model", "mlp", "--data", "builtin:synthetic", check=False)
    assert_one_line_error(proc, 1, "not a")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"weight": _Exploit()}, evil)
    proc = run(
        "analyze", str(evil), "--model", "mlp", "--data", "builtin:synthetic", cwd=tmp_path, check=False
    )
    assert_one_line_error(proc, 1, "refused")
    assert not (tmp_path / "pwned.txt").exists()


def test_unknown_what_is_a_usage_error(run_dir):
    proc = run("analyze", str(run_dir), "--what", "trace,vibes", check=False)
    assert_one_line_error(proc, 2, "vibes")


def test_nonexistent_model_import_path(run_dir):
    proc = run(
        "analyze",
        str(run_dir / "final.pt"),
        "--model",
        "no_such_pkg.nets:make",
        "--data",
        "builtin:synthetic",
        check=False,
    )
    assert_one_line_error(proc, 1, "no_such_pkg")


def test_bad_option_value_is_argparse_usage_error():
    proc = run("analyze", "x.pt", "--dtype", "float16", check=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_analyze_distributed_under_torchrun_matches_single_process(run_dir, tmp_path):
    """Two gloo ranks on uneven shards give the single-process trace (same probes) to 1e-6."""
    single = tmp_path / "single.json"
    run("analyze", str(run_dir), "--what", "trace", "--batch-size", "64", "--json", str(single), "--quiet")
    multi = tmp_path / "multi.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "hessian_tools",
            "analyze",
            str(run_dir),
            "--what",
            "trace",
            "--batch-size",
            "64",
            "--distributed",
            "--json",
            str(multi),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("Hessian trace") == 1  # rank 0 alone prints
    a, b = json.loads(single.read_text())["trace"], json.loads(multi.read_text())["trace"]
    assert b["estimate"] == pytest.approx(a["estimate"], rel=1e-6) and b["hvps"] == a["hvps"]


def test_bound_isotropic_on_a_run_folder(run_dir, tmp_path):
    out = tmp_path / "b.json"
    proc = run(
        "bound",
        str(run_dir),
        "--posterior",
        "isotropic",
        "--samples",
        "4",
        "--sigmas",
        "0.01,0.1",
        "--json",
        str(out),
        "--quiet",
    )
    assert (
        "PAC-Bayes bound" in proc.stdout and "not a certificate" in proc.stdout and "isotropic" in proc.stdout
    )
    c = json.loads(out.read_text())["certificate"]
    assert 0 <= c["mc_error"] <= c["mc_upper"] <= c["bound"] and c["sigma"] in (0.01, 0.1) and c["n_mc"] == 4


def test_bound_optimised_with_the_pretrained_prior(run_dir, tmp_path):
    out = tmp_path / "b.json"
    proc = run("bound", str(run_dir), "--steps", "40", "--samples", "100", "--json", str(out), "--quiet")
    assert "pre-trained prior (the fine-tuning start); bound on the training set, n=205" in proc.stdout
    c = json.loads(out.read_text())["certificate"]
    assert c["kind"] == "posterior_certificate" and c["prior"] == "pre-trained" and c["n"] == 205
    assert c["n_mc"] == 100 and c["steps"] == 40 and not c["optimise_mean"]
    assert 0 <= c["mc_error"] <= c["mc_upper"] <= c["bound"] <= 1


def test_bound_with_a_data_dependent_prior_holds_on_the_test_set(run_dir, tmp_path):
    """The issue's rule: the bound never falls below the measured test error of what it certifies. The
    certified network is one drawn from the posterior Q, so the rule is checked on Q's test error (from
    its Monte-Carlo draws, with their 95% interval); the checkpoint W itself is not what is certified
    (with a data-dependent prior Q's mean is optimised away from W), so its test error is not compared."""
    out = tmp_path / "b.json"
    proc = run(
        "bound",
        str(run_dir),
        "--prior-split",
        "0.5",
        "--prior-epochs",
        "3",
        "--steps",
        "60",
        "--samples",
        "200",
        "--delta",
        "0.1",
        "--json",
        str(out),
        "--quiet",
    )
    label = (
        "data-dependent prior: trained on 50% of the training set (n_prior=102, 3 epochs of the run's recipe)"
    )
    assert label in proc.stdout and "bound on the other 50%, n=103" in proc.stdout
    assert "posterior train error (MC)" in proc.stdout and "KL(Q‖P)" in proc.stdout
    c = json.loads(out.read_text())["certificate"]
    assert c["prior"] == "data-dependent" and c["n_prior"] + c["n"] == 205 and c["optimise_mean"]
    assert c["delta"] == pytest.approx(0.1) and c["delta_bound"] + c["delta_mc"] == pytest.approx(0.1)
    assert c["n_mc"] == 200 and c["n_test"] == 51 and c["bound"] < 1
    assert c["posterior_test_error"] + 1.96 * c["posterior_test_stderr"] <= c["bound"]
    assert "CERTIFICATE VIOLATED" not in proc.stdout


@pytest.mark.parametrize("fraction", ["0", "1", "1.5", "-0.2"])
def test_bound_bad_prior_split_is_one_line(run_dir, fraction):
    proc = run("bound", str(run_dir), "--prior-split", fraction, check=False)
    assert_one_line_error(proc, 2, "--prior-split", "between 0 and 1")


def test_bound_prior_split_on_a_bare_state_dict_asks_for_a_run_folder(run_dir):
    proc = run(
        "bound",
        str(run_dir / "final.pt"),
        "--model",
        "mlp",
        "--data",
        "builtin:synthetic",
        "--prior",
        str(run_dir / "init.pt"),
        "--prior-split",
        "0.5",
        check=False,
    )
    assert_one_line_error(proc, 2, "--prior-split", "recipe", "run folder")


def test_bound_prior_split_too_large_for_the_data_is_one_line(run_dir):
    proc = run(
        "bound", str(run_dir), "--prior-split", "0.99", "--prior-epochs", "1", "--steps", "5", check=False
    )
    assert_one_line_error(proc, 1, "n ≥")


def test_compare_with_bounds_adds_each_checkpoints_certificate(run_dir, tmp_path):
    other = tmp_path / "mlp-nso"
    run(
        "train",
        "--model",
        "mlp",
        "--data",
        "builtin:synthetic",
        "--epochs",
        "2",
        "--lr",
        "0.1",
        "--method",
        "nso",
        "--sigma",
        "0.05",
        "--out",
        str(other),
        "--quiet",
    )
    out = tmp_path / "c.json"
    proc = run(
        "compare",
        str(run_dir),
        str(other),
        "--bound",
        "--prior-split",
        "0.5",
        "--prior-epochs",
        "2",
        "--steps",
        "30",
        "--samples",
        "100",
        "--max-hvps",
        "60",
        "--json",
        str(out),
        "--quiet",
    )
    assert "bound (or difference)" in proc.stdout and "data-dependent prior: trained on 50%" in proc.stdout
    data = json.loads(out.read_text())
    bounds = {name: c["bound"] for name, c in data["certificates"].items()}
    assert len(bounds) == 2 and all(0 < b < 1 for b in bounds.values())
    pair = next(line for line in proc.stdout.splitlines() if line.startswith("mlp-nso/final.pt − "))
    assert f"{bounds['mlp-nso/final.pt'] - bounds['mlp-sgd/final.pt']:+.4f}" in pair
    assert data["comparison"]["kind"] == "comparison"


def test_analyze_diag_matches_the_exact_diagonal(run_dir, tmp_path):
    """``analyze --what diag`` against diag(∇²) by torch.func.hessian: with fewer HVPs than parameters
    each block's Σ H_ii lies within 4 of its standard errors; with max_hvps ≥ dim XDiag is exact."""
    import torch.nn.functional as F
    from helpers import exact_hessian

    from hessian_tools.app.runs import build_run_model
    from hessian_tools.app.zoo.data import load_data

    model = build_run_model(run_dir, "final.pt")
    X, y = load_data("builtin:synthetic").train
    exact = torch.diagonal(exact_hessian(model, F.cross_entropy, X, y))
    sizes = [p.numel() for p in model.parameters()]
    out = tmp_path / "d.json"
    proc = run("analyze", str(run_dir), "--what", "diag", "--max-hvps", "300", "--json", str(out), "--quiet")
    assert "diag(H) head.weight (192)" in proc.stdout and "diag(H) total (= trace)" in proc.stdout
    d = json.loads(out.read_text())["diagonal"]
    assert (
        d["kind"] == "diagonal" and d["method"] == "xdiag" and d["hvps"] <= 300 and len(d["estimate"]) == 899
    )
    for block, true_block in zip(d["blocks"], torch.split(exact, sizes)):
        assert abs(block["sum"] - float(true_block.sum())) <= 4 * block["sum_stderr"], block
    assert abs(d["trace"] - float(exact.sum())) <= 4 * d["trace_stderr"]
    run("analyze", str(run_dir), "--what", "diag", "--max-hvps", "1000", "--json", str(out), "--quiet")
    estimate = torch.tensor(json.loads(out.read_text())["diagonal"]["estimate"], dtype=torch.float64)
    assert torch.allclose(estimate, exact, rtol=1e-3, atol=1e-6)


def test_bound_without_prior_is_a_usage_error(run_dir):
    proc = run(
        "bound", str(run_dir / "final.pt"), "--model", "mlp", "--data", "builtin:synthetic", check=False
    )
    assert_one_line_error(proc, 2, "--prior")


def test_matrix_sensing_front_end(tmp_path):
    run("matrix-sensing", "--d", "12", "--r", "2", "--steps", "60", "--out", str(tmp_path), "--quiet")
    data = json.loads((tmp_path / "matrix_sensing.json").read_text())
    assert (tmp_path / "matrix_sensing.png").stat().st_size > 0
    assert set(data["summary"]) == {"gd", "wp", "nso"}
    assert all(
        len(s["final_val_loss"]) == 1 and s["hessian_trace_mean"] > 0 for s in data["summary"].values()
    )


@pytest.mark.slow
def test_demo_quick_writes_report_results_and_figures(tmp_path):
    out = tmp_path / "demo"
    proc = run("demo", "--quick", "--out", str(out), "--quiet")
    assert "report:" in proc.stdout and "NSO vs SGD" in proc.stdout
    report = (out / "report.md").read_text()
    assert "| method |" in report and "PAC-Bayes bound" in report
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == {"sgd", "sam", "nso"}
    assert all(r["analysis"]["trace"]["hvps"] > 0 and r["curve"] for r in results["runs"])
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert {
        "sharpness_curves.png",
        "trace_lambda_bars.png",
        "density.png",
        "stability.png",
        "bound_vs_trace.png",
    } <= set(pngs), pngs
    # every run is certified with the optimised posterior and a data-dependent prior, and no certificate fails
    certificates = [r["analysis"]["certificate"] for r in results["runs"]]
    assert all(c["kind"] == "posterior_certificate" and c["prior"] == "data-dependent" for c in certificates)
    assert results["violated_certificates"] == [] and "## PAC-Bayes certificates (every run)" in report
    assert all(c["posterior_test_error"] <= c["bound"] for c in certificates)
    # Re-running resumes: the saved analyses are reused (not rewritten), the same numbers come back.
    saved = {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    again = run("demo", "--quick", "--out", str(out), "--quiet")
    assert "report:" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")} == saved
    assert (
        json.loads((out / "results.json").read_text())["runs"][0]["analysis"]
        == results["runs"][0]["analysis"]
    )
