"""Equalities eliminated by a null-space basis: when it applies, what it maps back, and
that solutions through it agree with Clarabel's and with the iterations that keep the
equality rows.

Expected values are Clarabel through its own Python API (the test module of the
interior point), the KKT conditions themselves, or the unreduced iterations.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from convexddn.convex import interior_point
from convexddn.convex.equilibration import equilibrate
from convexddn.convex.interior_point import solve_cone_batch
from convexddn.convex.kkt import DENSE, KKTStructure
from convexddn.convex.nullspace import reduce
from convexddn.convex.symmetric_cones import ConeLayout

sys.path.insert(0, str(Path(__file__).parent))
from test_interior_point import clarabel_solve, random_program  # noqa: E402

F64 = torch.float64
SOLVED, PRIMAL_INF, DUAL_INF = 0, 1, 2


def _bmv(M, v):
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def test_reduce_applies_only_to_dense_full_rank_equalities():
    layout = ConeLayout(3, 10, (4,))
    P, q, A, b = random_program(layout, 8, 4, seed=0)
    d = equilibrate(P, q, A, b, layout)
    assert reduce(d, layout, DENSE) is not None
    assert reduce(d, layout, KKTStructure(rho=False, diagonal=True, cols=tuple(range(14)))) is None
    assert reduce(d, ConeLayout(0, 13, (4,)), DENSE) is None  # no equalities
    # A duplicated equality row in one element: rank-deficient, it keeps its rows (the mask of
    # the others: the caller solves the two groups apart).
    A2 = A.clone()
    A2[2, 1] = A2[2, 0]
    b2 = b.clone()
    b2[2, 1] = b2[2, 0]
    assert reduce(equilibrate(P, q, A2, b2, layout), layout, DENSE).tolist() == [True, True, False, True]
    # p >= n: the equalities leave nothing (or nothing consistent) to eliminate onto.
    wide = ConeLayout(4, 2)
    P3, q3, A3, b3 = random_program(wide, 4, 2, seed=1)
    assert reduce(equilibrate(P3, q3, A3, b3, wide), wide, DENSE) is None


def test_reduced_program_is_the_full_one_on_the_affine_set():
    """For any y: x = x_p + N y satisfies the equalities, the cone rows and objective
    agree with the full program's (up to the constant of x_p)."""
    layout = ConeLayout(3, 10, (4,))
    P, q, A, b = random_program(layout, 8, 4, seed=2)
    d = equilibrate(P, q, A, b, layout)
    dr, red = reduce(d, layout, DENSE)
    gen = torch.Generator().manual_seed(3)
    y1, y2 = torch.randn(2, 4, 5, dtype=F64, generator=gen)
    lift = lambda y: red.xp + _bmv(red.N, y)  # noqa: E731
    z0 = layout.zero
    for y in (y1, y2):
        x = lift(y)
        torch.testing.assert_close(_bmv(d.A[:, :z0], x), d.b[:, :z0], atol=1e-12, rtol=0)
        # cone rows: b_I − A_I x is the reduced program's b_r − A_r y
        torch.testing.assert_close(d.b[:, z0:] - _bmv(d.A[:, z0:], x), dr.b - _bmv(dr.A, y), atol=1e-12, rtol=0)

    def f(P_, q_, v):
        return 0.5 * (v * _bmv(P_, v)).sum(1) + (q_ * v).sum(1)
    # the objective differs by the same constant at every y
    diff1 = f(d.P, d.q, lift(y1)) - f(dr.P, dr.q, y1)
    diff2 = f(d.P, d.q, lift(y2)) - f(dr.P, dr.q, y2)
    torch.testing.assert_close(diff1, diff2, atol=1e-11, rtol=0)
    # N has orthonormal columns spanning the null space of A_E
    eye = torch.eye(5, dtype=F64).expand(4, -1, -1)
    torch.testing.assert_close(red.N.mT @ red.N, eye, atol=1e-13, rtol=0)
    assert (d.A[:, :z0] @ red.N).abs().max() < 1e-13


@pytest.mark.parametrize("layout,n,lp", [(ConeLayout(3, 20), 8, False), (ConeLayout(2, 6, (4, 3, 5)), 8, False),
                                         (ConeLayout(3, 20), 8, True)], ids=["qp", "socp", "lp"])
def test_solutions_through_the_reduction_match_clarabel_and_the_kkt_conditions(layout, n, lp):
    P, q, A, b = random_program(layout, n, 6, seed=4, lp=lp)
    assert reduce(equilibrate(P, q, A, b, layout), layout, DENSE) is not None
    sol = solve_cone_batch(P, q, A, b, layout)
    assert (sol.status == SOLVED).all()
    for i in range(6):
        x_ref, status = clarabel_solve(P[i], q[i], A[i], b[i], layout)
        assert status in ("Solved", "AlmostSolved")
        assert np.allclose(sol.x[i].numpy(), x_ref, atol=1e-5 * (1 + np.abs(x_ref).max()))
    # The lifted multipliers of the equalities make the full program's stationarity hold.
    stat = _bmv(P, sol.x) + _bmv(A.mT, sol.z) + q
    assert stat.abs().max() < 1e-8 * (1 + q.abs().max())
    torch.testing.assert_close(_bmv(A, sol.x) + sol.s, b, atol=1e-8 * (1 + float(b.abs().max())), rtol=0)


def test_reduction_agrees_with_the_iterations_that_keep_the_equality_rows(monkeypatch):
    layout = ConeLayout(4, 30, (5,))
    P, q, A, b = random_program(layout, 20, 16, seed=5)
    with_reduction = solve_cone_batch(P, q, A, b, layout)
    monkeypatch.setattr(interior_point, "reduce", lambda *args: None)
    without = solve_cone_batch(P, q, A, b, layout)
    assert (with_reduction.status == SOLVED).all() and (without.status == SOLVED).all()
    scale = 1 + without.x.abs().max()
    torch.testing.assert_close(with_reduction.x, without.x, atol=1e-8 * float(scale), rtol=0)
    torch.testing.assert_close(with_reduction.z, without.z, atol=1e-7 * float(1 + without.z.abs().max()), rtol=0)


def test_certificates_through_the_reduction_are_lifted_exactly():
    """An infeasible element (two inequalities that contradict on the affine set) and an
    unbounded one (an LP whose objective falls along the null space) in one batch."""
    layout = ConeLayout(1, 3)
    n = 3
    A = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]], dtype=F64)
    A = A.expand(3, -1, -1).clone()
    P = torch.zeros(3, n, n, dtype=F64)
    P[0] = torch.eye(n, dtype=F64)
    q = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, -1.0]], dtype=F64)
    # x1 + x2 + x3 = 1; x2 <= 1; x2 >= b[2]; x3 >= 0.
    b = torch.tensor([[1.0, 1.0, -2.0, 0.0],    # x2 >= 2 > 1: infeasible
                      [1.0, 1.0, 0.0, 0.0],     # min x3 at 0, x1 + x2 = 1 free: the reduced
                      # Cholesky at the solution fails (the active row's ~1e12 mixed into the
                      # free direction's pivot): the full form's solves that element
                      [1.0, 1.0, 0.0, 0.0]], dtype=F64)  # min x1 − x3: x3 → ∞, x1 → −∞: unbounded
    sol = solve_cone_batch(P, q, A, b, layout)
    assert sol.status.tolist() == [PRIMAL_INF, SOLVED, DUAL_INF]
    # The primal certificate: Aᵀz = 0, bᵀz < 0. The equality's multiplier is lifted so
    # that Aᵀz has no part along the equality rows (x1 + x2 + x3: the sum of Aᵀz's
    # entries); what is left is the reduced certificate's own residual (tolerance 1e-8).
    zz = sol.z[0] / sol.z[0].abs().max()
    ATz = A[0].mT @ zz
    assert abs(float(ATz.sum())) < 1e-13 and ATz.abs().max() < 1e-7 and float(b[0] @ zz) < -0.5
    # The ray stays on the equalities' null space (A_E d = 0 to rounding: it is N y), A_I d <= 0
    # to the certificate's tolerance, qᵀd < 0.
    ray = sol.x[2] / sol.x[2].abs().max()
    assert abs(float(A[2, 0] @ ray)) < 1e-13 and (A[2, 1:] @ ray <= 1e-7).all() and float(q[2] @ ray) < -0.5


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("layout", [ConeLayout(3, 6), ConeLayout(2, 3, (4, 3))], ids=["qp", "socp"])
def test_reduced_systems_solve_the_full_kkt_system(layout, scaled):
    """The polish, error estimate and backward solve K [x; z] = r through the null-space
    form; the answer must be the full system's, from a dense solve of
    K = [[P, Aᵀ], [A, -H]] (the cone rows scaled by W⁻¹ when ``scaled``)."""
    from convexddn.convex.kkt import DataOps
    from convexddn.convex.nullspace import ReducedSystems
    from convexddn.convex.symmetric_cones import NTScaling

    n, B = 6, 3
    P, q, A, b = random_program(layout, n, B, seed=7)
    d = equilibrate(P, q, A, b, layout)
    _, red = reduce(d, layout, DENSE)
    gen = torch.Generator().manual_seed(8)
    cone = lambda: layout.shift_inside(torch.randn(B, layout.cone_rows, dtype=F64, generator=gen))  # noqa: E731
    W = NTScaling(layout, cone(), cone())
    kkt = ReducedSystems(red, d, DataOps(d.P, d.A, layout, DENSE))(W)
    assert not kkt.failed.any()
    m, mc, z0 = layout.m, layout.cone_rows, layout.zero
    Wd = W.apply(torch.eye(mc, dtype=F64).expand(B, -1, -1).clone())
    H = torch.zeros(B, m, m, dtype=F64)
    H[:, z0:, z0:] = Wd @ Wd
    K = torch.cat([torch.cat([d.P, d.A.mT], 2), torch.cat([d.A, -H], 2)], 1)
    rhs = torch.randn(B, n + m, 2, dtype=F64, generator=gen)
    rz = rhs[:, n:].clone()
    if scaled:  # the caller passes W⁻¹ r_I on the cone rows
        rz[:, z0:] = W.apply_inv(rz[:, z0:])
    x, z, zh = kkt.solve(rhs[:, :n], rz, refine=2, scaled=scaled)
    expected = torch.linalg.solve(K, rhs)
    torch.testing.assert_close(torch.cat([x, z], 1), expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(zh, W.apply(z[:, z0:]), atol=1e-9, rtol=1e-9)


def test_elements_beside_dependent_rows_keep_their_own_form_forward_and_backward():
    """One element whose equality rows are dependent to 1e-14 kept the whole batch out of the
    null-space form: its neighbours' points moved by 4e-12 (relative) and their iteration
    counts changed. The two groups are solved apart now; forward and backward, every element
    gets what it gets alone (the dependent one too)."""
    import warnings

    import convexddn as cddn
    from test_interior_point import mixed_qps

    params, kind = mixed_qps(24, seed=3)
    params = [p.clone() for p in params]
    L, q, G, h, A, b = params
    A[5, 1] = A[5, 0] + 1e-14 * torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(0))
    b[5, 1] = b[5, 0]
    layer = cddn.layer("qp", backend="cvxpy", n=6, n_ineq=4, n_eq=2, on_failure="mask")
    up = torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(1))

    def run(idx):
        ins = [p[idx].clone().requires_grad_(True) for p in params]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = layer(*ins)
            grads = torch.autograd.grad((y * up).sum(), ins)
        return y.detach(), grads, layer.last_solve.solvers

    y, grads, solvers = run(torch.arange(24))
    for i in range(24):
        y1, grads1, solvers1 = run(torch.tensor([i]))
        assert solvers1[0] == solvers[i], i
        torch.testing.assert_close(y1[0], y[i], atol=1e-13, rtol=1e-13, equal_nan=True)
        for g1, g in zip(grads1, grads):
            torch.testing.assert_close(g1[0], g[i], atol=1e-11, rtol=1e-11)


def test_reduce_names_the_elements_it_applies_to_when_not_all():
    """Equality rows dependent to 1e-14 in element 1 of 3: :func:`reduce` returns the mask of
    the others (the caller solves the groups apart); for element 1 alone, None."""
    layout = ConeLayout(2, 3)
    P, q, A, b = random_program(layout, 5, 3, seed=2)
    A[1, 1] = A[1, 0] * (1 + 1e-14)
    d = equilibrate(P, q, A, b, layout, 3)
    assert reduce(d, layout, DENSE).tolist() == [True, False, True]
    assert reduce(d.select(torch.tensor([1])), layout, DENSE) is None
    assert isinstance(reduce(d.select(torch.tensor([0, 2])), layout, DENSE), tuple)
