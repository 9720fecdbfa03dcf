"""Benchmark the data-parallel Hessian operator on 1, 2 and 4 CPU processes (gloo).

    python analysis/bench_distributed.py            # writes figures/bench_distributed.md and prints it

Each rank is this script re-run in a subprocess with torchrun's environment variables
(MASTER_ADDR=127.0.0.1, a free port) and ``torch.set_num_threads(1)``. The model is a small MLP
(32 → 64 → 64 → 10, float32) on a synthetic dataset of 4096 samples in 16 batches of 256, dealt
round-robin with :func:`shard`. Per world size: the wall time of one 16-column ``matmat`` (median
of 3 after a warm-up; the slowest rank, measured between barriers), and the all_reduce payload
per probe block — ours measured by the reducer's counters, hessian-eigenthings 1.0's
``DDPHessianOperator`` computed from its algorithm (per vector and per batch, an autograd-aware
all_reduce of each of the P gradient tensors, its backward during the second autograd.grad, and an
all_reduce of each of the P HVP pieces: 3·P collectives of 3·dim values in the model dtype; it
does no collective when world_size is 1).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

K = 16
N_SAMPLES, BATCH = 4096, 256
WORLDS = (1, 2, 4)
REPEATS = 3
TIMEOUT_S = 100


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    X = torch.randn(N_SAMPLES, 32)
    y = torch.randint(0, 10, (N_SAMPLES,))
    batches = [(X[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N_SAMPLES, BATCH)]
    return model, nn.functional.cross_entropy, batches


def rank_main(out_path: str) -> None:
    import torch.distributed as dist

    from hessian_tools.operators.distributed import distributed_hessian_operator, init_from_env, shard

    torch.set_num_threads(1)
    rank, world, _ = init_from_env("cpu", timeout_s=120)
    model, loss_fn, batches = build()
    local = shard(batches, rank, world)
    op = distributed_hessian_operator(model, loss_fn, local)
    V = torch.randn(op.dim, K, generator=torch.Generator().manual_seed(1))
    op.matmat(V)  # warm-up
    times = []
    for _ in range(REPEATS):
        dist.barrier()
        start = time.perf_counter()
        op.matmat(V)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        times.append(float(elapsed))
    before_c, before_b = op.reducer.collectives, op.reducer.bytes_reduced
    op.matmat(V)
    batches_per_rank = torch.tensor([len(local)])
    dist.all_reduce(batches_per_rank, op=dist.ReduceOp.MAX)
    if rank == 0:
        n_tensors = len(op.param_names)
        itemsize = op.dtype.itemsize
        # hessian-eigenthings: K single-vector products, each over its B local batches (with a
        # DistributedSampler every rank has the same B = ceil(batches / W)).
        B = int(batches_per_rank)
        theirs_c = 0 if world == 1 else K * B * 3 * n_tensors
        theirs_b = 0 if world == 1 else K * B * 3 * op.dim * itemsize
        json.dump(
            {
                "world": world,
                "dim": op.dim,
                "tensors": n_tensors,
                "seconds": sorted(times)[len(times) // 2],
                "ours_collectives": op.reducer.collectives - before_c,
                "ours_bytes": op.reducer.bytes_reduced - before_b,
                "theirs_collectives": theirs_c,
                "theirs_bytes": theirs_b,
                "batches_per_rank": B,
            },
            open(out_path, "w"),
        )
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out_path: Path) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank", str(out_path)],
            cwd=str(ROOT),
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != 0 for p in procs):
        raise RuntimeError(
            f"world size {world}: a rank failed (return codes {[p.returncode for p in procs]})"
        )
    return json.loads(out_path.read_text())


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def main() -> None:
    tmp = ROOT / "figures" / ".bench_distributed_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    try:
        for world in WORLDS:
            rows.append(launch(world, tmp / f"world{world}.json"))
    finally:
        for f in tmp.glob("*.json"):
            f.unlink()
        tmp.rmdir()
    dim, tensors = rows[0]["dim"], rows[0]["tensors"]
    lines = [
        "# Data-parallel Hessian operator: one 16-column matmat",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: `nproc` = {os.cpu_count()}, {platform.machine()}, torch {torch.__version__}, "
        f"gloo on CPU, torch.set_num_threads(1) per process; 1-min load average at start {load:.1f}",
        "- command: `python analysis/bench_distributed.py`",
        f"- problem: MLP 32→64→64→10 (dim = {dim}, P = {tensors} parameter tensors, float32), "
        f"{N_SAMPLES} synthetic samples in {N_SAMPLES // BATCH} batches of {BATCH}, dealt round-robin",
        "",
        "| processes | batches/rank | matmat K=16 (s, median of 3) | ours: all_reduces / block "
        "| ours: payload / block "
        "| hessian-eigenthings DDP: collectives / block | hessian-eigenthings DDP: payload / block |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['world']} | {r['batches_per_rank']} | {r['seconds']:.3f} | {r['ours_collectives']} | "
            f"{human(r['ours_bytes'])} ({r['ours_bytes']:,} B) | {r['theirs_collectives']:,} | "
            + (f"{human(r['theirs_bytes'])} ({r['theirs_bytes']:,} B) |" if r["theirs_bytes"] else "0 |")
        )
    lines += [
        "",
        f"Ours: one all_reduce of dim·K + 1 float64 values = 8·({dim}·{K} + 1) bytes per block, whatever the "
        "number of batches (with one process the all_reduce is a local no-op). hessian-eigenthings 1.0 "
        "(`DDPHessianOperator`, computed from its code, not run): per vector and per batch, 3·P collectives "
        "carrying 3·dim values in the model dtype, i.e. 3·P·K·B collectives and 3·dim·K·B·4 bytes per block "
        "(B = batches per rank); none with one process. Payload = size of the buffers passed to all_reduce "
        "(a ring all_reduce sends ≈ 2(W−1)/W of it per rank).",
        "",
        f"With {os.cpu_count()} cores, more processes than cores oversubscribe them, so no speed-up is "
        "expected beyond that many processes"
        + (
            f"; the load average of {load:.1f} at the start means other work shared the "
            "cores and the timings are noisy."
            if load > 1.5
            else "."
        ),
    ]
    text = "\n".join(lines) + "\n"
    out = ROOT / "figures" / "bench_distributed.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rank":
        rank_main(sys.argv[2])
    else:
        main()
