"""The GGN as control variate for tr(H): variance per probe and cost to reach 1%, with and without it.

On the CNN, ResNet and MLP of bench_peers.py (same seeded, briefly trained models, same uneven batches
of the digits, float64), for seeds 0–4:

* the per-probe variance of Hutchinson's samples zᵀHz (plain) and zᵀ(H − G)z (control variate), from
  the SAME Rademacher probes z (``--probes`` per seed);
* the HVP-equivalents to reach a 95% half-width of 1% of tr(H), predicted from those variances:
  plain m_H = ⌈(1.96 σ_H / (0.01 tr H))²⌉ HVPs; with the control variate C + 2·m_R (C exact-trace
  passes, then one H product and one G product per residual probe);
* measured wall time per H product, per G product and for the exact tr(G), and the same costs in seconds;
* real runs of ``ht.trace(H, rtol=0.01, control_variate=G, seed=s)`` (budget ``--run-budget``):
  HVP-equivalents spent and the true relative error.

Truth: these networks are piecewise linear in every single parameter (ReLU, pooling, conv, linear,
eval-mode BatchNorm), so diag(H) = diag(G) and tr(H) = tr(G) exactly (see bench_peers.py); the mean of
the residual samples is reported as a check (it must be 0 within its error bar).

    python analysis/bench_control_variate.py --out figures           # full run (~5 min on 2 cores)
    python analysis/bench_control_variate.py --quick --out /tmp/cv   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_peers  # noqa: E402

import hessian_tools as ht  # noqa: E402
from hessian_tools.app.io import atomic_write_json, atomic_write_text  # noqa: E402
from hessian_tools.estimators.probes import rademacher  # noqa: E402
from hessian_tools.seeding import seeded_generator  # noqa: E402
from hessian_tools.stats import mean_and_stderr  # noqa: E402

TARGET = 0.01
Z95 = 1.96
COLUMNS = [
    "model",
    "params",
    "C",
    "tr(H) = tr(G) (exact)",
    "residual mean ± s.e. (check: 0)",
    "var/probe zᵀHz",
    "var/probe zᵀ(H−G)z",
    "variance ratio",
    "HVP-eq. to 1%: plain",
    "HVP-eq. to 1%: control variate",
    "cost ratio",
    "s to 1%: plain",
    "s to 1%: control variate",
]
RUN_COLUMNS = [
    "model",
    "seed",
    "HVP-eq. spent",
    "residual probes",
    "estimate ± 1.96 s.e.",
    "true rel. error",
    "converged",
    "seconds",
]


def probes_needed(variance: float, trace: float) -> int:
    """Probes whose mean has 1.96·stderr ≤ TARGET·|trace| (at least 2)."""
    return max(2, math.ceil((Z95 / (TARGET * abs(trace))) ** 2 * variance))


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def per_probe_samples(H, G, seeds: Sequence[int], probes: int) -> dict:
    """zᵀHz and zᵀGz for ``probes`` Rademacher probes per seed, and the seconds per product."""
    qH, qG, seconds_H, seconds_G = [], [], 0.0, 0.0
    for seed in seeds:
        generator, _ = seeded_generator(seed)
        Z = rademacher(H.dim, probes, generator)
        HZ, tH = timed(lambda: H.matmat(Z))
        GZ, tG = timed(lambda: G.matmat(Z))
        qH.append((Z * HZ).sum(0))
        qG.append((Z * GZ).sum(0))
        seconds_H, seconds_G = seconds_H + tH, seconds_G + tG
    n = probes * len(seeds)
    return {"H": torch.stack(qH), "G": torch.stack(qG), "s_per_H": seconds_H / n, "s_per_G": seconds_G / n}


def measure(name: str, spec, seeds: Sequence[int], probes: int, run_budget: int) -> dict:
    problem = bench_peers.build_problem(name, spec, dtype=torch.float64)
    H = ht.HessianOperator(problem.model, problem.criterion, problem.batches)
    G = ht.GGNOperator.from_risk(H.risk, chunk_size=H.chunk_size)
    exact, exact_seconds = timed(lambda: ht.ggn_trace(G))
    q = per_probe_samples(H, G, seeds, probes)
    residual = q["H"] - q["G"]
    var_H = float(q["H"].var(dim=1).mean())  # per-seed sample variances, averaged over seeds
    var_R = float(residual.var(dim=1).mean())
    residual_mean, residual_se = mean_and_stderr(residual.reshape(-1))
    m_H, m_R = probes_needed(var_H, exact.estimate), probes_needed(var_R, exact.estimate)
    row = {
        "model": name,
        "params": H.dim,
        "C": exact.hvps,
        "trace": exact.estimate,
        "residual_mean": residual_mean,
        "residual_se": residual_se,
        "var_H": var_H,
        "var_R": var_R,
        "var_H_by_seed": q["H"].var(dim=1).tolist(),
        "var_R_by_seed": residual.var(dim=1).tolist(),
        "hvps_plain": m_H,
        "hvps_cv": exact.hvps + 2 * m_R,
        "residual_probes": m_R,
        "s_per_H": q["s_per_H"],
        "s_per_G": q["s_per_G"],
        "s_exact_trace": exact_seconds,
        "seconds_plain": m_H * q["s_per_H"],
        "seconds_cv": exact_seconds + m_R * (q["s_per_H"] + q["s_per_G"]),
    }
    row["runs"] = [control_variate_run(H, G, exact.estimate, seed, run_budget) for seed in seeds]
    return row


def control_variate_run(H, G, truth: float, seed: int, budget: int) -> dict:
    result, seconds = timed(lambda: ht.trace(H, rtol=TARGET, max_hvps=budget, control_variate=G, seed=seed))
    return {
        "seed": seed,
        "hvps": result.hvps,
        "probes": result.n_probes,
        "estimate": result.estimate,
        "halfwidth": Z95 * result.stderr,
        "rel_error": abs(result.estimate - truth) / abs(truth),
        "converged": result.converged,
        "seconds": seconds,
    }


def md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def summary_rows(rows) -> list[list[str]]:
    out = []
    for r in rows:
        out.append(
            [
                r["model"],
                r["params"],
                r["C"],
                f"{r['trace']:.8g}",
                f"{r['residual_mean']:.3g} ± {r['residual_se']:.2g}",
                f"{r['var_H']:.4g}",
                f"{r['var_R']:.4g}",
                f"{r['var_H'] / r['var_R']:.3g}×",
                r["hvps_plain"],
                f"{r['hvps_cv']} ({r['C']} + 2·{r['residual_probes']})",
                f"{r['hvps_plain'] / r['hvps_cv']:.3g}×",
                f"{r['seconds_plain']:.3g}",
                f"{r['seconds_cv']:.3g}",
            ]
        )
    return out


def run_rows(rows) -> list[list[str]]:
    return [
        [
            r["model"],
            run["seed"],
            run["hvps"],
            run["probes"],
            f"{run['estimate']:.6g} ± {run['halfwidth']:.2g}",
            f"{100 * run['rel_error']:.3f}%",
            run["converged"],
            f"{run['seconds']:.2f}",
        ]
        for r in rows
        for run in r["runs"]
    ]


def write_report(results: dict, out: Path) -> None:
    rows = results["rows"]
    timing = [
        [
            r["model"],
            f"{1e3 * r['s_per_H']:.1f}",
            f"{1e3 * r['s_per_G']:.1f}",
            f"{r['s_per_G'] / r['s_per_H']:.2f}",
            f"{r['s_exact_trace']:.2f}",
            f"{r['s_exact_trace'] / r['s_per_H']:.0f} (counted as {r['C']})",
        ]
        for r in rows
    ]
    text = "\n\n".join(
        [
            "# tr(H) with the GGN as control variate",
            f"{results['date']}; torch {torch.__version__}; {results['threads']} thread(s); load average "
            f"at start {results['load_start'][0]:.2f}, end {results['load_end'][0]:.2f}; "
            f"`{results['command']}`; seeds {results['seeds']}, {results['probes']} Rademacher probes per "
            "seed (the same probes for both columns); float64. Variances per probe are the per-seed sample "
            "variances averaged over the seeds. HVP-equivalents to 1% (95% half-width ≤ 1% of tr H) are "
            "predicted from them: plain m_H; control variate C + 2·m_R (C exact-trace passes counted as one "
            "HVP each, then one H and one G product per residual probe). Seconds to 1% use the measured "
            "time per product and of the exact trace.",
            "## Variance per probe and cost to 1%",
            md_table(COLUMNS, summary_rows(rows)),
            "## Time per product (ms, per probe in one block) and of the exact tr(G) (s)",
            "The HVP-equivalent counts above charge one HVP per G product and per exact-trace pass; the "
            "last columns say what that costs in time (the exact trace's per-sample products are dearer "
            "for the wide MLP).",
            md_table(
                [
                    "model",
                    "H product (ms)",
                    "G product (ms)",
                    "G / H time",
                    "exact tr(G) (s)",
                    "exact tr(G) in H-product times",
                ],
                timing,
            ),
            f"## Real runs: `ht.trace(H, rtol=0.01, max_hvps={results['run_budget']}, "
            "control_variate=G, seed=s)`",
            md_table(RUN_COLUMNS, run_rows(rows)),
        ]
    )
    atomic_write_text(out / "bench_control_variate.md", text + "\n")
    atomic_write_json(out / "bench_control_variate.json", results)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models (smoke test)")
    parser.add_argument("--out", default="figures", help="folder for bench_control_variate.md/.json")
    parser.add_argument("--models", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--probes", type=int, default=None, help="probes per seed (default 32, quick 8)")
    parser.add_argument(
        "--run-budget", type=int, default=None, help="max_hvps of the real runs (default 1000, quick 60)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = bench_peers.QUICK if args.quick else bench_peers.FULL
    names = [m.strip() for m in args.models.split(",")] if args.models else list(settings.models)
    seeds = list(range(2 if args.quick else 5))
    probes = args.probes or (8 if args.quick else 32)
    run_budget = args.run_budget or (60 if args.quick else 1000)
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "threads": args.threads,
        "load_start": os.getloadavg(),
        "seeds": seeds,
        "probes": probes,
        "run_budget": run_budget,
        "command": "python analysis/bench_control_variate.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    results["rows"] = []
    for name in names:
        row, seconds = timed(lambda: measure(name, settings.models[name], seeds, probes, run_budget))
        print(f"{name}: {seconds:.1f} s", flush=True)
        results["rows"].append(row)
    results["load_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(results, out)
    return results


if __name__ == "__main__":
    main()
