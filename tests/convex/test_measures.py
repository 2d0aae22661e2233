"""The caller-unit measures (:func:`convexddn.convex.measures.caller_measures`): row by
row, forgiving a row's (column's) residual only the rounding of the solution's own size.

The program is the projection ``min ½‖x − c‖² s.t. x ≥ 0`` in cone form (``P = I``,
``q = −c``, ``A = −I``, ``b = 0``) at ``c = (0, S)``, whose solution ``x = (0, S)`` meets
its first bound at 0: every term of that row and column is 0 there, so a residual of a
few rounding units of ``S`` (what a float solve of the element leaves) was measured
absolutely and failed from ``S ~ 1e7`` on.
"""
from __future__ import annotations

import pytest
import torch

from convexddn.convex.measures import FEASIBLE_DUAL, FEASIBLE_PRIMAL, ROUNDING, caller_measures
from convexddn.convex.symmetric_cones import ConeLayout

F64 = torch.float64
EPS = torch.finfo(F64).eps
TOL = 1e-8


def _program(S: float, bound: float | None = None):
    """(P, q, A, b, layout) of the projection, with an inactive row ``x₀ <= bound`` if given."""
    rows = [[-1.0, 0.0], [0.0, -1.0]] + ([[1.0, 0.0]] if bound is not None else [])
    A = torch.tensor([rows], dtype=F64)
    b = torch.tensor([[0.0, 0.0] + ([bound] if bound is not None else [])], dtype=F64)
    return torch.eye(2, dtype=F64)[None], torch.tensor([[0.0, -S]], dtype=F64), A, b, ConeLayout(0, A.shape[1])


def _residual(S: float, x0: float, s0: float, bound: float | None = None) -> float:
    P, q, A, b, layout = _program(S, bound)
    x = torch.tensor([[x0, S]], dtype=F64)
    s = torch.tensor([[s0, S] + ([bound - x0] if bound is not None else [])], dtype=F64)
    z = torch.zeros_like(s)
    residual, _ = caller_measures(P, q, A, b, layout, x, s, z, TOL)
    return float(residual)


def test_caller_measures_forgive_the_rounding_of_the_solution_size():
    for S in (1.0, 1e8, 1e12):
        off = 4 * EPS * S  # a few rounding units of the solution's size
        # dual column 0: x₀ − c₀ = off (its terms: |x₀| only); primal row 0: −x₀ + s₀ = −off
        assert _residual(S, off, off) <= TOL, S
        assert _residual(S, -off, 0.0) <= TOL, S
        assert _residual(S, 0.0, off) <= TOL, S


def test_caller_measures_still_see_a_violation_beyond_rounding():
    """x₀ = −1e-4 at S = 1e8 (1e-12 of the solution, 450 rounding units) violates x₀ >= 0
    by 1e-4, also beside an inactive bound with a slack of 1e12 (which does not widen the
    rows' allowance: the solution's size sets it, not the slack's)."""
    for bound in (None, 1e12):
        assert _residual(1e8, -1e-4, 0.0, bound) >= 5e-5, bound
        assert _residual(1e8, 0.0, 1e-4, bound) >= 5e-5, bound
        assert _residual(1.0, 1e-7, 1e-7, bound) >= 5e-8, bound



def test_caller_measures_see_a_pair_not_complementary_beside_its_own_row():
    """A bound whose terms are small, x₀ <= r = 1e-6, met halfway (slack r/2, half its
    row's terms) with the largest multiplier, 5e-5, the dual residual exact (c₀ = x₀ + z):
    its product, 2.5e-11, is nothing beside the program's unit (the gap), but neither
    member is small beside its own scale: the point is no solution (x₀ = c₀ is, at z = 0).
    The ball of radius 1e-6 around an O(1) centre ended there: pulled to its centre."""
    r, z0 = 1e-6, 5e-5
    A = torch.tensor([[[1.0, 0.0]]], dtype=F64)
    b = torch.tensor([[r]], dtype=F64)
    x = torch.tensor([[r / 2, 1.0]], dtype=F64)
    for z, c0, worse in ((z0, r / 2 + z0, True), (0.0, r / 2, False)):
        q = torch.tensor([[-c0, -1.0]], dtype=F64)
        zz = torch.tensor([[z]], dtype=F64)
        residual, _ = caller_measures(torch.eye(2, dtype=F64)[None], q, A, b, ConeLayout(0, 1), x, b - x[:, :1], zz,
                                      TOL)
        # min(s/ρ, z/max(‖z‖∞, tol)) = min(1/2, 1), s less ROUNDING units of the solution size (‖A₀‖∞‖x‖∞ = 1)
        expected = (r / 2 - ROUNDING * EPS) / r if worse else 0.0
        assert float(residual) == pytest.approx(expected, rel=1e-6, abs=TOL), z


def test_caller_measures_weigh_a_second_order_cone_by_its_head_row():
    """‖y - c‖₂ <= r as one cone (r, y - c): its slack's tail is y - c, the difference of
    O(1) terms, and its head the radius. At y = c with the interior multiplier z = (w, 0, 0)
    (w = 5e-5, the largest) both Jordan-frame pairs are (r, w): each member its own scale."""
    r, w = 1e-6, 5e-5
    c = torch.tensor([0.3, -1.2], dtype=F64)
    A = torch.cat([torch.zeros(1, 2, dtype=F64), -torch.eye(2, dtype=F64)])[None]
    b = torch.cat([torch.tensor([r], dtype=F64), -c])[None]
    x = c[None].clone()
    s = b - torch.einsum("bij,bj->bi", A, x)
    z = torch.tensor([[w, 0.0, 0.0]], dtype=F64)
    q = -(x + torch.einsum("bij,bi->bj", A, z))  # the dual residual exact
    residual, _ = caller_measures(torch.eye(2, dtype=F64)[None], q, A, b, ConeLayout(0, 0, (3,)), x, s, z, TOL)
    assert float(residual) == pytest.approx((r - TOL * 1.2) / r, rel=1e-6)  # (a_k less TOL‖A_i‖∞‖x‖∞)


def _bits(P, q, A, b, layout, x, s, z) -> int:
    return int(caller_measures(P, q, A, b, layout, x, s, z, TOL)[1])


def test_feasibility_bits_are_judged_in_the_programs_own_unit():
    """The bits that refute a certificate (FEASIBLE_PRIMAL, FEASIBLE_DUAL) at every data scale S.
    Primal: x₀ ∈ [1.1 S, S] (empty) met halfway misses both rows by 5 % of their data; x₀ ∈
    [0.9 S, S] met halfway is feasible. Dual: min S(1, ∓1)ᵀx s.t. x ≥ 0 with z = (S, 0)
    misses the second column by all of its cost (the program is unbounded) or meets it exactly
    (z = (S, S), bounded). Against an absolute 1 the infeasible and unbounded ones were
    "feasible" from S ~ 1e-8 on."""
    layout = ConeLayout(0, 2)
    A = torch.tensor([[[-1.0], [1.0]]], dtype=F64)
    P = torch.zeros(1, 1, 1, dtype=F64)
    for S in (1.0, 1e-4, 1e-7, 1e-10):
        q = torch.tensor([[S]], dtype=F64)
        for lo, feasible in ((1.1, False), (0.9, True)):
            b = torch.tensor([[-lo * S, S]], dtype=F64)
            x = torch.tensor([[(lo + 1.0) / 2 * S]], dtype=F64)
            s = (b - x * A[..., 0]).clamp_min(0.0)  # the slacks in K, the residual in the rows
            bits = _bits(P, q, A, b, layout, x, s, torch.zeros_like(s))
            assert bool(bits & FEASIBLE_PRIMAL) == feasible, (S, lo)
        A2 = -torch.eye(2, dtype=F64)[None]
        x2, b2 = torch.zeros(1, 2, dtype=F64), torch.zeros(1, 2, dtype=F64)
        for sign, z1, bounded in ((-1.0, 0.0, False), (1.0, S, True)):
            q2 = torch.tensor([[S, sign * S]], dtype=F64)
            z = torch.tensor([[S, z1]], dtype=F64)
            bits = _bits(torch.zeros(1, 2, 2, dtype=F64), q2, A2, b2, layout, x2, torch.zeros_like(z), z)
            assert bool(bits & FEASIBLE_DUAL) == bounded, (S, sign)


def _soc_projection_layer():
    """The projection of (s₀, y) onto {(t, x): ‖x‖ <= t}: closed form t = (‖y‖ + s₀)/2,
    x = t y/‖y‖ (Parikh & Boyd, Proximal Algorithms, 6.3.2) where |s₀| < ‖y‖."""
    import cvxpy as cp

    from convexddn import ConvexLayer

    y, s0, x, t = cp.Parameter(4), cp.Parameter(), cp.Variable(4), cp.Variable()
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y) + cp.square(t - s0)), [cp.SOC(t, x)])
    return ConvexLayer(prob, parameters=[y, s0], variables=[x])


def test_caller_gap_is_weighed_by_its_terms_not_their_sum():
    """A point 1e-6 of its data's size outside the polar cone (data ~1e6, solution ~0.3): qᵀx
    sums terms of 3e5 to about -1, and the caller's gap measured against that sum read 1.4e-6
    for a point 6e-11 off (the data fix it only to 2e-10): not certified, then SolverError on
    every solver. The gap is now weighed by |q_j x_j| and |b_i z_i| (a tester's finding: 10 of
    60 random directions raised). The solution and its gradient against the closed form."""
    import numpy as np

    layer = _soc_projection_layer()
    Y = np.array([605352.5, 62991.1, -498167.1, -617584.0])
    ny = np.linalg.norm(Y)
    S = -ny * (1 - 1e-6)
    te = (ny + S) / 2  # (2e-10 relative: the cancellation the data carry)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    Yt = torch.tensor(Y, requires_grad=True)
    St = torch.tensor(S, dtype=F64, requires_grad=True)
    out = layer(Yt, St)
    gy, gs = torch.autograd.grad((w * out).sum(), [Yt, St])
    u = torch.tensor(Y / ny)
    torch.testing.assert_close(out.detach(), te * u, atol=1e-9 * te, rtol=0)
    gy_e = 0.5 * w + 0.5 * S / ny * (w - u * (u @ w))
    torch.testing.assert_close(gy, gy_e, atol=1e-8, rtol=0)
    torch.testing.assert_close(gs, 0.5 * (w @ u), atol=1e-8, rtol=0)
    assert layer.last_solve.solvers == ["batched"]


def test_group_lasso_prox_at_a_large_scale_is_exact():
    """min ‖x − y‖² + 2λ(‖x₀:₃‖ + ‖x₃:₆‖) at data ~1e6, both groups 1e-9 outside the threshold:
    block soft-thresholding gives entries ~6e-4; the layer returned ~30 (5.7e-5 of the data's
    size) with a warning blaming ill-conditioned constraints, where the same problem divided by
    1e6 is exact (the batched point was refused by the caller's gap, as above)."""
    import cvxpy as cp
    import numpy as np

    from convexddn import ConvexLayer

    Y = np.array([-586958.4099762613, 534623.3193959836, 707348.404458901, -799757.6517210053,
                  629205.7215622694, 308499.4204879492])
    lam_v = 1063336.2740511703
    y, lam, x = cp.Parameter(6), cp.Parameter(nonneg=True), cp.Variable(6)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y) + 2 * lam * (cp.norm(x[0:3], 2) + cp.norm(x[3:6], 2))))
    layer = ConvexLayer(prob, parameters=[y, lam], variables=[x])
    exact = np.concatenate([max(0.0, 1 - lam_v / np.linalg.norm(Y[g])) * Y[g] for g in (slice(0, 3), slice(3, 6))])
    out = layer(torch.tensor(Y), torch.tensor(lam_v, dtype=F64))
    # (to a few rounding units of the data: 1 − λ/‖y_g‖ = 1e-9 leaves the entries only that exact)
    assert float(np.abs(out.numpy() - exact).max()) <= 4 * EPS * float(np.abs(Y).max())
