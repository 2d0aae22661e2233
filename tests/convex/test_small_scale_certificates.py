"""A verified certificate against a point that passes only by the residual's absolute floor
(:func:`convexddn.convex.dissent.within_reach`): QPs whose data are ~1e-4, infeasible by 2e-7 or
unbounded along an exact ray, raise InfeasibleError / UnboundedError, as the same programs scaled
by 1e4 do. SCS's points violated the program by the margin the certificate proves, yet passed
the check at 1e-7 against its floor tol (1 + |b|), and were returned as solutions. Feasible,
bounded programs of the same scale and margin still solve, to the closed form."""
from __future__ import annotations

import warnings

import cvxpy as cp
import pytest
import torch

import convexddn as cddn
from convexddn.errors import InfeasibleError, SolverWarning, UnboundedError

F64 = torch.float64


def _layer(solver):
    # min (x0 - c0)^2 + c1 x1  s.t.  x1 >= -c3,  c2 <= x0 <= c3
    x = cp.Variable(2)
    c = cp.Parameter(4)
    prob = cp.Problem(cp.Minimize(cp.square(x[0] - c[0]) + c[1] * x[1]),
                      [x[1] >= -c[3], x[0] >= c[2], x[0] <= c[3]])
    return cddn.ConvexLayer(prob, [c], [x], solver=solver)


# c1 < 0 of 1.8e-3 relative: unbounded along the exact ray (0, 1) (no curvature in x1).
UNBOUNDED = [[3.6159505490948474e-05, -1.8132702392002725e-07, 0.0, 1e-4],
             [9.470809631292422e-05, -1.60663577576718e-07, 0.0, 1e-4]]
# c2 > c3 by 1e-3 relative (1.8e-7 absolute): infeasible.
INFEASIBLE = [4.13259793472436e-06, 1e-4, 0.00018176694076756534, 0.00018158535541215322]


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
@pytest.mark.parametrize("row", range(2))
def test_small_scale_unbounded_qp_raises(solver, row):
    layer = _layer(solver)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        with pytest.raises(UnboundedError) as err:
            layer(torch.tensor([UNBOUNDED[row]], dtype=F64))
    assert err.value.indices == [(0,)]


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
def test_small_scale_infeasible_qp_raises_in_a_batch(solver):
    layer = _layer(solver)
    feasible = [5e-5, 1e-4, 0.0, 1e-4]  # x = (5e-5, -1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        with pytest.raises(InfeasibleError) as err:
            layer(torch.tensor([feasible, INFEASIBLE], dtype=F64))
    assert err.value.indices == [(1,)]


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
def test_small_scale_feasible_programs_at_the_same_margins_solve(solver):
    # The controls: the interval 1e-3 wide (relative) instead of inverted, c1 > 0 by the same
    # 1.8e-7, and a target outside the interval: each solves to its closed form,
    # x0 = clip(c0, c2, c3), x1 = -c3.
    rows = torch.tensor([[4.13259793472436e-06, 1e-4, 0.00018158535541215322, 0.00018176694076756534],
                         [3.6159505490948474e-05, 1.8132702392002725e-07, 0.0, 1e-4],
                         [2.5e-4, 1.6e-7, 0.0, 1e-4]], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        # (Clarabel's polished point for the last misses a bound by 7e-5 of the row's own scale, which
        # the acceptance test reads since the box-QP fix: SCS's, the fallback, is taken, and said so)
        warnings.filterwarnings("ignore", ".*needed a fallback", SolverWarning)
        x = _layer(solver)(rows)
    expected = torch.stack([torch.minimum(torch.maximum(rows[:, 0], rows[:, 2]), rows[:, 3]), -rows[:, 3]], -1)
    torch.testing.assert_close(x, expected, atol=1e-14, rtol=1e-9)


def _box_lp(solver):
    # min a x  s.t.  lo <= x <= hi
    x = cp.Variable(4)
    a, lo, hi = (cp.Parameter(4) for _ in range(3))
    return cddn.ConvexLayer(cp.Problem(cp.Minimize(a @ x), [x >= lo, x <= hi]), [a, lo, hi], [x], solver=solver)


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
def test_tiny_lp_infeasible_by_a_tenth_of_its_data_raises_infeasible(solver):
    """lo₁ = 1.1 S > hi₁ = S: infeasible by 10 % of every datum at each scale S. At S = 1e-7
    and 1e-8 the verified certificate was demoted to a SolverError by the batched path's point,
    "primal feasible" against an absolute 1 (every point of such a program is)."""
    layer = _box_lp(solver)
    a = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=F64)
    lo = torch.tensor([-1.0, 1.1, -1.0, -1.0], dtype=F64)
    hi = torch.ones(4, dtype=F64)
    for S in (1.0, 1e-7, 1e-8):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SolverWarning)
            with pytest.raises(InfeasibleError):
                layer(a * S, lo * S, hi * S)
    # The control: lo₁ = 0.9 S, feasible; x = lo where a > 0, hi where a < 0, without a
    # fallback (Clarabel's own point was 0.3 off in its units at 1e-7 before b and c went to it
    # in their unit: .diffcp_solve).
    lo[1] = 0.9
    for S in (1e-6, 1e-7, 1e-8):
        with warnings.catch_warnings():
            warnings.simplefilter("error", SolverWarning)
            x = layer(a * S, lo * S, hi * S)
        torch.testing.assert_close(x, torch.where(a > 0, lo, hi) * S, atol=1e-12 * S, rtol=1e-9)


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
def test_entropy_regularised_simplex_with_a_tiny_objective(solver):
    """min t(cᵀx − λ Σ entr(x)) s.t. Σ x = 1 is softmax(−c/λ) for every t > 0 (exponential cones:
    the per-element path). At t = 1e-8 it raised SolverError (residual 0.2-0.5): Clarabel's
    tolerances held an absolute "1 +" against a cost of 1e-8. (There the Newton polish stays above
    rounding, which a SolverWarning says; the solution is right to 1e-8.)"""
    x = cp.Variable(5)
    c, lam = cp.Parameter(5), cp.Parameter(pos=True)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(c @ x - lam * cp.sum(cp.entr(x))), [cp.sum(x) == 1]),
                             [c, lam], [x], solver=solver)
    c0 = torch.tensor([0.5, -1.0, 0.2, 1.3, -0.4], dtype=F64)
    for t in (1.0, 1e-8):
        with warnings.catch_warnings():
            warnings.simplefilter("error" if t == 1.0 else "ignore", SolverWarning)
            y = layer(c0 * t, torch.tensor(0.7 * t, dtype=F64))
        torch.testing.assert_close(y, torch.softmax(-c0 / 0.7, 0), atol=1e-7, rtol=0)
