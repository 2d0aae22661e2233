"""The per-element acceptance check in the data's own scale (:func:`convexddn.convex.cone_checks.kkt_residual`).

CVXPY's epigraph of a squared objective puts constants 1 in ``b`` and ``c`` whatever the data's
scale, and each row's floor was its coefficient's size (1): with all data scaled by 1e-6 an
infeasible box QP came back "solved" violating its bounds by 5e-6 of their size, an unbounded QP
came back as a finite point, and a narrow box's midpoint (5e-6 off the solution, gradient (0.5,
0.5) for (1, 0)) passed, silently; at scale 1 each was right. Each row's (column's) floor is now at
most its own terms (down to sqrt(eps) of the program's unit, the rounding of which is discounted).
Found by a scale-equivariance fuzz; every case here is compared with the same program at scale 1.
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

from convexddn import ConvexLayer
from convexddn.errors import InfeasibleError, SolverError, SolverWarning, UnboundedError

F64 = torch.float64
N = 4
A0 = np.array([0.3, -0.2, 0.5, 0.1])


def _box_layer(solver, quad_form=False):
    x = cp.Variable(N)
    a, lo, hi = cp.Parameter(N), cp.Parameter(N), cp.Parameter(N)
    objective = cp.quad_form(x - a, np.eye(N)) if quad_form else 0.5 * cp.sum_squares(x - a)
    prob = cp.Problem(cp.Minimize(objective), [x >= lo, x <= hi])
    return ConvexLayer(prob, parameters=[a, lo, hi], variables=[x], solver=solver)


def _call(layer, values, scale, grad=False):
    args = [torch.tensor(v * scale, dtype=F64, requires_grad=grad) for v in values]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer(*args)
    return out, args, [w.category for w in caught]


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
def test_an_infeasible_box_qp_at_small_scale_is_not_solved(solver):
    lo, hi = -np.ones(N), np.ones(N)
    lo[1] = 1 + 1e-5  # lo > hi by 1e-5 of the bound
    layer = _box_layer(solver)
    with pytest.raises(InfeasibleError):
        _call(layer, (A0, lo, hi), 1.0)
    with pytest.raises(SolverError):  # (an InfeasibleError is one too; Clarabel calls it "Optimal Inaccurate")
        _call(layer, (A0, lo, hi), 1e-6)


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
@pytest.mark.parametrize("scale", [1.0, 1e-4, 1e-6])
def test_an_unbounded_qp_at_small_scale_raises(solver, scale):
    # min ½ Σ p_i x_i² + c·x s.t. x >= lo, p = (1, 1, 0), c_2 = -0.01: unbounded along (0, 0, 1);
    # c and lo scaled by s (x* would scale by s). At s <= 1e-4 a finite point came back.
    x = cp.Variable(3)
    c, lo, p = cp.Parameter(3), cp.Parameter(3), cp.Parameter(3, nonneg=True)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum(cp.multiply(p, cp.square(x))) + c @ x), [x >= lo])
    layer = ConvexLayer(prob, parameters=[c, lo, p], variables=[x], solver=solver)
    values = ([1.0, 0.5, -1e-2], [0.0, -1.0, 0.0], [1.0, 1.0, 0.0])
    try:
        _, _, caught = _call(layer, [np.array(v) * f for v, f in zip(values, (scale, scale, 1.0))], 1.0)
    except UnboundedError:
        return
    # (at 1e-4 SCS, the fallback, may stop at its iteration limit within tol: returned, but warned)
    assert scale < 1.0 and SolverWarning in caught


@pytest.mark.parametrize("solver,quad_form", [("Clarabel", False), ("auto", True)])
def test_a_narrow_box_at_small_scale_is_solved_to_tol_or_warned(solver, quad_form):
    # [0.99999, 1] s with a_1 = -0.2 s: x_1 = lo_1, dx_1/d(lo_1, hi_1) = (1, 0) at every s.
    lo, hi = -np.ones(N), np.ones(N)
    lo[1] = 1 - 1e-5
    layer = _box_layer(solver, quad_form)
    for scale in (1.0, 1e-6):
        out, args, caught = _call(layer, (A0, lo, hi), scale, grad=True)
        out[1].backward()
        right = abs(out[1].item() / scale - lo[1]) <= 1e-6 * lo[1] and abs(args[1].grad[1].item() - 1) <= 1e-4
        assert right or SolverWarning in caught, (scale, out[1].item() / scale, args[1].grad[1].item())
        if scale == 1.0:  # (the control: exact and quiet)
            assert right and not caught, caught


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
@pytest.mark.parametrize("target", [[0.1, -0.1, 0.6, 0.1], [-0.5, -0.3, 0.4, 1.0]])
def test_an_infeasible_box_with_an_equality_at_small_scale_is_not_solved(solver, target):
    # lo <= x <= hi (±1) and sum(x) = 4 (1 + 1e-3): infeasible by 1e-3 of the bound. At 1e-8 the
    # first target came back x/s = 1.0008 each without a warning, the second off by 66 %.
    x = cp.Variable(N)
    a, lo, hi, f = cp.Parameter(N), cp.Parameter(N), cp.Parameter(N), cp.Parameter()
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - a)), [x >= lo, x <= hi, cp.sum(x) == f])
    layer = ConvexLayer(prob, parameters=[a, lo, hi, f], variables=[x], solver=solver)
    values = (np.array(target), -np.ones(N), np.ones(N), np.array(4 * (1 + 1e-3)))
    with pytest.raises(InfeasibleError):
        _call(layer, values, 1.0)
    with pytest.raises(SolverError):
        _call(layer, values, 1e-8)
