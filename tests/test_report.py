"""The numbers in the demo report's tables, against values computed by hand from constructed runs."""

import math

import numpy as np

from hessian_tools.app.report import demo_markdown, method_summary
from hessian_tools.stats import t95

# trace, λmax and test accuracy per (method, seed)
RUNS = {
    ("sgd", 0): (100.0, 40.0, 0.90), ("sgd", 1): (200.0, 60.0, 0.92), ("sgd", 2): (400.0, 80.0, 0.94),
    ("nso", 0): (90.0, 38.0, 0.91), ("nso", 1): (176.0, 57.0, 0.92), ("nso", 2): (364.0, 78.0, 0.93),
}


def _results():
    runs = []
    for (method, seed), (trace, lmax, acc) in RUNS.items():
        analysis = {"kind": "checkpoint_analysis", "name": f"{method}-s{seed}", "dim": 10, "n_train": 250,
                    "n_test": 646, "train_loss": 0.1, "train_acc": 1.0, "test_loss": 0.3, "test_acc": acc, "seed": 0,
                    "hvps": 100, "wall_time_s": 1.0,
                    "trace": {"kind": "trace", "estimate": trace, "stderr": 1.0, "hvps": 50, "method": "hutchpp",
                              "seed": 0, "n_probes": 30},
                    "top": {"kind": "eigen", "values": [lmax], "residuals": [1e-5], "converged": True, "hvps": 10,
                            "which": "LA", "method": "lanczos", "tol": 1e-4, "seed": 0}}
        runs.append({"name": f"{method}-s{seed}", "method": method, "seed": seed, "analysis": analysis})
    config = {"model": "resnet", "seeds": [0, 1, 2], "per_class": 50, "finetune_epochs": 10, "lr": 0.02,
              "schedule": "cosine", "batch_size": 32, "sigma": 0.03, "k": 1, "rho": 0.05}
    return {"runs": runs, "config": config, "pretrain": {"test_acc": 1.0}, "data": {"n_train": 250, "n_test": 646},
            "wall_time_s": 1.0}


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
