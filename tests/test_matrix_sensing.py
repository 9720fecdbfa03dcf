"""Matrix sensing: packing, closed-form gradient and Hessian trace vs autograd, short runs, the script."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.func import hessian

from hessian_tools.app.experiments import matrix_sensing as ms
from hessian_tools.app.experiments.matrix_sensing import (
    exact_hessian_trace,
    gradient,
    initial_U,
    loss,
    make_problem,
    objective_scale,
    objective_value,
    pack_symmetric,
    residuals,
    run_matrix_sensing,
    unpack_symmetric,
)

ROOT = Path(__file__).resolve().parents[1]


def test_pack_unpack_round_trip_and_inner_product():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    S = (G + G.transpose(1, 2)) / 2
    packed = pack_symmetric(S)
    assert packed.shape == (3, 15)
    assert torch.allclose(unpack_symmetric(packed, 5), S)
    inner = (S[0] * S[1]).sum()
    assert torch.allclose(packed[0] @ packed[1], inner)


def test_problem_matches_its_definition():
    p = make_problem(d=6, r=2, m=30, seed=1, dtype=torch.float64)
    assert p.A_train.shape == (30, 21) and p.A_val.shape == (30, 21) and p.m == 30
    A = unpack_symmetric(p.A_train, 6)
    assert torch.allclose(A, A.transpose(1, 2))
    assert torch.allclose(p.y_train, (A * p.X_star).sum((1, 2)))
    assert torch.linalg.matrix_rank(p.X_star) == 2
    assert loss(torch.zeros(6, 6, dtype=torch.float64), p, "val") == pytest.approx(1.0)
    assert loss(p.U_star @ torch.eye(2, 6, dtype=torch.float64), p) == pytest.approx(0.0, abs=1e-20)
    q = make_problem(d=6, r=2, m=30, seed=1, dtype=torch.float64)
    assert torch.equal(q.A_val, p.A_val) and torch.equal(q.y_train, p.y_train)
    # m defaults to 5·d·r
    assert make_problem(d=4, r=1, seed=0).m == 20


@pytest.mark.parametrize("objective", ["half_mse", "relative"])
def test_closed_form_gradient_matches_autograd(objective):
    p = make_problem(d=7, r=2, m=40, seed=2, dtype=torch.float64)
    U = initial_U(p, seed=2, init_scale=0.7).requires_grad_(True)
    f = objective_value(U, p, objective)
    (auto,) = torch.autograd.grad(f, U)
    closed = gradient(U.detach(), p, objective)
    assert torch.allclose(closed, auto, rtol=1e-10, atol=1e-12)
    # and f is Σ r² / (m s)
    r = residuals(U.detach(), p)
    assert float(f.detach()) == pytest.approx(
        float(r.pow(2).sum()) / (40 * objective_scale(p, objective)), rel=1e-12
    )


@pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)  # torch.func internals
@pytest.mark.parametrize("objective", ["half_mse", "relative"])
def test_exact_trace_matches_torch_func_hessian(objective):
    p = make_problem(d=4, r=1, m=20, seed=3, dtype=torch.float64)
    for U in (initial_U(p, seed=0), p.U_star @ torch.ones(1, 4, dtype=torch.float64) * 0.5):
        H = hessian(lambda V: objective_value(V, p, objective))(U)  # (4, 4, 4, 4)
        expected = float(torch.einsum("ijij->", H))
        assert exact_hessian_trace(U, p, objective, chunk=7) == pytest.approx(expected, rel=1e-10)


def test_trace_is_positive_definite_part_at_a_global_minimum():
    # at U with UUᵀ = X* the residual term vanishes and the trace is (2/(m s)) Σ ‖2 A_i U‖²
    p = make_problem(d=5, r=2, m=50, seed=4, dtype=torch.float64)
    U = torch.cat([p.U_star, torch.zeros(5, 3, dtype=torch.float64)], 1)
    A = unpack_symmetric(p.A_train, 5)
    expected = (2 / (50 * 2.0)) * float((2 * A @ U).pow(2).sum())
    assert exact_hessian_trace(U, p) == pytest.approx(expected, rel=1e-12)


def test_short_runs_decrease_the_loss_and_are_seeded():
    p = make_problem(d=20, r=2, m=200, seed=0)
    outs = {}
    for method in ("gd", "wp", "nso"):
        out = run_matrix_sensing(method, seed=0, steps=300, problem=p, lr=2e-3, sigma=0.05, log_every=100)
        curve = out["curve"]
        assert curve["step"] == [0, 100, 200, 300]
        assert curve["train_loss"][-1] < 0.05 * curve["train_loss"][0]
        assert curve["val_loss"][-1] < curve["val_loss"][0]
        assert not out["diverged"] and out["hessian_trace"] > 0 and out["wall_time_s"] > 0
        assert out["final_val_loss"] == curve["val_loss"][-1]
        outs[method] = out
    # all methods start from the same U on the same data; the noisy ones take different paths
    assert outs["gd"]["curve"]["train_loss"][0] == outs["nso"]["curve"]["train_loss"][0]
    assert outs["wp"]["final_train_loss"] != outs["gd"]["final_train_loss"]
    again = run_matrix_sensing("nso", seed=0, steps=300, problem=p, lr=2e-3, sigma=0.05, log_every=100)
    assert torch.equal(again["U"], outs["nso"]["U"])


def test_one_step_of_each_method_is_its_update_rule():
    """The runs go through hessian_tools.optim: one step of GD, WP-GD and two-sided NSO equals the
    update written out by hand with the same noise stream."""
    lr, sigma = 1e-3, 0.05
    problem = make_problem(d=6, r=1, m=40, seed=0, dtype=torch.float64)
    U0 = ms.initial_U(problem, seed=0)
    E = sigma * torch.randn(U0.shape, generator=torch.Generator().manual_seed(104_729), dtype=torch.float64)
    g = lambda U: ms.gradient(U, problem)  # noqa: E731
    expected = {
        "gd": U0 - lr * g(U0),
        "wp": U0 - lr * g(U0 + E),
        "nso": U0 - lr * (g(U0 + E) + g(U0 - E)) / 2,
    }
    for method, U1 in expected.items():
        out = run_matrix_sensing(method, seed=0, steps=1, problem=problem, lr=lr, sigma=sigma, trace=False)
        assert torch.allclose(out["U"], U1, rtol=0, atol=1e-14), method


def test_nso_regularises_the_trace_over_gd():
    p = make_problem(d=20, r=2, m=200, seed=1)
    gd = run_matrix_sensing("gd", seed=1, steps=400, problem=p, lr=2e-3, log_every=400)
    nso = run_matrix_sensing("nso", seed=1, steps=400, problem=p, lr=2e-3, sigma=0.2, log_every=400)
    assert nso["hessian_trace"] < gd["hessian_trace"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        run_matrix_sensing("sam", d=4, r=1, steps=1)
    with pytest.raises(ValueError, match="objective must be one of"):
        run_matrix_sensing("gd", d=4, r=1, steps=1, objective="mse")
    with pytest.raises(ValueError, match="1 ≤ r ≤ d"):
        make_problem(d=3, r=4)


def test_analysis_script_writes_json_and_png(tmp_path):
    spec = importlib.util.spec_from_file_location("ms_script", ROOT / "analysis" / "matrix_sensing.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    assert (
        script.main(
            [
                "--seeds",
                "0",
                "1",
                "--steps",
                "40",
                "--d",
                "8",
                "--r",
                "1",
                "--log-every",
                "20",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    data = json.loads((tmp_path / "matrix_sensing.json").read_text())
    assert data["config"]["m"] == 40 and len(data["runs"]) == 6
    assert set(data["summary"]) == {"gd", "wp", "nso"}
    for run in data["runs"]:
        assert run["curve"]["step"] == [0, 20, 40] and "U" not in run
        assert run["hessian_trace"] > 0 and run["wall_time_s"] > 0
    assert data["config"]["threads"] == 1 and torch.get_num_threads() == threads  # restored
    png = (tmp_path / "matrix_sensing.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (tmp_path / "matrix_sensing.pdf").stat().st_size > 1000


def test_core_trace_estimator_agrees_with_the_closed_form():
    """Hutch++ on the HessianOperator of the objective lands within 3 stderr of the exact trace."""
    from hessian_tools.app.experiments import matrix_sensing as ms

    problem = ms.make_problem(d=6, r=2, m=60, seed=3, dtype=torch.float64)
    U = ms.initial_U(problem, seed=1)
    exact = ms.exact_hessian_trace(U, problem)
    op = ms.hessian_operator(U, problem)
    torch.testing.assert_close(
        torch.trace(op.dense()), torch.tensor(exact, dtype=torch.float64), rtol=1e-9, atol=1e-9
    )
    est = ms.estimated_hessian_trace(U, problem, rtol=0.05, seed=0)
    assert abs(est["estimate"] - exact) <= 3 * est["stderr"] + 1e-9 and est["hvps"] > 0
