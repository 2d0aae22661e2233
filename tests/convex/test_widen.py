"""Casts between the caller's dtype and the solver's float64 (:mod:`convexddn.convex.widen`):
derivatives beyond the caller's range warn, in either mode.

Expected values: y = argmin ‖y − 1000x‖² = 1000x, so dy = 1000 dx and dL/dx = 1000 dL/dy.
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import convexddn as cddn
from convexddn.errors import GradientWarning


def _scaling_layer():
    x, y = cp.Parameter(3), cp.Variable(3)
    return cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - 1000 * x)), [y >= -1e9]), [x], [y])


@pytest.mark.parametrize("dtype, big", [(torch.float16, 100.0), (torch.float32, 1e36)])
def test_forward_mode_tangents_beyond_the_callers_range_warn(dtype, big):
    # dy_0 = 1000 · big (1e5 in float16, 1e39 in float32) came back as inf without a warning.
    layer, x = _scaling_layer(), torch.tensor([1.0, 2.0, 3.0], dtype=dtype)
    with fwAD.dual_level():
        with pytest.warns(GradientWarning, match=rf"forward mode: 1 tangent entries of the solution exceed the "
                                                 rf"range of {dtype}"):
            out = layer(fwAD.make_dual(x, torch.tensor([big, 1.0, 1.0], dtype=dtype)))
        y, t = fwAD.unpack_dual(out)
    assert y.dtype == t.dtype == dtype and torch.isinf(t[0])
    torch.testing.assert_close(y, 1000 * x)
    torch.testing.assert_close(t[1:], torch.full((2,), 1000.0, dtype=dtype))
    with warnings.catch_warnings(), fwAD.dual_level():  # tangents that fit: no warning
        warnings.simplefilter("error")
        t = fwAD.unpack_dual(layer(fwAD.make_dual(x, torch.tensor([0.5, 1.0, 1.0], dtype=dtype)))).tangent
    torch.testing.assert_close(t, torch.tensor([500.0, 1000.0, 1000.0], dtype=dtype))


def test_reverse_mode_through_the_narrowing_cast_is_exact():
    # The cast back to float32 passes the gradient on unchanged (widened to float64).
    layer = _scaling_layer()
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (layer(x) * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, torch.tensor([1000.0, -2000.0, 500.0]))
