"""The derivative's scaling at the limit (:mod:`convexddn.convex.limit_scaling`) and the
semismooth polish (:func:`convexddn.convex.certify._polish_subset`), near a kink.

References are closed forms: the projection onto a ball, ``x / max(1, ‖x‖)`` with Jacobian
``(I - y yᵀ) / ‖x‖`` outside and ``I`` inside, and onto a halfspace ``aᵀy ≤ 1``, ``x − (aᵀx
− 1)₊ a`` with Jacobian ``I − a aᵀ`` outside. Points 1e-5..1e-9 from the boundary put a
multiplier (or a slack) of that size beside O(1) ones: the batched path's gradients were
off by up to 4e-2 there without a warning (ball, 1e-7 outside), and its solution by 1.3e-7
with a warning (halfspace).
"""
from __future__ import annotations

import math
import warnings

import cvxpy as cp
import pytest
import torch

from convexddn.convex import vjp
from convexddn.convex.layer import ConvexLayer
from convexddn.convex.limit_scaling import LimitScaling, kink_point, limit_point
from convexddn.convex.symmetric_cones import ConeLayout
from convexddn.errors import GradientWarning, SolverWarning

F64 = torch.float64
N = 5


def _directions(seed: int = 0) -> torch.Tensor:
    d = torch.randn(3, N, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return d / d.norm(dim=-1, keepdim=True)


def _solve(prob, xp, y, x):
    """(solution, gradient for a fixed cotangent, cotangent, warnings) of the default layer."""
    layer = ConvexLayer(prob, [xp], [y])
    x = x.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer(x)
        g = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
        (gx,) = torch.autograd.grad(out, x, g)
    return out.detach(), gx, g, [str(w.message) for w in caught]


@pytest.mark.parametrize("eps", [1e-3, 1e-5, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, -1e-5, -1e-7])
def test_ball_projection_near_its_sphere_has_the_closed_form_gradient(eps):
    xp, y = cp.Parameter(N), cp.Variable(N)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - xp)), [cp.norm(y, 2) <= 1])
    x = _directions() * (1 + eps)
    out, gx, g, caught = _solve(prob, xp, y, x)
    r = x.norm(dim=-1, keepdim=True)
    if eps > 0:
        ref = x / r
        g_ref = (g - (g * ref).sum(-1, keepdim=True) * ref) / r
    else:
        ref, g_ref = x, g
    assert (out - ref).abs().max() < 1e-9
    # (before: 4e-2 at 1e-7 outside, 1.3e-5 at 1e-5, 1.9e-6 at 1e-7 inside; no warning. From
    # 1e-8 to 1e-11 outside 0.14-0.21 off with a warning, the cone's pair undecided: Jordan
    # steps halve it, the semismooth ones on its natural residual decide it.)
    assert (gx - g_ref).abs().max() < 1e-8
    assert not caught


@pytest.mark.parametrize("eps", [1e-6, 1e-7, 1e-9, -1e-6, -1e-9])
def test_halfspace_projection_near_its_plane_is_exact_without_a_warning(eps):
    xp, y = cp.Parameter(N), cp.Variable(N)
    a = torch.ones(N, dtype=F64) / math.sqrt(N)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - xp)), [a.numpy() @ y <= 1])
    d = torch.randn(3, N, dtype=F64, generator=torch.Generator().manual_seed(0))
    x = d - ((d @ a)[:, None] - 1) * a + eps * a  # eps outside the plane aᵀy = 1
    out, gx, g, caught = _solve(prob, xp, y, x)
    ref = x - max(eps, 0.0) * a
    g_ref = g - (g @ a)[:, None] * a if eps > 0 else g
    # (before: 1.3e-7 off, the gradient 0.23 off with a warning, at 1e-7 and 1e-9)
    assert (out - ref).abs().max() < 1e-12
    assert (gx - g_ref).abs().max() < 1e-9
    assert not caught


def _soc_pair(a1, b2, u):
    """s = a1 c1, z = b2 c2 on one cone of 1 + len(u) rows, c_{1,2} = (1, ±u)/2."""
    c1 = torch.cat([torch.ones(1, dtype=F64), u]) / 2
    c2 = torch.cat([torch.ones(1, dtype=F64), -u]) / 2
    return a1 * c1, b2 * c2, c1, c2


@pytest.mark.parametrize("b2", [1.0, 1e-7])
def test_limit_scaling_of_a_complementary_cone_pair(b2):
    """H = W² has the limit's eigenvalues whatever the multiplier's size: δ along c₂
    (active), 1/δ along c₁, s₀/z₀ on the tangent directions."""
    u = torch.tensor([0.6, 0.0, -0.8], dtype=F64)
    s, z, c1, c2 = _soc_pair(2.0, b2, u)
    layout = ConeLayout(0, 0, (4,))
    delta = 1e-12
    lifted = [layout.lift(v[None], delta) for v in (s, z)]
    W = LimitScaling(layout, s[None], z[None], *lifted, delta)
    t = torch.tensor([0.0, 0.8, 0.0, 0.6], dtype=F64)  # ⊥ c1, c2
    t2 = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=F64)

    def H(v):
        return W.apply(W.apply(v[None]))[0]

    s0, z0 = float(s[0]), float(z[0])
    for v in (t, t2):  # (c₁'s 1/δ turns the rounding of v's frame part into ~eps/δ)
        assert (H(v) - (s0 / z0) * v).norm() <= 1e-14 * (s0 / z0) + 1e-3
    # Along c₂: H ≈ δ relative to its unit (the lift keeps a₂ at δ(1 + ‖s‖∞), b₂ at its
    # value plus δ(1 + ‖z‖∞)): the old rescaling by s₀/z₀ made it ~1e-5..2e-2 at b₂ = 1e-7.
    assert float(H(c2) @ c2 / (c2 @ c2)) <= 2 * delta
    assert float(H(c1) @ c1 / (c1 @ c1)) >= 1 / (2 * delta)
    # W is symmetric and W⁻¹ its inverse.
    basis = torch.eye(4, dtype=F64)
    Wm = torch.stack([W.apply(e[None])[0] for e in basis], 1)
    assert torch.allclose(Wm, Wm.T, atol=1e-9 * float(Wm.abs().max()))
    back = torch.stack([W.apply_inv(W.apply(e[None]))[0] for e in basis], 1)
    assert torch.allclose(back, basis, atol=1e-15 / delta)  # (W's condition is 1/δ)


def test_limit_point_sets_decided_members_to_zero():
    """Nonnegative rows: the smaller member of a decided pair is 0, an undecided pair (ratio
    0.5) is left. Second-order cones: a boundary pair off by a small c₂ part and a small
    tangent part in s (and a small c₁ part in z) lands on s = a₁c₁, z = b₂c₂ of its own
    frame: on the boundary, complementary; an interior s beside a tiny z keeps s, z = 0."""
    u = torch.tensor([0.6, 0.0, -0.8], dtype=F64)
    s_b, z_b, c1, c2 = _soc_pair(2.0, 3.0, u)
    tangent = torch.tensor([0.0, 0.8, 0.0, 0.6], dtype=F64)
    s_off = s_b + 1e-9 * c2 + 1e-9 * tangent
    z_off = z_b + 1e-10 * c1
    s_in, z_tiny = torch.tensor([5.0, 1.0, 0.5, -1.0], dtype=F64), 1e-13 * torch.tensor([1.0, 0.2, 0.3, 0.1], dtype=F64)
    s = torch.cat([torch.tensor([1.0, 1e-9, 1e-3], dtype=F64), s_off, s_in])[None]
    z = torch.cat([torch.tensor([1e-12, 2.0, 2e-3], dtype=F64), z_off, z_tiny])[None]
    layout = ConeLayout(0, 3, (4, 4))
    sl, zl = limit_point(layout, s, z)
    torch.testing.assert_close(sl[0, :3], torch.tensor([1.0, 0.0, 1e-3], dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(zl[0, :3], torch.tensor([0.0, 2.0, 2e-3], dtype=F64), rtol=0, atol=0)
    # on the cone's boundary, complementary, and moved by no more than the perturbation
    # (the frame's axis u comes from s̄ − z̄, which the tangent part tilts by ~1e-10)
    for v in (sl[0, 3:7], zl[0, 3:7]):
        assert abs(float(v[0] - v[1:].norm())) <= 1e-15
    assert abs(float(sl[0, 3:7] @ zl[0, 3:7])) <= 1e-15
    assert float((sl[0, 3:7] - s_b).abs().max()) <= 2e-9
    assert float((zl[0, 3:7] - z_b).abs().max()) <= 2e-9
    torch.testing.assert_close(sl[0, 7:], s_in, rtol=0, atol=0)
    assert torch.count_nonzero(zl[0, 7:]) == 0


def test_limit_scaling_without_a_frame_is_a_multiple_of_the_identity():
    """s and z both on the cone's axis (s₁ = z₁ = 0, u undefined): H = (s₀/z₀) I; the
    same for a cone of one row."""
    layout = ConeLayout(0, 0, (3, 1))
    s = torch.tensor([[2.0, 0.0, 0.0, 3.0]], dtype=F64)
    z = torch.tensor([[0.5, 0.0, 0.0, 1.5]], dtype=F64)
    W = LimitScaling(layout, s, z, s, z, 1e-12)
    v = torch.tensor([[0.3, -1.0, 2.0, 0.7]], dtype=F64)
    expect = v * torch.tensor([[4.0, 4.0, 4.0, 2.0]], dtype=F64)
    assert torch.allclose(W.apply(W.apply(v)), expect, rtol=1e-14)
    # (B, m, k) columns too
    cols = torch.stack([v[0], 2 * v[0]], -1)[None]
    assert torch.allclose(W.apply_inv(W.apply(cols)), cols, rtol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_bound_met_exactly_is_still_a_kink_with_a_warning(dtype):
    """x on a bound of the box [-1, 1]: no derivative exists (the one-sided ones are 0
    and 1). The semismooth polish ends there with s, z at rounding level, which is not a
    decided pair (it returned 2e-10 and 0.7 without a warning, found by review)."""
    xp, y = cp.Parameter(4), cp.Variable(4)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - xp)), [y <= 1, y >= -1])
    x = torch.tensor([[1.0, 0.3, -0.2, 0.1], [0.5, -1.0, 0.2, 2.0], [1.0, 1.0, -1.0, -1.0]], dtype=dtype)
    x.requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (g,) = torch.autograd.grad(ConvexLayer(prob, [xp], [y])(x).sum(), x)
    named = " ".join(str(w.message) for w in caught if issubclass(w.category, GradientWarning))
    assert all(f"({i},)" in named for i in range(3))
    # The components off the bounds keep their exact derivative (1 inside, 0 outside).
    assert float(g[0, 1:].sub(1).abs().max()) < 1e-6 and abs(float(g[1, 3])) < 1e-6


def _ball_with_bound():
    # ‖y‖ ≤ R with R huge: CVXPY's epigraph variable t is free in [‖y‖, R] and the interior
    # point leaves it at R/2, its multipliers ~1e-13: the duality gap R·z in the caller's units.
    x, R, y = cp.Parameter(5, name="x"), cp.Parameter(name="R", nonneg=True), cp.Variable(5)
    return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [cp.norm(y, 2) <= R]), [x, R], [y]


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
@pytest.mark.parametrize("radius", [3e8, 1e10])
def test_projection_onto_a_huge_ball_is_the_identity(solver, radius):
    """x well inside ‖y‖ ≤ R: y = x and dy/dx = I (the batched path certifies it at the limit
    point; the per-element adjoint decides its rank in equilibrated units, not against R)."""
    prob, params, variables = _ball_with_bound()
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    G = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    layer = ConvexLayer(prob, params, variables, solver=solver)
    Xg = X.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        y = layer(Xg, torch.tensor(radius, dtype=torch.float64))
        (g,) = torch.autograd.grad(y, Xg, G)
    assert torch.allclose(y, X, rtol=0, atol=1e-12)
    assert torch.allclose(g, G, rtol=0, atol=1e-9)
    if solver == "auto":
        assert layer.last_solve.backend == ["batched"] * 4


@pytest.mark.parametrize("a", [1.001, 1.002, 1.005])
def test_a_derivative_system_the_factorisation_cannot_solve_is_solved_densely(a, monkeypatch):
    """CVXPY's p^a for a near 1 is a chain of second-order cones (40 for 1.005) whose limit
    system the reduced factorisation cannot solve (refinement stalled at 0.46): the
    gradient was 0.4 off without a warning. Those elements are solved densely: exact."""
    x, u = cp.Parameter(5, name="x"), cp.Variable(5, name="u")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (CVXPY's note on the rational approximation)
        prob = cp.Problem(cp.Minimize(cp.sum(cp.power(u, a)) / (a * (a - 1)) - x @ u), [u >= 0, cp.sum(u) == 1])
        layer, reference = ConvexLayer(prob, [x], [u]), ConvexLayer(prob, [x], [u], solver="Clarabel")
    X = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    G = torch.arange(1.0, 16.0, dtype=torch.float64).view(3, 5)
    calls = []
    solve = vjp.dense_limit_solve
    monkeypatch.setattr(vjp, "dense_limit_solve", lambda *args: calls.append(args[2].numel()) or solve(*args))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("always", GradientWarning)
        (g,) = torch.autograd.grad(layer(X), X, G)
        (g_ref,) = torch.autograd.grad(reference(X), X, G)
    # (a factorised answer that stopped short of its target is certified densely: its estimate, 1.8e-8 at
    # a = 1.002, may pass the 1e-8 promise; kept, with that estimate, never zeroed)
    texts = [w.message for w in caught if issubclass(w.category, GradientWarning)]
    assert all(max(getattr(t, "estimated_error", [math.inf])) <= 1e-6 for t in texts), [str(t) for t in texts]
    assert layer.last_solve.backend == ["batched"] * 3
    assert sum(calls) > 0  # (the dense solve ran: the factorised one stalls on these)
    assert torch.allclose(g, g_ref, rtol=0, atol=1e-6 * float(g_ref.abs().max()))


@pytest.mark.parametrize("lam", [1e-2, 1e-5, 1e-8])
def test_the_dense_solve_is_exact_at_active_rows_with_small_multipliers(lam, monkeypatch):
    """The dense fallback, forced (every factorised solve taken as stalled), on the
    projection onto y ≤ 0 with two rows active at multiplier λ: dy/dx = diag(0, 0, 1, 1).
    Refined against the δ-regularised matrix instead of the exact limit (H = 0 on those
    rows) it was δ/λ off: 1e-4 at λ = 1e-8."""
    x, c, y = cp.Parameter(4, name="x"), cp.Parameter(4, name="c"), cp.Variable(4)
    layer = ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [y <= c]), [x, c], [y])
    densely = vjp._densely_where_unsolved

    def forced(sol, layout, kkt, *args):
        kkt.solve_residual = torch.ones_like(kkt.solve_residual)
        return densely(sol, layout, kkt, *args)

    monkeypatch.setattr(vjp, "_densely_where_unsolved", forced)
    X = torch.tensor([[lam, lam, -1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    G = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (g,) = torch.autograd.grad(layer(X, torch.zeros(1, 4, dtype=torch.float64)), X, G)
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.0, 3.0, 4.0]], dtype=torch.float64), rtol=0, atol=1e-10)


def test_limit_rows_drop_the_frame_parts_whose_limit_is_zero_or_infinite():
    """A second-order cone pair on the boundary (s = a₁c₁, z = b₂c₂): H = ∞ along c₁, 0
    along c₂, s₀/z₀ on the tangent. ``held`` removes c₁'s part of a vector, ``kept`` c₂'s,
    neither the tangent's; a cone decided along both pairs (s interior, z = 0) loses
    everything in ``held`` (nonnegative rows: by their masks)."""
    u = torch.tensor([0.6, 0.0, -0.8], dtype=F64)
    s_b, z_b, c1, c2 = _soc_pair(2.0, 3.0, u)
    s_in, z_in = torch.tensor([5.0, 1.0, 0.5, -1.0], dtype=F64), torch.zeros(4, dtype=F64)
    layout = ConeLayout(0, 2, (4, 4))
    s = torch.cat([torch.tensor([0.0, 1.0], dtype=F64), s_b, s_in])[None]
    z = torch.cat([torch.tensor([1.0, 0.0], dtype=F64), z_b, z_in])[None]
    rows = LimitScaling(layout, s, z, s, z, 1e-12).rows
    t = torch.tensor([0.0, 0.8, 0.0, 0.6], dtype=F64)  # ⊥ c1, c2
    v = torch.cat([torch.tensor([3.0, 4.0], dtype=F64), 2.0 * c1 - 5.0 * c2 + 7.0 * t, t + c1])[None]
    held_expect = torch.cat([torch.tensor([3.0, 0.0], dtype=F64), -5.0 * c2 + 7.0 * t, torch.zeros(4, dtype=F64)])
    kept_expect = torch.cat([torch.tensor([0.0, 4.0], dtype=F64), 2.0 * c1 + 7.0 * t, t + c1])
    torch.testing.assert_close(rows.held(v)[0], held_expect, rtol=0, atol=1e-14)
    torch.testing.assert_close(rows.kept(v)[0], kept_expect, rtol=0, atol=1e-14)
    cols = torch.stack([v[0], -v[0]], -1)[None]  # (B, m, k) columns too
    torch.testing.assert_close(rows.held(cols)[0], torch.stack([held_expect, -held_expect], -1), rtol=0, atol=1e-14)
    torch.testing.assert_close(rows.select(torch.tensor([0, 0])).kept(v.expand(2, -1))[1], kept_expect,
                               rtol=0, atol=1e-14)


@pytest.mark.parametrize("dense", [False, True])
def test_a_flat_objective_under_active_cones_has_the_closed_form_gradient(dense, monkeypatch):
    """min −a pᵀ√x + (c/2)‖x‖² with a = 1e3, c = 2e-6: x = (a p / 2c)^(2/3) ~ 5e5 and
    dx/dp = 2x / 3p. Each √x is a second-order cone with s and z on its boundary: H = ∞
    along one frame direction, which the factorisation keeps at 1/δ. Beside the program's
    own curvature (~1e-10 of that in its equilibrated units) the gradient moved by
    ~1e10·δ: 4.5 % off at δ = 1e-12, without a warning, until the refinement went against
    the exact limit there too (the factorised solve and the dense one, forced)."""
    n, a, c = 6, 1e3, 2e-6
    p, x = cp.Parameter(n, nonneg=True), cp.Variable(n)
    layer = ConvexLayer(cp.Problem(cp.Minimize(-a * p @ cp.sqrt(x) + c / 2 * cp.sum_squares(x))), [p], [x])
    if dense:
        densely = vjp._densely_where_unsolved

        def forced(sol, layout, kkt, *args):
            kkt.solve_residual = torch.ones_like(kkt.solve_residual)
            return densely(sol, layout, kkt, *args)

        monkeypatch.setattr(vjp, "_densely_where_unsolved", forced)
    gen = torch.Generator().manual_seed(0)
    P = (0.5 + torch.rand(2, n, generator=gen, dtype=F64)).requires_grad_(True)
    G = torch.randn(2, n, generator=gen, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        y = layer(P)
        (g,) = torch.autograd.grad(y, P, G)
    xs = (a * P.detach() / (2 * c)) ** (2 / 3)
    torch.testing.assert_close(y.detach(), xs, rtol=1e-8, atol=0)
    torch.testing.assert_close(g, G * 2 * xs / (3 * P.detach()), rtol=1e-6, atol=0)


def test_kink_point_takes_undecided_nonnegative_pairs_at_their_kink():
    """An undecided pair (3e-9, 1e-8): multiplier 0, slack what its row leaves, b − Ax
    (0 where that is negative); decided pairs, the equality row and the cone keep theirs."""
    layout = ConeLayout(1, 4, (3,))
    A = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 1.0], [0.0, 1.0],
                       [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], dtype=F64)
    x = torch.tensor([[2e-9, 3.0]], dtype=F64)
    b = torch.tensor([[2e-9, 0.0, -3.0 - 1e-9, 4.0, 5.0, 1.0, 0.0, 0.0]], dtype=F64)
    s = torch.tensor([[0.0, 3e-9, 1e-9, 1e-12, 2.0, 5.0, 0.1, 0.2]], dtype=F64)
    z = torch.tensor([[0.7, 1e-8, 2e-9, 2.0, 1e-13, 1.0, 0.1, -0.2]], dtype=F64)
    sk, zk = kink_point(layout, A, b, x, s, z)
    # rows 1, 2 undecided: b − Ax = 2e-9 and -1e-9 (clamped to 0); rows 3, 4 decided
    torch.testing.assert_close(sk, torch.tensor([[0.0, 2e-9, 0.0, 1e-12, 2.0, 5.0, 0.1, 0.2]], dtype=F64),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(zk, torch.tensor([[0.7, 0.0, 0.0, 2.0, 1e-13, 1.0, 0.1, -0.2]], dtype=F64),
                               rtol=0, atol=0)


def _exact_on_batched_path(layer, args, want):
    """The layer's solution, which must be the batched path's, solved, without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        y = layer(*args)
    assert layer.last_solve.solvers == ["batched"] * len(layer.last_solve.solvers)
    assert set(layer.last_solve.statuses) == {"solved"}
    scale = want.abs().amax(-1, keepdim=True)
    assert float(((y - want).abs() / scale).max()) <= 1e-12


def test_a_bound_met_at_zero_is_solved_on_the_batched_path_at_any_scale():
    """ReLU as a projection, min ‖y − x‖² s.t. y >= 0 at x = (0, s): the interior point
    ends with the bound's slack and multiplier both ~1e-12 s (a kink), exact but measured
    absolutely in the caller's units (all that row's terms are 0), so from s = 1e4 the
    point was rejected for Clarabel (and SCS from 1e6). At the kink (multiplier 0) it is
    exact; the derivative there still warns (no derivative exists)."""
    xp, y = cp.Parameter(2), cp.Variable(2)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - xp)), [y >= 0]), [xp], [y])
    S = torch.tensor([1.0, 1e4, 1e5, 1e6, 1e7], dtype=F64)
    X = torch.stack([torch.zeros_like(S), S], 1)
    _exact_on_batched_path(layer, (X,), X.clamp_min(0))
    x = torch.tensor([0.0, 1e6], dtype=F64, requires_grad=True)
    with pytest.warns(GradientWarning):
        layer(x).sum().backward()


def test_a_box_projection_with_weakly_active_bounds_is_solved_at_any_scale():
    """clip(x, 0, u) with x₀ = 0 and x₃ = u₃ (bounds met with zero multipliers): at s = 1e6
    the batched point was 1.2e-15 from clip, rejected, and Clarabel and SCS failed
    (SolverError); at 5.6e6, 1.8e7 and 1.8e8 the rounding of y₀ (~5e-16 s) alone failed the
    caller-unit check, whose unit is absolute in a row with no other terms."""
    n = 5
    xp, up, y = cp.Parameter(n), cp.Parameter(n), cp.Variable(n)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - xp)), [y >= 0, y <= up]), [xp, up], [y])
    S = torch.tensor([1e4, 1e6, 5.62341325e6, 1.77827941e7, 1.77827941e8], dtype=F64)[:, None]
    X = S * torch.tensor([0.0, 1.5, -2.0, 0.7, 3.0], dtype=F64)
    U = S * torch.tensor([1.0, 2.0, 1.0, 0.7, 2.0], dtype=F64)
    _exact_on_batched_path(layer, (X, U), torch.minimum(X.clamp_min(0), U))


@pytest.mark.parametrize("lam", [1.0, 10.0])
def test_a_squared_hinge_at_zero_is_solved_at_any_scale(lam):
    """min ‖y − x‖² + λ Σ pos(y)²: y = x/(1 + λ) where x > 0, x elsewhere. CVXPY's pos(y) is
    an epigraph t >= y, t >= 0 whose t >= 0 is met with a zero multiplier where x < 0; at
    x ~ 3e4 the point came back 13 % off with a warning (λ = 1), 2e-7 off without one
    (λ = 10), and from 1e5 raised SolverError."""
    xp, lp, y = cp.Parameter(4), cp.Parameter(nonneg=True), cp.Variable(4)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - xp) + lp * cp.sum_squares(cp.pos(y))))
    layer = ConvexLayer(prob, [xp, lp], [y])
    S = torch.tensor([1e3, 1e4, 3e4, 1e5, 1e7], dtype=F64)[:, None]
    X = S * torch.tensor([1.5, -2.0, 0.7, 3.1], dtype=F64)
    L = torch.full((S.shape[0],), lam, dtype=F64)
    _exact_on_batched_path(layer, (X, L), torch.where(X > 0, X / (1 + lam), X))
