"""convexddn._sort: float32 rows sorted as integer keys give torch's sorted values."""
import math

import pytest
import torch

from convexddn._sort import sort_values


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("dim", [-1, 0])
def test_same_values_as_torch_sort(descending, dim):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, generator=gen)
    x[0, :8] = torch.tensor([-0.0, 0.0, 1e-42, -1e-42, math.inf, -math.inf, 3.4e38, -3.4e38])
    x[1] = -x[1].abs()
    x[2, ::2] = x[2, 1::2]  # ties
    for t in (x, x[:, ::3], x.mT.contiguous().mT):  # contiguous, strided, transposed
        got = sort_values(t, dim=dim, descending=descending)
        assert got.is_contiguous()
        # Equal entry for entry; -0.0 == 0.0, so only their order can differ.
        assert torch.equal(got, torch.sort(t, dim=dim, descending=descending).values)


def test_nan_goes_to_the_end_its_sign_bit_says_and_other_dtypes_pass_through():
    x = torch.tensor([[1.0, math.nan, -2.0, 0.5]])
    neg = -x  # NaN with its sign bit set
    assert math.isnan(sort_values(x)[0, -1]) and torch.equal(sort_values(x)[0, :3], torch.tensor([-2.0, 0.5, 1.0]))
    assert torch.signbit(neg[0, 1]) and math.isnan(sort_values(neg)[0, 0])
    assert torch.equal(sort_values(neg)[0, 1:], torch.tensor([-1.0, -0.5, 2.0]))
    d = torch.randn(3, 7, dtype=torch.float64)
    assert torch.equal(sort_values(d, descending=True), d.sort(-1, descending=True).values)
    h = torch.randn(3, 7).to(torch.bfloat16)
    assert torch.equal(sort_values(h), h.sort(-1).values)
