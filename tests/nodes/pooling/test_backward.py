"""Tests of convexddn.nodes.pooling.backward: the singular-curvature verdict of the closed-form
backward (and its forward-mode twin) at a degenerate minimiser, where the curvature sum
vanishes and the solver's y is known only to its noise.

Welsch at alpha = 0.5 on two clusters 1 apart (2 alpha) has its minimiser at 0.5 with
sum_i phi''(0.5 - x_i) = 0: dy/dx does not exist. Until 2026-12-06 x = (0, 1) got zero and a
GradientWarning (y = 0.5 exactly), while the same problem with every point doubled, x = (0, 0, 1, 1)
in float64, stopped at y = 0.499995576, where the curvature is 1.9e-10 (a cancellation of terms
of 1e-4 that y's own uncertainty moves by a factor of 7), and returned dy/dx = +-5.65e4 silently.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from convexddn.errors import GradientWarning, SolverWarning
from convexddn.nodes.pooling import Penalty, robust_pool

F64 = torch.float64
# Degenerate rows (two clusters 2 alpha apart, each point repeated 1, 2 or 3 times).
DEGENERATE = ([0.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0])


class UserWelsch(Penalty):
    """Welsch's formulas in a user's penalty: the derived row sums and weights (whose
    size is sum |w|, which itself vanishes where every point sits at an inflection)."""

    name = "user_welsch"
    convex = False

    def phi(self, z, a):
        return -torch.expm1(-0.5 * (z / a) ** 2)

    def dphi(self, z, a):
        return z / (a * a) * torch.exp(-0.5 * (z / a) ** 2)

    def d2phi(self, z, a):
        r2 = (z / a) ** 2
        return (1 - r2) * torch.exp(-0.5 * r2) / (a * a)

    def d2phi_dalpha(self, z, a):
        r = z / a
        return r * (r * r - 2) * torch.exp(-0.5 * r * r) / (a * a)


def _pool(x: torch.Tensor, penalty, alpha: float) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)  # (the forward says y is unresolved: not under test)
        return robust_pool(x, penalty, alpha)


def _backward(x: torch.Tensor, penalty, alpha: float, gy: torch.Tensor | None = None):
    """(grad_x, the GradientWarnings of the backward)."""
    x = x.detach().clone().requires_grad_()
    y = _pool(x, penalty, alpha)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y.backward(torch.ones_like(y) if gy is None else gy)
    return x.grad, [w for w in rec if issubclass(w.category, GradientWarning)]


@pytest.mark.parametrize("penalty", ["welsch", UserWelsch()], ids=["welsch", "user"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("xs", DEGENERATE, ids=lambda xs: f"n{len(xs)}")
def test_degenerate_minimum_warns_and_gives_zero(xs, dtype, penalty):
    grad, warned = _backward(torch.tensor(xs, dtype=dtype), penalty, 0.5)
    assert len(warned) == 1, f"no GradientWarning for {xs} ({dtype}): gradient {grad.tolist()}"
    assert "degenerate minimum" in str(warned[0].message)
    assert torch.equal(grad, torch.zeros_like(grad))  # the same as (0, 1): the documented convention


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("xs", DEGENERATE, ids=lambda xs: f"n{len(xs)}")
def test_degenerate_minimum_forward_mode_agrees(xs, dtype):
    x = torch.tensor(xs, dtype=dtype)
    tangent = torch.zeros_like(x)
    tangent[0] = 1.0
    with warnings.catch_warnings(record=True) as rec, fwAD.dual_level():
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", SolverWarning)
        t = fwAD.unpack_dual(robust_pool(fwAD.make_dual(x, tangent), "welsch", 0.5)).tangent
    assert t.item() == 0.0
    assert any(issubclass(w.category, GradientWarning) for w in rec)


def test_degenerate_row_is_named_and_others_keep_their_gradient():
    # Row 1 degenerate, rows 0 and 2 well-posed: only row 1 is named and zeroed.
    x = torch.tensor([[0.0, 0.1, 1.0, 0.2], [0.0, 0.0, 1.0, 1.0], [0.3, 0.0, 1.0, 1.0]], dtype=F64)
    grad, warned = _backward(x, "welsch", 0.5)
    assert len(warned) == 1 and "indices [(1,)]" in str(warned[0].message)
    assert torch.equal(grad[1], torch.zeros(4, dtype=F64))
    for i in (0, 2):
        alone, none = _backward(x[i], "welsch", 0.5)
        assert not none
        torch.testing.assert_close(grad[i], alone, rtol=0, atol=0)


def _central_fd(x: torch.Tensor, penalty: str, alpha: float, h: float = 1e-6) -> torch.Tensor:
    fd = torch.empty_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e[i] = h
        fd[i] = (_pool(x + e, penalty, alpha) - _pool(x - e, penalty, alpha)) / (2 * h)
    return fd


@pytest.mark.parametrize("xs, alpha", [
    ([0.0, 0.02, 1.0, 1.0], 0.45),  # near the degenerate case, a strict minimum near 1 (unique: asymmetric)
    ([0.0, 0.0, 1.0, 1.0], 0.55),  # the minimiser 0.5 with positive curvature
    ([0.0, 0.0, 1.0, 1.001], 0.4999),  # curvature a cancellation of its terms, resolved: checked, kept
])
def test_nearby_well_posed_rows_match_finite_differences(xs, alpha):
    x = torch.tensor(xs, dtype=F64)
    grad, warned = _backward(x, "welsch", alpha)
    assert not warned
    assert grad.abs().max() > 0.1
    torch.testing.assert_close(grad, _central_fd(x, "welsch", alpha), rtol=1e-5, atol=1e-6)
