"""Memory budgets: how many probe columns, and how many samples, one product may take at once.

An operator's product H·V pushes its K columns through the model in chunks (one vmap or batched
double backward per chunk) and streams the data in batches. Both set its transient memory: the
activations, tangents and parameter-sized buffers of one chunk on one batch. A *memory budget*
bounds that transient: the operator measures what one column costs on the first batch and picks

    chunk = max(1, ⌊(budget − fixed) / per_column⌋)      (at most the operator's ``chunk_size``),

where ``fixed`` is what a product needs whatever its number of columns (the forward pass and the
gradient graph) and ``per_column`` what each further column adds. When even one column does not
fit, batches are split into micro-batches (exact: each piece is weighted by its size), their size
scaled down in proportion until one column fits or a micro-batch holds one sample.

How the costs are measured (:class:`PeakMeter`): a 1-column and a 2-column product on the first
batch, each bracketed by a reading of the process's peak memory. On CUDA that is
``torch.cuda.max_memory_allocated`` (reset before each product). On the CPU it is the peak resident
set of the process (``VmHWM`` of ``/proc/self/status``, reset through ``/proc/self/clear_refs``
after returning freed heap memory to the system with glibc's ``malloc_trim``, so that memory freed
earlier and still resident does not hide the product's own). Then
per_column = cost(2) − cost(1), never less than the bytes of one output column, and
fixed = cost(1) − per_column. Where neither reading exists (a CPU without ``/proc``), the costs are
estimated from the product itself: the bytes of the tensors its forward pass saves for the backward
(the activations) plus the parameter-sized buffers of a column, each counted
:data:`ESTIMATE_FACTOR` times. The measuring products are extra work on one (micro-)batch; they
count neither as HVPs nor as passes, and their results are discarded, so every product of an
operator uses the same chunking and repeated products are bit for bit the same.

The default budget (``memory_budget="auto"``) is :data:`DEFAULT_FRACTION` of the memory available
now: ``MemAvailable`` of ``/proc/meminfo`` on the CPU, the free device memory on CUDA.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import math
import os
import re
import time
from collections.abc import Callable

import torch

from ..errors import HessianToolsError

#: the default budget: this fraction of the memory available when the operator plans its products
DEFAULT_FRACTION = 0.25
#: the budget when the available memory cannot be read at all
FALLBACK_BUDGET = 2**30
#: a path not measured yet is assumed to cost at most this many times another path's measured column
PROXY_MARGIN = 4

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


class MemoryBudgetError(HessianToolsError, ValueError):
    """A memory budget that is not a positive size."""


def parse_size(value, name: str = "memory budget") -> int:
    """A size in bytes from ``value``: a positive number of bytes, or a string such as ``"4GB"``,
    ``"512MB"``, ``"2.5GiB"`` or ``"1e9"`` (units B, KB, MB, GB, TB in powers of 1000 and KiB, MiB,
    GiB, TiB in powers of 1024, any case). Anything else is one :class:`MemoryBudgetError`.
    """
    message = (
        f"{name} must be a positive size in bytes, optionally with a unit (B, KB, MB, GB, TB, "
        f"KiB, MiB, GiB, TiB), e.g. 4GB, 512MB or 2.5GiB; got {value!r}"
    )
    if isinstance(value, bool):
        raise MemoryBudgetError(message)
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise MemoryBudgetError(message)
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise MemoryBudgetError(message)
    size = number * _UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise MemoryBudgetError(message)
    return int(size)


def format_size(size: float) -> str:
    """``size`` bytes as a short decimal string (``"2.5 GB"``, ``"512 MB"``)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(size) >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes available now: free device memory on CUDA, ``MemAvailable`` (else free pages) on the CPU;
    None when it cannot be read.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def default_budget(device: torch.device | str = "cpu") -> int:
    """:data:`DEFAULT_FRACTION` of :func:`available_memory` (:data:`FALLBACK_BUDGET` if unknown)."""
    available = available_memory(device)
    return FALLBACK_BUDGET if available is None else max(1, int(available * DEFAULT_FRACTION))


def resolve_budget(budget, device: torch.device | str = "cpu") -> int | None:
    """``"auto"`` → :func:`default_budget`; None → None (no budget); else :func:`parse_size`."""
    if isinstance(budget, str) and budget.strip().lower() == "auto":
        return default_budget(device)
    if budget is None:
        return None
    return parse_size(budget, "memory_budget")


def columns_within(budget: int, fixed: int, per_column: int, most: int | None = None) -> int:
    """The chunk: the most columns whose cost fixed + chunk·per_column stays within ``budget``,
    at least 1 and at most ``most`` (None: no limit).
    """
    chunk = max(1, (int(budget) - int(fixed)) // max(1, int(per_column)))
    return chunk if most is None else min(chunk, int(most))


def samples_within(budget: int, batch: int, cost: int) -> int:
    """The micro-batch size for a batch of ``batch`` samples whose 1-column product costs ``cost``
    bytes: ``batch`` if it fits, else ⌊batch·budget/cost⌋ (memory taken as proportional to the
    samples; the operator measures again at the new size), at least 1 and always smaller than ``batch``.
    """
    if cost <= budget or batch <= 1:
        return batch
    return max(1, min(batch - 1, int(batch * budget // cost)))


@dataclasses.dataclass
class MemoryPlan:
    """What an operator chose under its budget (all sizes in bytes).

    ``budget``: the bound; ``fixed`` and ``per_column``: the measured (or estimated, ``method``)
    cost of a product, ``fixed + K·per_column`` for K columns on one batch; ``chunk``: columns per
    vmap / batched backward; ``max_batch_size``: the micro-batch size (None: batches as given);
    ``method``: ``"measured"``, ``"estimated"`` (no peak reading) or ``"bounded"`` (by another path's
    measured cost, :meth:`ChunkPlanner.fit`).
    """

    budget: int
    fixed: int = 0
    per_column: int = 0
    chunk: int | None = None
    max_batch_size: int | None = None
    method: str = "measured"

    def __str__(self) -> str:
        batch = "" if self.max_batch_size is None else f", micro-batches of {self.max_batch_size}"
        if self.chunk is None:
            return (
                f"memory budget {format_size(self.budget)}: one column costs {format_size(self.fixed)}{batch}"
            )
        return (
            f"memory budget {format_size(self.budget)}: {format_size(self.fixed)} + "
            f"{format_size(self.per_column)} per column ({self.method}), chunks of {self.chunk}{batch}"
        )


# ----------------------------------------------------------------------------- measuring peaks
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1])
    raise OSError(f"no {key} in /proc/self/status")


def release_freed_memory() -> None:
    """Hand the heap memory freed so far back to the system (glibc's ``malloc_trim``; no-op elsewhere).

    A product frees its activations and graph when it ends, but glibc keeps freed heap chunks
    resident, and once large tensors have been freed it serves even ~30 MB ones from the heap: the
    resident set then drifts up to a few hundred MB above what is alive (measured on ResNet-18's
    Lanczos steps after its trace). The operators call this after every pass over the data.
    """
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _reset_cpu_peak() -> bool:
    """Return freed heap memory to the system and reset VmHWM to the current RSS; False if impossible."""
    release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _status_kb("VmHWM:")
    except OSError:
        return False
    return True


class PeakMeter:
    """``with meter: ...`` then ``meter.peak``: the most bytes the block used above what was in use
    when it started (None where the device has no such reading; see the module docstring).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak: int | None = None
        self._start = 0
        self._ok = False

    def __enter__(self) -> PeakMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self._ok = True
        elif self.device.type == "cpu":
            self._ok = _reset_cpu_peak()
            if self._ok:
                self._start = _status_kb("VmRSS:") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if not self._ok:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
        else:
            self.peak = max(0, _status_kb("VmHWM:") * 1024 - self._start)


def saved_activation_bytes(run: Callable[[], object]) -> int:
    """Bytes of the tensors ``run()`` saves for a backward pass (its activations), counted once each."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        with contextlib.suppress(RuntimeError):
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


# ----------------------------------------------------------------------------- the planner
class ChunkPlanner:
    """Chooses an operator's chunk (and micro-batch size) under a memory budget, per product path.

    Parameters
    ----------
    budget : int or None
        The bound in bytes; None: no budget (the chunk is ``most``, batches as given).
    risk : EmpiricalRisk
        The operator's data loop; its ``source.max_batch_size`` is lowered for micro-batches.
    most : int or None
        The operator's ``chunk_size``: the chunk never exceeds it (None: no limit).
    run : callable
        ``run(path, inputs, targets, index, V, chunk)`` computes the product of the columns ``V`` on
        one batch by ``path`` (e.g. ``"func"`` or ``"autograd"``), ``chunk`` columns at a time.
    estimate : callable
        ``estimate(inputs, targets) -> (fixed, per_column)``: the costs in bytes where no peak
        reading exists (see the module docstring).
    """

    def __init__(self, budget, risk, most, run: Callable, estimate: Callable):
        self.budget, self.risk, self.most = budget, risk, most
        self.run, self.estimate = run, estimate
        self.dim = risk.dim
        self.column_bytes = risk.dim * torch.empty((), dtype=risk.dtype).element_size()
        self.plans: dict[str, MemoryPlan] = {}
        #: (path, columns, chunk) → Measurement on the first batch at the current micro-batch size
        self.measured: dict[tuple, Measurement] = {}

    @property
    def plan(self) -> MemoryPlan | None:
        """The plan of the most recently planned path (None before the first product)."""
        return next(reversed(self.plans.values()), None)

    def record(self, path: str, columns: int, chunk: int, peak: int | None) -> None:
        """Take ``peak`` (bytes of a product made elsewhere on the first batch) as a measurement."""
        first = self._first() if self.budget is not None and peak is not None else None
        if first is not None:
            self.measured.setdefault(
                (path, columns, chunk), Measurement(int(peak), None, "measured", first[3])
            )

    def chunk(self, path: str, columns: int) -> int | None:
        """The chunk for a product of ``columns`` columns by ``path`` (measuring on first use)."""
        if self.budget is None:
            return self.most
        self.fit(path)
        if path not in self.plans or (self.plans[path].chunk is None and columns > 1):
            self.plans[path] = self._plan(path, need_chunk=columns > 1)
        plan = self.plans[path]
        self.plans[path] = self.plans.pop(path)  # most recent last
        return plan.chunk if plan.chunk is not None else 1

    def measure(self, path: str, columns: int, chunk: int, timed: bool = False) -> Measurement:
        """The cost of ``columns`` columns by ``path`` on the first batch (cached; ``timed``: timed too)."""
        key = (path, columns, chunk)
        known = self.measured.get(key)
        if known is None or (timed and known.seconds is None) or (timed and known.method == "bounded"):
            first = self._first()
            if first is None:  # no data on this rank: nothing to measure
                known = Measurement(0, 0.0, "measured", 0)
            else:
                known = self._cost(path, first, columns, chunk)
            self.measured[key] = known
        return known

    def fit(self, path: str) -> None:
        """Measure one column on the first batch; while it exceeds the budget, shrink the micro-batches.

        A path not measured yet is taken to cost no more than :data:`PROXY_MARGIN` times one column of
        another path measured on the same batch when that fits the budget (no extra product then).
        """
        if self.budget is None:
            return
        if (path, 1, 1) not in self.measured:
            proxies = [m for (_, c, _), m in self.measured.items() if c == 1 and m.method == "measured"]
            if proxies and PROXY_MARGIN * max(m.bytes for m in proxies) <= self.budget:
                m = max(proxies, key=lambda m: m.bytes)
                self.measured[(path, 1, 1)] = Measurement(PROXY_MARGIN * m.bytes, None, "bounded", m.batch)
        while True:
            one = self.measure(path, 1, 1)
            size = samples_within(self.budget, one.batch, one.bytes)
            if size >= one.batch:
                return
            current = self.risk.source.max_batch_size
            self.risk.source.max_batch_size = size if current is None else min(size, current)
            self.measured.clear()  # costs measured on bigger batches no longer hold
            self.plans.clear()

    def loop(self, path: str) -> int:
        """Plan ``path`` one column at a time (e.g. one double backward per column on a shared graph):
        chunk 1, its per-column cost measured from 1 and 2 columns. Returns 1.
        """
        self.fit(path)
        if path not in self.plans or self.plans[path].chunk != 1:
            one, two = self.measure(path, 1, 1), self.measure(path, 2, 1)
            per_column = max(two.bytes - one.bytes, self.column_bytes)
            batch = self.risk.source.max_batch_size
            self.plans[path] = MemoryPlan(
                self.budget, max(one.bytes - per_column, 0), per_column, 1, batch, one.method
            )
        self.plans[path] = self.plans.pop(path)
        return 1

    # ------------------------------------------------------------------ measuring
    def _first(self):
        return next(self.risk.batches(), None)

    def _probe(self, columns: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        V = torch.rand(self.dim, columns, generator=gen, dtype=torch.float64) - 0.5
        return V.to(device=self.risk.device, dtype=self.risk.dtype)

    def _cost(self, path: str, first, columns: int, chunk: int) -> Measurement:
        index, inputs, targets, n = first
        V = self._probe(columns)
        with self.risk.computation_mode():
            meter = PeakMeter(self.risk.device)
            start = time.perf_counter()
            with meter:
                out = self.run(path, inputs, targets, index, V, chunk)
                del out
            seconds = time.perf_counter() - start
        if meter.peak is not None:  # at least its output: the reading has a page's resolution
            return Measurement(max(int(meter.peak), columns * self.column_bytes), seconds, "measured", n)
        fixed, per_column = self.estimate(inputs, targets)
        return Measurement(int(fixed + columns * per_column), seconds, "estimated", n)

    def _plan(self, path: str, need_chunk: bool) -> MemoryPlan:
        one = self.measure(path, 1, 1)
        batch = self.risk.source.max_batch_size
        plan = MemoryPlan(self.budget, fixed=one.bytes, method=one.method, max_batch_size=batch)
        if not need_chunk:
            return plan  # one column at a time so far: the chunk is decided by the first block
        if self.most == 1 or one.batch == 0:
            plan.chunk = 1 if self.most == 1 else self.most
            return plan
        if self.most is not None and self.most * one.bytes <= self.budget:
            # fixed + c·per_column ≤ c·(fixed + per_column): the most columns fit, no need to measure two
            plan.per_column, plan.fixed, plan.chunk = max(one.bytes, self.column_bytes), 0, self.most
            return plan
        two = self.measure(path, 2, 2)
        per_column = max(two.bytes - one.bytes, self.column_bytes)
        plan.per_column, plan.fixed = per_column, max(one.bytes - per_column, 0)
        plan.method = "estimated" if "estimated" in (one.method, two.method) else "measured"
        plan.chunk = columns_within(self.budget, plan.fixed, per_column, self.most)
        return plan


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One measured product on the first batch: peak ``bytes`` above what was in use, wall ``seconds``
    (None if not timed), ``method`` (``"measured"`` or ``"estimated"``), ``batch`` (its samples).
    """

    bytes: int
    seconds: float | None
    method: str
    batch: int
