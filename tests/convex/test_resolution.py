"""Columns the batched solve leaves unresolved (:mod:`convexddn.convex.resolution`): a
regulariser's weight far below the program's scale.

Expected values: the closed form of min_y ‖y − x‖² + λ Σ huber(y_i) (y = x/(1 + λ) where
|x/(1 + λ)| ≤ 1, else x − λ sign x), differentiated by torch itself.
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import convexddn as cddn
from convexddn._first_order import first_order_region
from convexddn.convex.kkt import bmv
from convexddn.convex.resolution import moved_columns
from convexddn.errors import GradientWarning

F64 = torch.float64
X = torch.tensor([[0.5, 2.0, -3.0], [0.25, -0.5, 1.5]], dtype=F64)


def _layer():
    x = cp.Parameter(3, name="x")
    lam = cp.Parameter(nonneg=True, name="lam")
    y = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x) + lam * cp.sum(cp.huber(y, 1.0))))
    return cddn.ConvexLayer(prob, parameters=[x, lam], variables=[y])


def _exact(x, lam):
    quad = x / (1 + lam)
    return torch.where(quad.abs() <= 1, quad, x - lam * torch.sign(x))


def _lam_grad(lam):
    lam = torch.full((2,), lam, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(_exact(X, lam[:, None]).sum(), lam)
    return g


@pytest.mark.parametrize("lam", [1e-2, 1e-6, 1e-8, 1e-10, 1e-11])
def test_resolved_weights_give_exact_gradients_without_warning(lam):
    """(At 1e-10 and 1e-11 the polished point had a multiplier of the wrong sign beyond
    rounding: the active-set steps of :mod:`convexddn.convex.active_set` correct it, and
    dL/dλ is exact; before, it was 6e-16 for the true -0.5, with the warning below.)"""
    layer = _layer()
    L = torch.full((2,), lam, dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (g,) = torch.autograd.grad(layer(X, L).sum(), L)
    torch.testing.assert_close(g, _lam_grad(lam), atol=1e-7, rtol=0)


@pytest.mark.parametrize("lam", [1e-12, 1e-13, 1e-14])
def test_a_weight_below_the_solves_resolution_warns_where_its_gradient_is_asked(lam):
    """dL/dλ was 0.13 for the true −0.5 at λ = 1e-10 (the Huber's epigraph variables
    and their bounds' multipliers, of order λ, pass the relative tolerance at any value),
    with no warning; at 1e-13 and 1e-14 (columns at rounding, which the residual test
    cannot judge) 0.18 and 0.45, with no warning. The gradient with respect to x goes through resolved columns: exact,
    and no warning where λ does not require grad."""
    layer = _layer()
    x = X.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (gx,) = torch.autograd.grad(layer(x, torch.full((2,), lam, dtype=F64)).sum(), x)
    torch.testing.assert_close(gx, torch.full_like(X, 1 / (1 + lam)), atol=1e-9, rtol=0)
    L = torch.full((2,), lam, dtype=F64, requires_grad=True)
    with pytest.warns(GradientWarning, match="unresolved") as rec:
        torch.autograd.grad(layer(X, L).sum(), L)
    message = next(str(r.message) for r in rec if "unresolved" in str(r.message))
    assert "batch indices [(0,), (1,)]" in message


def test_forward_mode_warns_along_a_tangent_that_moves_an_unresolved_weight():
    layer = _layer()
    with pytest.warns(GradientWarning, match="forward mode.*unresolved"):
        with fwAD.dual_level():
            L = fwAD.make_dual(torch.full((2,), 1e-12, dtype=F64), torch.ones(2, dtype=F64))
            layer(X, L)


def test_moved_columns_reads_costs_constraint_columns_and_rows_through_a_column():
    A = torch.tensor([[[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]]], dtype=F64)  # rows (x0 - x1), (x2)
    none = moved_columns(None, None, None, None, A)
    assert not none.any()
    dq = torch.tensor([[0.0, 0.0, 2.0]], dtype=F64)
    assert moved_columns(None, dq, None, None, A).tolist() == [[False, False, True]]
    db = torch.tensor([[3.0, 0.0]], dtype=F64)  # moves the row through columns 0 and 1
    assert moved_columns(None, None, None, db, A).tolist() == [[True, True, False]]
    dA = torch.zeros(1, 2, 3, dtype=F64)
    dA[0, 1, 2] = 1.0
    assert moved_columns(None, None, dA, None, A).tolist() == [[False, False, True]]


def test_first_order_region_leaves_tensors_without_grad_as_they_are():
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(2)
    out = first_order_region("node", [a, b])[0]
    assert out[0].requires_grad and not out[1].requires_grad
    assert out[1] is b


def test_a_second_order_cone_decided_inactive_counts_as_zero_in_the_check():
    """λ‖y‖² through a norm: an epigraph variable t with curvature 2λ and a cone t ≥ ‖y‖
    whose multiplier (~2λt) the derivative takes as 0 (cone decided inactive): dL/dλ came
    back exactly 0 for the true −w·x/(1 + λ)² at λ = 1e-11, with no warning."""
    x = cp.Parameter(3)
    lam = cp.Parameter(nonneg=True)
    y = cp.Variable(3)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x) + lam * cp.norm(y, 2) ** 2)),
                             parameters=[x, lam], variables=[y])
    x0 = torch.tensor([0.8, 0.35, 1.3], dtype=F64)
    w = torch.tensor([0.5, -1.0, 0.7], dtype=F64)
    L = torch.tensor(1e-9, dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (g,) = torch.autograd.grad(layer(x0, L) @ w, L)
    torch.testing.assert_close(g, -(w @ x0) / (1 + L.detach()) ** 2, atol=1e-8, rtol=0)
    L = torch.tensor(1e-11, dtype=F64, requires_grad=True)
    with pytest.warns(GradientWarning, match="unresolved"):
        torch.autograd.grad(layer(x0, L) @ w, L)


def test_kinks_and_zero_solutions_are_not_unresolved():
    """Columns whose only terms sit at the polish's floor (a bound met with a zero
    multiplier: no derivative, which the backward names as such) or at 1e-38 (an all-zero
    solution's inactive rows) are not a weight below the solve's resolution."""
    x = cp.Parameter(3, name="x")
    y = cp.Variable(3, name="y")
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0, cp.sum(y) <= 10]), [x], [y])
    for xs in (torch.tensor([[0.0, 1.0, -1.0]], dtype=F64), torch.zeros(1, 3, dtype=F64)):
        xs.requires_grad_()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.autograd.grad(layer(xs).sum(), xs)
        assert not any("unresolved" in str(r.message) for r in rec)


def test_columns_sharing_a_bound_with_an_unresolved_one_are_reached():
    """A constant L1 weight of 1e-9: y = soft(x, lam/2), so x_3 = 0 sits inside the dead
    zone (dy_3/dx_3 = 0), which the solve cannot resolve (its epigraph t ~ 1.4 for |y|, the
    bounds |y| <= t decided inactive): dL/dx came back (1, 1, 1, 1) for (1, 1, 1, 0) without
    a warning, the weight being no parameter. y's columns share those bounds' rows."""
    x = cp.Parameter(4)
    y = cp.Variable(4)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x) + 1e-9 * cp.norm1(y))), [x], [y])
    xs = torch.tensor([1.0, 0.5, -2.0, 0.0], dtype=F64, requires_grad=True)
    with pytest.warns(GradientWarning, match="unresolved"):
        torch.autograd.grad(layer(xs).sum(), xs)


def _ridge_layer(constrained: bool):
    G, h, lam, y = cp.Parameter((1, 2)), cp.Parameter(1), cp.Parameter(nonneg=True), cp.Variable(2)
    cost = cp.sum_squares(G @ y - h) + lam * cp.sum_squares(y)
    prob = cp.Problem(cp.Minimize(cost), [y <= 10] if constrained else [])  # (y ≤ 10: inactive)
    return cddn.ConvexLayer(prob, parameters=[G, h, lam], variables=[y])


@pytest.mark.parametrize("constrained", [False, True])
def test_a_small_ridge_on_an_underdetermined_least_squares_warns_where_its_gradient_is_off(constrained):
    # min ‖Gy − h‖² + λ‖y‖² with G 1×2: y's part in G's null space is fixed by λ alone, to
    # rounding/λ, and dL/dλ amplifies that by 1/λ again (11-14 % off at λ = 1e-7, silently).
    # Closed form (Woodbury): y = Gᵀh/(|G|² + λ), dy/dλ = −Gᵀh/(|G|² + λ)².
    layer, w = _ridge_layer(constrained), torch.tensor([1.0, -2.0], dtype=F64)
    G, h = torch.tensor([[1.0, 0.3]], dtype=F64), torch.tensor([1.0], dtype=F64)
    for lam, weak in [(1e-3, False), (1e-7, True)]:
        L = torch.tensor(lam, dtype=F64, requires_grad=True)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            (g,) = torch.autograd.grad(layer(G, h, L) @ w, L)
        exact = -(w @ G[0]) * h[0] / ((G ** 2).sum() + lam) ** 2
        msgs = [str(r.message) for r in rec if issubclass(r.category, GradientWarning)]
        if weak:
            assert any("curves only weakly" in m for m in msgs), msgs
        else:
            assert not msgs
            assert abs(float(g - exact)) <= 1e-6 * abs(float(exact))


def test_forward_mode_warns_where_a_small_ridge_leaves_the_tangent_off():
    # The same ridge in forward mode: dy/dλ 3.7e-2 off at λ = 1e-7 (G = (1, 1), y ≤ 10), silently.
    layer = _ridge_layer(True)
    G, h = torch.tensor([[1.0, 1.0]], dtype=F64), torch.tensor([1.0], dtype=F64)
    for lam, weak in [(1e-3, False), (1e-7, True)]:
        with warnings.catch_warnings(record=True) as rec, fwAD.dual_level():
            warnings.simplefilter("always")
            L = fwAD.make_dual(torch.tensor(lam, dtype=F64), torch.tensor(1.0, dtype=F64))
            t = fwAD.unpack_dual(layer(G, h, L)).tangent
        exact = -G[0] * h / ((G ** 2).sum() + lam) ** 2
        msgs = [str(r.message) for r in rec if issubclass(r.category, GradientWarning)]
        if weak:
            assert any("curves only weakly" in m for m in msgs), msgs
        else:
            assert not msgs
            assert float((t - exact).abs().max()) <= 1e-6 * float(exact.abs().max())


def test_weak_direction_check_on_a_batch_of_ridge_layers_with_computed_curvature():
    """sum_squares(G y - h) + lam sum_squares(y), G a parameter (P computed from the
    parameters: the backward's secant, formed for the checked elements alone, was indexed
    again by batch indices, an IndexError whenever two or more elements past the first
    reached the check). Expected dL/dh: G (GᵀG + lam I)⁻¹ 1, the closed form."""
    rng = np.random.default_rng(0)
    n, B = 8, 64
    y = cp.Variable(n)
    lam, G, h = cp.Parameter(nonneg=True), cp.Parameter((3, n)), cp.Parameter(3)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(G @ y - h) + lam * cp.sum_squares(y))),
                             parameters=[G, h, lam], variables=[y])
    Gt = torch.tensor(rng.standard_normal((B, 3, n)), requires_grad=True)
    ht = torch.tensor(rng.standard_normal((B, 3)), requires_grad=True)
    lt = torch.full((B,), 1e-3, dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientWarning)
        layer(Gt, ht, lt).sum().backward()
    Gd = Gt.detach()
    M = Gd.mT @ Gd + 1e-3 * torch.eye(n, dtype=F64)
    want = (Gd @ torch.linalg.solve(M, torch.ones(B, n, 1, dtype=F64))).squeeze(-1)
    torch.testing.assert_close(ht.grad, want, atol=1e-6, rtol=1e-6)


def test_a_weak_ridge_warns_when_other_parameters_require_grad_too():
    """With G and h requiring grad beside lam, the check along one combined direction of
    the parameters let the large, accurate dL/dG hide dL/dlam off by up to 25 times itself
    (its sign wrong) at lam = 1e-7: each parameter's direction is checked too."""
    rng = np.random.default_rng(0)
    n = 8
    y = cp.Variable(n)
    lam, G, h = cp.Parameter(nonneg=True), cp.Parameter((3, n)), cp.Parameter(3)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(G @ y - h) + lam * cp.sum_squares(y))),
                             parameters=[G, h, lam], variables=[y])
    Gt = torch.tensor(rng.standard_normal((1, 3, n)), requires_grad=True)
    ht = torch.tensor(rng.standard_normal((1, 3)), requires_grad=True)
    lt = torch.tensor([1e-7], dtype=F64, requires_grad=True)
    g = torch.tensor(rng.standard_normal((1, n)))
    with pytest.warns(GradientWarning, match="curves only weakly"):
        (layer(Gt, ht, lt) * g).sum().backward()


def _projection_layer(ball: bool):
    x, A, b, y = cp.Parameter(4), cp.Parameter((3, 4)), cp.Parameter(3), cp.Variable(4)
    r = cp.Parameter(nonneg=True)
    cons = [A @ y <= b] + ([cp.norm(y, 2) <= r] if ball else [])
    return cddn.ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), cons),
                            [x, A, b] + ([r] if ball else []), [y])


@pytest.mark.parametrize("ball", [False, True])
def test_forward_mode_does_not_call_a_well_conditioned_projection_weak(ball):
    """Projection onto {y : Ay <= b} (P = I), the tangent in A: forward mode warned "curves
    only weakly" on exact zeros (x strictly inside) and, with an inactive ball, on tangents
    exact to 1e-11, where reverse mode on the same data did not (its bound took a generic
    vector's amplification, 1e9 through the ball's multipliers, with no gate). Closed forms:
    inside, y = x and dy = 0; beyond the first row alone, y = x - (a₀ᵀx - b₀) a₀ / |a₀|²."""
    g = torch.Generator().manual_seed(0)
    B, n = 8, 4
    X, A, dA = (torch.randn(B, *s, dtype=F64, generator=g) for s in ((n,), (3, n), (3, n)))
    a0 = A[:, 0]
    b0 = (a0 * X).sum(1) - 0.5

    def closed(A):
        a = A[:, 0]
        return X - (((a * X).sum(1) - b0) / (a * a).sum(1))[:, None] * a

    Y = closed(A)
    inside = Y - 0.3 * a0 / a0.norm(dim=1, keepdim=True)  # (slack 0.3 |a₀| on the first row)
    others = A[:, 1:]
    slack = torch.maximum(bmv(others, Y), bmv(others, inside)) + 0.5  # (the other rows inactive at both)
    b = torch.cat([b0[:, None], slack], 1)
    ball_r = [torch.maximum(Y.norm(dim=1), inside.norm(dim=1)) + 0.1] if ball else []
    layer = _projection_layer(ball)
    for x, want in [(X, torch.func.jvp(closed, (A,), (dA,))[1]), (inside, torch.zeros(B, n, dtype=F64))]:
        with warnings.catch_warnings(), fwAD.dual_level():
            warnings.simplefilter("error", GradientWarning)
            t = fwAD.unpack_dual(layer(x, fwAD.make_dual(A, dA), b, *ball_r)).tangent
        torch.testing.assert_close(t, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("cond,scale,rotated", [(1e6, 1.0, False), (1e4, 0.1, False), (1e6, 1.0, True)])
def test_a_well_posed_ill_conditioned_qp_is_not_called_weak(cond, scale, rotated):
    """min ½‖Lx‖² + qᵀx s.t. gᵀx <= h, the row inactive by a wide margin, P = LᵀL of condition
    1e4-1e6 (L diagonal, or rotated): every element was warned "curves only weakly" (a tester's
    fuzz: 21 of 2,550 random QPs), its gradient exact to 1e-15 (1e-11 rotated). Two causes: the
    inactive row's dL/dg is exactly 0, and any bound beside it (1e-16, beside dL/dL ~ 1e9) read as
    relative error; and the floor was ε times the rows' largest term times ‖K⁻¹‖ in every entry,
    where a diagonal P keeps each entry of x to ε of itself. Closed form: x* = −P⁻¹q, u = P⁻¹w,
    dL/dq = −u, dL/dL = −L(u x*ᵀ + x* uᵀ), dL/dg = dL/dh = 0."""
    n, B = 5, 4
    Lp, q, G, h, x = cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((1, n)), cp.Parameter(1), cp.Variable(n)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Lp @ x) + q @ x), [G @ x <= h]),
                             [Lp, q, G, h], [x])
    rng = np.random.default_rng(0)
    L = np.diag(np.logspace(0, -0.5 * np.log10(cond), n)) * scale
    Ls = np.stack([L @ np.linalg.qr(rng.standard_normal((n, n)))[0].T if rotated else L for _ in range(B)])
    L = torch.tensor(Ls, dtype=F64)
    qq = torch.tensor(rng.standard_normal((B, n)), dtype=F64) * scale
    GG = torch.tensor(rng.standard_normal((B, 1, n)), dtype=F64)
    P = L.mT @ L
    xs = -torch.linalg.solve(P, qq.unsqueeze(-1)).squeeze(-1)
    hh = (GG @ xs.unsqueeze(-1)).squeeze(-1) + 1.0 + xs.abs().amax(1, keepdim=True)
    w = torch.tensor(rng.standard_normal((B, n)), dtype=F64)
    args = [v.clone().requires_grad_(True) for v in (L, qq, GG, hh)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        grads = torch.autograd.grad(layer(*args), args, w)
    assert not [str(r.message) for r in rec if issubclass(r.category, GradientWarning)]
    u = torch.linalg.solve(P, w.unsqueeze(-1)).squeeze(-1)
    want = [-L @ (u[:, :, None] * xs[:, None, :] + xs[:, :, None] * u[:, None, :]), -u, torch.zeros_like(GG),
            torch.zeros_like(hh)]
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-8 * float(want[1].abs().max()))
