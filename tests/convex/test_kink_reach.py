"""An undecided complementary pair that the gradient reaches warns, however large the
derivative is on variables no parameter touches (:mod:`convexddn.convex.kink_reach`).

``sqrt(y) >= p``, ``min ‖y − q‖²`` has the closed form ``y = max(q, max(p, 0)²)``.
CVXPY's form adds a hypograph variable ``t ≥ p``, ``t² ≤ y``; at ``q₀ = 0``, ``p₀ ≤ 1e-4``
``t`` is known to √rounding only, and its derivative (2.4e3) set the scale the open
direction's component (0.16) was measured against: ``dL/dq₀ = 0.63`` where it is 0, silently.
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import pytest
import torch

import convexddn as cddn
from convexddn.errors import GradientWarning

F64 = torch.float64


def _layer(n):
    p, q, y = cp.Parameter(n), cp.Parameter(n), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - q)), [cp.sqrt(y) >= p])
    return cddn.ConvexLayer(prob, parameters=[p, q], variables=[y])


def _backward(layer, P, Q, W):
    P, Q = P.clone().requires_grad_(), Q.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (W * layer(P, Q)).sum().backward()
    warned = set()
    for w in caught:
        if issubclass(w.category, GradientWarning):
            warned |= {tuple(e) for e in w.message.elements}
    return P.grad, Q.grad, warned


@pytest.mark.parametrize("p0", [1e-2, 1e-3, 1e-4, 1e-5, 1e-6])
def test_near_the_tip_the_gradient_is_right_or_warned(p0):
    # Entry 0: y0 = p0², dL/dp0 = 2 p0 w0, dL/dq0 = 0; entry 1 inactive: y1 = q1.
    P = torch.tensor([[p0, -1.0]], dtype=F64)
    Q = torch.tensor([[0.0, 1.0]], dtype=F64)
    W = torch.tensor([[1.0, 0.5]], dtype=F64)
    gp, gq, warned = _backward(_layer(2), P, Q, W)
    exact_p = torch.tensor([[2 * p0, 0.0]], dtype=F64)
    exact_q = torch.tensor([[0.0, 0.5]], dtype=F64)
    right = bool(torch.allclose(gp, exact_p, atol=1e-6, rtol=0) and torch.allclose(gq, exact_q, atol=1e-6, rtol=0))
    assert right or (0,) in warned, (p0, gp, gq)
    if p0 >= 1e-3:  # (well inside float64's reach: exact, and quiet)
        assert right and not warned, (p0, gp, gq, warned)


def test_at_the_tip_the_kink_is_warned_and_smooth_elements_are_exact():
    # At p_i = q_i = 0, y_i = max(q_i, 0) has one-sided derivatives 1 and 0 in q_i.
    P = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 1.0], [1e-3, 0.0, 0.5]], dtype=F64)
    Q = torch.tensor([[0.0, 1e-3, 0.0], [-1.0, 0.1, 2.0], [-1.0, 0.0, 0.3]], dtype=F64)
    _, gq, warned = _backward(_layer(3), P, Q, torch.ones(3, 3, dtype=F64))
    assert {(0,), (2,)} <= warned
    assert (1,) not in warned
    torch.testing.assert_close(gq[1], torch.tensor([0.0, 0.0, 1.0], dtype=F64), atol=1e-8, rtol=0)


@pytest.mark.parametrize("p0", [1e-3, 1e-4, 1e-5])
def test_forward_mode_near_the_tip_is_right_or_warned(p0):
    # The tangent of y along q0 is 0 (y0 = p0² > q0 = 0); a tangent of 0.63 came back silently.
    import torch.autograd.forward_ad as fwAD

    P = torch.tensor([[p0, -1.0]], dtype=F64)
    Q = torch.tensor([[0.0, 1.0]], dtype=F64)
    layer = _layer(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fwAD.dual_level():
            out = layer(P, fwAD.make_dual(Q, torch.tensor([[1.0, 0.0]], dtype=F64)))
            tangent = fwAD.unpack_dual(out).tangent
    warned = any(issubclass(w.category, GradientWarning) for w in caught)
    right = bool(tangent.abs().max() < 1e-6)
    assert right or warned, (p0, tangent)
    if p0 >= 1e-3:
        assert right and not warned, (p0, tangent)
