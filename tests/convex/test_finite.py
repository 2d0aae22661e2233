"""Non-finite constants in a problem (convexddn.convex.finite): infinite bounds mean no
bound, as in CVXPY; NaN and infinities that are no bound are refused at construction."""
from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from convexddn import ConvexLayer, CvxpyLayer
from convexddn.convex.finite import finite_problem
from convexddn.errors import NonFiniteError, ProblemError

F64 = torch.float64
INF = np.inf


def _grad(layer, X: torch.Tensor, *more: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    X = X.clone().requires_grad_(True)
    out = layer(X, *more)
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()
    return out.detach(), X.grad


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
def test_finite_infinite_upper_bounds_are_no_bound(solver):
    """y <= [0.1, inf, inf]: y = min(x, ub) (closed form), dy/dx = 1 where x < ub. Before,
    every call raised SolverError (KKT residual NaN) after Clarabel and SCS ran on each
    element, on both backends."""
    x, y = cp.Parameter(3, name="x"), cp.Variable(3, name="y")
    ub = np.array([0.1, INF, INF])
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y <= ub]), [x], [y], solver=solver)
    X = torch.tensor([[0.5, -0.3, 2.0], [-1.0, 0.7, 0.2]], dtype=F64)
    Y, G = _grad(layer, X)
    torch.testing.assert_close(Y, torch.minimum(X, torch.tensor(ub)), atol=1e-7, rtol=0)
    torch.testing.assert_close(G, (X < torch.tensor(ub)).to(F64), atol=1e-6, rtol=0)
    assert layer.last_solve.backend == (["batched"] * 2 if solver == "auto" else ["per_element"] * 2)


def test_finite_bounds_of_every_shape_and_side():
    """A matrix bound (the mask's entry order), a lower bound on the left (-inf <= y), a
    scalar variable under a vector bound, a whole constraint of +inf (sum(y) <= inf): each
    against its closed form, through CvxpyLayer too."""
    X, Y = cp.Parameter((2, 2), name="X"), cp.Variable((2, 2), name="Y")
    U = np.array([[0.1, INF], [INF, -0.2]])
    L = np.array([[-INF, 0.3], [-INF, -INF]])
    prob = cp.Problem(cp.Minimize(cp.sum_squares(Y - X)), [Y <= U, L <= Y, cp.sum(Y) <= INF])
    Xv = torch.tensor([[[0.5, 0.0], [3.0, 0.4]], [[-1.0, 0.9], [-2.0, -0.7]]], dtype=F64)
    want = torch.maximum(torch.minimum(Xv, torch.tensor(U)), torch.tensor(L))
    (out,) = CvxpyLayer(prob, parameters=[X], variables=[Y])(Xv)
    torch.testing.assert_close(out, want, atol=1e-7, rtol=0)
    s, t = cp.Parameter(name="s"), cp.Variable(name="t")
    scalar = ConvexLayer(cp.Problem(cp.Minimize(cp.square(t - s)), [t <= np.array([1.0, INF])]), [s], [t])
    torch.testing.assert_close(scalar(torch.tensor([0.5, 3.0], dtype=F64)),
                               torch.tensor([0.5, 1.0], dtype=F64), atol=1e-7, rtol=0)


def test_finite_problem_rewrites_only_what_it_must():
    x, y = cp.Parameter(3), cp.Variable(3)
    plain = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y <= 1.0])
    assert finite_problem(plain) is plain
    vacuous = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y <= INF, cp.norm(y) <= INF, y >= -1.0])
    assert [str(c) for c in finite_problem(vacuous).constraints] == [str(vacuous.constraints[2])]


def test_finite_constants_that_are_no_bound_are_refused_at_construction():
    x, y = cp.Parameter(2, name="x"), cp.Variable(2, name="y")
    obj = cp.Minimize(cp.sum_squares(y - x))
    cases = [
        ([y <= np.array([1.0, np.nan])], r"constraint 0 `.*` holds a NaN constant"),
        ([y >= 0, y <= -INF], r"constraint 1 `.*` can never hold: its constant right side is -inf at 2 of its entries"),
        ([np.array([INF, 0.0]) <= y], r"constraint 0 `.*` can never hold: its constant left side is \+inf"),
        ([y == np.array([INF, 0.0])], r"constraint 0 `.*` \(Equality\) holds an infinite constant"),
        ([y - np.array([1.0, INF]) <= 0], r"constraint 0 `.*` holds an infinite constant where it cannot be a bound"),
        ([y <= x + INF], r"constraint 0 `.*` holds an infinite constant where it cannot be a bound"),
    ]
    for constraints, message in cases:
        with pytest.raises(ProblemError, match=message):
            ConvexLayer(cp.Problem(obj, constraints), [x], [y])
    with pytest.raises(ProblemError, match=r"the objective `.*` holds a non-finite constant"):
        ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x) + INF)), [x], [y])
    bound = y <= np.array([1.0, INF])
    with pytest.raises(ProblemError, match=r"variables\[1\] is the dual variable of constraint 0"):
        ConvexLayer(cp.Problem(obj, [bound]), [x], [y, bound.dual_variables[0]])


def test_finite_bound_through_a_parameter_is_refused_per_call():
    """A parameter is data of each call: an infinite bound there is a NonFiniteError (an
    InputError) naming the parameter, not a row dropped for some elements only."""
    ub, y = cp.Parameter(2, name="ub"), cp.Variable(2, name="y")
    x = cp.Parameter(2, name="x")
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y <= ub]), [x, ub], [y])
    with pytest.raises(NonFiniteError, match=r"parameter 1 \(ub\) must be finite"):
        layer(torch.zeros(2, dtype=F64), torch.tensor([1.0, INF], dtype=F64))
