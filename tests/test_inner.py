"""``common.inner``: AᵀB summed accurately for tall float32 matrices, in every layout it is given."""

import pytest
import torch

from hessian_tools.estimators.common import inner

DIM = 1_000_003  # not a multiple of the chunk sizes: the remainder rows are summed too


def exact(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return A.double().T @ B.double()


def relative_error(A: torch.Tensor, B: torch.Tensor, value: torch.Tensor) -> float:
    """max |error| / (‖a_i‖‖b_j‖) over the entries."""
    scale = exact(A, A).diagonal().sqrt()[:, None] * exact(B, B).diagonal().sqrt()[None, :]
    return float(((value - exact(A, B)).abs() / scale).max())


@pytest.fixture(scope="module")
def rows():
    """A basis stored by rows (its transpose is the dim × j matrix), positive entries: the worst case
    for float32 sums, whose rounding errors then all add up."""
    return torch.rand(6, DIM, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("columns", [1, 4])
def test_rows_of_a_buffer_are_summed_to_about_1e8(rows, columns):
    A = rows.T  # stride(0) == 1: float32 partial sums of chunks of rows
    B = torch.rand(DIM, columns, generator=torch.Generator().manual_seed(1))
    value = inner(A, B)
    assert value.dtype == torch.float64 and value.shape == (6, columns)
    # measured 2e-8 to 8e-8 here; one float32 BLAS sum of 10⁷ terms is off by up to a few percent
    assert relative_error(A, B, value) < 2e-7
    assert relative_error(A, A, inner(A, A)) < 2e-7
    signs = torch.randn(DIM, columns, generator=torch.Generator().manual_seed(2))
    assert relative_error(A, signs, inner(A, signs)) < 2e-8  # measured 1e-9


def test_tall_row_major_matrices_and_single_columns_are_summed_in_float64():
    g = torch.Generator().manual_seed(2)
    A, x = torch.rand(DIM, 3, generator=g), torch.rand(DIM, 1, generator=g)
    assert relative_error(A, A, inner(A, A)) < 1e-12
    assert relative_error(x, x, inner(x, x)) < 1e-12
    assert relative_error(A, x, inner(A, x)) < 1e-12


def test_float64_and_short_inputs_are_one_product():
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(500, 4, generator=g), torch.randn(500, 2, generator=g)
    torch.testing.assert_close(inner(A, B), exact(A, B), rtol=1e-6, atol=1e-6)
    A64 = torch.randn(DIM, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(inner(A64, A64), A64.T @ A64, rtol=1e-14, atol=0)
    assert inner(A[:, :0], B).shape == (0, 2)
