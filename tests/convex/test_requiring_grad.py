"""convexddn.convex.parametric.requiring_grad: the per-element backward judges whether a
gradient is unique in the parameters that require grad only, as the batched path's probe
does; a parameter that gets no gradient cannot make it non-unique.

References: the registry's ``ot_lp`` with uniform marginals a = b = 1/4 (its plan a
permutation, a degenerate vertex: unique, locally constant in the cost C, so dP/dC = 0;
moving a or b moves the vertex along one of several bases), and the projection of x onto
the ball ``norm(y - c) <= r`` at r = 0 (y = c: Jacobian 0 in x, I in c; in r one-sided).
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.errors import GradientWarning

F64 = torch.float64


def _backward(layer, values, needs, w):
    """The gradients of (layer(values) * w).sum() in the values whose ``needs`` flag is set,
    and the GradientWarnings of the call and its backward."""
    values = [v.clone().requires_grad_(flag) for v, flag in zip(values, needs)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer(*values)
        grads = torch.autograd.grad((out * w).sum(), [v for v in values if v.requires_grad])
    return out.detach(), grads, [x for x in caught if issubclass(x.category, GradientWarning)]


def _uniform_ot(batch: int = 2, m: int = 4):
    gen = torch.Generator().manual_seed(0)
    C = torch.rand(batch, m, m, generator=gen, dtype=F64)
    a = torch.full((batch, m), 1 / m, dtype=F64)
    return C, a, a.clone(), torch.randn(batch, m, m, generator=gen, dtype=F64)


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
def test_a_uniform_transport_plan_has_its_cost_gradient_without_a_warning(solver):
    # The plan is unique and does not move with C (dP/dC = 0); the marginals, which would
    # move it off its degenerate vertex, do not require grad. Before: "not unique or not
    # differentiable" on every element (with "auto": the batched path does not certify the
    # vertex, whose active rows are dependent, and the per-element path warned).
    layer = cddn.layer("ot_lp", m=4, n=4, solver=solver)
    C, a, b, w = _uniform_ot()
    P, (dC,), warned = _backward(layer, [C, a, b], [True, False, False], w)
    assert not warned, [str(x.message)[:200] for x in warned]
    assert torch.allclose(P.sum(-1), a, atol=1e-9) and torch.allclose(P.sum(-2), b, atol=1e-9)
    # Central differences along two random directions of C, all in one batched call.
    gen = torch.Generator().manual_seed(1)
    dirs = torch.randn(2, *C.shape, generator=gen, dtype=F64)
    h = 1e-6
    Cs = torch.cat([C + h * dirs[0], C - h * dirs[0], C + h * dirs[1], C - h * dirs[1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Ps = layer(Cs, a.repeat(4, 1), b.repeat(4, 1)).reshape(4, *P.shape)
    fd = torch.stack([((Ps[2 * k] - Ps[2 * k + 1]) * w).sum() / (2 * h) for k in range(2)])
    assert torch.allclose(fd, (dirs * dC).sum((1, 2, 3)), atol=1e-8), (fd, (dirs * dC).sum((1, 2, 3)))
    assert dC.abs().max() < 1e-8


def test_a_uniform_transport_plan_still_warns_when_its_marginals_require_grad():
    # Moving a or b moves the degenerate vertex: its derivative there is not unique.
    layer = cddn.layer("ot_lp", m=4, n=4, solver="Clarabel")
    C, a, b, w = _uniform_ot()
    _, _, warned = _backward(layer, [C, a, b], [True, True, True], w)
    assert warned and "not unique or not differentiable" in str(warned[0].message)


def _ball_layer():
    """The projection of x onto the ball of radius r around c (per element)."""
    n = 3
    y, x, c, r = cp.Variable(n), cp.Parameter(n), cp.Parameter(n), cp.Parameter(nonneg=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [cp.norm(y - c) <= r])
    return cddn.ConvexLayer(prob, [x, c, r], [y], solver="Clarabel")


def test_a_projection_onto_a_point_has_its_gradients_without_a_warning():
    # At r = 0 the ball is the point c: y = c, dy/dx = 0, dy/dc = I. Only r, which does not
    # require grad, reaches a null direction (r < 0 is infeasible: one-sided in r).
    layer = _ball_layer()
    gen = torch.Generator().manual_seed(2)
    x, c, w = (torch.randn(2, 3, generator=gen, dtype=F64) for _ in range(3))
    r = torch.zeros(2, dtype=F64)
    y, (dx,), warned = _backward(layer, [x, c, r], [True, False, False], w)
    assert not warned, [str(m.message)[:200] for m in warned]
    assert torch.allclose(y, c, atol=1e-9)
    assert dx.abs().max() < 1e-9
    _, (dx, dc), warned = _backward(layer, [x, c, r], [True, True, False], w)
    assert not warned and dx.abs().max() < 1e-9 and torch.allclose(dc, w, atol=1e-8)


def test_a_projection_onto_a_point_still_warns_when_its_radius_requires_grad():
    layer = _ball_layer()
    gen = torch.Generator().manual_seed(2)
    x, c, w = (torch.randn(2, 3, generator=gen, dtype=F64) for _ in range(3))
    _, _, warned = _backward(layer, [x, c, torch.zeros(2, dtype=F64)], [True, False, True], w)
    assert warned and "not unique or not differentiable" in str(warned[0].message)


def test_each_parameter_has_its_columns_of_theta():
    # cvxpylayers orders θ by its own column order, a PSD parameter by its upper triangle.
    x, S, q, t = cp.Variable(3), cp.Parameter((3, 3), PSD=True), cp.Parameter(3), cp.Parameter(nonneg=True)
    prob = cp.Problem(cp.Minimize(q @ x), [cp.sum(x) == t, x >= 0, cp.sum(cp.multiply(S, np.ones((3, 3)))) >= 0])
    backend = cddn.ConvexLayer(prob, [t, S, q], [x], solver="Clarabel")._backend
    par, cols = backend._parametric, backend._theta_cols
    assert sorted(np.concatenate(cols).tolist()) == list(range(par.c_map.shape[1]))
    assert [c.size for c in cols] == [1, 6, 3]
    # t and S move the constraints' data only, q the objective only
    assert [(par.c_map[:, c].nnz, par.ab_map[:, c].nnz) for c in cols] == [(0, 1), (0, 6), (3, 0)]
