"""Tests of convexddn.convex.active_set: the sign check of polished points and the active-set
steps that correct them, against closed forms, central finite differences and each
element's result alone.

The LP throughout: min p @ x + sum(t) s.t. -t <= x <= t, -1 <= x <= 1 (i.e. p @ x + ||x||_1
on the box), p = (-1 - eps, 0.5). Coordinate 0 costs -eps * x0 for x0 >= 0, so the unique
solution is x* = (1, 0) for every eps > 0, and it stays so for all nearby p: dx*/dp = 0.
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.errors import UnboundedError
from convexddn.convex.active_set import correct, sign_tolerance, sign_violation
from convexddn.convex.batched import BatchedProgram
from convexddn.convex.cone_solution import EXACT_RAY, STATUS_NAMES
from convexddn.convex.rays import exact_unbounded_ray, verified_rays
from convexddn.convex.symmetric_cones import ConeLayout

F64 = torch.float64
EPS = [1e-9, 1e-8, 1.8e-8, 3.2e-8, 1e-7, 1e-6]


def cone_form(p0: float, p1: float, box: bool = True):
    """``(P, q, A, b, layout)`` of the LP in the variables (x0, x1, t0, t1), rows
    x_i - t_i <= 0, -x_i - t_i <= 0, then (with ``box``) x_i <= 1, -x_i <= 1."""
    rows = [[1, 0, -1, 0], [0, 1, 0, -1], [-1, 0, -1, 0], [0, -1, 0, -1]]
    rhs = [0, 0, 0, 0]
    if box:
        rows += [[1, 0, 0, 0], [0, 1, 0, 0], [-1, 0, 0, 0], [0, -1, 0, 0]]
        rhs += [1, 1, 1, 1]
    A = torch.tensor([rows], dtype=F64)
    return (torch.zeros(1, 4, 4, dtype=F64), torch.tensor([[p0, p1, 1.0, 1.0]], dtype=F64), A,
            torch.tensor([rhs], dtype=F64), ConeLayout(0, len(rows)))


def wrong_vertex(p0: float, p1: float, m: int):
    """The KKT point at x = t = 0 in closed form: stationarity p_i + z_i - z_{2+i} = 0 (x_i),
    1 - z_i - z_{2+i} = 0 (t_i) gives z_i = (1 - p_i)/2, z_{2+i} = (1 + p_i)/2: negative
    (-eps/2) for p0 = -1 - eps. The box rows are inactive (slack 1, multiplier 0)."""
    x = torch.zeros(1, 4, dtype=F64)
    z = torch.zeros(1, m, dtype=F64)
    z[0, :4] = torch.tensor([(1 - p0) / 2, (1 - p1) / 2, (1 + p0) / 2, (1 + p1) / 2], dtype=F64)
    s = torch.zeros(1, m, dtype=F64)
    s[0, 4:] = 1.0
    return x, s, z


@pytest.mark.parametrize("eps", [1e-8, 1e-6])
def test_sign_violation_flags_a_wrong_multiplier(eps):
    P, q, A, b, layout = cone_form(-1 - eps, 0.5)
    x, s, z = wrong_vertex(-1 - eps, 0.5, 8)
    assert float(sign_violation(P, q, A, b, layout, x, s, z)) > 1e3
    # the solution (1, 0): multipliers z_0 = 1 (x0 <= t0), z_4 = eps (x0 <= 1), x1's as above
    xs = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=F64)
    zs = torch.tensor([[1.0, 0.25, 0.0, 0.75, eps, 0.0, 0.0, 0.0]], dtype=F64)
    ss = torch.tensor([[0.0, 0.0, 2.0, 0.0, 0.0, 1.0, 2.0, 1.0]], dtype=F64)
    assert float(sign_violation(P, q, A, b, layout, xs, ss, zs)) == 0.0


def test_sign_violation_leaves_a_tie_at_rounding():
    """A margin of 1e-16 is below float64's rounding: either vertex is a solution to rounding."""
    P, q, A, b, layout = cone_form(-1 - 2.2e-16, 0.5)
    x, s, z = wrong_vertex(-1 - 2.2e-16, 0.5, 8)
    assert float(sign_violation(P, q, A, b, layout, x, s, z)) <= 1


@pytest.mark.parametrize("eps", [1e-12, 1e-8, 1e-3])
def test_correct_moves_to_the_right_vertex(eps):
    P, q, A, b, layout = cone_form(-1 - eps, 0.5)
    x, s, z, done, ray = correct(P, q, A, b, layout, *wrong_vertex(-1 - eps, 0.5, 8))
    assert bool(done) and not bool(ray)
    # (to O(δ) = 2.2e-12, the working rows' regularisation, which the polish after it removes)
    torch.testing.assert_close(x, torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=F64), atol=1e-11, rtol=0)
    want_z = torch.tensor([[1.0, 0.25, 0.0, 0.75, eps, 0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(z, want_z, atol=1e-11, rtol=0)
    assert float(sign_violation(P, q, A, b, layout, x, s, z)) <= 1


@pytest.mark.parametrize("eps", [1e-9, 1e-6])
def test_correct_finds_the_ray_of_an_unbounded_lp(eps):
    """Without the box, p @ x + ||x||_1 decreases without bound along x = t = (1, 0)."""
    P, q, A, b, layout = cone_form(-1 - eps, 0.5, box=False)
    x, s, z, done, ray = correct(P, q, A, b, layout, *wrong_vertex(-1 - eps, 0.5, 4))
    assert bool(ray) and not bool(done)
    torch.testing.assert_close(x, torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=F64), atol=1e-9, rtol=0)


def near_tie_layer(R: float = 1.0, linf: bool = False):
    x = cp.Variable(2)
    p = cp.Parameter(2)
    if linf:  # CVXPY's own canonicalisation of the norms
        prob = cp.Problem(cp.Minimize(p @ x + cp.norm1(x)), [cp.norm(x, "inf") <= R])
    else:
        t = cp.Variable(2)
        prob = cp.Problem(cp.Minimize(p @ x + cp.sum(t)), [-t <= x, x <= t, x <= R, x >= -R])
    return cddn.ConvexLayer(prob, parameters=[p], variables=[x])


def solve_quietly(layer, P):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where the answer is exact
        return layer(P)


def test_near_tie_lp_solved_at_the_right_vertex_with_zero_gradient():
    layer = near_tie_layer()
    P = torch.tensor([[-1 - e, 0.5] for e in EPS], dtype=F64, requires_grad=True)
    # Central differences of the layer's own map, steps within each margin (h = eps/4), in the
    # same call: the batch [p, p + h e_0, p - h e_0, p + h e_1, p - h e_1] (each element as alone).
    h = torch.tensor(EPS, dtype=F64)[:, None] / 4
    steps = [torch.zeros_like(P)] + [s * h * torch.eye(2, dtype=F64)[j] for j in range(2) for s in (1, -1)]
    out = solve_quietly(layer, torch.cat([P + step for step in steps]))
    assert layer.last_solve.statuses == ["solved"] * (5 * len(EPS))
    want = torch.tensor([[1.0, 0.0]] * (5 * len(EPS)), dtype=F64)
    torch.testing.assert_close(out.detach(), want, atol=1e-9, rtol=0)
    for i in range(2):
        g, = torch.autograd.grad(out[:len(EPS), i].sum(), P, retain_graph=True)
        torch.testing.assert_close(g, torch.zeros_like(g), atol=1e-9, rtol=0)
    y = out.detach().reshape(5, len(EPS), 2)
    for j in range(2):
        fd = (y[1 + 2 * j] - y[2 + 2 * j]) / (2 * h)
        torch.testing.assert_close(fd, torch.zeros_like(fd), atol=1e-6, rtol=0)


def test_l1_linf_near_tie_at_radius_10():
    layer = near_tie_layer(10.0, linf=True)
    P = torch.tensor([-1 - 1e-8, 0.5], dtype=F64, requires_grad=True)
    out = solve_quietly(layer, P)
    assert layer.last_solve.statuses == ["solved"]
    torch.testing.assert_close(out.detach(), torch.tensor([10.0, 0.0], dtype=F64), atol=1e-8, rtol=0)
    g, = torch.autograd.grad(out[0], P)
    torch.testing.assert_close(g, torch.zeros_like(g), atol=1e-9, rtol=0)


def test_batch_of_near_ties_and_ordinary_elements_each_as_alone():
    """Near ties on either side and both ways (x0 = +-1, and |p0| = 1 - eps: x0 = 0) beside
    ordinary elements: each element's answer is its closed form, and the one it gets alone."""
    layer = near_tie_layer()
    p = np.array([[-1 - 1e-8, 0.5], [-2.0, 0.5], [1 + 3.2e-8, -0.3], [0.3, -0.2], [-1 + 1e-8, 1 + 1e-7],
                  [1.5, -1 - 1.8e-8]])
    exact = np.where(np.abs(p) > 1, -np.sign(p), 0.0)
    out = solve_quietly(layer, torch.tensor(p))
    assert layer.last_solve.statuses == ["solved"] * len(p)
    np.testing.assert_allclose(out.numpy(), exact, atol=1e-9, rtol=0)
    for i in range(len(p)):
        alone = solve_quietly(layer, torch.tensor(p[i]))
        np.testing.assert_allclose(alone.numpy(), out[i].numpy(), atol=1e-12, rtol=0)


def test_exact_unbounded_ray_against_rounding():
    """The ray x = t = (1, 0) of p @ x + ||x||_1 at p0 = -1 - 1e-9 is exact (q^T d = -1e-9, far
    beyond rounding; -Ad in K exactly); with the box it leaves x0 <= 1, and at p0 = -1 + 1e-9
    the cost rises along it: refused both times. (verified_rays' tolerance of 1e-6 refuses the first.)"""
    d = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=F64)
    P, q, A, b, layout = cone_form(-1 - 1e-9, 0.5, box=False)
    assert bool(exact_unbounded_ray(P, q, A, layout, d, sign_tolerance(d)))
    assert not bool(verified_rays(P, q, A, b, layout, d, torch.zeros_like(b))[1])
    P, q, A, b, layout = cone_form(-1 - 1e-9, 0.5)
    assert not bool(exact_unbounded_ray(P, q, A, layout, d, sign_tolerance(d)))
    P, q, A, b, layout = cone_form(-1 + 1e-9, 0.5, box=False)
    assert not bool(exact_unbounded_ray(P, q, A, layout, d, sign_tolerance(d)))


def test_unbounded_near_tie_is_certified_not_solved():
    """p @ x + ||x||_1 without constraints, p = (-1 - eps, 0.5): unbounded for every eps > 0
    along the exact ray above. The batched path certifies it with that ray (was 'solved' at
    x = 0 for eps up to 3e-9), and the layer raises UnboundedError, asking no other solver (at
    eps <= 1e-7 SCS's point came back 'solved' with a warning; at 1e-6, SolverError)."""
    x, p = cp.Variable(2), cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(p @ x + cp.norm1(x)))
    program = BatchedProgram(prob, [p], [x])
    eps = (1e-10, 1e-9, 3e-9, 1e-7, 1e-6)
    _, info = program(torch.tensor([[-1 - e, 0.5] for e in eps], dtype=F64))
    assert info.status_names() == [STATUS_NAMES[EXACT_RAY]] * len(eps)
    layer = cddn.ConvexLayer(prob, parameters=[p], variables=[x])
    for e in (1e-9, 1e-7, 1e-6):
        with pytest.raises(UnboundedError, match="exact to rounding"):
            layer(torch.tensor([-1 - e, 0.5], dtype=F64))


def test_near_tie_lp_with_an_equality_row():
    """The same LP with u = x1 + 0.3 and a cost 0.1 u: the working set keeps the equality row
    (solution x = (1, 0), u = 0.3; was x = (0, 0) at these eps, dx0/dp0 = -313 and -1000)."""
    x, t, u, p = cp.Variable(2), cp.Variable(2), cp.Variable(), cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(p @ x + cp.sum(t) + 0.1 * u), [-t <= x, x <= t, x <= 1, x >= -1, u == x[1] + 0.3])
    layer = cddn.ConvexLayer(prob, parameters=[p], variables=[x, u])
    P = torch.tensor([[-1 - 1e-8, 0.5], [-1 - 3.2e-8, 0.5]], dtype=F64, requires_grad=True)
    xo, uo = solve_quietly(layer, P)
    assert layer.last_solve.statuses == ["solved"] * 2
    torch.testing.assert_close(xo.detach(), torch.tensor([[1.0, 0.0]] * 2, dtype=F64), atol=1e-9, rtol=0)
    torch.testing.assert_close(uo.detach(), torch.full((2,), 0.3, dtype=F64), atol=1e-9, rtol=0)
    g, = torch.autograd.grad(xo[:, 0].sum(), P)
    torch.testing.assert_close(g, torch.zeros_like(g), atol=1e-9, rtol=0)


def test_corrections_in_chunks_give_the_same_points(monkeypatch):
    """settle_signs hands correct() its flagged elements in chunks of at most a share of
    MEMORY_BUDGET of dense systems (n + m = 3000 holds 72 MB an element): one element a chunk here, the same
    vertices as in one call."""
    import convexddn.convex.active_set as active_set

    P = torch.tensor([[-1 - e, 0.5] for e in EPS], dtype=F64)
    whole = solve_quietly(near_tie_layer(), P)
    monkeypatch.setattr(active_set, "MEMORY_BUDGET", 1)
    chunked = solve_quietly(near_tie_layer(), P)
    torch.testing.assert_close(whole, torch.tensor([[1.0, 0.0]] * len(EPS), dtype=F64), atol=1e-9, rtol=0)
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)


def _box_from_the_centre(costs: list[list[float]]):
    """``correct``'s arguments for ``min cᵀx`` s.t. ``-1 <= x <= 1`` (rows ``x <= 1``, then ``-x <= 1``),
    each element ``c`` of ``costs`` from ``x = 0``, where no bound holds. With P = 0 each step goes
    along -c (the proximal step) to the first bound it meets, the largest |c_i| first (distinct
    magnitudes: one bound a step), so an element with j nonzero costs takes j steps to its vertex
    and one more to find its multipliers right: x = -sign(c), z = |c_i| on the bound met, 0 elsewhere."""
    c = torch.tensor(costs, dtype=F64)
    B, n = c.shape
    eye = torch.eye(n, dtype=F64)
    A = torch.cat([eye, -eye]).expand(B, -1, -1).contiguous()
    start = (torch.zeros(B, n, dtype=F64), torch.ones(B, 2 * n, dtype=F64), torch.zeros(B, 2 * n, dtype=F64))
    return (torch.zeros(B, n, n, dtype=F64), c, A, torch.ones(B, 2 * n, dtype=F64), ConeLayout(0, 2 * n)), start


# Elements that end after 2, 4 and 6 steps (1, 3 and 5 nonzero costs).
_STAGGERED = [[0.0, 0.0, 0.7, 0.0, 0.0], [0.3, 0.0, -0.9, 0.0, 0.5], [0.3, -0.45, -0.9, 0.8, 0.5]]


def test_correct_factorises_only_the_elements_still_moving(monkeypatch):
    """Each step factorises the elements whose steps have not ended: the batch sizes sum to the
    elements' own step counts (2 + 4 + 6, each counted alone), not the slowest element's count
    times the batch (3 · 6: an assignment LP's vertex, 15 × 15 at batch 8, took 88 factorisations
    of 479 × 479 for 46 steps)."""
    import convexddn.convex.active_set as active_set

    sizes, original = [], active_set.lu_factor_ex

    def counted(K):
        sizes.append(K.shape[0])
        return original(K)

    monkeypatch.setattr(active_set, "lu_factor_ex", counted)
    own = []
    for row in _STAGGERED:
        data, start = _box_from_the_centre([row])
        sizes.clear()
        assert correct(*data, *start)[3].all()
        own.append(len(sizes))
    assert own == [2, 4, 6]
    data, start = _box_from_the_centre(_STAGGERED)
    sizes.clear()
    assert correct(*data, *start)[3].all()
    assert sizes == [3, 3, 2, 2, 1, 1]
    assert sum(sizes) == sum(own)


def test_correct_gives_each_element_its_result_alone():
    """An element's steps are its own: alone, or in a batch whose other elements take more (or
    fewer) steps, the same working set, the same vertex and multipliers (closed form: x = -sign(c),
    z = |c_i| on the bound met), to rounding."""
    c = torch.tensor(_STAGGERED, dtype=F64)
    data, start = _box_from_the_centre(_STAGGERED)
    x, s, z, done, ray = correct(*data, *start)
    assert done.all() and not ray.any()
    # (to the working rows' regularisation: δ = 1e4 ulps, times the multiplier)
    torch.testing.assert_close(x, -torch.sign(c), atol=1e-10, rtol=0)
    expected_z = torch.cat([(-c).clamp_min(0), c.clamp_min(0)], 1)
    torch.testing.assert_close(z, expected_z, atol=1e-10, rtol=0)
    for i, row in enumerate(_STAGGERED):
        data, start = _box_from_the_centre([row])
        alone = correct(*data, *start)
        assert bool(alone[3]) and not bool(alone[4])
        assert torch.equal(alone[1] == 0, s[i:i + 1] == 0)  # (the same working set)
        for got, batched in zip(alone[:3], (x, s, z)):
            torch.testing.assert_close(got, batched[i:i + 1], atol=4 * torch.finfo(F64).eps, rtol=0)
