"""Data-parallel Hessian operator: each rank streams its own shard, ONE all_reduce per probe block.

The operator's ``matmat(V)`` already accumulates, over the local batches, the sample-weighted sum
``total = Σ_b n_b·H_b V`` (float64, dim × K) and the local sample count ``count = Σ_b n_b``. With a
reducer it hands both to :meth:`ProcessGroupReducer.sum_block`, which packs them into one float64
buffer of dim·K + 1 values (the count rides in the last element; float64 holds integers exactly
up to 2⁵³), all-reduces it with SUM once, and unpacks. Every rank then returns

    H V = (Σ_ranks Σ_b n_b H_b V) / (Σ_ranks Σ_b n_b),

exactly the single-process result on the union of the shards (up to summation order, ~1e-16
relative): shards may be uneven, a rank may hold no batch at all, and batches are weighted by
their size, never ranks by 1/world_size. All ranks hold the same reduced block, so estimators
that draw their probes from ``seeded_generator(seed)`` (the same on every rank) take the same steps
and return the same numbers everywhere; only rank 0 should write output (:func:`is_main_process`).

Usage (under ``torchrun --nproc_per_node=W``)::

    rank, world, device = init_from_env("cpu")                  # gloo on CPU, nccl on CUDA
    op = distributed_hessian_operator(model, loss_fn, shard(batches, rank, world), dtype=torch.float64)
    result = ht.trace(op, seed=0)                                  # same call, same seed, on every rank
    if is_main_process():
        save(result)

Every rank must make the same sequence of operator calls (``matmat``, ``num_samples``,
``loss_and_gradient``): each is a collective. A rank that raises inside ``matmat`` (e.g. a
NaN loss on its shard) leaves the others waiting in the all_reduce until the process-group
timeout (``init_from_env(timeout_s=...)``); construction errors, by contrast, are agreed on by all
ranks in :func:`distributed_hessian_operator`.

Communication volume. One ``all_reduce`` of dim·K + 1 float64 values, ≈ 8·(dim·K + 1) bytes of
payload, per probe block of K columns, independent of the number of batches (``num_samples`` costs
one 8-byte all_reduce; ``loss_and_gradient`` one of dim + 2 values). For comparison,
hessian-eigenthings 1.0's ``DDPHessianOperator`` (``operators/distributed/ddp.py`` in
noahgolmant/pytorch-hessian-eigenthings, identical in the 1.0.0a5 wheel) computes one vector at a
time and, for EVERY batch, calls ``torch.distributed.nn.all_reduce`` on each of the P parameter
gradients (create_graph), again, implicitly, in the backward of that autograd-aware all_reduce
during the second ``autograd.grad``, and once more on each of the P HVP pieces: 3·P collectives
and 3·dim values in the model dtype per batch and per vector, i.e. per K-column block
3·P·K·B collectives and 3·dim·K·B·itemsize bytes (B = batches per rank). It then divides by
world_size and by the local batch count: ranks and batches are weighted equally, which is exact
only for equal shards of equal batches, and ranks with different batch counts issue different
numbers of collectives (a mismatch/hang).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..errors import DataError, HessianToolsError
from .data_source import is_single_pair
from .hessian import HessianOperator

__all__ = [
    "PeerError",
    "ProcessGroupReducer",
    "distributed_hessian_operator",
    "init_from_env",
    "is_main_process",
    "shard",
]


class PeerError(HessianToolsError, RuntimeError):
    """Another rank failed (its own message is on its stderr), so this rank stops too."""


def _require_initialized() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call hessian_tools.operators.distributed.init_from_env() "
            "(under torchrun) or torch.distributed.init_process_group() first"
        )


class ProcessGroupReducer:
    """Sums the operator's local partial sums over the ranks of ``group`` (default: WORLD).

    Each call is ONE ``all_reduce(SUM)``: the block and the count travel in one float64 buffer,
    on CUDA for an nccl group and on the CPU for gloo, and come back on the caller's device.
    ``collectives`` and ``bytes_reduced`` count the calls and the payload bytes so far.
    """

    def __init__(self, group=None):
        _require_initialized()
        self.group = group
        self.backend = str(dist.get_backend(group)).lower()
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.collectives = 0
        self.bytes_reduced = 0

    def _comm_device(self, like: torch.device) -> torch.device:
        if "nccl" in self.backend and "gloo" not in self.backend:
            return torch.device("cuda", torch.cuda.current_device())
        if "gloo" in self.backend and "nccl" not in self.backend:
            return torch.device("cpu")
        return like  # a multi-device backend ("cpu:gloo,cuda:nccl"): reduce where the data is

    def _all_reduce(self, buffer: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(buffer, op=op, group=self.group)
        self.collectives += 1
        self.bytes_reduced += buffer.numel() * buffer.element_size()
        return buffer

    def sum_block(self, total: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
        """(Σ_ranks total, Σ_ranks count) for a local (dim, K) block and local sample count."""
        device = self._comm_device(total.device)
        buffer = torch.empty(total.numel() + 1, dtype=torch.float64, device=device)
        buffer[:-1].copy_(total.reshape(-1))
        buffer[-1] = float(count)
        self._all_reduce(buffer)
        reduced_count = int(round(float(buffer[-1])))
        if reduced_count == 0:
            raise DataError("the data is empty on every rank: no batch with at least one sample")
        out = buffer[:-1].reshape(total.shape).to(device=total.device, dtype=total.dtype)
        return out, reduced_count

    def sum_count(self, local: int) -> int:
        """Σ_ranks local (one all_reduce of one value)."""
        buffer = torch.tensor([int(local)], dtype=torch.int64, device=self._comm_device(torch.device("cpu")))
        return int(self._all_reduce(buffer)[0])

    def __repr__(self) -> str:
        return (
            f"ProcessGroupReducer(backend={self.backend!r}, rank={self.rank}, world_size={self.world_size})"
        )


def distributed_hessian_operator(
    model, loss_fn, data, params=None, *, group=None, **kwargs
) -> HessianOperator:
    """A :class:`HessianOperator` over this rank's shard ``data`` whose products are summed over
    all ranks of ``group`` (the data-parallel Hessian of the mean loss over the union of shards).

    Collective: every rank of ``group`` must call it. Keyword arguments go to HessianOperator
    (mode, backend, dtype, device, chunk_size, check_determinism). ``data`` may be empty on some
    ranks. If construction fails on any rank (bad data, nondeterminism, a different model), every
    rank raises: the failing one its own error, the others :class:`PeerError`.
    """
    if "reducer" in kwargs:
        raise TypeError("distributed_hessian_operator builds its own reducer; do not pass reducer=")
    reducer = ProcessGroupReducer(group)
    op, error = None, None
    try:
        op = HessianOperator(model, loss_fn, data, params, reducer=reducer, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the ranks agree
        error = exc
    # One MAX all_reduce of [failed, dim, -dim]: anyone failed? all dims equal?
    dim = op.dim if op is not None else 0
    flags = torch.tensor(
        [int(error is not None), dim, -dim],
        dtype=torch.int64,
        device=reducer._comm_device(torch.device("cpu")),
    )
    reducer._all_reduce(flags, op=dist.ReduceOp.MAX)
    failed, max_dim, min_dim = int(flags[0]), int(flags[1]), -int(flags[2])
    if error is not None:
        raise error
    if failed:
        raise PeerError(
            f"rank {reducer.rank}: another rank failed to build its Hessian operator (see its error)"
        )
    if max_dim != min_dim:
        raise PeerError(
            f"rank {reducer.rank}: the ranks select different numbers of parameters "
            f"({min_dim} to {max_dim}); every rank must load the same model and params"
        )
    return op


class _RoundRobin:
    """A lazy, re-iterable view of batches ``rank, rank + world_size, ...`` of a re-iterable."""

    def __init__(self, data, rank: int, world_size: int):
        self.data, self.rank, self.world_size = data, rank, world_size

    def __iter__(self):
        for index, batch in enumerate(self.data):
            if index % self.world_size == self.rank:
                yield batch


def shard(data: Any, rank: int, world_size: int):
    """The calling rank's share of ``data``, batches dealt round-robin (batch i goes to rank i mod W).

    A list/tuple of batches gives a list (shards may be uneven; with fewer batches than ranks some
    ranks get an empty list, which the distributed operator accepts). Another re-iterable (a
    DataLoader) gives a lazy re-iterable that skips the other ranks' batches (every rank still
    loads them all; for big data give each rank its own loader instead — but not through
    ``DistributedSampler`` with ``drop_last=False``: it pads the shards by REPEATING samples, which
    would count them twice in the mean). One
    ``(X, y)`` pair is split by samples into W contiguous pieces (sizes differ by at most one),
    each returned as a one-batch list.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    if is_single_pair(data):
        X, y = data
        piece = torch.tensor_split(torch.arange(X.shape[0]), world_size)[rank]
        return [(X[piece], y[piece])] if piece.numel() else []
    if isinstance(data, Iterator):
        raise DataError("data is a one-shot iterator; pass a re-iterable (a list of batches or a DataLoader)")
    if isinstance(data, Sequence):
        return list(data[rank::world_size])
    try:
        iter(data)
    except TypeError:
        raise DataError(
            "data must be an (X, y) pair or an iterable of (inputs, targets) batches, "
            f"got {type(data).__name__}"
        ) from None
    return _RoundRobin(data, rank, world_size)


def init_from_env(
    device: str | torch.device | None = None, *, timeout_s: float | None = None
) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT): nccl when ``device`` is CUDA (``cuda`` alone becomes
    ``cuda:LOCAL_RANK``, made current), gloo otherwise. ``device=None`` means CUDA if available.
    Returns ``(rank, world_size, device)``; a no-op apart from that if already initialised.
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"distributed mode needs torchrun (or these environment variables): {', '.join(missing)} not set"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        options = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group(backend, init_method="env://", **options)
    return dist.get_rank(), dist.get_world_size(), device


def is_main_process() -> bool:
    """True on rank 0, and in a process that is not part of a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
