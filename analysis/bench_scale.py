"""Scale benchmark: a torchvision-layout ResNet-18 (11.2 M parameters) on 128 CIFAR-shaped images and a
transformer text classifier with dict inputs — time and peak memory of a gradient, of one HVP (ours,
each backend and chunking, and PyHessian) and of the end-to-end ``hessian-tools analyze`` run.

For each model (factories in analysis/scale_models.py; the checkpoint is the seeded model after a
few training steps, written once per run):

  gradient   one full-data gradient by plain autograd: the unit every HVP is measured in
  ours       hessian_tools.HessianOperator.matmat on a block of K probes, per backend (torch.func
             forward-over-reverse vmap, autograd double backward) and chunk size: time per probe
  PyHessian  pyhessian.hessian(...).dataloader_hv_product (one forward, backward with create_graph
             and double backward per HVP and batch); where the data is one batch, also its
             single-batch mode (data=(X, y): one graph, reused by every HVP)
  cli        hessian-tools analyze CKPT --model M --data D --what trace,eigs --max-hvps 48: wall time
             and peak RSS next to 48 PyHessian HVPs (the issue's target: ≤ 2.5 GB, ≤ 3× the 48 HVPs)

Every measurement runs in a fresh Python process that reports its own peak resident set (VmHWM of
/proc/self/status, bench_peers.status_mb): the model, the data and the one thing measured, nothing
left over from another. Timings are wall clock, medians over repeats, and only their ratios to the
gradient measured in the same run mean anything on a shared machine (the load average is recorded
next to every row). ``--quick`` runs tiny sizes, and all of a model's measurements in one process
(peaks then accumulate), in well under a minute.

    python analysis/bench_scale.py --out figures            # full run (≈20 min on 2 cores)
    python analysis/bench_scale.py --quick --out /tmp/bs    # smoke test
    python analysis/bench_scale.py --models resnet18 --only cli --out /tmp/bs   # just the analyze run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import scale_models as SM  # noqa: E402
from bench_peers import fmt, log, machine_info, md_table, status_mb  # noqa: E402

import hessian_tools as ht  # noqa: E402
from hessian_tools.app.zoo.data import batches as make_batches  # noqa: E402
from hessian_tools.app.zoo.models import count_parameters, load_factory  # noqa: E402
from hessian_tools.operators.empirical_risk import call_model, model_output  # noqa: E402

CLI_BATCH = 512  # the command line's default --batch-size: 128 images are one batch
RSS_TARGET_MB = 2.5e9 / 2**20  # 2.5 GB in MiB (status_mb's unit)
CLI_TIME_FACTOR = 3.0  # target: the analyze run takes ≤ 3× what 48 PyHessian HVPs take
HVP_TARGET = 3.0  # target: one HVP costs ≤ 3 gradients
ROW_COLUMNS = [
    "measurement",
    "time (s)",
    "per HVP (s)",
    "× gradient",
    "peak RSS (MB)",
    "above loaded model+data (MB)",
    "repeats",
    "load (1 min)",
]


# ------------------------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class Probe:
    """One measurement: ``kind`` gradient | ours | pyhessian | pyhessian-batch | estimators."""

    label: str
    kind: str
    backend: str = ""
    K: int = 1
    chunk: int | None = None
    reps: int = 1
    dim_divisor: int = (
        1  # estimators: run at the model's dim / this (their cost and storage are linear in dim)
    )
    reuse: bool = True  # ours: HessianOperator(reuse_graphs=...)


@dataclasses.dataclass(frozen=True)
class Case:
    """A model, its data (both as ``file.py:function`` specs the CLI accepts) and what to measure."""

    model_spec: str
    data_spec: str
    num_classes: int
    probes: tuple
    pyhessian_hvps: (
        int  # the "48 PyHessian HVPs" line: measured for real when the PyHessian probe ran that many
    )
    cli_max_hvps: int = 48
    train_steps: int = 3
    lr: float = 0.01


def ours_probes(reps_one: int, blocks: Sequence[tuple[str, int, int | None]]) -> tuple:
    one = (
        Probe("ours func, 1 probe (vmap of 1)", "ours", "func", 1, 16, reps_one),
        Probe("ours autograd, 1 probe (double backward, kept graph)", "ours", "autograd", 1, 16, reps_one),
        Probe(
            "ours autograd, 1 probe (double backward, graph rebuilt: reuse_graphs=False)",
            "ours",
            "autograd",
            1,
            16,
            reps_one,
            reuse=False,
        ),
    )
    described = {
        ("func", True): "vmap of {c} columns at a time",
        # kept graphs are multiplied one column at a time: the batched backward is measured on rebuilt ones
        ("autograd", True): "batched double backward, {c} at a time, graph rebuilt",
        ("autograd", False): "kept graph, one double backward per column",
    }
    more = []
    for backend, K, chunk in blocks:
        batched = chunk is None or chunk > 1
        how = described[(backend, batched)].format(c=chunk or K)
        reuse = not (backend == "autograd" and batched)
        more.append(Probe(f"ours {backend}, block of {K} ({how})", "ours", backend, K, chunk, 1, reuse=reuse))
    return one + tuple(more)


SPEC = "analysis/scale_models.py:"
ESTIMATORS = Probe(
    "analyze's estimators alone (trace, top-5; free diagonal operator of the model's dim)", "estimators"
)
ESTIMATORS_16 = Probe(
    "analyze's estimators alone (trace, top-5; free diagonal operator of 1/16 the model's dim)",
    "estimators",
    dim_divisor=16,
)
FULL = {
    "transformer": Case(
        SPEC + "text_classifier",
        SPEC + "text_batches",
        2,
        (
            Probe("gradient (autograd)", "gradient", reps=5),
            *ours_probes(3, [("func", 4, 4), ("func", 16, 16), ("autograd", 16, 16), ("autograd", 16, 1)]),
            Probe("PyHessian dataloader_hv_product", "pyhessian", reps=48),
            ESTIMATORS,
        ),
        pyhessian_hvps=48,
        train_steps=30,
        lr=1e-3,
    ),
    "resnet18": Case(
        SPEC + "resnet18",
        SPEC + "cifar_images",
        10,
        (
            Probe("gradient (autograd)", "gradient", reps=3),
            *ours_probes(1, [("func", 4, 4), ("autograd", 4, 1)]),
            Probe("PyHessian dataloader_hv_product", "pyhessian", reps=3),
            Probe("PyHessian single batch (graph reused)", "pyhessian-batch", reps=3),
            ESTIMATORS_16,
        ),
        pyhessian_hvps=48,
        train_steps=3,
    ),
}
QUICK = {
    "transformer": Case(
        SPEC + "text_classifier_tiny",
        SPEC + "text_batches_tiny",
        2,
        (
            Probe("gradient (autograd)", "gradient", reps=2),
            *ours_probes(1, [("func", 4, 4), ("autograd", 4, 1)]),
            Probe("PyHessian dataloader_hv_product", "pyhessian", reps=3),
            ESTIMATORS,
        ),
        pyhessian_hvps=3,
        cli_max_hvps=6,
        train_steps=2,
        lr=1e-3,
    ),
    "resnet18": Case(
        SPEC + "resnet_tiny",
        SPEC + "cifar_images_tiny",
        10,
        (
            Probe("gradient (autograd)", "gradient", reps=2),
            *ours_probes(1, [("autograd", 2, 1)]),
            Probe("PyHessian dataloader_hv_product", "pyhessian", reps=2),
            Probe("PyHessian single batch (graph reused)", "pyhessian-batch", reps=2),
            ESTIMATORS,
        ),
        pyhessian_hvps=2,
        cli_max_hvps=6,
        train_steps=2,
    ),
}
QUICK_CLI_TIMEOUT = 120.0  # quick sizes: only a hung run is stopped


# ------------------------------------------------------------------------------------ problems
def training_batches(case: Case) -> list:
    """The data as the CLI streams it: a list of (inputs, targets); a ``{"train": (X, y), ...}``
    loader is cut into batches of the CLI's default size."""
    data = load_factory(case.data_spec)()
    if isinstance(data, dict):
        X, y = data["train"]
        return make_batches(X, y, CLI_BATCH)
    return list(data)


def build_model(case: Case, checkpoint: str | None = None) -> torch.nn.Module:
    model = load_factory(case.model_spec)(num_classes=case.num_classes)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
    return model.eval()


def logits(model, inputs) -> torch.Tensor:
    return model_output(call_model(model, inputs))


def write_checkpoint(case: Case, path: Path) -> dict:
    """The seeded model (``manual_seed(0)``) after ``train_steps`` passes of SGD/Adam over the data in
    train mode (BatchNorm statistics move off their initial values), saved as a plain state_dict."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(case)
    data = training_batches(case)
    opt = (
        torch.optim.Adam(model.parameters(), lr=case.lr)
        if case.lr < 0.01
        else torch.optim.SGD(model.parameters(), lr=case.lr, momentum=0.9)
    )
    model.train()
    losses = []
    for _ in range(case.train_steps):
        for inputs, y in data:
            opt.zero_grad()
            loss = F.cross_entropy(logits(model, inputs), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    torch.save(model.state_dict(), path)
    return {
        "params": count_parameters(model),
        "samples": sum(int(y.shape[0]) for _, y in data),
        "batches": "+".join(str(int(y.shape[0])) for _, y in data),
        "train_loss_first_last": [losses[0], losses[-1]],
    }


# ------------------------------------------------------------------------------------ one measurement
def _gradient(model, data) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    total, n = None, 0
    for inputs, y in data:
        g = torch.autograd.grad(F.cross_entropy(logits(model, inputs), y), params)
        flat = torch.cat([t.reshape(-1) for t in g]) * y.shape[0]
        total, n = (flat if total is None else total + flat), n + y.shape[0]
    return total / n


def _timed_calls(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure(probe: Probe, case: Case, checkpoint: str) -> dict:
    """Run one probe in this process; times in seconds, memory in MB (MiB)."""
    model = build_model(case, checkpoint)
    data = training_batches(case)
    out = {
        "label": probe.label,
        "config": dataclasses.asdict(probe),
        "load": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "base_mb": status_mb("VmRSS"),
    }
    peak_before = status_mb("VmHWM")
    gen = torch.Generator().manual_seed(0)
    if probe.kind == "gradient":
        _gradient(model, data)  # warm-up
        out["times"] = _timed_calls(lambda: _gradient(model, data), probe.reps)
        out["hvps_per_call"] = 0
    elif probe.kind == "ours":
        start = time.perf_counter()
        op = ht.HessianOperator(
            model,
            F.cross_entropy,
            data,
            backend=probe.backend,
            chunk_size=probe.chunk,
            reuse_graphs=probe.reuse,
        )
        out["construct_s"] = time.perf_counter() - start  # includes one probe HVP on the first batch (func)
        V = torch.randn(op.dim, probe.K, generator=gen)
        # the first product plans the chunks under the memory budget and builds the graphs it keeps:
        # timed apart, the rows time the products that follow (what every later product pays)
        out["first_s"] = _timed_calls(lambda: op.matmat(V), 1)[0]
        out["graphs_kept"] = op.graphs.kept
        out["times"] = _timed_calls(lambda: op.matmat(V), probe.reps)
        out["hvps_per_call"] = probe.K
    elif probe.kind in ("pyhessian", "pyhessian-batch"):
        from pyhessian import hessian
        from pyhessian.utils import hessian_vector_product

        if isinstance(data[0][0], dict):  # PyHessian calls inputs.size(0) and model(inputs) -> tensor
            model, data = SM.PackedTextInputs(model), [(SM.PackedTextInputs.pack(x), y) for x, y in data]
        start = time.perf_counter()
        if probe.kind == "pyhessian":
            h = hessian(model, F.cross_entropy, dataloader=data, cuda=False)
        else:
            if len(data) != 1:
                raise ValueError("PyHessian's single-batch mode needs the data in one batch")
            h = hessian(model, F.cross_entropy, data=data[0], cuda=False)  # forward + backward(create_graph)
        out["construct_s"] = time.perf_counter() - start
        v = [torch.randn(p.shape, generator=gen) for p in h.params]
        if probe.kind == "pyhessian":
            call = lambda: h.dataloader_hv_product(v)  # noqa: E731
        else:
            call = lambda: hessian_vector_product(h.gradsH, h.params, v)  # noqa: E731
        out["times"] = _timed_calls(call, probe.reps)
        out["hvps_per_call"] = 1
    elif probe.kind == "estimators":
        out["dim"] = count_parameters(model) // probe.dim_divisor
        del model, data
        out["base_mb"] = status_mb("VmRSS")
        out["phases"] = estimator_phases(out["dim"], case.cli_max_hvps)
        out["times"] = [sum(phase["seconds"] for phase in out["phases"])]
        out["hvps_per_call"] = 0
    else:
        raise ValueError(f"unknown probe kind {probe.kind!r}")
    # The operator's memory probe resets VmHWM (clear_refs) after trimming the heap, so the peak of
    # this process is the larger of the high-water mark before and after the work.
    out["peak_mb"] = max(peak_before, status_mb("VmHWM"))
    return out


class DiagonalOperator:
    """H = diag(d) with d uniform in [−1, 1] (no gap, so Lanczos spends its whole budget): products
    cost nothing, so running the analyze command's estimators on it measures their own storage and
    arithmetic at the model's dimension. float32 in and out, like a float32 model's operator."""

    dtype = torch.float32

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.diagonal = torch.rand(self.dim, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.diagonal[:, None] * V


def estimator_phases(dim: int, max_hvps: int) -> list[dict]:
    """The estimators of ``analyze --what trace,eigs --max-hvps N`` (the pipeline's calls and
    settings) on a :class:`DiagonalOperator` of dimension ``dim``: seconds, HVPs and the process's
    peak RSS after each (cumulative: VmHWM only grows)."""
    from hessian_tools.app.analyses import trace_method_for
    from hessian_tools.app.pipeline import AnalysisSettings
    from hessian_tools.estimators import eigenvalues, trace

    s = AnalysisSettings(what=("trace", "eigs"), trace_max_hvps=max_hvps, eig_max_hvps=max_hvps)
    op = DiagonalOperator(dim)
    steps = {  # the smallest eigenvalue runs the same Lanczos (same basis size) as the top ones: not repeated
        "trace": lambda: trace(
            op, method=trace_method_for(s, dim), rtol=s.trace_rtol, max_hvps=s.trace_max_hvps, seed=s.seed
        ),
        "top eigenvalues": lambda: eigenvalues(
            op, k=min(s.eig_k, dim), which="LA", tol=s.eig_tol, seed=s.seed, max_hvps=s.eig_max_hvps
        ),
    }
    phases = []
    for name, run in steps.items():
        start = time.perf_counter()
        result = run()
        phases.append(
            {
                "name": name,
                "seconds": time.perf_counter() - start,
                "hvps": result.hvps,
                "peak_mb": status_mb("VmHWM"),
            }
        )
    return phases


CHILD = r"""
import json, sys
sys.path[:0] = {paths!r}
import torch
torch.set_num_threads({threads})
import bench_scale as B
case = B.{settings}[{name!r}]
for probe in {probes!r}:
    print("RESULT " + json.dumps(B.measure(B.Probe(**probe), case, {checkpoint!r})), flush=True)
"""


def run_child(name: str, probes: Sequence[Probe], quick: bool, checkpoint: str, threads: int) -> list[dict]:
    """``probes`` measured in one fresh Python process; one result per probe."""
    code = CHILD.format(
        paths=[str(HERE), str(REPO)],
        threads=threads,
        settings="QUICK" if quick else "FULL",
        name=name,
        probes=[dataclasses.asdict(p) for p in probes],
        checkpoint=checkpoint,
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    results = [
        json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")
    ]
    if proc.returncode != 0:
        error = (proc.stderr.strip().splitlines() or ["(no message)"])[-1][:300]
        results += [
            {"label": p.label, "config": dataclasses.asdict(p), "error": error}
            for p in probes[len(results) :]
        ]
    return results


# ------------------------------------------------------------------------------------ the CLI run
CLI_CHILD = r"""
import sys
from hessian_tools.app.cli import main
try:
    code = main(sys.argv[1:])
finally:
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    print(f"PEAK_RSS_MB {peak:.1f}", file=sys.stderr, flush=True)
sys.exit(code)
"""


def cli_args(case: Case, checkpoint: str, json_out: str, threads: int) -> list[str]:
    return [
        "analyze",
        checkpoint,
        "--model",
        case.model_spec,
        "--data",
        case.data_spec,
        "--what",
        "trace,eigs",
        "--max-hvps",
        str(case.cli_max_hvps),
        "--threads",
        str(threads),
        "--json",
        json_out,
    ]


def run_cli(case: Case, checkpoint: str, workdir: Path, threads: int, timeout_s: float) -> dict:
    """``hessian-tools analyze`` (its entry point, ``hessian_tools.app.cli:main``) in a fresh process:
    wall time, peak RSS (reported by the process at exit, or polled from /proc while it runs when it
    has to be stopped at ``timeout_s``), the stages it reached and the HVPs it spent."""
    json_out = workdir / f"cli-{Path(checkpoint).stem}.json"
    args = cli_args(case, checkpoint, str(json_out), threads)
    stderr_path = workdir / f"cli-{Path(checkpoint).stem}.stderr"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = {
        # the checkpoint and JSON live in a temporary folder: the command is shown with their file names
        "command": "hessian-tools "
        + " ".join(Path(a).name if a in (checkpoint, str(json_out)) else a for a in args),
        "load": os.getloadavg()[0],
        "timeout_s": timeout_s,
        "stages": [],
    }
    polled, seen = 0.0, 0
    start = time.perf_counter()
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI_CHILD, *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            cwd=REPO,
        )
        while proc.poll() is None:
            try:
                polled = max(polled, status_mb("VmHWM", proc.pid))
            except (OSError, StopIteration):
                pass
            lines = stderr_path.read_text().splitlines()
            for line in lines[seen:]:
                if line.startswith("…") and ":" not in line:  # a stage, not a progress line (name: …)
                    out["stages"].append([line.lstrip("… ").strip(), round(time.perf_counter() - start, 1)])
            seen = len(lines)
            if time.perf_counter() - start > timeout_s:
                proc.kill()
                break
            time.sleep(0.25)
        stdout, _ = proc.communicate()
    out["wall_s"] = time.perf_counter() - start
    text = stderr_path.read_text()
    peak = [float(line.split()[1]) for line in text.splitlines() if line.startswith("PEAK_RSS_MB")]
    # the operator's memory probe resets VmHWM once (clear_refs): the polled maximum covers before it
    out["peak_mb"] = max(peak[-1], polled) if peak else polled
    out["returncode"] = proc.returncode
    out["finished"] = proc.returncode == 0
    out["stopped"] = not out["finished"] and out["wall_s"] > timeout_s
    if not out["finished"] and not out["stopped"]:
        lines = [line for line in text.splitlines() if not line.startswith(("PEAK_RSS_MB", "…"))]
        out["error"] = (lines or ["(no message)"])[-1][:300]
    if json_out.exists():
        analysis = json.loads(json_out.read_text())
        out["hvps"] = analysis.get("hvps")
        out["timings"] = analysis.get("timings")
        out["trace"] = (analysis.get("trace") or {}).get("estimate")
    out["stdout_tail"] = stdout.strip().splitlines()[-3:] if stdout else []
    return out


# ------------------------------------------------------------------------------------ summary
def cli_status(cli: dict) -> str:
    return "finished" if cli["finished"] else "stopped" if cli["stopped"] else "failed"


def per_hvp(row: dict) -> float | None:
    if "error" in row or not row.get("hvps_per_call"):
        return None
    return statistics.median(row["times"]) / row["hvps_per_call"]


def pyhessian_48(rows: list[dict], hvps: int) -> dict:
    """Seconds for ``hvps`` PyHessian HVPs per mode: the measured loop when it ran that many, else
    ``hvps`` × the median (each of its HVPs repeats the whole computation, so the cost is linear);
    single-batch mode adds its one graph construction."""
    out = {}
    for row in rows:
        kind = row["config"]["kind"]
        if not kind.startswith("pyhessian") or "error" in row:
            continue
        measured = len(row["times"]) >= hvps
        seconds = sum(row["times"][:hvps]) if measured else hvps * statistics.median(row["times"])
        if kind == "pyhessian-batch":
            seconds += row["construct_s"]
        out[row["label"]] = {"seconds": seconds, "measured": measured, "peak_mb": row["peak_mb"]}
    return out


def summarise(name: str, model: dict, case: Case) -> list[list[str]]:
    rows, targets = model["rows"], []
    grad = next((r for r in rows if r["config"]["kind"] == "gradient" and "error" not in r), None)
    grad_s = statistics.median(grad["times"]) if grad else None
    ours = [(r, per_hvp(r)) for r in rows if r["config"]["kind"] == "ours" and per_hvp(r) is not None]
    if grad_s and ours:
        best, best_s = min(ours, key=lambda item: item[1])
        verdict = "met" if best_s <= HVP_TARGET * grad_s else "MISSED"
        targets.append(
            [
                f"{name}: one HVP ≤ {HVP_TARGET:g}× one gradient",
                f"best ours: {best['label']}, {best_s:.3g} s = {best_s / grad_s:.2f}× "
                f"(gradient {grad_s:.3g} s); "
                "one probe alone (what each Lanczos step of analyze pays: autograd, kept graph): "
                + ", ".join(
                    f"{r['config']['backend']}{'' if r['config'].get('reuse', True) else ' rebuilt'} "
                    f"{s / grad_s:.2f}×"
                    for r, s in ours
                    if r["config"]["K"] == 1
                ),
                verdict + ("" if verdict == "MISSED" else " (by the best configuration)"),
            ]
        )
    cli = model.get("cli")
    if cli and not cli.get("skipped"):
        if "error" in cli:
            targets.append(
                [
                    f"{name}: analyze --what trace,eigs --max-hvps {case.cli_max_hvps}",
                    f"failed: {cli['error']}",
                    "not run",
                ]
            )
        else:
            peak_ok = cli["peak_mb"] <= RSS_TARGET_MB
            note = "" if cli["finished"] else f" (stopped at {cli['wall_s']:.0f} s: peak so far)"
            targets.append(
                [
                    f"{name}: analyze peak RSS ≤ 2.5 GB",
                    f"{cli['peak_mb']:.0f} MB{note}",
                    "met" if peak_ok and cli["finished"] else ("MISSED" if not peak_ok else "not determined"),
                ]
            )
            for label, base in model.get("pyhessian_48", {}).items():
                limit = CLI_TIME_FACTOR * base["seconds"]
                how = "measured" if base["measured"] else "48 × median"
                stopped = "" if cli["finished"] else " (stopped)"
                measured = f"{cli['wall_s']:.0f} s{stopped} vs {base['seconds']:.0f} s ({how}): "
                if cli["finished"]:
                    verdict = "met" if cli["wall_s"] <= limit else "MISSED"
                    measured += f"{cli['wall_s'] / base['seconds']:.2f}×"
                else:
                    verdict = "MISSED" if cli["wall_s"] > limit else "not determined"
                    measured += f"> {cli['wall_s'] / base['seconds']:.2f}×"
                targets.append(
                    [
                        f"{name}: analyze wall ≤ {CLI_TIME_FACTOR:g}× {case.pyhessian_hvps} HVPs of {label}",
                        measured,
                        verdict,
                    ]
                )
    return targets


def row_cells(row: dict, grad_s: float | None) -> list[str]:
    if "error" in row:
        return [row["label"], "failed: " + row["error"], "", "", "", "", "", ""]
    total = statistics.median(row["times"])
    hvp = per_hvp(row)
    ratio = f"{(hvp or total) / grad_s:.2f}×" if grad_s and row["config"]["kind"] != "estimators" else "—"
    return [
        row["label"],
        f"{total:.3g}",
        fmt(hvp),
        ratio,
        f"{row['peak_mb']:.0f}",
        f"{row['peak_mb'] - row['base_mb']:.0f}",
        str(len(row["times"])),
        f"{row['load']:.2f}",
    ]


def analyze_estimate(model: dict) -> str | None:
    """What the analyze run should take, from the rows (an estimate, not a measurement): its trace
    spends the budget in blocks (the largest func block measured), each Lanczos run spends it one
    probe at a time (autograd, as backend "auto" picks for one column), plus the estimators' own time
    (scaled), the smallest eigenvalue costing what the top ones cost."""
    rows = {
        (r["config"]["kind"], r["config"]["backend"], r["config"]["K"]): r
        for r in model["rows"]
        if "error" not in r and r["config"].get("reuse", True)
    }
    blocks = [r for (kind, backend, K), r in rows.items() if kind == "ours" and backend == "func" and K > 2]
    one = rows.get(("ours", "autograd", 1))
    estimators = next((r for r in model["rows"] if r.get("phases")), None)
    if not (blocks and one and estimators):
        return None
    n = model["case_max_hvps"]
    block = max(blocks, key=lambda r: r["config"]["K"])
    if per_hvp(one) < per_hvp(block):  # backend auto runs blocks on the shared (kept) graph when faster
        block = one
    scale = model["params"] / estimators["dim"]
    own = {ph["name"]: ph["seconds"] * scale for ph in estimators["phases"]}
    parts = {
        "trace HVPs": n * per_hvp(block),
        "eigenvalue HVPs": 2 * n * per_hvp(one),
        "trace bookkeeping": own.get("trace", 0.0),
        "eigenvalue bookkeeping": 2 * own.get("top eigenvalues", 0.0),
    }
    return (
        f"Estimated analyze time from these rows (not a measurement): {sum(parts.values()):.0f} s = "
        + " + ".join(f"{name} {seconds:.0f} s" for name, seconds in parts.items())
        + f" (trace: {n} probes at the rate of {block['label']}; "
        + f"eigenvalues: 2 × {n} single probes)."
    )


def estimator_text(row: dict, dim: int) -> str:
    """The estimators' own time and storage; where measured at a fraction of the dim, scaled up
    linearly (their vectors are dim × columns, their arithmetic dim × columns² per step)."""
    scale = dim / row["dim"]
    phases = "; ".join(
        f"{ph['name']} {ph['seconds']:.1f} s ({ph['hvps']} HVPs), peak {ph['peak_mb']:.0f} MB "
        f"(+{ph['peak_mb'] - row['base_mb']:.0f})"
        for ph in row["phases"]
    )
    text = (
        "The analyze command's estimators alone (a diagonal operator whose products cost nothing; "
        "one process, "
        f"peaks cumulative) at dim {row['dim']:,}: {phases}."
    )
    if scale > 1.01:
        text += (
            f" Scaled ×{scale:.1f} to the model's {dim:,}: "
            + "; ".join(
                f"{ph['name']} ≈ {ph['seconds'] * scale:.0f} s, "
                f"+{(ph['peak_mb'] - row['base_mb']) * scale:.0f} MB"
                for ph in row["phases"]
            )
            + "."
        )
    return text


def write_report(results: dict, out: Path) -> None:
    info = results["machine"]
    parts = [
        "# Scale benchmark: ResNet-18 and a transformer, gradient vs HVP vs the analyze command",
        "",
        f"- date: {results['date']}",
        f"- machine: {info['cpu']}, nproc {info['nproc']}, torch {info['torch']}, python {info['python']}, "
        f"torch threads {info['threads']} (every process, OMP_NUM_THREADS too)",
        f"- load average (1/5/15 min) at start {', '.join(f'{x:.2f}' for x in info['load_start'])}, "
        f"at end {', '.join(f'{x:.2f}' for x in info['load_end'])}",
        f"- command: `{results['command']}`"
        + (" (quick: tiny sizes, one process per model, peaks accumulate)" if results["quick"] else ""),
        f"- wall time of the whole run: {results['elapsed_s'] / 60:.1f} min",
        "",
        "Every row is a fresh Python process (model, data, the one thing measured) that reports its own peak "
        "resident set (VmHWM); `above loaded model+data` subtracts its RSS before the measurement. "
        "`× gradient`: per-HVP time over one full-data autograd gradient measured in the same run.",
        "",
    ]
    if results["targets"]:
        parts += ["## Targets", "", md_table(["target", "measured", "verdict"], results["targets"]), ""]
    for name, model in results["models"].items():
        rows = model["rows"]
        grad = next((r for r in rows if r["config"]["kind"] == "gradient" and "error" not in r), None)
        grad_s = statistics.median(grad["times"]) if grad else None
        first, last = model["train_loss_first_last"]
        parts += [
            f"## {name}: {model['params']:,} parameters, {model['samples']} samples "
            f"(batches {model['batches']})",
            "",
            f"Model `{model['model_spec']}`, data `{model['data_spec']}`; checkpoint: seeded, "
            f"{model['train_steps']} training pass(es), loss {first:.3f} → {last:.3f}.",
            "",
            md_table(ROW_COLUMNS, [row_cells(r, grad_s) for r in rows]),
            "",
        ]
        firsts = [r for r in rows if "first_s" in r]
        if firsts:
            parts += [
                "Our rows time the products after the first; the first plans the chunks under the memory "
                "budget and builds the gradient graphs it keeps (when they fit half the budget): "
                + "; ".join(
                    f"{r['label']}: first {r['first_s']:.3g} s, graphs "
                    + ("kept" if r["graphs_kept"] else "not kept")
                    for r in firsts
                )
                + ".",
                "",
            ]
        for row in rows:
            if row.get("phases"):
                parts += [estimator_text(row, model["params"]), ""]
        if model.get("pyhessian_48"):
            n = model["case_hvps"]
            parts += [
                "PyHessian, "
                + "; ".join(
                    f"{n} HVPs of {label}: {v['seconds']:.1f} s "
                    f"({'measured' if v['measured'] else f'{n} × median'})"
                    for label, v in model["pyhessian_48"].items()
                )
                + ".",
                "",
            ]
        estimate = analyze_estimate(model)
        if estimate:
            parts += [estimate, ""]
        cli = model.get("cli")
        if cli and not cli.get("skipped"):
            status = (
                "finished"
                if cli["finished"]
                else f"stopped after {cli['wall_s']:.0f} s (limit {cli['timeout_s']:.0f} s)"
                if cli["stopped"]
                else f"failed: {cli.get('error', '')}"
            )
            stages = ", ".join(f"{stage} from {t:.0f} s" for stage, t in cli["stages"])
            timings = {k: round(v, 1) for k, v in (cli.get("timings") or {}).items()}
            parts += [
                f"**End to end** (`{cli['command']}`): {status}; wall {cli['wall_s']:.1f} s, peak RSS "
                f"{cli['peak_mb']:.0f} MB, HVPs {cli.get('hvps', '—')}, load {cli['load']:.2f}"
                + (f"; stages: {stages}" if stages else "")
                + (f"; seconds per analysis {json.dumps(timings)}" if timings else "")
                + ".",
                "",
            ]
    (out / "bench_scale.md").write_text("\n".join(parts))
    (out / "bench_scale.json").write_text(json.dumps(results, indent=1, default=str))


def render(json_path: Path, out: Path) -> dict:
    """Re-write the report from a saved bench_scale.json (targets recomputed; no measurement)."""
    results = json.loads(json_path.read_text())
    settings = QUICK if results["quick"] else FULL
    results["targets"] = [
        row for name, model in results["models"].items() for row in summarise(name, model, settings[name])
    ]
    out.mkdir(parents=True, exist_ok=True)
    write_report(results, out)
    return results


# ------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one process per model (smoke test)")
    parser.add_argument("--out", default="figures", help="folder for bench_scale.md and bench_scale.json")
    parser.add_argument(
        "--models", default="transformer,resnet18", help="comma-separated subset of transformer,resnet18"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every process (default 1)")
    parser.add_argument("--no-cli", action="store_true", help="skip the end-to-end analyze runs")
    parser.add_argument(
        "--only",
        choices=["cli", "probes"],
        help="cli: only the end-to-end analyze run of each model (its time limit then defaults to "
        "--cli-timeout or 600 s: no PyHessian rows to derive it from); probes: only the measurement rows",
    )
    parser.add_argument(
        "--cli-timeout",
        type=float,
        default=None,
        help="stop an analyze run after this many seconds (default: 3× the 48 PyHessian HVPs, "
        "beyond which it has missed its target, and at most --budget-minutes into the run)",
    )
    parser.add_argument(
        "--budget-minutes", type=float, default=19.0, help="stop the last analyze run this far into the run"
    )
    parser.add_argument(
        "--render", metavar="JSON", help="only re-write bench_scale.md from a saved bench_scale.json"
    )
    args = parser.parse_args(argv)
    if args.render:
        return render(Path(args.render), Path(args.out))
    settings = QUICK if args.quick else FULL
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in settings]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(settings)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python analysis/bench_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(args.threads),
        "command": command,
        "quick": args.quick,
        "models": {},
        "targets": [],
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        workdir = Path(tmp)
        for name in names:
            case = settings[name]
            checkpoint = workdir / f"{name}.pt"
            model = {
                "model_spec": case.model_spec,
                "data_spec": case.data_spec,
                "train_steps": case.train_steps,
                "case_hvps": case.pyhessian_hvps,
                "case_max_hvps": case.cli_max_hvps,
                **write_checkpoint(case, checkpoint),
            }
            log(f"[{name}] {model['params']:,} parameters, {model['samples']} samples ({model['batches']})")
            groups = [list(case.probes)] if args.quick else [[p] for p in case.probes]
            if args.only == "cli":
                groups = []
            model["rows"] = []
            for group in groups:
                for row in run_child(name, group, args.quick, str(checkpoint), args.threads):
                    model["rows"].append(row)
                    log(
                        f"  {row['label']:60s} "
                        + (
                            f"failed: {row['error']}"
                            if "error" in row
                            else f"{statistics.median(row['times']):.3g} s (×{len(row['times'])}), "
                            f"peak {row['peak_mb']:.0f} MB"
                        )
                    )
            model["pyhessian_48"] = pyhessian_48(model["rows"], case.pyhessian_hvps)
            if args.no_cli or args.only == "probes":
                model["cli"] = {"skipped": True}
            else:
                limit = CLI_TIME_FACTOR * max(
                    (v["seconds"] for v in model["pyhessian_48"].values()), default=600.0
                )
                if args.quick:
                    limit = QUICK_CLI_TIMEOUT
                if args.cli_timeout is not None:
                    limit = args.cli_timeout
                remaining = args.budget_minutes * 60 - (time.perf_counter() - start)
                limit = max(min(limit, remaining), 30.0)
                log(f"  analyze (stopped after {limit:.0f} s if not done) ...")
                model["cli"] = run_cli(case, str(checkpoint), workdir, args.threads, limit)
                cli = model["cli"]
                log(
                    f"  analyze: {cli_status(cli)} "
                    f"in {cli['wall_s']:.1f} s, peak {cli['peak_mb']:.0f} MB, HVPs {cli.get('hvps')}"
                    + (f" ({cli['error']})" if "error" in cli else "")
                )
            results["models"][name] = model
            results["targets"] += summarise(name, model, case)
    results["elapsed_s"] = time.perf_counter() - start
    results["machine"]["load_end"] = os.getloadavg()
    write_report(results, out)
    log(f"wrote {out / 'bench_scale.md'} ({results['elapsed_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
