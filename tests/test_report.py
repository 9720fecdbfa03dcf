"""The numbers in the demo report's tables, against values computed by hand from constructed runs."""

import math

import numpy as np

from hessian_tools.app.report import demo_markdown, method_summary
from hessian_tools.stats import t95

# trace, λmax and test accuracy per (method, seed)
RUNS = {
    ("sgd", 0): (100.0, 40.0, 0.90),
    ("sgd", 1): (200.0, 60.0, 0.92),
    ("sgd", 2): (400.0, 80.0, 0.94),
    ("nso", 0): (90.0, 38.0, 0.91),
    ("nso", 1): (176.0, 57.0, 0.92),
    ("nso", 2): (364.0, 78.0, 0.93),
}


def _results():
    runs = []
    for (method, seed), (trace, lmax, acc) in RUNS.items():
        analysis = {
            "kind": "checkpoint_analysis",
            "name": f"{method}-s{seed}",
            "dim": 10,
            "n_train": 250,
            "n_test": 646,
            "train_loss": 0.1,
            "train_acc": 1.0,
            "test_loss": 0.3,
            "test_acc": acc,
            "seed": 0,
            "hvps": 100,
            "wall_time_s": 1.0,
            "trace": {
                "kind": "trace",
                "estimate": trace,
                "stderr": 1.0,
                "hvps": 50,
                "method": "hutchpp",
                "seed": 0,
                "n_probes": 30,
            },
            "top": {
                "kind": "eigen",
                "values": [lmax],
                "residuals": [1e-5],
                "converged": True,
                "hvps": 10,
                "which": "LA",
                "method": "lanczos",
                "tol": 1e-4,
                "seed": 0,
            },
        }
        runs.append({"name": f"{method}-s{seed}", "method": method, "seed": seed, "analysis": analysis})
    config = {
        "model": "resnet",
        "seeds": [0, 1, 2],
        "per_class": 50,
        "finetune_epochs": 10,
        "lr": 0.02,
        "schedule": "cosine",
        "batch_size": 32,
        "sigma": 0.03,
        "k": 1,
        "rho": 0.05,
    }
    return {
        "runs": runs,
        "config": config,
        "pretrain": {"test_acc": 1.0},
        "data": {"n_train": 250, "n_test": 646},
        "wall_time_s": 1.0,
    }


def test_method_summary_is_the_t_interval_over_seeds():
    summary = method_summary(_results()["runs"])
    traces = [100.0, 200.0, 400.0]
    mean, half, values = summary["sgd"]["trace"]
    assert values == traces and mean == np.mean(traces)
    assert math.isclose(half, t95(3) * np.std(traces, ddof=1) / math.sqrt(3), rel_tol=1e-12)


def test_nso_vs_sgd_row_shows_the_paired_and_unpaired_changes():
    report = demo_markdown(_results())
    changes = np.array([90 / 100, 176 / 200, 364 / 400]) - 1  # −10%, −12%, −9%
    paired = f"{100 * changes.mean():+.1f}% ± {100 * t95(3) * changes.std(ddof=1) / math.sqrt(3):.1f}%"
    row = next(line for line in report.splitlines() if line.startswith("| NSO vs SGD | trace |"))
    assert paired in row and "| 3/3 |" in row
    # the unpaired interval is dominated by the seed-to-seed spread and is much wider
    unpaired = row.split("|")[5].strip()
    assert float(unpaired.split("±")[1].rstrip("% ")) > 10 * float(paired.split("±")[1].rstrip("%"))


# --------------------------------------------------------------------------- the certificates
BOUNDS = {
    ("sgd", 0): 0.30,
    ("sgd", 1): 0.26,
    ("sgd", 2): 0.34,
    ("sam", 0): 0.31,
    ("sam", 1): 0.25,
    ("sam", 2): 0.33,
    ("nso", 0): 0.27,
    ("nso", 1): 0.25,
    ("nso", 2): 0.30,
}


def _certificate(bound, posterior_test_error=0.05):
    return {
        "kind": "posterior_certificate",
        "bound": bound,
        "delta": 0.05,
        "delta_bound": 0.04,
        "delta_mc": 0.01,
        "n": 125,
        "kl": 0.4,
        "mc_error": 0.10,
        "mc_stderr": 0.001,
        "mc_upper": 0.12,
        "n_mc": 1000,
        "lambdas": [0.00794],
        "grid_cost": 3.71,
        "posterior_test_error": posterior_test_error,
        "posterior_test_stderr": 0.001,
        "test_error": 0.036,
        "mean_test_error": 0.04,
        "n_test": 646,
        "n_mc_test": 200,
        "prior": "data-dependent",
        "prior_split": 0.5,
        "n_prior": 125,
        "variance": "layer",
        "optimise_mean": True,
        "seed": 0,
        "steps": 600,
        "evaluations": 1800,
        "wall_time_s": 30.0,
    }


def _certified_results(violate=None):
    results = _results()
    runs = [r for r in results["runs"] if r["method"] == "sgd"]
    runs += [{**r, "method": "sam", "name": r["name"].replace("sgd", "sam")} for r in runs]
    runs += [r for r in results["runs"] if r["method"] == "nso"]
    runs = [{**r, "analysis": dict(r["analysis"])} for r in runs]
    for run in runs:
        error = 0.5 if run["name"] == violate else 0.05
        run["analysis"]["certificate"] = _certificate(BOUNDS[run["method"], run["seed"]], error)
    results["runs"] = runs
    results["config"] = dict(results["config"], prior_split=0.5, prior_epochs=20)
    return results


def test_paired_bound_differences_are_the_t_interval_of_the_per_seed_differences():
    from hessian_tools.app.report import paired_bound_difference

    runs = _certified_results()["runs"]
    for base in ("sgd", "sam"):
        differences = np.array([BOUNDS["nso", s] - BOUNDS[base, s] for s in range(3)])
        mean, half, lower, count = paired_bound_difference(runs, "nso", base)
        assert math.isclose(mean, differences.mean(), abs_tol=1e-15) and count == 3
        assert math.isclose(half, t95(3) * differences.std(ddof=1) / math.sqrt(3), rel_tol=1e-12)
        assert lower == int((differences < 0).sum())
    assert paired_bound_difference([r for r in runs if r["method"] != "sam"], "nso", "sam") is None


def test_demo_report_lists_every_certificate_with_its_parts_and_the_paired_differences():
    report = demo_markdown(_certified_results())
    assert "## PAC-Bayes certificates (every run)" in report and "CERTIFICATE VIOLATED" not in report
    assert "data-dependent prior: trained on 50% of the training set (n_prior=125, 20 epochs" in report
    row = next(line for line in report.splitlines() if line.startswith("| nso-s1 | 0.25 |"))
    assert "0.1 (≤ 0.12)" in row and "| 125 |" in row and "0.04 + 0.01" in row and "0.05 ± 0.002" in row
    assert "| 0.036 |" in row and "| 30.0 |" in row
    differences = np.array([BOUNDS["nso", s] - BOUNDS["sgd", s] for s in range(3)])  # −0.03, −0.01, −0.04
    line = next(line for line in report.splitlines() if line.startswith("| NSO − SGD |"))
    assert f"{differences.mean():.4g}" in line and "| 3/3 |" in line


def test_a_violated_certificate_is_flagged_loudly():
    report = demo_markdown(_certified_results(violate="sam-s1"))
    banner = [line for line in report.splitlines() if "CERTIFICATE VIOLATED" in line]
    assert len(banner) == 1 and "sam-s1" in banner[0] and "nso" not in banner[0]
    from hessian_tools.app.analyses import bound_rows

    rows = bound_rows({"certificate": _certificate(0.25, 0.26)})
    assert any(row[0] == "CERTIFICATE VIOLATED" for row in rows)
    assert not any(
        row[0] == "CERTIFICATE VIOLATED" for row in bound_rows({"certificate": _certificate(0.25, 0.2)})
    )


def test_comparison_rows_with_bounds_add_the_bound_columns_and_the_pair_difference():
    from hessian_tools.app.report import comparison_header, comparison_rows

    trace = {"kind": "trace", "estimate": 10.0, "stderr": 0.1, "hvps": 50}
    comparison = {
        "names": ["a", "b"],
        "traces": [trace, dict(trace, estimate=8.0)],
        "pairs": [
            {
                "a": "a",
                "b": "b",
                "difference": -2.0,
                "stderr": 0.05,
                "relative_change": -0.2,
                "relative_change_stderr": 0.005,
                "independent_stderr": 0.14,
                "tightening": 2.8,
            }
        ],
    }
    rows = comparison_rows(comparison, {"a": _certificate(0.30), "b": _certificate(0.26)})
    assert len(comparison_header(True)) == len(rows[0]) == len(rows[2]) == 10
    assert rows[0][6:] == ["0.3", "0.05 ± 0.002", "0.4", "125"] and rows[2][6] == "-0.0400"
    assert len(comparison_rows(comparison)[0]) == 6
