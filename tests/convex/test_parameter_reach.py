"""The batched backward's probe along a fixed direction of the parameters
(:func:`convexddn.convex.vjp.cone_vjp`): where the parameters reach a null direction of
the limit system, the solution's derivative does not exist even when the loss is unique,
and a ``GradientWarning`` must say so.

References are closed forms: the L1 prox (soft threshold, x = y − (λ/2) sign y for
|y| > λ/2) and the L1-minimal solution of one equality, x = (b / a_k) e_k at the
largest a_k (sum(x) = b / max a: one-sided derivatives −b/a_k² and 0 at a tie).
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import pytest
import torch

from convexddn.convex.layer import ConvexLayer
from convexddn.errors import GradientWarning

F64 = torch.float64


def _grads(layer, values, loss):
    values = [v.clone().requires_grad_(True) for v in values]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(*values)
        grads = torch.autograd.grad(loss(y), values)
    return y.detach(), grads, [w for w in caught if issubclass(w.category, GradientWarning)]


def _l1_equality():
    a, b, x = cp.Parameter(3), cp.Parameter(), cp.Variable(3)
    return ConvexLayer(cp.Problem(cp.Minimize(cp.norm1(x)), [a @ x == b]), [a, b], [x])


def test_a_face_of_optima_the_parameters_tilt_is_warned_about():
    """At a = (1, 1, 1) the whole simplex is optimal; sum(x) = b is unique, but its
    derivative in a is not (−1 and 0 from the two sides): a gradient (−1/3 each, the
    analytic centre's) was returned without a warning."""
    layer = _l1_equality()
    _, _, warned = _grads(layer, [torch.ones(3, dtype=F64), torch.tensor(1.0, dtype=F64)], lambda y: y.sum())
    assert warned


def test_a_vertex_of_the_same_program_keeps_its_closed_form_gradient():
    a = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    y, (ga, gb), warned = _grads(_l1_equality(), [a, torch.tensor(1.5, dtype=F64)], lambda y: y.sum())
    assert not warned
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 0.5], dtype=F64), rtol=0, atol=1e-9)
    torch.testing.assert_close(ga, torch.tensor([0.0, 0.0, -1.5 / 9], dtype=F64), rtol=0, atol=1e-8)
    torch.testing.assert_close(gb, torch.tensor(1 / 3, dtype=F64), rtol=0, atol=1e-8)


def _l1_prox():
    y, lam, x = cp.Parameter(4), cp.Parameter(nonneg=True), cp.Variable(4)
    return ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(x - y) + lam * cp.norm1(x))), [y, lam], [x])


Y = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
W = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=F64)


@pytest.mark.parametrize("lam", [0.0, 1e-9])
def test_a_regulariser_weight_at_zero_is_warned_about(lam):
    """λ‖x‖₁ with λ = 0 leaves its epigraph variable free above ‖x‖₁ (and at 1e-9 its
    multiplier is below what the interior point resolves): the limit system drops the link
    from λ to x and the gradient came back 0, where the right derivative is
    −Σ w sign(y)/2 = 0.6, without a warning."""
    _, (_, g_lam), warned = _grads(_l1_prox(), [Y, torch.tensor(lam, dtype=F64)], lambda x: x @ W)
    assert warned, f"gradient {float(g_lam)} returned silently (right derivative 0.6)"


def test_a_regulariser_weight_away_from_zero_has_the_soft_threshold_gradient():
    y, (g_y, g_lam), warned = _grads(_l1_prox(), [Y, torch.tensor(0.5, dtype=F64)], lambda x: x @ W)
    assert not warned
    torch.testing.assert_close(y, Y - 0.25 * Y.sign(), rtol=0, atol=1e-9)
    torch.testing.assert_close(g_lam, -(W * Y.sign()).sum() / 2, rtol=0, atol=1e-8)
    torch.testing.assert_close(g_y, W, rtol=0, atol=1e-8)
