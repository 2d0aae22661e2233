"""Robust pooling's backward on float32 rows long enough that a float32 sum's worst-case
rounding bound ``n eps`` reaches the Hessian sum itself: the singularity test must judge
the sum by its actual (float64-accumulated) rounding, not declare every long row singular
and return a zero gradient (with a false :class:`~convexddn.errors.GradientWarning`)."""
from __future__ import annotations

import warnings

import pytest
import torch

from convexddn.errors import GradientWarning
from convexddn.nodes.pooling import robust_pool
from convexddn.nodes.pooling.backward import _nonsingular


def _expected(pen: str, x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Table 1's gradient ``phi''(y - x_i) / sum_j phi''(y - x_j)`` in float64, closed form."""
    r = (y.double().unsqueeze(-1) - x.double()) / alpha
    h = {"pseudo_huber": (1 + r * r) ** -1.5, "welsch": (1 - r * r) * torch.exp(-r * r / 2)}[pen]
    return h / h.sum(-1, keepdim=True)


@pytest.mark.parametrize("pen,n,alpha", [("pseudo_huber", 2 ** 23 + 1, 1.0), ("welsch", 1_000_000, 0.4)])
def test_long_float32_row_gradient(pen: str, n: int, alpha: float) -> None:
    # pseudo-Huber: weights all > 0, sw == size and n eps32 > 1; Welsch at alpha 0.4:
    # weights of both signs, sw / size ~ 0.1 < n eps32 = 0.12 (a 1000 x 1000 image pooled).
    torch.manual_seed(0)
    x = torch.randn(1, n, dtype=torch.float32, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        y = robust_pool(x, pen, alpha=alpha)
        y.sum().backward()
    expected = _expected(pen, x.detach(), y.detach(), alpha)
    err = (x.grad.double() - expected).abs().max() / expected.abs().max()
    assert err < 1e-5
    assert abs(x.grad.double().sum().item() - 1.0) < 1e-4


def test_nonsingular_bound_uses_accumulator_rounding() -> None:
    # A float64-accumulated sum of float32 terms: its noise is eps32 + n eps64 of the
    # absolute sum, so a row of positive weights is nonsingular at any length, while a
    # sum truly within the terms' own rounding stays singular.
    n, eps32 = 2 ** 24, torch.finfo(torch.float32).eps
    size = torch.tensor([[float(n)], [float(n)], [float(n)]], dtype=torch.float64)
    sw = torch.tensor([[float(n)], [0.5 * eps32 * n], [4 * eps32 * n]], dtype=torch.float64)
    assert _nonsingular(sw, size, n, eps32).tolist() == [True, False, True]


def test_row_sum_float32_accumulates_wide() -> None:
    # Partial sums of float32 terms added in float64, a row length not a multiple of the part.
    from convexddn.nodes.pooling.backward import _row_sum

    torch.manual_seed(0)
    w = torch.rand(2, 2 ** 23 + 3, dtype=torch.float32)
    got = _row_sum(w)
    exact = w.double().sum(-1, keepdim=True)
    assert got.dtype == torch.float64
    assert ((got - exact).abs() / exact).max().item() < 4 * torch.finfo(torch.float32).eps
