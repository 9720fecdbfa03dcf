"""Every tool the benchmark compares, behind one small interface.

A :class:`Tool` wraps one library's Hessian operator for one problem (model, loss, batches) and
counts the Hessian-vector products (HVPs) it spends. It exposes

* ``block(V)`` — H·V for a (dim, K) block through the library's own product (for timing);
* ``trace_configs()`` — ``{label: TraceConfig}``: a function ``(knob, seed) -> estimate`` and
  the knob values to sweep (an HVP budget, or a tolerance for adaptive methods);
* ``eigen_configs(k)`` — ``{label: EigenConfig}``: ``(knob, seed) -> k largest eigenvalues``.

Tools whose library is not installed report ``available() == False`` and are skipped. Nothing here
tunes a peer: every peer is called through its documented public API with its defaults, except for
the knob being swept (and ``cuda=False`` for PyHessian).

Randomness: PyHessian and curvlinops draw probes from the global torch RNG, so each call starts
with ``torch.manual_seed(seed)``; ours and hessian-eigenthings take ``seed=``; scipy's ``eigsh``
gets ``v0`` from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

import hessian_tools as ht


@dataclasses.dataclass
class Problem:
    """One benchmark problem: a model (eval mode), a batch-mean loss and a list of uneven batches."""

    name: str
    model: nn.Module
    criterion: nn.Module
    batches: list
    dim: int = 0

    def __post_init__(self):
        self.model.eval()
        self.dim = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def num_samples(self) -> int:
        return sum(int(x.shape[0]) for x, _ in self.batches)


@dataclasses.dataclass
class TraceConfig:
    run: Callable[[float, int], float]  # (knob, seed) -> estimate of tr(H)
    knobs: Sequence[float]  # swept from cheapest to most expensive
    knob_name: str = "HVPs"
    nested: Callable[[Sequence[int], int], list[tuple[float, float, int]]] | None = None
    # nested(budgets, seed) -> [(estimate, seconds, hvps)] per budget, from ONE run at the largest
    # budget: for running means of i.i.d. probes (PyHessian, plain Hutchinson) the estimate after
    # m probes is exactly what a run with budget m returns (same RNG stream); time is prorated.


@dataclasses.dataclass
class EigenConfig:
    run: Callable[[float, int], np.ndarray]  # (knob, seed) -> k eigenvalues, largest first
    knobs: Sequence[float]
    knob_name: str = "tol"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _split_like(v: torch.Tensor, params) -> list[torch.Tensor]:
    out, start = [], 0
    for p in params:
        out.append(v[start : start + p.numel()].view_as(p))
        start += p.numel()
    return out


def _budgets(candidates: Sequence[int], dim: int, multiple: int = 1) -> list[int]:
    """Budgets rounded down to a multiple (curvlinops needs ÷3 or ÷2) and below dim."""
    out = []
    for b in candidates:
        b = (int(b) // multiple) * multiple
        if multiple <= b < dim and b not in out:
            out.append(b)
    return out


class Tool:
    name = "tool"
    module = ""  # import name of the library, for available()

    def __init__(self, problem: Problem):
        self.problem = problem

    @classmethod
    def available(cls) -> bool:
        return not cls.module or installed(cls.module)

    @property
    def hvps(self) -> int:
        raise NotImplementedError

    def block(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def gradient(self) -> torch.Tensor:
        """One full-data gradient of the sample-weighted mean loss (plain autograd, shared by all)."""
        p = self.problem
        total, n = None, 0
        for x, y in p.batches:
            loss = p.criterion(p.model(x), y)
            g = _flat(torch.autograd.grad(loss, p.params))
            total = g * x.shape[0] if total is None else total + g * x.shape[0]
            n += x.shape[0]
        return total / n

    def trace_configs(self, budgets: Sequence[int]) -> dict[str, TraceConfig]:
        return {}

    def eigen_configs(self, k: int) -> dict[str, EigenConfig]:
        return {}


# ----------------------------------------------------------------------------------------- ours
def ours_name(backend: str = "auto", reuse_graphs: bool = True) -> str:
    """ "ours" for the defaults (backend auto, gradient graphs kept when they fit the budget), else the
    backend and/or "streaming" (graphs rebuilt every product: memory flat in the number of samples)."""
    parts = ([] if backend == "auto" else [backend]) + ([] if reuse_graphs else ["streaming"])
    return f"ours ({', '.join(parts)})" if parts else "ours"


class Ours(Tool):
    """hessian_tools.HessianOperator (torch.func or autograd backend) and its estimators."""

    module = "hessian_tools"

    def __init__(
        self,
        problem: Problem,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        reuse_graphs: bool = True,
    ):
        super().__init__(problem)
        self.name = ours_name(backend, reuse_graphs)
        self.op = ht.HessianOperator(
            problem.model,
            problem.criterion,
            problem.batches,
            backend=backend,
            dtype=dtype,
            reuse_graphs=reuse_graphs,
        )

    @property
    def hvps(self) -> int:
        return self.op.hvps

    def block(self, V):
        return self.op.matmat(V)

    def gradient(self):
        return self.op.loss_and_gradient()[1]

    def trace_configs(self, budgets):
        op, dim = self.op, self.problem.dim
        fixed = [b for b in budgets if b < dim]
        cap = min(2 * max(budgets), 2000)  # the adaptive rule's HVP ceiling: twice the largest fixed budget
        return {
            "hutchpp (rtol)": TraceConfig(
                lambda r, s: ht.trace(op, "hutchpp", rtol=r, max_hvps=cap, seed=s).estimate,
                [0.02, 0.01, 0.005, 0.0025, 0.001, 0.0005],
                "rtol",
            ),
            "hutchpp": TraceConfig(
                lambda b, s: ht.trace(op, "hutchpp", max_hvps=int(b), seed=s).estimate,
                [b for b in fixed if b >= 6],
            ),
            "xtrace": TraceConfig(
                lambda b, s: ht.trace(op, "xtrace", max_hvps=int(b), seed=s).estimate,
                [b for b in fixed if b >= 4],
            ),
            "hutchinson": TraceConfig(
                lambda b, s: ht.trace(op, "hutchinson", max_hvps=int(b), seed=s).estimate, fixed
            ),
        }

    def eigen_configs(self, k):
        op = self.op
        tols = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7]
        return {
            "eigenvalues (lanczos)": EigenConfig(
                lambda t, s: np.asarray(
                    ht.eigenvalues(op, k=k, which="LA", tol=t, seed=s, max_hvps=3000).values
                ),
                tols,
            ),
        }


# ------------------------------------------------------------------------------------ PyHessian
class PyHessian(Tool):
    """pyhessian.hessian(model, criterion, dataloader=batches, cuda=False): batch-size-weighted, exact."""

    name = "PyHessian"
    module = "pyhessian"

    def __init__(self, problem: Problem):
        super().__init__(problem)
        import pyhessian

        self.h = pyhessian.hessian(problem.model, problem.criterion, dataloader=problem.batches, cuda=False)
        self._count = 0
        inner = self.h.dataloader_hv_product

        def counted(v):
            self._count += 1
            return inner(v)

        self.h.dataloader_hv_product = counted

    @property
    def hvps(self):
        return self._count

    def block(self, V):
        cols = []
        for j in range(V.shape[1]):
            _, hv = self.h.dataloader_hv_product(_split_like(V[:, j].contiguous(), self.h.params))
            cols.append(_flat(hv))
        return torch.stack(cols, dim=1)

    def trace_configs(self, budgets):
        h = self.h

        def defaults(_knob, seed):
            torch.manual_seed(seed)
            return float(np.mean(h.trace()))

        def fixed(b, seed):
            torch.manual_seed(seed)
            return float(np.mean(h.trace(maxIter=int(b), tol=0.0)))

        def nested(bs, seed):
            torch.manual_seed(seed)
            start = time.perf_counter()
            samples = h.trace(maxIter=int(max(bs)), tol=0.0)
            seconds = time.perf_counter() - start
            return [(float(np.mean(samples[: int(b)])), seconds * b / len(samples), int(b)) for b in bs]

        return {
            "trace() defaults": TraceConfig(defaults, [0], "defaults"),
            "trace(maxIter=m, tol=0)": TraceConfig(fixed, list(budgets), nested=nested),
        }

    def eigen_configs(self, k):
        h = self.h

        dtype = self.problem.params[0].dtype

        def run(tol, seed):
            torch.manual_seed(seed)
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)  # PyHessian draws its vectors with the default dtype
            try:
                values, _ = h.eigenvalues(maxIter=1000, tol=tol, top_n=k)
            finally:
                torch.set_default_dtype(previous)
            return np.sort(np.asarray(values, dtype=float))[::-1]

        return {"eigenvalues (power)": EigenConfig(run, [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9])}


# ----------------------------------------------------------------------------------- curvlinops
class Curvlinops(Tool):
    """curvlinops.HessianLinearOperator (torch.func, vmap over columns); hutchpp_trace, xtrace, and
    scipy.sparse.linalg.eigsh on its to_scipy()."""

    name = "curvlinops"
    module = "curvlinops"

    def __init__(self, problem: Problem):
        super().__init__(problem)
        from curvlinops import HessianLinearOperator

        self.op = HessianLinearOperator(problem.model, problem.criterion, problem.params, problem.batches)
        self._count = 0
        inner = self.op._matmat

        def counted(M):
            self._count += int(M[0].shape[-1])
            return inner(M)

        self.op._matmat = counted

    @property
    def hvps(self):
        return self._count

    def block(self, V):
        return self.op @ V

    def trace_configs(self, budgets):
        from curvlinops import hutchpp_trace, xtrace

        op, dim = self.op, self.problem.dim

        def run(fn):
            def go(b, seed):
                torch.manual_seed(seed)
                return float(fn(op, int(b)))

            return go

        return {
            "hutchpp_trace": TraceConfig(run(hutchpp_trace), _budgets(budgets, dim, 3)),
            "xtrace": TraceConfig(run(xtrace), _budgets(budgets, dim, 2)),
        }

    def eigen_configs(self, k):
        from scipy.sparse.linalg import eigsh

        A = self.op.to_scipy()

        def run(tol, seed):
            v0 = np.random.default_rng(seed).standard_normal(A.shape[0])
            values = eigsh(A, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
            return np.sort(values)[::-1]

        return {"scipy eigsh": EigenConfig(run, [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 0.0])}


# --------------------------------------------------------------------------- hessian-eigenthings
class Eigenthings(Tool):
    """hessian_eigenthings.HessianOperator (double backward, one vector at a time). NB: it averages
    the per-batch Hessians with EQUAL weights, so with an uneven last batch its operator is not the
    full-data Hessian; errors below are against the true full-data Hessian all the same."""

    name = "hessian-eigenthings"
    module = "hessian_eigenthings"

    def __init__(self, problem: Problem):
        super().__init__(problem)
        import hessian_eigenthings as he

        self.he = he
        self.op = he.HessianOperator(problem.model, problem.batches, he.supervised_loss(problem.criterion))
        self._count = 0
        inner = self.op.matvec

        def counted(v):
            self._count += 1
            return inner(v)

        self.op.matvec = counted

    @property
    def hvps(self):
        return self._count

    def block(self, V):
        return torch.stack([self.op.matvec(V[:, j].contiguous()) for j in range(V.shape[1])], dim=1)

    def trace_configs(self, budgets):
        he, op = self.he, self.op

        def nested(bs, seed):
            start = time.perf_counter()
            samples = he.hutchinson(op, num_samples=int(max(bs)), seed=seed).samples
            seconds = time.perf_counter() - start
            return [(float(samples[: int(b)].mean()), seconds * b / len(samples), int(b)) for b in bs]

        # Its operator is not the full-data Hessian when batches are uneven (equal batch weights): the
        # error has a floor (the report gives its operator's exact trace), so budgets stop at 96.
        small = [b for b in budgets if b <= 96]
        return {
            "trace (hutch++)": TraceConfig(
                lambda b, s: he.trace(op, num_matvecs=int(b), method="hutch++", seed=s).estimate,
                _budgets(small, self.problem.dim, 3),
            ),
            "hutchinson": TraceConfig(
                lambda b, s: he.hutchinson(op, num_samples=int(b), seed=s).estimate, small, nested=nested
            ),
        }

    def eigen_configs(self, k):
        he, op, dim = self.he, self.op, self.problem.dim

        def run(m, seed):
            res = he.lanczos(op, k=k, max_iter=int(min(m, dim - 1)), which="LA", seed=seed)
            return np.sort(np.asarray(res.eigenvalues.cpu(), dtype=float))[::-1]

        # its error floor is set by its operator (equal batch weights), not by max_iter: a short sweep
        # shows it
        return {"lanczos (max_iter=m)": EigenConfig(run, [max(k, 2) * f for f in (1, 2, 4, 8)], "max_iter")}


PEERS = (PyHessian, Curvlinops, Eigenthings)


def make_tools(
    problem: Problem,
    peers: bool = True,
    backends: Sequence[str] = ("auto",),
    log: Callable[[str], None] = print,
) -> list[Tool]:
    """Ours (one tool per backend) and every installed peer, each built on ``problem``."""
    tools: list[Tool] = [Ours(problem, backend=b) for b in backends]
    if peers:
        for cls in PEERS:
            if not cls.available():
                log(f"  {cls.name}: not installed, skipped (make bench installs it)")
                continue
            tools.append(cls(problem))
    return tools
