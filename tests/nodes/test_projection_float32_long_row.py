"""project_lp(p=2) on long float32 rows: the norm must be accumulated wider than float32
(vector_norm's float32 accumulation was 3000 eps off at n = 1e7), so that y lies on the
ball's boundary to a few ulp and a row just outside is projected, not returned as is."""
from __future__ import annotations

import pytest
import torch

import convexddn.functional as F
from convexddn.nodes.projection.kernels import _norm2


def _row(n: int) -> torch.Tensor:
    torch.manual_seed(0)
    return 3 * torch.randn(1, n, dtype=torch.float32)


def test_norm2_float32_long_row_is_float64_accurate() -> None:
    x = _row(2_000_000)
    exact = x.double().square().sum().sqrt()
    got = _norm2(x, -1, torch.float32)
    assert got.dtype == torch.float32
    assert abs(got.double().item() / exact.item() - 1) <= torch.finfo(torch.float32).eps


@pytest.mark.parametrize("mode", ["ball", "sphere"])
def test_project_l2_float32_long_row_on_boundary(mode: str) -> None:
    x = _row(2_000_000)
    y = F.project_lp(x, 2, mode=mode, radius=1.0).double()
    expected = x.double() / x.double().norm(dim=-1, keepdim=True)
    assert abs(y.norm().item() - 1) < 4 * torch.finfo(torch.float32).eps
    assert ((y - expected).abs().max() / expected.abs().max()).item() < 1e-6


def test_project_l2_float32_long_row_just_outside_is_projected() -> None:
    x = _row(2_000_000)
    x = x / x.double().norm().float() * 1.0002  # ‖x‖ = 1.0002 (to float32's rounding)
    y = F.project_lp(x, 2, radius=1.0).double()
    assert abs(y.norm().item() - 1) < 4 * torch.finfo(torch.float32).eps
