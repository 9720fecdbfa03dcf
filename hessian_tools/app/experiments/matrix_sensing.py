"""Over-parameterised matrix sensing: the first experiment of the Noise Stability Optimization paper.

Problem (:func:`make_problem`): a rank-r ground truth X* = U* U*ᵀ with U* ~ N(0, 1)^{d×r}; m
training and m validation measurements y_i = ⟨A_i, X*⟩ with A_i = (G + Gᵀ)/2, G ~ N(0, 1)^{d×d}
(the paper: d = 100, r = 5, m = 5·d·r = 2,500). The model is a full d×d matrix U (d² parameters,
over-parameterised: r ≪ d), started from ``init_scale · N(0, 1)^{d×d}`` (``init_scale = 1``: the
description taken literally, no 1/√d scaling).

Losses. Reported losses (curves, final values) are always *relative*:
``mean_i r_i² / mean_i y_i²`` on the split, r_i = ⟨A_i, UUᵀ⟩ − y_i, so U = 0 scores 1. The
*training objective* whose gradient the methods follow is ``f(U) = Σ_i r_i² / (m·s)`` with

* ``objective="half_mse"`` (default): s = 2, f = (1/2m) Σ r_i², the usual matrix-sensing loss;
* ``objective="relative"``: s = c = mean_i y_i² (train), f = the relative loss itself.

Why the default is not the relative loss: with U ~ N(0, 1) and d = 100, c ≈ ‖X*‖_F² ≈ 5·10⁴, so
lr = 10⁻³ on the relative loss is an effective step of 2·10⁻⁸ on the half-MSE — in 5,000 steps
the relative loss only goes from 37 to about 20 for every method. With the half-MSE, lr = 10⁻³ is
just stable at this initialisation (lr·λ_max ≈ 1.6; plain MSE, s = 1, diverges) and the three
methods separate as the paper reports.

Storage: the A_i are symmetric, so each is kept as its packed upper triangle, with the off-diagonal
entries multiplied by √2 — (m, d(d+1)/2) — so that ⟨A_i, X⟩ = packed(A_i) · packed(X) for
symmetric X. One residual is one matrix-vector product over that table, and Σ r_i A_i is one
vector-matrix product; half the memory traffic of an (m, d²) table.

Closed forms of the objective (S = Σ_i r_i A_i, symmetric):

* gradient  ∇f(U) = (2/(m s)) Σ r_i (A_i + A_iᵀ) U = (4/(m s)) S U;
* Hessian trace  Tr ∇²f(U) = (2/(m s)) Σ_i (‖2 A_i U‖_F² + 2 r_i · d · tr A_i), since ∇r_i = 2A_iU
  and ∇²r_i[V] = 2A_iV (a map on d×d matrices whose trace is d·tr(2A_i)).

Methods (full batch, step size ``lr``, fresh noise every step from a seeded ``torch.Generator``):

* ``gd``:  U ← U − lr ∇f(U);
* ``wp``:  U ← U − lr ∇f(U + E), E ~ N(0, σ²)^{d×d} (weight-perturbed GD);
* ``nso``: U ← U − lr · (1/(2k)) Σ_j [∇f(U + E_j) + ∇f(U − E_j)] (two-sided noise stability
  optimisation; ``two_sided=False`` → (1/k) Σ_j ∇f(U + E_j)).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...optim import make_optimizer
from ..runs import Diverged, optimization_steps

__all__ = [
    "MatrixSensingProblem",
    "make_problem",
    "pack_symmetric",
    "unpack_symmetric",
    "residuals",
    "loss",
    "objective_value",
    "objective_scale",
    "OBJECTIVES",
    "gradient",
    "exact_hessian_trace",
    "initial_U",
    "run_matrix_sensing",
    "run_experiment",
    "write_results",
    "METHODS",
    "PAPER_VAL_LOSS",
]

METHODS = ("gd", "wp", "nso")
_SQRT2 = math.sqrt(2.0)


@dataclasses.dataclass(frozen=True, eq=False)
class MatrixSensingProblem:
    """Packed measurement tables and targets of one matrix-sensing instance (see the module docstring)."""

    d: int
    r: int
    A_train: torch.Tensor  # (m, d(d+1)/2), packed
    y_train: torch.Tensor  # (m,)
    A_val: torch.Tensor
    y_val: torch.Tensor
    U_star: torch.Tensor  # (d, r)
    seed: int

    @property
    def m(self) -> int:
        return int(self.A_train.shape[0])

    @property
    def c_train(self) -> float:
        return float(self.y_train.double().pow(2).mean())

    @property
    def c_val(self) -> float:
        return float(self.y_val.double().pow(2).mean())

    @property
    def X_star(self) -> torch.Tensor:
        return self.U_star @ self.U_star.T

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        if which == "train":
            return self.A_train, self.y_train, self.c_train
        if which == "val":
            return self.A_val, self.y_val, self.c_val
        raise ValueError(f"split must be 'train' or 'val', got {which!r}")


@lru_cache(maxsize=8)
def _triu(d: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(d, d, offset=1, device=device)
    return rows, cols


OBJECTIVES = ("half_mse", "relative")


def objective_scale(problem: MatrixSensingProblem, objective: str = "half_mse") -> float:
    """S in f(U) = Σ r_i² / (m·s): 2 for "half_mse", mean y² of the training set for "relative"."""
    if objective == "half_mse":
        return 2.0
    if objective == "relative":
        return problem.c_train
    raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")


def pack_symmetric(X: torch.Tensor) -> torch.Tensor:
    """Packed form of symmetric matrices (..., d, d) → (..., d(d+1)/2): the diagonal, then the strict
    upper triangle times √2, so that ⟨X, Y⟩_F = pack(X) · pack(Y).
    """
    d = X.shape[-1]
    rows, cols = _triu(d, X.device)
    return torch.cat([torch.diagonal(X, dim1=-2, dim2=-1), _SQRT2 * X[..., rows, cols]], dim=-1)


def unpack_symmetric(v: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of :func:`pack_symmetric`: (..., d(d+1)/2) → symmetric (..., d, d)."""
    rows, cols = _triu(d, v.device)
    out = v.new_zeros(*v.shape[:-1], d, d)
    idx = torch.arange(d, device=v.device)
    out[..., idx, idx] = v[..., :d]
    off = v[..., d:] / _SQRT2
    out[..., rows, cols] = off
    out[..., cols, rows] = off
    return out


def make_problem(
    d: int = 100,
    r: int = 5,
    m: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    chunk: int = 256,
) -> MatrixSensingProblem:
    """Draw a seeded instance: U*, then m training and m validation measurements (m = 5·d·r by default)."""
    if d < 1 or r < 1 or r > d:
        raise ValueError(f"need 1 ≤ r ≤ d, got d={d}, r={r}")
    m = 5 * d * r if m is None else int(m)
    if m < 1:
        raise ValueError(f"m must be positive, got {m}")
    gen = torch.Generator().manual_seed(int(seed))
    U_star = torch.randn(d, r, generator=gen, dtype=torch.float64)
    x_star = pack_symmetric(U_star @ U_star.T)

    def measurements() -> tuple[torch.Tensor, torch.Tensor]:
        A = torch.empty(m, d * (d + 1) // 2, dtype=dtype)
        y = torch.empty(m, dtype=torch.float64)
        for start in range(0, m, chunk):
            n = min(chunk, m - start)
            G = torch.randn(n, d, d, generator=gen, dtype=torch.float64)
            packed = pack_symmetric((G + G.transpose(1, 2)) / 2)
            A[start : start + n] = packed.to(dtype)
            y[start : start + n] = packed @ x_star
        return A, y.to(dtype)

    A_train, y_train = measurements()
    A_val, y_val = measurements()
    return MatrixSensingProblem(d, r, A_train, y_train, A_val, y_val, U_star.to(dtype), int(seed))


def residuals(U: torch.Tensor, problem: MatrixSensingProblem, which: str = "train") -> torch.Tensor:
    """r_i = ⟨A_i, U Uᵀ⟩ − y_i for the chosen split."""
    A, y, _ = problem.split(which)
    return torch.mv(A, pack_symmetric(U @ U.T).to(A.dtype)) - y


def loss(U: torch.Tensor, problem: MatrixSensingProblem, which: str = "train") -> float:
    """mean_i r_i² / mean_i y_i² on the chosen split."""
    _, _, c = problem.split(which)
    return float(residuals(U, problem, which).double().pow(2).mean()) / c


def objective_value(
    U: torch.Tensor, problem: MatrixSensingProblem, objective: str = "half_mse"
) -> torch.Tensor:
    """f(U) = Σ_i r_i² / (m·s) on the training set (differentiable in U; for autograd checks)."""
    A, y, _ = problem.split("train")
    r = A @ pack_symmetric(U @ U.T).to(A.dtype) - y
    return r.pow(2).sum() / (A.shape[0] * objective_scale(problem, objective))


def gradient(U: torch.Tensor, problem: MatrixSensingProblem, objective: str = "half_mse") -> torch.Tensor:
    """Closed-form ∇f(U) of the training objective: (4/(m s)) (Σ r_i A_i) U."""
    return objective_and_gradient(U, problem, objective)[1]


def objective_and_gradient(
    U: torch.Tensor, problem: MatrixSensingProblem, objective: str = "half_mse"
) -> tuple[float, torch.Tensor]:
    """f(U) = Σ r_i²/(m s) and ∇f(U) = (4/(m s)) (Σ r_i A_i) U from one residual pass."""
    A = problem.A_train
    scale = A.shape[0] * objective_scale(problem, objective)
    r = residuals(U, problem, "train")
    S = unpack_symmetric(torch.mv(A.T, r), problem.d)
    return float(r.double().pow(2).sum()) / scale, (4.0 / scale) * (S @ U)


def exact_hessian_trace(
    U: torch.Tensor, problem: MatrixSensingProblem, objective: str = "half_mse", chunk: int = 128
) -> float:
    """Tr ∇²f(U) of the training objective in closed form (float64 accumulation)."""
    A = problem.A_train
    c = objective_scale(problem, objective)
    d, m = problem.d, A.shape[0]
    U64 = U.detach().double()
    r = residuals(U, problem, "train").double()
    traces = A[:, :d].double().sum(1)  # tr A_i: the packed diagonal
    gn = 0.0
    for start in range(0, m, chunk):
        Ai = unpack_symmetric(A[start : start + chunk].double(), d)
        gn += float((2.0 * Ai @ U64).pow(2).sum())
    return (2.0 / (m * c)) * (gn + float((2.0 * d * r * traces).sum()))


class _Factor(torch.nn.Module):
    """The model ⟨A_i, UUᵀ⟩ as an ``nn.Module`` of the packed measurements, so that the core's
    HessianOperator (and every estimator) applies to the matrix-sensing objective unchanged.
    """

    def __init__(self, U: torch.Tensor):
        super().__init__()
        self.U = torch.nn.Parameter(U.detach().clone())

    def forward(self, A: torch.Tensor) -> torch.Tensor:
        return A @ pack_symmetric(self.U @ self.U.T).to(A.dtype)


def hessian_operator(
    U: torch.Tensor, problem: MatrixSensingProblem, objective: str = "half_mse", batch_size: int = 500
):
    """∇²f(U) of the training objective as a :class:`~hessian_tools.HessianOperator` (float64),
    streaming the measurements in batches: f = mean_i r_i² / s over all m measurements.
    """
    from ...operators import HessianOperator

    scale = objective_scale(problem, objective)
    A, y = problem.A_train, problem.y_train
    data = [(A[i : i + batch_size], y[i : i + batch_size]) for i in range(0, A.shape[0], batch_size)]
    return HessianOperator(
        _Factor(U), lambda pred, target: (pred - target).pow(2).mean() / scale, data, dtype=torch.float64
    )


def estimated_hessian_trace(
    U: torch.Tensor,
    problem: MatrixSensingProblem,
    objective: str = "half_mse",
    rtol: float = 0.01,
    seed: int = 0,
) -> dict:
    """Tr ∇²f(U) by the core's Hutch++ (95% half-width ≤ rtol·|trace|), to set next to the exact value."""
    from ...estimators import trace

    result = trace(hessian_operator(U, problem, objective), rtol=rtol, max_hvps=2000, seed=seed)
    return {
        "estimate": result.estimate,
        "stderr": result.stderr,
        "hvps": result.hvps,
        "seed": seed,
        "method": result.method,
        "converged": result.converged,
    }


def initial_U(problem: MatrixSensingProblem, seed: int, init_scale: float = 1.0) -> torch.Tensor:
    """U₀ = init_scale · N(0, 1)^{d×d}, from its own generator (the same for every method)."""
    gen = torch.Generator().manual_seed(int(seed) + 7_919)
    U = torch.randn(problem.d, problem.d, generator=gen, dtype=torch.float64)
    return (init_scale * U).to(problem.A_train.dtype)


def run_matrix_sensing(
    method: str,
    seed: int = 0,
    steps: int = 5000,
    *,
    d: int = 100,
    r: int = 5,
    m: int | None = None,
    lr: float = 1e-3,
    sigma: float = 0.08,
    k: int = 1,
    two_sided: bool = True,
    init_scale: float = 1.0,
    objective: str = "half_mse",
    log_every: int = 50,
    problem: MatrixSensingProblem | None = None,
    dtype: torch.dtype = torch.float32,
    trace: bool = True,
    num_threads: int | None = 1,
) -> dict[str, Any]:
    """Run one method on the seeded instance; returns curves, final losses, the final trace and times.

    The problem (from ``seed``, or the given ``problem``), the initial U and the noise stream are all
    seeded, so the three methods with the same seed start from the same U on the same data.
    ``num_threads`` (default 1; ``None`` leaves torch's setting) is set for the run and restored
    after: every step is a few memory-bound matrix-vector products, and on a small shared machine a
    second BLAS thread made steps ~10× slower (oversubscription), never faster.
    Returned keys: method, seed, steps, d, r, m, lr, sigma, k, two_sided, init_scale, curve
    ({"step", "train_loss", "val_loss"} lists, every ``log_every`` steps and at the end),
    final_train_loss, final_val_loss, hessian_trace (of the final U; None with ``trace=False``),
    wall_time_s (the optimisation loop incl. logging), diverged, objective, and U (the final
    matrix, a tensor: drop it before writing JSON).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if steps < 0 or log_every < 1 or k < 1:
        raise ValueError(f"need steps ≥ 0, log_every ≥ 1, k ≥ 1; got {steps}, {log_every}, {k}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if problem is None:
        problem = make_problem(d, r, m, seed=seed, dtype=dtype)
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        return _run(
            method, seed, steps, problem, lr, sigma, k, two_sided, init_scale, objective, log_every, trace
        )
    finally:
        torch.set_num_threads(previous_threads)


def _optimizer(
    method: str,
    U: torch.nn.Parameter,
    lr: float,
    sigma: float,
    k: int,
    two_sided: bool,
    noise: torch.Generator,
) -> torch.optim.Optimizer:
    """Full-batch GD (plain SGD, no momentum), weight-perturbed GD or NSO from :mod:`hessian_tools.optim`."""
    options = {
        "gd": {},
        "wp": {"sigma": sigma, "k": k},
        "nso": {"sigma": sigma, "k": k, "two_sided": two_sided},
    }[method]
    name = {"gd": "sgd", "wp": "wp", "nso": "nso"}[method]
    return make_optimizer(name, [U], base="sgd", lr=lr, momentum=0.0, generator=noise, **options)


def _run(method, seed, steps, problem, lr, sigma, k, two_sided, init_scale, objective, log_every, trace):
    U = torch.nn.Parameter(initial_U(problem, seed, init_scale))
    optimizer = _optimizer(
        method, U, lr, sigma, k, two_sided, torch.Generator().manual_seed(int(seed) + 104_729)
    )
    curve: dict[str, list] = {"step": [], "train_loss": [], "val_loss": []}

    def log(step: int) -> None:
        curve["step"].append(step)
        curve["train_loss"].append(loss(U.detach(), problem, "train"))
        curve["val_loss"].append(loss(U.detach(), problem, "val"))

    def closure():  # the closed-form gradient at the (possibly perturbed) U the optimizer set
        value, g = objective_and_gradient(U.detach(), problem, objective)
        U.grad = g
        return value

    t0 = time.perf_counter()
    log(0)
    diverged = False
    step = 0
    try:
        for step, _ in enumerate(optimization_steps(optimizer, itertools.repeat(closure, steps)), start=1):
            if step % log_every == 0 or step == steps:
                log(step)
    except Diverged as exc:
        diverged = True
        log(exc.step + 1)
    if not diverged and not all(math.isfinite(v) for v in curve["train_loss"]):
        diverged = True
    wall = time.perf_counter() - t0
    final = U.detach()
    return {
        "method": method,
        "seed": int(seed),
        "steps": int(steps),
        "d": problem.d,
        "r": problem.r,
        "m": problem.m,
        "lr": lr,
        "sigma": sigma,
        "k": k,
        "two_sided": two_sided,
        "init_scale": init_scale,
        "objective": objective,
        "curve": curve,
        "final_train_loss": curve["train_loss"][-1],
        "final_val_loss": curve["val_loss"][-1],
        "hessian_trace": (exact_hessian_trace(final, problem, objective) if trace and not diverged else None),
        "hessian_trace_estimated": (
            estimated_hessian_trace(final, problem, objective, seed=seed) if trace and not diverged else None
        ),
        "wall_time_s": wall,
        "diverged": diverged,
        "U": final,
    }


# --------------------------------------------------------------------------- the experiment (script / CLI)
#: the paper's reported final validation losses (d=100, r=5, m=2,500, σ=0.08, lr=1e-3, 5,000 steps)
PAPER_VAL_LOSS = {"gd": 1.7, "wp": 2.5e-3, "nso": 5.5e-4}
_PAPER_SETTING = {"d": 100, "r": 5, "m": 2500, "lr": 1e-3, "sigma": 0.08}


def _summarise(runs: list[dict], methods: Sequence[str]) -> dict:
    out = {}
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "paper_val_loss": PAPER_VAL_LOSS[method]}
        for key in ("final_train_loss", "final_val_loss", "hessian_trace", "wall_time_s"):
            values = [r[key] for r in rs if r[key] is not None]
            entry[key] = values
            entry[key + "_mean"] = float(np.mean(values)) if values else None
        entry["hessian_trace_estimated"] = [r.get("hessian_trace_estimated") for r in rs]
        out[method] = entry
    return out


def run_experiment(
    seeds: Sequence[int] = (0,),
    steps: int = 5000,
    methods: Sequence[str] = METHODS,
    *,
    d: int = 100,
    r: int = 5,
    m: int | None = None,
    lr: float = 1e-3,
    sigma: float = 0.08,
    init_scale: float = 1.0,
    objective: str = "half_mse",
    log_every: int = 50,
    num_threads: int | None = 1,
    say=print,
) -> dict:
    """Every method on every seed (one problem per seed, shared by the methods): the JSON-ready results
    ``{"experiment", "config", "paper_val_loss", "summary", "runs", "total_wall_time_s", "versions"}``.
    """
    from ... import __version__

    m = 5 * d * r if m is None else int(m)
    cfg = {
        "d": d,
        "r": r,
        "m": m,
        "lr": lr,
        "sigma": sigma,
        "steps": steps,
        "log_every": log_every,
        "init_scale": init_scale,
        "objective": objective,
        "methods": list(methods),
        "seeds": list(seeds),
        "k": 1,
        "two_sided": True,
        "threads": num_threads,
    }
    runs = []
    t_all = time.perf_counter()
    for seed in seeds:
        t0 = time.perf_counter()
        problem = make_problem(d, r, m, seed=seed)
        say(f"seed {seed}: problem drawn in {time.perf_counter() - t0:.1f}s")
        for method in methods:
            out = run_matrix_sensing(
                method,
                seed,
                steps,
                problem=problem,
                lr=lr,
                sigma=sigma,
                init_scale=init_scale,
                objective=objective,
                log_every=log_every,
                num_threads=num_threads,
            )
            out.pop("U")
            runs.append(out)
            trace = "n/a" if out["hessian_trace"] is None else f"{out['hessian_trace']:.4g}"
            say(
                f"  {method:>4}: train {out['final_train_loss']:.3e}  val {out['final_val_loss']:.3e} "
                f"(paper {PAPER_VAL_LOSS[method]:.1e})  Tr H {trace}  {out['wall_time_s']:.1f}s"
            )
    return {
        "experiment": "matrix_sensing",
        "config": cfg,
        "paper_val_loss": PAPER_VAL_LOSS,
        "summary": _summarise(runs, methods),
        "runs": runs,
        "total_wall_time_s": time.perf_counter() - t_all,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": np.__version__,
            "hessian_tools": __version__,
        },
    }


def write_results(results: dict, out_dir: str | Path) -> list[Path]:
    """Write OUT/matrix_sensing.json and the figure (png + pdf); returns the paths written. The
    paper's final validation losses are drawn only for the paper's own set-up.
    """
    from ..io import atomic_write_json
    from ..plots import plot_matrix_sensing

    out_dir = Path(out_dir)
    json_path = atomic_write_json(out_dir / "matrix_sensing.json", results)
    cfg = results["config"]
    paper_setup = all(cfg[k] == v for k, v in _PAPER_SETTING.items())
    shown = results if paper_setup else {k: v for k, v in results.items() if k != "paper_val_loss"}
    return [json_path, *plot_matrix_sensing(shown, out_dir, "matrix_sensing")]
