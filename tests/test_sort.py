"""convexddn._sort: float32 rows sorted as integer keys give torch's sorted values."""
import math

import pytest
import torch

from convexddn import _sort
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


@pytest.mark.parametrize("shape", [(2100, 131), (6, 50_000), (1, 300_000), (9, 32, 1024)])
@pytest.mark.parametrize("descending", [False, True])
def test_flat_radix_sort_of_row_tagged_keys_gives_each_rows_order(shape, descending, monkeypatch):
    # Large enough for the flat radix sorts (two chunks of 131072 entries, rows of at least
    # 64): rows split into chunks (2100 rows of 131 in 3 chunks of 700; a row of 300,000
    # alone).
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen) * torch.logspace(-40, 38, shape[-1])
    flat = x.view(-1, shape[-1])
    flat[:, :10] = torch.tensor([-0.0, 0.0, 1e-42, -1e-42, math.inf, -math.inf, 3.4e38, -3.4e38, 1.0, 1.0])
    flat[1::2] = -flat[1::2].abs()  # rows of negatives only
    flat[::3, 1::2] = flat[::3, ::2][:, : shape[-1] // 2]  # ties
    calls = []
    radix = _sort._radix_rows
    monkeypatch.setattr(_sort, "_radix_rows", lambda *a: calls.append(a[0].shape) or radix(*a))
    for dim in range(-1, -len(shape) - 1, -1):
        want = torch.sort(x, dim=dim, descending=descending).values
        for t in (x, x.transpose(0, -1).contiguous().transpose(0, -1)):  # contiguous, transposed
            got = sort_values(t, dim=dim, descending=descending)
            assert got.is_contiguous() and got.shape == x.shape
            assert torch.equal(got, want)
    # The flat radix sorts ran wherever the rows were long enough (64 entries) and more than
    # one (a single row sorts its untagged int32 keys).
    assert x.numel() >= _sort._RADIX_MIN
    assert len(calls) == 2 * sum(n >= _sort._RADIX_ROW and n < x.numel() for n in shape)


def test_flat_radix_sort_puts_nan_where_its_sign_bit_says():
    x = torch.randn(512, 1024, generator=torch.Generator().manual_seed(2))  # the flat radix sorts
    x[5, 100] = math.nan
    x[7, 3] = -math.nan
    got = sort_values(x)
    assert math.isnan(got[5, -1]) and not torch.isnan(got[5, :-1]).any()
    assert math.isnan(got[7, 0]) and torch.signbit(got[7, 0]) and not torch.isnan(got[7, 1:]).any()
    rest = torch.ones(512, dtype=torch.bool)
    rest[[5, 7]] = False
    assert torch.equal(got[rest], torch.sort(x[rest], dim=-1).values)
