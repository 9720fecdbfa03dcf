"""Data-parallel operator: 2 and 3 CPU processes (gloo) on uneven shards — one with an empty rank —
agree with the single-process operator on the union of the shards, identically on every rank.

Each rank is this file run as a script in a subprocess, with torchrun's environment variables
(RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT=a free port), so ``init_from_env`` is
exercised too. Ranks write their results to a temporary directory; the parent waits with a
timeout and kills every rank on a hang.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import hessian_tools as ht  # noqa: E402
from hessian_tools.errors import DataError  # noqa: E402
from hessian_tools.operators.distributed import shard  # noqa: E402

SIZES = [20, 3, 9, 1, 11, 7, 2]  # 7 batches of unequal sizes (53 samples)
RTOL_MATMAT = 1e-10
RTOL_ESTIMATES = 1e-8  # the issue asks 1e-5; observed ~1e-15
HAS_DENSITY = importlib.util.find_spec("hessian_tools.estimators.density") is not None
TIMEOUT_S = 90

# name -> (world size, number of the SIZES batches used, assignment, wrap in DDP)
CASES = {
    2: {
        "rr7": (7, "round_robin", False),  # ranks hold 4 and 3 batches (24 and 29 samples)
        "rank1_empty": (3, "all_on_0", False),  # rank 1 holds no batch
        "bad_rank1": (7, "bad_on_1", False),  # rank 1's data does not fit the model
    },
    3: {
        "rr7": (7, "round_robin", True),  # 3/2/2 batches (23/14/16 samples), DDP-wrapped model
        "rank2_empty": (2, "round_robin", False),  # 2 batches over 3 ranks: rank 2 holds none
    },
}


# ---------------------------------------------------------------------------- problem and estimates
def problem(n_batches: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).double()
    X = torch.randn(sum(SIZES), 6, dtype=torch.float64)
    y = torch.randint(0, 4, (sum(SIZES),))
    bounds = np.cumsum([0] + SIZES)
    batches = [(X[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return model, nn.functional.cross_entropy, batches[:n_batches]


def estimates(op) -> dict:
    """Everything compared between runs; every call is collective on a distributed operator."""
    g = torch.Generator().manual_seed(5)
    V = torch.randn(op.dim, 5, generator=g, dtype=torch.float64)
    out = {"num_samples": op.num_samples}
    reducer = op.reducer
    before = reducer.collectives if reducer is not None else 0
    out["matmat"] = op.matmat(V)
    out["collectives_per_matmat"] = (reducer.collectives - before) if reducer is not None else None
    loss, grad = op.loss_and_gradient()
    out["loss"], out["grad"] = loss, grad
    out["hutchpp"] = ht.hutchpp(op, max_hvps=48, seed=3).estimate
    out["hutchinson"] = ht.hutchinson(op, n_probes=32, seed=3).estimate
    out["eigenvalues"] = ht.eigenvalues(op, k=3, tol=1e-8, seed=0, block_size=3).values
    if HAS_DENSITY:
        from hessian_tools.estimators.density import density

        d = density(op, n_probes=4, steps=10, seed=1)
        out["density_nodes"], out["density_weights"] = d.nodes, d.weights
    return out


# ---------------------------------------------------------------------------- rank process
def _local_data(batches, assignment: str, rank: int, world: int):
    if assignment == "round_robin":
        return shard(batches, rank, world)
    if assignment == "all_on_0":
        return list(batches) if rank == 0 else []
    if assignment == "bad_on_1":
        local = shard(batches, rank, world)
        return [(x[:, :5], t) for x, t in local] if rank == 1 else local
    raise ValueError(assignment)


def _rank_main(out_dir: str) -> None:
    import torch.distributed as dist

    from hessian_tools.operators.distributed import (
        PeerError,
        distributed_hessian_operator,
        init_from_env,
        is_main_process,
    )

    torch.set_num_threads(1)
    rank, world, device = init_from_env("cpu", timeout_s=60)
    assert device.type == "cpu" and dist.get_backend() == "gloo"
    results = {"is_main": is_main_process()}
    for name, (n_batches, assignment, ddp) in CASES[world].items():
        model, loss_fn, batches = problem(n_batches)
        if ddp:
            model = nn.parallel.DistributedDataParallel(model)
        local = _local_data(batches, assignment, rank, world)
        try:
            op = distributed_hessian_operator(model, loss_fn, local, dtype=torch.float64)
        except (PeerError, RuntimeError, ValueError) as exc:
            results[name] = {"error": type(exc).__name__}
            continue
        results[name] = {"local_batches": len(local), **estimates(op)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- parent side
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, tmp_path: Path) -> list[dict]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(world),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    procs, logs = [], []
    for rank in range(world):
        log = open(tmp_path / f"rank{rank}.log", "w+")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, str(tmp_path)],
                cwd=str(ROOT),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            )
        )
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        hung = [p for p in procs if p.poll() is None]
        for p in hung:
            p.kill()
            p.wait()
        text = ""
        for rank, log in enumerate(logs):
            log.seek(0)
            text += f"--- rank {rank} ---\n{log.read()[-3000:]}\n"
            log.close()
    assert not hung, f"{len(hung)} of {world} ranks hung (killed after {TIMEOUT_S}s)\n{text}"
    assert all(p.returncode == 0 for p in procs), f"a rank failed\n{text}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a, dtype=np.float64)), torch.as_tensor(np.asarray(b, dtype=np.float64))
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@functools.cache
def _reference(n_batches: int) -> dict:
    """The single-process estimates on all ``n_batches`` batches."""
    model, loss_fn, batches = problem(n_batches)
    return estimates(ht.HessianOperator(model, loss_fn, batches, dtype=torch.float64))


def _check_world(world: int, tmp_path: Path) -> None:
    ranks = _launch(world, tmp_path)
    assert [r["is_main"] for r in ranks] == [True] + [False] * (world - 1)
    for name, (n_batches, assignment, _) in CASES[world].items():
        got = [r[name] for r in ranks]
        if assignment == "bad_on_1":  # every rank raises (the bad one its own error), none hangs
            assert got[1]["error"] == "RuntimeError" and all(
                g["error"] == "PeerError" for i, g in enumerate(got) if i != 1
            ), got
            continue
        ref = _reference(n_batches)
        assert sum(g["local_batches"] for g in got) == n_batches
        if assignment == "round_robin" and n_batches >= world:
            assert len({g["local_batches"] for g in got}) > 1  # the shards are uneven
        for g in got:
            assert g["collectives_per_matmat"] == 1
            assert g["num_samples"] == ref["num_samples"] == sum(SIZES[:n_batches])
            assert _rel(g["matmat"], ref["matmat"]) <= RTOL_MATMAT, (name, _rel(g["matmat"], ref["matmat"]))
            assert _rel(g["grad"], ref["grad"]) <= RTOL_MATMAT and abs(
                g["loss"] - ref["loss"]
            ) <= RTOL_MATMAT * abs(ref["loss"])
            keys = ["hutchpp", "hutchinson", "eigenvalues"] + (
                ["density_nodes", "density_weights"] if HAS_DENSITY else []
            )
            for key in keys:
                assert _rel(g[key], ref[key]) <= RTOL_ESTIMATES, (name, key, g[key], ref[key])
        # identical, bit for bit, on every rank
        for g in got[1:]:
            for key, value in got[0].items():
                if key == "local_batches":
                    continue
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, g[key]), (name, key)
                elif isinstance(value, np.ndarray):
                    assert np.array_equal(value, g[key]), (name, key)
                else:
                    assert value == g[key], (name, key)


def test_two_ranks_uneven_and_empty_shards(tmp_path):
    _check_world(2, tmp_path)


def test_three_ranks_uneven_shards_ddp_and_empty_rank(tmp_path):
    _check_world(3, tmp_path)


def test_shard_round_robin_and_sample_split():
    batches = [(torch.full((n, 2), float(i)), torch.zeros(n)) for i, n in enumerate(SIZES)]
    parts = [shard(batches, r, 3) for r in range(3)]
    assert [[int(b[0][0, 0]) for b in p] for p in parts] == [[0, 3, 6], [1, 4], [2, 5]]
    assert shard(batches[:2], 2, 3) == []
    lazy = shard(iter_like(range(7)), 1, 3)  # a non-sequence re-iterable (a DataLoader) stays lazy
    assert not isinstance(lazy, list) and list(lazy) == [1, 4] == list(lazy)
    X, y = torch.arange(10.0)[:, None], torch.arange(10)
    pieces = [shard((X, y), r, 4) for r in range(4)]
    assert [len(p[0][1]) for p in pieces] == [3, 3, 2, 2]
    assert torch.equal(torch.cat([p[0][1] for p in pieces]), y)
    assert shard((X[:2], y[:2]), 3, 4) == []
    for bad in [(0, 0), (3, 3), (-1, 2)]:
        try:
            shard(batches, *bad)
        except ValueError:
            continue
        raise AssertionError(bad)
    try:
        shard(iter(batches), 0, 2)
    except DataError:
        pass
    else:
        raise AssertionError("one-shot iterator accepted")


class iter_like:  # noqa: N801 - a minimal re-iterable that is not a Sequence (like a DataLoader)
    def __init__(self, items):
        self.items = list(items)

    def __iter__(self):
        return iter(self.items)


def test_empty_data_still_rejected_without_reducer():
    model, loss_fn, _ = problem(1)
    try:
        ht.HessianOperator(model, loss_fn, [])
    except DataError as exc:
        assert "empty" in str(exc)
    else:
        raise AssertionError("empty data accepted without a reducer")


if __name__ == "__main__":
    _rank_main(sys.argv[1])
