"""Memory budgets: sizes, the chunk and micro-batch chooser, and products and estimates that do not
depend on the budget (only the memory they take does)."""

import numpy as np
import pytest
import torch
from helpers import PROBLEMS, batches, exact_hessian, known_spectrum

import hessian_tools as ht
from hessian_tools.app.cli import build_parser
from hessian_tools.app.pipeline import AnalysisSettings
from hessian_tools.estimators import common
from hessian_tools.estimators.probes import rademacher, rademacher_blocks
from hessian_tools.operators import memory
from hessian_tools.operators.memory import (
    ChunkPlanner,
    Measurement,
    MemoryBudgetError,
    columns_within,
    parse_size,
    resolve_budget,
    samples_within,
)


# ----------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    "text,expected",
    [
        ("4GB", 4 * 10**9),
        ("512MB", 512 * 10**6),
        ("2.5GiB", int(2.5 * 2**30)),
        ("64 kib", 64 * 1024),
        ("1e9", 10**9),
        ("100", 100),
        (" 3 TB ", 3 * 10**12),
        (2048, 2048),
        (1.5e6, 1_500_000),
    ],
)
def test_sizes_parse(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad", ["4 lightyears", "", "GB", "-1GB", "0", "0.1", "4 G B", "nan", True, None, [4]]
)
def test_bad_sizes_get_one_clear_error(bad):
    with pytest.raises(MemoryBudgetError, match=r"positive size in bytes.*e\.g\. 4GB, 512MB or 2\.5GiB"):
        parse_size(bad)


def test_budget_resolution():
    assert resolve_budget(None) is None
    assert resolve_budget("1GiB") == 2**30
    auto = resolve_budget("auto")
    available = memory.available_memory()
    assert auto > 0 and (available is None or auto == int(available * memory.DEFAULT_FRACTION))
    with pytest.raises(MemoryBudgetError, match="memory_budget"):
        resolve_budget("lots")


def test_cli_and_settings_refuse_bad_budgets(capsys):
    parser = build_parser()
    args = parser.parse_args(["analyze", "ckpt.pt", "--memory-budget", "512MB"])
    assert args.memory_budget == "512MB"
    assert parser.parse_args(["compare", "a", "b", "--memory-budget", "none"]).memory_budget is None
    assert parser.parse_args(["bound", "a"]).memory_budget == "auto"
    assert parser.parse_args(["curve", "run", "--memory-budget", "2.5GiB"]).memory_budget == "2.5GiB"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["analyze", "ckpt.pt", "--memory-budget", "4 lightyears"])
    assert exc.value.code == 2
    assert "--memory-budget must be a positive size" in capsys.readouterr().err
    with pytest.raises(MemoryBudgetError):
        AnalysisSettings(memory_budget="4 lightyears")


# ----------------------------------------------------------------------------- the chooser
def test_columns_within_the_budget():
    assert columns_within(budget=100, fixed=20, per_column=10, most=16) == 8
    assert columns_within(budget=100, fixed=20, per_column=10, most=5) == 5
    assert columns_within(budget=100, fixed=20, per_column=10, most=None) == 8
    assert columns_within(budget=25, fixed=20, per_column=10, most=16) == 1  # never fewer than one
    assert columns_within(budget=10, fixed=20, per_column=10, most=16) == 1


def test_samples_within_the_budget():
    assert samples_within(budget=100, batch=128, cost=100) == 128  # fits
    assert samples_within(budget=100, batch=128, cost=400) == 32  # proportional
    assert samples_within(budget=100, batch=128, cost=10**6) == 1
    assert samples_within(budget=100, batch=1, cost=400) == 1
    assert samples_within(budget=100, batch=2, cost=101) == 1  # always smaller than the batch


def _planner(budget, cost, batch=128, most=16):
    """A planner over one batch of ``batch`` samples whose product of c columns on n samples costs
    ``cost(n, c)`` bytes (no product is computed)."""
    model, loss_fn, X, y = PROBLEMS["mlp"]()
    X, y = X.repeat(batch // X.shape[0] + 1, 1)[:batch], y.repeat(batch // y.shape[0] + 1)[:batch]
    risk = ht.EmpiricalRisk(model, loss_fn, (X, y))
    planner = ChunkPlanner(budget, risk, most, run=None, estimate=None)
    planner._cost = lambda path, first, columns, chunk: Measurement(
        cost(first[3], columns), 0.0, "measured", first[3]
    )
    return planner


def test_chunk_from_the_measured_cost_per_column():
    # one column: 1000 + 100 per sample of activations, each further column 500 + 10 per sample
    cost = lambda n, c: 1000 + 100 * n + c * (500 + 10 * n)  # noqa: E731
    per_column, fixed = 500 + 10 * 128, 1000 + 100 * 128
    budget = fixed + 5 * per_column + 7
    planner = _planner(budget, cost)
    assert planner.chunk("func", 1) == 1  # one column: no chunk needed yet
    assert planner.plan.chunk is None and planner.plan.max_batch_size is None
    assert planner.chunk("func", 64) == 5
    plan = planner.plan
    assert (plan.fixed, plan.per_column, plan.chunk, plan.max_batch_size) == (fixed, per_column, 5, None)
    assert "chunks of 5" in str(plan)
    assert _planner(10**9, cost).chunk("func", 64) == 16  # the budget never raises the chunk above chunk_size
    assert _planner(10**9, cost, most=None).chunk("func", 64) > 16


def test_falls_back_to_one_column_then_to_micro_batches():
    cost = lambda n, c: 1000 + 100 * n + c * (500 + 10 * n)  # noqa: E731
    one = cost(128, 1)
    planner = _planner(one + 10, cost)  # one column fits, two do not
    assert planner.chunk("func", 16) == 1 and planner.plan.max_batch_size is None
    planner = _planner(one // 3, cost)  # not even one column: micro-batches until one fits
    assert planner.chunk("func", 16) == 1
    size = planner.plan.max_batch_size
    assert size is not None and size < 128 and cost(size, 1) <= one // 3
    assert planner.risk.source.max_batch_size == size
    assert sum(n for *_, n in planner.risk.batches()) == 128  # every sample still there, split
    planner = _planner(10, cost)  # nothing fits: one sample per micro-batch, one column per chunk
    assert planner.chunk("func", 16) == 1 and planner.plan.max_batch_size == 1


def test_no_budget_keeps_chunk_size_and_batches():
    planner = _planner(None, lambda n, c: 10**12)
    assert planner.chunk("func", 64) == 16 and planner.plan is None
    assert planner.risk.source.max_batch_size is None


# ----------------------------------------------------------------------------- results do not depend on it
@pytest.mark.parametrize("backend", ["auto", "func", "autograd"])
def test_products_under_a_tiny_budget_equal_unbudgeted_ones(backend):
    model, loss_fn, X, y = PROBLEMS["cnn_bn"]()
    data = batches(X, y, 16)
    free = ht.HessianOperator(model, loss_fn, data, dtype=torch.float64, backend=backend, memory_budget=None)
    tight = ht.HessianOperator(model, loss_fn, data, dtype=torch.float64, backend=backend, memory_budget=1)
    V = torch.randn(free.dim, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = free.matmat(V)
    got = tight.matmat(V)
    plan = tight.memory_plan
    assert plan.chunk == 1 and plan.max_batch_size == 1  # one column of one sample at a time
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tight.matvec(V[:, 0]), expected[:, 0], rtol=1e-12, atol=1e-14)
    assert tight.hvps == 8 and tight.passes == 2  # the measuring products are not counted
    torch.testing.assert_close(got, tight.matmat(V), rtol=0, atol=0)  # the same plan every time


def test_chunking_alone_is_exact():
    model, loss_fn, X, y = PROBLEMS["mlp"]()
    H = exact_hessian(model, loss_fn, X, y)
    op = ht.HessianOperator(model, loss_fn, (X, y), dtype=torch.float64, chunk_size=3, backend="func")
    torch.testing.assert_close(op.dense(block=7), H, rtol=1e-9, atol=1e-11)


def test_estimates_under_a_tiny_budget_are_unchanged():
    model, loss_fn, X, y = PROBLEMS["cnn_bn"]()
    data = batches(X, y, 20)
    ops = [
        ht.HessianOperator(model, loss_fn, data, dtype=torch.float64, memory_budget=budget)
        for budget in (None, "1kB")
    ]
    top = [ht.eigenvalues(op, k=3, tol=1e-8) for op in ops]
    np.testing.assert_allclose(top[1].values, top[0].values, rtol=1e-10)
    assert top[0].hvps == top[1].hvps
    for method in ("hutchpp", "hutchinson", "xtrace"):
        traces = [ht.trace(op, method=method, max_hvps=30, seed=3) for op in ops]
        assert traces[1].estimate == pytest.approx(traces[0].estimate, rel=1e-10)
        assert traces[1].stderr == pytest.approx(traces[0].stderr, rel=1e-8)


def test_lanczos_keeps_its_basis_in_the_operators_precision():
    H, lam = known_spectrum(dim=200)
    r64 = ht.eigenvalues(H, k=3, tol=1e-8)
    r32 = ht.eigenvalues(H.float(), k=3, tol=1e-4)
    assert r64.vectors.dtype == torch.float64 and r32.vectors.dtype == torch.float32
    np.testing.assert_allclose(r32.values, r64.values, rtol=1e-5)
    exact = lam.numpy()
    for value, res in zip(r32.values, r32.residuals):  # the residual bounds the error (float32 slack)
        assert np.min(np.abs(exact - value)) <= res + 1e-6 * abs(value)


def test_probe_blocks_are_the_probes_of_one_draw():
    one = torch.Generator().manual_seed(5)
    whole, after = rademacher(1001, 37, one), torch.rand(3, generator=one)
    split = torch.Generator().manual_seed(5)
    pieces = list(rademacher_blocks(1001, 37, split, 8, dtype=torch.float32))
    assert [(a, b) for a, b, _ in pieces] == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 37)]
    assert torch.equal(torch.cat([p for *_, p in pieces], dim=1), whole.float())
    assert torch.equal(torch.rand(3, generator=split), after)


@pytest.mark.parametrize("dim", [1003, 9])
def test_probe_blocks_drawn_in_many_packed_row_chunks_are_the_same_probes(monkeypatch, dim):
    import hessian_tools.estimators.probes as probes

    monkeypatch.setattr(probes, "_PACK_CHUNK_ENTRIES", 100)  # chunks of 8 rows, a remainder of 3 or 1
    one = torch.Generator().manual_seed(7)
    whole, after = rademacher(dim, 13, one), torch.rand(3, generator=one)
    split = torch.Generator().manual_seed(7)
    pieces = list(rademacher_blocks(dim, 13, split, 4, dtype=torch.float32))
    assert torch.equal(torch.cat([p for *_, p in pieces], dim=1), whole.float())
    assert torch.equal(torch.rand(3, generator=split), after)


class _Widths(ht.LinearOperator):
    def __init__(self, matrix):
        self.matrix, self.dim, self.dtype, self.widths = matrix, matrix.shape[0], matrix.dtype, []

    def _matmat(self, V):
        self.widths.append(V.shape[1])
        return self.matrix @ V


def test_trace_probes_go_through_in_bounded_pieces(monkeypatch):
    H, _ = known_spectrum(dim=300)
    expected = {m: ht.trace(H, method=m, rtol=0.001, max_hvps=200, seed=1) for m in ("hutchpp", "hutchinson")}
    monkeypatch.setattr(common, "STREAM_BYTES", 300 * 8 * 5)  # five float64 columns
    for method, reference in expected.items():
        op = _Widths(H)
        result = ht.trace(op, method=method, rtol=0.001, max_hvps=200, seed=1)
        assert max(op.widths) <= 5 and sum(op.widths) == result.hvps == reference.hvps
        assert result.estimate == pytest.approx(reference.estimate, rel=1e-12)
        assert result.stderr == pytest.approx(reference.stderr, rel=1e-9)


@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_gauss_newton_products_under_a_tiny_budget_equal_unbudgeted_ones(kind):
    model, loss_fn, X, y = PROBLEMS["cnn_bn"]()
    data = batches(X, y, 16)
    make = ht.GGNOperator if kind == "ggn" else ht.FisherOperator
    free = make(model, loss_fn, data, dtype=torch.float64, memory_budget=None)
    tight = make(model, loss_fn, data, dtype=torch.float64, memory_budget=1)
    V = torch.randn(free.dim, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(tight.matmat(V), free.matmat(V), rtol=1e-12, atol=1e-14)
    assert tight.memory_plan.chunk == 1 and tight.memory_plan.max_batch_size == 1


def test_auto_trace_method_is_xtrace_only_where_its_sketch_fits_the_budget():
    from hessian_tools.app.analyses import XTRACE_COLUMNS_PER_PROBE, trace_method_for

    dim, hvps = 1000, 48
    sketch = XTRACE_COLUMNS_PER_PROBE * dim * (hvps // 2) * 8
    fits = AnalysisSettings(trace_max_hvps=hvps, memory_budget=sketch)
    assert trace_method_for(fits, dim) == "xtrace"
    assert trace_method_for(AnalysisSettings(trace_max_hvps=hvps, memory_budget=sketch - 1), dim) == "hutchpp"
    assert trace_method_for(AnalysisSettings(trace_max_hvps=hvps, memory_budget=None), 10**9) == "xtrace"
    # an explicit choice is kept whatever the budget
    chosen = AnalysisSettings(trace_method="xtrace", trace_max_hvps=hvps, memory_budget=1)
    assert trace_method_for(chosen, dim) == "xtrace"
    with pytest.raises(ValueError, match="trace_method"):
        AnalysisSettings(trace_method="hutch")
