"""Tests of convexddn.nodes.projection: Lp ball/sphere and simplex projections."""
from __future__ import annotations

import itertools
import math
import warnings
from fractions import Fraction

import cvxpy as cp
import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.autograd import gradcheck
from torch.autograd.functional import jacobian

import convexddn as cddn
from convexddn.errors import DTypeError, GradientWarning, NonFiniteError, OptionError, ShapeError
from convexddn.nodes.projection import (
    LpProjection,
    SimplexProjection,
    project_lp,
    project_simplex,
)

PS = [1, 2, math.inf]
MODES = ["ball", "sphere"]
CASES = list(itertools.product(PS, MODES))
F64 = torch.float64


def _norm(y: torch.Tensor, p: float, dim: int = -1) -> torch.Tensor:
    return torch.linalg.vector_norm(y, ord=p, dim=dim)


def _x(*shape: int, scale: float = 1.0, seed: int = 0, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def _cvxpy_ball(x: np.ndarray, p: float, r: float) -> np.ndarray:
    """Independent solve of argmin ½‖u − x‖² s.t. ‖u‖_p ≤ r, tight tolerances."""
    u = cp.Variable(x.shape[0])
    prob = cp.Problem(cp.Minimize(cp.sum_squares(u - x)), [cp.norm(u, p) <= r])
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    return u.value


def _cvxpy_simplex(x: np.ndarray) -> np.ndarray:
    u = cp.Variable(x.shape[0])
    prob = cp.Problem(cp.Minimize(cp.sum_squares(u - x)), [u >= 0, cp.sum(u) == 1])
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    return u.value


# --------------------------------------------------------------------------- feasibility


@pytest.mark.parametrize("p,mode", CASES)
@pytest.mark.parametrize("scale", [0.05, 0.3, 5.0])
def test_project_lp_feasible(p, mode, scale):
    r = 1.3
    x = _x(16, 7, scale=scale)
    y = project_lp(x, p, mode, r)
    n = _norm(y, p)
    assert (n <= r + 1e-12).all()
    if mode == "sphere":
        torch.testing.assert_close(n, torch.full_like(n, r), atol=1e-12, rtol=0)


@pytest.mark.parametrize("p", PS)
def test_project_lp_ball_inside_is_identity(p):
    x = _x(5, 6)
    x = x / _norm(x, p).unsqueeze(-1) * 0.9  # strictly inside the unit ball
    torch.testing.assert_close(project_lp(x, p, "ball", 1.0), x, atol=1e-14, rtol=0)


@pytest.mark.parametrize("p,mode", CASES)
def test_project_lp_idempotent(p, mode):
    x = _x(8, 9, scale=2.0, seed=3)
    y = project_lp(x, p, mode, 0.7)
    torch.testing.assert_close(project_lp(y, p, mode, 0.7), y, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- optimality


@pytest.mark.parametrize("p", PS)
def test_project_lp_ball_matches_cvxpy(p):
    # Rows both inside and outside the ball.
    x = torch.cat([_x(3, 6, scale=2.0, seed=1), _x(2, 6, scale=0.1, seed=2)])
    r = 1.5
    y = project_lp(x, p, "ball", r)
    ref = np.stack([_cvxpy_ball(row, p, r) for row in x.numpy()])
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-6)


def _l1_sphere_brute(x: np.ndarray, r: float) -> tuple[float, np.ndarray]:
    """The L1 sphere is the union of its 2ⁿ facets {s∘u ≥ 0, sᵀu = r}: best facet wins."""
    best = (math.inf, None)
    for signs in itertools.product([-1.0, 1.0], repeat=x.shape[0]):
        s = np.array(signs)
        u = cp.Variable(x.shape[0])
        prob = cp.Problem(
            cp.Minimize(cp.sum_squares(u - x)), [cp.multiply(s, u) >= 0, s @ u == r]
        )
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
        dist = float(np.linalg.norm(u.value - x))
        if dist < best[0]:
            best = (dist, u.value)
    return best


def _linf_sphere_brute(x: np.ndarray, r: float) -> tuple[float, np.ndarray]:
    """The L∞ sphere is the union of its 2n facets {u_i = ±r, |u_j| ≤ r}: best facet wins."""
    best = (math.inf, None)
    for i in range(x.shape[0]):
        for sign in (-1.0, 1.0):
            u = np.clip(x, -r, r)
            u[i] = sign * r
            dist = float(np.linalg.norm(u - x))
            if dist < best[0]:
                best = (dist, u)
    return best


@pytest.mark.parametrize("scale", [0.2, 3.0])
def test_project_l1_sphere_global_min(scale):
    r = 1.0
    x = _x(3, 3, scale=scale, seed=5)
    y = project_lp(x, 1, "sphere", r)
    for xi, yi in zip(x.numpy(), y.numpy()):
        dist, u = _l1_sphere_brute(xi, r)
        assert abs(np.linalg.norm(yi - xi) - dist) <= 1e-7
        np.testing.assert_allclose(yi, u, atol=1e-6)


@pytest.mark.parametrize("scale", [0.2, 3.0])
def test_project_linf_sphere_global_min(scale):
    r = 1.0
    x = _x(6, 4, scale=scale, seed=6)
    y = project_lp(x, math.inf, "sphere", r)
    for xi, yi in zip(x.numpy(), y.numpy()):
        dist, u = _linf_sphere_brute(xi, r)
        assert abs(np.linalg.norm(yi - xi) - dist) <= 1e-12
        np.testing.assert_allclose(yi, u, atol=1e-12)


def test_project_l2_sphere_global_min():
    # Dense sampling of the circle: no sampled point is closer than the projection.
    r = 2.0
    theta = torch.linspace(0, 2 * math.pi, 200_001, dtype=F64)
    circle = r * torch.stack([theta.cos(), theta.sin()], -1)
    x = torch.cat([_x(4, 2, scale=0.3, seed=7), _x(4, 2, scale=4.0, seed=8)])
    y = project_lp(x, 2, "sphere", r)
    # cdist's default matmul formula loses ~1e-8 to cancellation (it made this test flaky).
    best = torch.cdist(x, circle, compute_mode="donot_use_mm_for_euclid_dist").min(-1).values
    torch.testing.assert_close((y - x).norm(dim=-1), best, atol=1e-9, rtol=0)


def test_project_lp_known_values():
    # Worked by hand.
    # L1 ball, r = 2: sorted |x| = 3, 1, 0.5; ρ = 1, θ = 3 − 2 = 1.
    x = torch.tensor([3.0, -1.0, 0.5], dtype=F64)
    torch.testing.assert_close(project_lp(x, 1, "ball", 2.0), torch.tensor([2.0, 0, 0], dtype=F64))
    # L1 sphere from inside, r = 1.5: ‖x‖₁ = 0.75, each |x_i| grows by 0.25; 0 goes to +.
    x = torch.tensor([0.5, -0.25, 0.0], dtype=F64)
    torch.testing.assert_close(
        project_lp(x, 1, "sphere", 1.5), torch.tensor([0.75, -0.5, 0.25], dtype=F64)
    )
    # -0.0 counts as a zero too (tie rule: + side).
    x = torch.tensor([0.5, -0.0], dtype=F64)
    torch.testing.assert_close(
        project_lp(x, 1, "sphere", 1.0), torch.tensor([0.75, 0.25], dtype=F64)
    )
    # L∞ sphere from inside: ties in |x| push the first one; its sign is kept.
    x = torch.tensor([0.2, -0.5, 0.5], dtype=F64)
    torch.testing.assert_close(
        project_lp(x, math.inf, "sphere", 1.0), torch.tensor([0.2, -1.0, 0.5], dtype=F64)
    )
    # L∞ sphere at 0 pushes the first coordinate to +r.
    torch.testing.assert_close(
        project_lp(torch.zeros(3, dtype=F64), "inf", "sphere", 2.0),
        torch.tensor([2.0, 0, 0], dtype=F64),
    )
    # L2 ball, r = 1: (3, 4) has norm 5.
    torch.testing.assert_close(
        project_lp(torch.tensor([3.0, 4.0], dtype=F64), 2, "ball", 1.0),
        torch.tensor([0.6, 0.8], dtype=F64),
    )


def test_project_l2_sphere_zero():
    # At x = 0 every sphere point is nearest: the derivative does not exist (r/‖x‖ → ∞),
    # so the zero gradient comes with a warning naming the rows.
    x = torch.tensor([[0.0, 0, 0], [3.0, 4.0, 0], [0.0, 0, 0]], dtype=F64, requires_grad=True)
    y = project_lp(x, 2, "sphere", 1.5)
    torch.testing.assert_close(y.detach(), torch.tensor([[1.5, 0, 0], [0.9, 1.2, 0], [1.5, 0, 0]], dtype=F64))
    with pytest.warns(GradientWarning, match=r"2 row\(s\) are x = 0"):
        (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g[[0, 2]], torch.zeros(2, 3, dtype=F64))
    # The nonzero row keeps its gradient (r/‖x‖)(I − ûûᵀ)·1 with û = (0.6, 0.8, 0).
    u = torch.tensor([0.6, 0.8, 0.0], dtype=F64)
    torch.testing.assert_close(g[1], 0.3 * (torch.ones(3, dtype=F64) - u * u.sum()))


def test_project_l2_zero_rows_without_warning_where_defined():
    # The ball at x = 0 is the identity (derivative I), and rows off zero have a derivative.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = torch.zeros(2, 3, dtype=F64, requires_grad=True)
        (g,) = torch.autograd.grad(project_lp(x, 2, "ball", 1.5).sum(), x)
        assert torch.equal(g, torch.ones_like(g))
        x = torch.tensor([[1e-300, 0, 0]], dtype=F64, requires_grad=True)
        project_lp(x, 2, "sphere", 1e-300).sum().backward()


def test_project_lp_p_spellings():
    x = _x(3, 5, scale=2.0)
    for spellings in ([1, 1.0], [2, 2.0], [math.inf, float("inf"), "inf", torch.inf]):
        outs = [project_lp(x, p, "sphere", 1.0) for p in spellings]
        for out in outs[1:]:
            assert torch.equal(out, outs[0])


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("p,mode", CASES)
@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_project_lp_grad(p, mode, scale):
    # Random inputs: no ties, no zero coordinates, no coordinate at a threshold.
    x = _x(4, 5, scale=scale, seed=11).requires_grad_(True)
    r = torch.tensor([1.0, 0.7, 1.3, 0.9], dtype=F64, requires_grad=True)
    assert gradcheck(lambda a, b: project_lp(a, p, mode, b), (x, r))


@pytest.mark.parametrize("p,mode", CASES)
def test_project_lp_grad_dim0(p, mode):
    x = _x(5, 3, 2, scale=2.0, seed=12).requires_grad_(True)
    r = torch.tensor([[1.0, 0.5], [0.8, 1.2], [2.0, 0.3]], dtype=F64, requires_grad=True)
    assert gradcheck(lambda a, b: project_lp(a, p, mode, b, dim=0), (x, r))


@pytest.mark.parametrize("mode", MODES)
def test_project_l2_jacobian_closed_form(mode):
    r = 1.5
    x = _x(6, scale=2.0, seed=13)
    x = x / x.norm() * 3.0  # outside the ball
    y = project_lp(x, 2, mode, r)
    expected = (torch.eye(6, dtype=F64) - torch.outer(y, y) / r**2) * r / x.norm()
    jac = jacobian(lambda a: project_lp(a, 2, mode, r), x)
    torch.testing.assert_close(jac, expected)
    inside = x / x.norm() * 0.5
    jac_in = jacobian(lambda a: project_lp(a, 2, "ball", r), inside)
    torch.testing.assert_close(jac_in, torch.eye(6, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_project_l2_sphere_matches_normalize(dtype):
    r = 1.7
    x1 = _x(5, 8, scale=2.0, seed=14, dtype=dtype).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = _x(5, 8, seed=15, dtype=dtype)
    y1 = project_lp(x1, 2, "sphere", r)
    y2 = x2 / x2.norm(dim=-1, keepdim=True) * r
    torch.testing.assert_close(y1, y2)
    (g1,) = torch.autograd.grad(y1, x1, g)
    (g2,) = torch.autograd.grad(y2, x2, g)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_project_linf_ball_matches_clamp(dtype):
    r = 0.8
    x1 = _x(6, 9, seed=16, dtype=dtype).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = _x(6, 9, seed=17, dtype=dtype)
    y1 = project_lp(x1, math.inf, "ball", r)
    y2 = x2.clamp(-r, r)
    assert torch.equal(y1, y2)
    assert torch.equal(torch.autograd.grad(y1, x1, g)[0], torch.autograd.grad(y2, x2, g)[0])


def test_project_l1_jacobian_closed_form():
    x = _x(7, scale=2.0, seed=18)
    r = 1.0
    y = project_lp(x, 1, "ball", r)
    s = y.sign()
    m = s.abs()
    expected = torch.diag(m) - torch.outer(s, s) / m.sum()
    torch.testing.assert_close(jacobian(lambda a: project_lp(a, 1, "ball", r), x), expected)


# --------------------------------------------------------------------------- simplex


def test_project_simplex():
    x = torch.cat([_x(4, 6, scale=s, seed=19) for s in (0.1, 1.0, 10.0)])
    y = project_simplex(x)
    assert (y >= 0).all()
    torch.testing.assert_close(y.sum(-1), torch.ones(12, dtype=F64))
    ref = np.stack([_cvxpy_simplex(row) for row in x.numpy()])
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-6)
    torch.testing.assert_close(project_simplex(y), y, atol=1e-12, rtol=0)


def test_project_simplex_known_values():
    # Support {1, 0.5}: τ = (1.5 − 1)/2 = 0.25.
    x = torch.tensor([1.0, 0.5, -1.0], dtype=F64)
    torch.testing.assert_close(project_simplex(x), torch.tensor([0.75, 0.25, 0.0], dtype=F64))
    # Shift invariance and large values (τ without cancellation).
    big = torch.full((3,), 1e7, dtype=torch.float32)
    torch.testing.assert_close(project_simplex(big), torch.full((3,), 1 / 3))


def test_project_simplex_grad():
    x = _x(5, 6, scale=1.0, seed=20).requires_grad_(True)
    assert gradcheck(project_simplex, (x,))
    x0 = _x(6, scale=0.5, seed=21)
    y = project_simplex(x0)
    m = (y > 0).to(F64)
    expected = torch.diag(m) - torch.outer(m, m) / m.sum()
    torch.testing.assert_close(jacobian(project_simplex, x0), expected)


def test_project_simplex_batched():
    x = _x(2, 3, 5, seed=22)
    y = project_simplex(x, dim=1)
    for i in range(2):
        for k in range(5):
            torch.testing.assert_close(y[i, :, k], project_simplex(x[i, :, k]))


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("p,mode", CASES)
@pytest.mark.parametrize("batch", [(), (1,), (2, 3)])
@pytest.mark.parametrize("n", [1, 5])
def test_project_lp_batched(p, mode, batch, n):
    x = _x(*batch, n, scale=1.5, seed=23)
    y = project_lp(x, p, mode, 0.9)
    assert y.shape == x.shape
    flat_x, flat_y = x.reshape(-1, n), y.reshape(-1, n)
    for row_x, row_y in zip(flat_x, flat_y):
        torch.testing.assert_close(row_y, project_lp(row_x, p, mode, 0.9))


@pytest.mark.parametrize("p,mode", CASES)
def test_project_lp_dim(p, mode):
    x = _x(3, 6, 4, scale=1.5, seed=24)
    y = project_lp(x, p, mode, 1.1, dim=1)
    torch.testing.assert_close(y, project_lp(x.movedim(1, -1), p, mode, 1.1).movedim(-1, 1))
    torch.testing.assert_close(y, project_lp(x, p, mode, 1.1, dim=-2))


@pytest.mark.parametrize("p,mode", CASES)
def test_project_lp_radius_tensor(p, mode):
    x = _x(3, 4, 5, scale=1.5, seed=25)
    # Batch shape without dim 0 is (4, 5): one radius per dim-1 slice, broadcast over 5.
    r = torch.tensor([[0.5], [1.0], [2.0], [3.0]], dtype=F64)
    y = project_lp(x, p, mode, r, dim=0)
    for j in range(4):
        torch.testing.assert_close(y[:, j], project_lp(x[:, j], p, mode, float(r[j]), dim=0))
    # A scalar tensor works as a float does.
    torch.testing.assert_close(
        project_lp(x, p, mode, torch.tensor(0.8)), project_lp(x, p, mode, 0.8)
    )


@pytest.mark.parametrize("p,mode", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_project_lp_dtype(p, mode, dtype):
    x = _x(4, 6, scale=2.0, seed=26, dtype=dtype)
    y = project_lp(x, p, mode, 1.0)
    assert y.dtype == dtype
    assert project_simplex(x).dtype == dtype
    ref = project_lp(x.double(), p, mode, 1.0)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p,mode", CASES)
def test_project_lp_empty_batch(p, mode):
    x = torch.zeros(0, 5, dtype=F64, requires_grad=True)
    y = project_lp(x, p, mode, 1.0)
    assert y.shape == (0, 5)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.shape == (0, 5)
    assert project_simplex(x.detach()).shape == (0, 5)


def test_project_lp_large_values():
    # Row norms / sums that overflow float32 while every entry is finite.
    x = torch.full((2, 4), 1e20)
    torch.testing.assert_close(project_lp(x, 2, "sphere", 1.0), torch.full((2, 4), 0.5))
    x = torch.tensor([[3e37, -3e37, 3e37, 3e37]])
    y = project_lp(x, 1, "ball", 4e37)
    torch.testing.assert_close(y, torch.tensor([[1e37, -1e37, 1e37, 1e37]]))


def test_project_lp_inputs_untouched():
    x = _x(3, 4, scale=3.0)
    before = x.clone()
    for p, mode in CASES:
        project_lp(x, p, mode, 1.0)
    project_simplex(x)
    assert torch.equal(x, before)


# --------------------------------------------------------------------------- modules


def test_lp_projection_module():
    proj = LpProjection(p="inf", mode="sphere", radius=2.0, dim=0)
    assert repr(proj) == (
        "LpProjection(p=inf, mode='sphere', radius=2.0, dim=0)"
    )
    x = _x(4, 3, seed=27)
    assert torch.equal(proj(x), project_lp(x, math.inf, "sphere", 2.0, dim=0))
    assert "radius=tensor of shape (3,)" in repr(LpProjection(radius=torch.ones(3)))
    assert repr(SimplexProjection(dim=1)) == "SimplexProjection(dim=1, z=1.0)"


def test_lp_projection_module_learns_radius():
    proj = LpProjection(p=2, mode="sphere", radius=nn.Parameter(torch.tensor(1.0, dtype=F64)))
    assert [n for n, _ in proj.named_parameters()] == ["radius"]
    x = _x(3, 4, seed=28)
    proj(x).square().sum().backward()
    # ‖y‖² = r² per row, so d/dr Σ‖y‖² = 2·rows·r = 6.
    torch.testing.assert_close(proj.radius.grad, torch.tensor(6.0, dtype=F64))
    buf = LpProjection(radius=torch.tensor([1.0, 2.0]))
    assert [n for n, _ in buf.named_buffers()] == ["radius"]


def test_lp_projection_module_invalid():
    with pytest.raises(OptionError, match="p must be one of"):
        LpProjection(p=3)
    with pytest.raises(OptionError, match="mode must be one of"):
        LpProjection(mode="disc")
    with pytest.raises(OptionError, match="radius must be finite and > 0"):
        LpProjection(radius=0.0)
    with pytest.raises(OptionError, match="dim must be an integer"):
        SimplexProjection(dim=True)
    with pytest.raises(OptionError, match="dim must be an integer"):
        LpProjection(dim=1.0)
    with pytest.raises(OptionError, match="radius must be a positive number"):
        LpProjection(radius="1")


# --------------------------------------------------------------------------- bad input


def test_project_lp_invalid():
    x = _x(2, 3)
    bad = x.clone()
    bad[0, 1] = float("nan")
    bad[1, 2] = float("inf")
    for p, mode in CASES:
        with pytest.raises(NonFiniteError, match=r"x must be finite, got 1 NaN and 1 Inf"):
            project_lp(bad, p, mode)
    with pytest.raises(NonFiniteError, match=r"x must be finite, got 0 NaN and 1 Inf"):
        project_lp(torch.tensor([1.0, -float("inf")]), math.inf, "ball")
    with pytest.raises(ShapeError, match=r"at least one entry along dim=-1"):
        project_lp(torch.zeros(3, 0))
    with pytest.raises(ShapeError, match="out of range"):
        project_lp(x, dim=2)
    with pytest.raises(ShapeError, match="out of range"):
        project_lp(torch.tensor(1.0))
    with pytest.raises(OptionError, match="dim must be an integer"):
        project_lp(x, dim=(0, 1))
    with pytest.raises(OptionError, match="radius must be a positive number"):
        project_lp(x, radius="1")
    with pytest.raises(OptionError, match=r"radius must be finite and > 0, got 0"):
        project_lp(x, radius=0)
    with pytest.raises(OptionError, match=r"radius must be finite and > 0"):
        project_lp(x, radius=torch.tensor([1.0, -1.0]))
    with pytest.raises(ShapeError, match=r"radius must broadcast to the shape of x"):
        project_lp(x, radius=torch.ones(3))
    with pytest.raises(OptionError, match=r"p must be one of \[1, 2, inf, 'inf'\], got 3"):
        project_lp(x, p=3)
    with pytest.raises(OptionError, match="p must be one of"):
        project_lp(x, p=torch.tensor(2.0))
    with pytest.raises(OptionError, match=r"mode must be one of \['ball', 'sphere'\]"):
        project_lp(x, mode="shell")
    with pytest.raises(DTypeError, match="x must have a floating-point dtype"):
        project_lp(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(DTypeError, match="radius must have a floating-point dtype"):
        project_lp(x, radius=torch.tensor([1, 2]))
    with pytest.raises(DTypeError, match="x must be a torch.Tensor"):
        project_lp([1.0, 2.0])


def test_project_simplex_invalid():
    with pytest.raises(NonFiniteError, match=r"x must be finite, got 1 NaN and 0 Inf"):
        project_simplex(torch.tensor([0.5, float("nan")]))
    with pytest.raises(NonFiniteError, match=r"got 0 NaN and 1 Inf"):
        project_simplex(torch.tensor([0.5, -float("inf")]))
    with pytest.raises(ShapeError, match="at least one entry along dim=0"):
        project_simplex(torch.zeros(0, 3), dim=0)
    with pytest.raises(DTypeError, match="floating-point"):
        project_simplex(torch.ones(3, dtype=torch.int32))


def test_project_lp_cvxpy_invalid():
    with pytest.raises(OptionError, match="radius must be finite and > 0"):
        cddn.layer("lp_ball", n=3, p=2, radius=0.0, backend="cvxpy")
    with pytest.raises(OptionError, match="p must be one of"):
        cddn.layer("lp_ball", n=3, p=3, backend="cvxpy")


# --------------------------------------------------------------------------- cvxpy backend


@pytest.mark.parametrize("p", PS)
def test_project_lp_cvxpy_agrees(p):
    # Rows outside the ball and one inside. Moderate scale: the cone solver stops on a
    # relative duality gap, so its solution error grows like sqrt(gap · objective)
    # (measured: 1.5e-5 for p=1 at scale 2, 1.7e-6 at scale 1).
    x = torch.cat([_x(3, 6, scale=1.0, seed=29), _x(1, 6, scale=0.1, seed=30)])
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    g = _x(4, 6, seed=31)
    y1 = project_lp(x1, p, "ball", 1.2)
    y2 = cddn.layer("lp_ball", n=6, p=p, radius=1.2, backend="cvxpy")(x2)
    assert y2.dtype == F64 and y2.shape == (4, 6)
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=0)
    (g1,) = torch.autograd.grad(y1, x1, g)
    (g2,) = torch.autograd.grad(y2, x2, g)
    torch.testing.assert_close(g2, g1, atol=1e-4, rtol=0)


def test_project_simplex_cvxpy_agrees():
    x = _x(4, 6, seed=32)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    g = _x(4, 6, seed=33)
    y1 = project_simplex(x1)
    y2 = cddn.layer("simplex", n=6, backend="cvxpy")(x2)
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=0)
    (g1,) = torch.autograd.grad(y1, x1, g)
    (g2,) = torch.autograd.grad(y2, x2, g)
    torch.testing.assert_close(g2, g1, atol=1e-4, rtol=0)


def test_project_lp_cvxpy_dim_and_empty():
    x = _x(5, 2, seed=34)
    cone = cddn.layer("lp_ball", n=5, p=2, radius=0.5, backend="cvxpy")
    y = cone(x.movedim(0, -1)).movedim(-1, 0)
    torch.testing.assert_close(y, project_lp(x, 2, "ball", 0.5, dim=0), atol=1e-5, rtol=0)
    assert cddn.layer("lp_ball", n=4, p=1, backend="cvxpy")(torch.zeros(0, 4, dtype=F64)).shape == (0, 4)


@pytest.mark.parametrize("name, options", [("lp_ball", {"p": 1}), ("lp_ball", {"p": 2}),
                                           ("lp_ball", {"p": math.inf}), ("simplex", {})])
def test_layer_auto_is_native_and_exact(name, options):
    """convexddn.layer gives the native node for projections, same answer as the function."""
    layer = cddn.layer(name, n=6, **options)
    assert not isinstance(layer, cddn.ConvexLayer)
    x = _x(4, 6, seed=35)
    want = project_simplex(x) if name == "simplex" else project_lp(x, options["p"], "ball", 1.0)
    torch.testing.assert_close(layer(x), want)
    with pytest.raises(ShapeError, match=r"trailing shape \(6,\)"):
        layer(_x(4, 5))


# --------------------------------------------------------------------------- numerical range


def _simplex_fraction(d: list[int], z: int):
    """Exact projection of integer offsets d onto {v ≥ 0, Σv = z} (Fractions, by hand)."""
    from fractions import Fraction

    u = sorted(d, reverse=True)
    best = None
    for rho in range(1, len(u) + 1):
        theta = Fraction(sum(u[:rho]) - z, rho)
        if u[rho - 1] - theta > 0:
            best = theta
    return [max(Fraction(di) - best, Fraction(0)) for di in d]


@pytest.mark.parametrize("mode", MODES)
def test_project_l1_huge_values_exact(mode):
    # x = 2^60 + 2^8·k is exact in float64 (ulp 2^8); r = 2^10. The threshold is ~2^60,
    # so computing |x| − θ directly cancels to 0; the exact answer has size ~r.
    k = [5, -3, 4, 1, -4]
    x = torch.tensor([math.copysign(2.0**60 + 2.0**8 * abs(v), v) for v in k], dtype=F64)
    r = 2.0**10
    expected = _simplex_fraction([2**8 * abs(v) for v in k], 2**10)
    want = torch.tensor([math.copysign(float(e), v) for e, v in zip(expected, k)], dtype=F64)
    y = project_lp(x, 1, mode, r)
    torch.testing.assert_close(y, want, rtol=1e-15, atol=0)
    assert y.abs().sum() == r


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_project_l1_huge_values(mode, dtype):
    # Issue 10: |x| ≫ r/eps gave zeros (or a point far outside the ball).
    x = torch.tensor([[1e30, -1e30, 3e29], [1e30, 5e29, 1.0]], dtype=dtype)
    want = torch.tensor([[0.5, -0.5, 0.0], [1.0, 0.0, 0.0]], dtype=dtype)
    y = project_lp(x, 1, mode, 1.0)
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_project_l1_tiny_radius(mode):
    # Issue 10: the p=1 sphere of radius 1e-30 returned 0. By hand: the largest |x|
    # alone carries the whole (tiny) radius; two equal largest share it.
    x = torch.tensor([[0.7, -0.2, 0.1], [-0.5, 0.5, 0.25]], dtype=F64)
    y = project_lp(x, 1, mode, 1e-30)
    want = torch.tensor([[1e-30, 0.0, 0.0], [-5e-31, 5e-31, 0.0]], dtype=F64)
    torch.testing.assert_close(y, want, rtol=1e-15, atol=0)
    assert torch.equal(y.abs().sum(-1), torch.full((2,), 1e-30, dtype=F64))


def test_project_l1_scale_equivariant():
    # P_{ar}(a x) = a P_r(x) exactly for powers of two a, across the whole range.
    x = _x(6, 9, scale=2.0, seed=40)
    for mode in MODES:
        base = project_lp(x, 1, mode, 0.8)
        for k in (-1000, -300, -60, 60, 300, 1000):
            a = 2.0**k
            torch.testing.assert_close(project_lp(x * a, 1, mode, 0.8 * a), base * a,
                                       rtol=4e-16, atol=0)


def test_project_l1_sphere_underflow_warns():
    # 1e-45 is the smallest float32 subnormal: a quarter of it rounds to 0, off the sphere.
    x = torch.ones(2, 4)
    with pytest.warns(cddn.errors.ConvexDDNWarning, match="rounded to zero"):
        project_lp(x, 1, "sphere", 1e-45)


@pytest.mark.parametrize("dtype,z", [(torch.float16, 1e-8), (torch.float32, 1e-46), (torch.bfloat16, 1e-45)])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float_z", "tensor_z"])
def test_project_simplex_underflow_warns(dtype, z, as_tensor):
    """A z below the dtype's range: whole rows rounded to 0 (row sum 0, not z: off the
    simplex, whose points sum to z > 0 by definition), silently, where the L1 sphere warned.
    A subnormal z/n that the dtype holds (float16 z = 1e-6, n = 8) keeps the rows on it
    (sum z within n half-spacings of the dtype there, 8 · 2**-25): no warning."""
    x = _x(3, 8, seed=0).to(dtype)
    zz = torch.tensor(z, dtype=F64) if as_tensor else z
    with pytest.warns(cddn.errors.ConvexDDNWarning,
                      match=r"^project_simplex: z too small for .*3 of 3 .*not on the simplex\); use a larger z"):
        y = project_simplex(x, z=zz)
    assert torch.equal(y, torch.zeros_like(y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", cddn.errors.ConvexDDNWarning)
        y = project_simplex(x.to(torch.float16), z=1e-6)
    assert (y.double().sum(-1) - 1e-6).abs().max() <= 8 * 2.0**-25 and bool((y >= 0).all())


@pytest.mark.parametrize("dtype,radius", [(torch.float16, 1e-30), (torch.float32, 1e-46)])
def test_project_linf_sphere_underflow_warns(dtype, radius):
    """A radius below the dtype's range rounds to 0: p = 1 and p = 2 warned that the
    result (0, off the sphere) is not a sphere point, p = inf returned it silently.
    A subnormal radius that the dtype holds is on the sphere: no warning."""
    x = torch.tensor([[3.0, 4.0]], dtype=dtype)
    with pytest.warns(cddn.errors.ConvexDDNWarning, match=r"p=inf.*rounded to zero"):
        y = project_lp(x, math.inf, "sphere", radius)
    assert torch.equal(y, torch.zeros_like(y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", cddn.errors.ConvexDDNWarning)
        y = project_lp(x, math.inf, "sphere", 1e-7)  # subnormal in float16, normal in float32
    assert float(y.abs().amax()) > 0



def _exact_l1(x: list[float], r: float, dtype) -> torch.Tensor:
    """Exact L1 ball/sphere projection of x (outside the ball, or the sphere from inside)."""
    from fractions import Fraction

    v = _simplex_fraction([Fraction(abs(xi)) for xi in x], Fraction(r))
    return torch.tensor([math.copysign(float(e), xi) for e, xi in zip(v, x)], dtype=dtype)


# Radii near the largest float: every answer is representable, but z − c_j, c_ρ − z (up
# to ~2z) overflowed. Rows: (x, radius, dtype); the last needs n·z > max, not 2z.
HUGE_RADIUS = [
    ([8.3196203e37, -2.4738299e38], 3e38, torch.float32),
    ([1.6151957e38, -2.0390793e38], 3e38, torch.float32),
    ([1.6e38, -0.6e38], 3e38, torch.float32),
    ([1e308, -1.7e308], 1.7e308, F64),
    ([1e308, -1.7e308, 5e307], 1.7e308, F64),
    ([3.0, -1.0, 2.5, 0.5, -2.0, 1.0], 1e38, torch.float32),
]


@pytest.mark.parametrize("x,r,dtype", HUGE_RADIUS)
def test_projections_radius_near_float_max(x, r, dtype):
    from fractions import Fraction

    xt = torch.tensor([x], dtype=dtype)
    xs = xt[0].tolist()  # the values as rounded to dtype
    rr = float(torch.tensor(r, dtype=dtype))
    tol = {"rtol": 4 * torch.finfo(dtype).eps, "atol": 0}
    want = torch.tensor(
        [float(v) for v in _simplex_fraction([Fraction(v) for v in xs], Fraction(rr))],
        dtype=dtype,
    )
    torch.testing.assert_close(project_simplex(xt, z=rr)[0], want, **tol)
    zt = torch.tensor([rr], dtype=dtype)
    torch.testing.assert_close(project_simplex(xt, z=zt)[0], want, **tol)
    for mode in MODES:
        y = project_lp(xt, 1, mode, rr)[0]
        if mode == "ball" and sum(abs(Fraction(v)) for v in xs) <= rr:
            assert torch.equal(y, xt[0])
        else:
            torch.testing.assert_close(y, _exact_l1(xs, rr, dtype), **tol)
    # Gradients go through the same forward: finite, and Σy = z moves one-for-one with z.
    zt = torch.tensor([rr], dtype=dtype, requires_grad=True)
    (gz,) = torch.autograd.grad(project_simplex(xt, z=zt).sum(), zt)
    assert gz.item() == 1.0


def test_projections_huge_radius_per_row():
    # Only the row with the huge radius is rescaled; the others keep their exact answer.
    x = torch.tensor([[8.3196203e37, -2.4738299e38], [0.75, -0.5], [0.75, -0.5]])
    z = torch.tensor([3e38, 1.0, 1e-30])
    want = torch.tensor([[3e38, 0.0], [1.0, 0.0], [1e-30, 0.0]])
    assert torch.equal(project_simplex(x, z=z), want)
    y = project_lp(x, 1, "sphere", z)
    assert torch.equal(y[1:], torch.tensor([[0.625, -0.375], [1e-30, 0.0]]))
    want = _exact_l1(x[0].tolist(), 3e38, torch.float32)
    torch.testing.assert_close(y[0], want, rtol=4e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_projections_sum_overflow_16bit(dtype):
    # 2^e is the top binade of dtype (float16 max 65504, bfloat16 ~3.4e38). By hand: the
    # sphere adds (r − ‖x‖₁)/2 = 2^(e−3) to each |x_i|; the simplex has τ = −13·2^(e−3).
    e = 15 if dtype == torch.float16 else 127
    x = torch.tensor([[2.0**e, -(2.0**(e - 1))]], dtype=dtype)
    r = 7 * 2.0 ** (e - 2)
    want = torch.tensor([[9 * 2.0 ** (e - 3), -5 * 2.0 ** (e - 3)]], dtype=dtype)
    assert torch.equal(project_lp(x, 1, "sphere", r), want)
    want = torch.tensor([[13 * 2.0 ** (e - 3), 2.0 ** (e - 3)]], dtype=dtype)
    assert torch.equal(project_simplex(x, z=r), want)


def test_project_simplex_sum_overflow_float16():
    # n > float16 max entries at −z: the prefix sums overflow for z = 1, where the old
    # fallback z·P_1(x/z) was the same problem again (endless recursion).
    x = torch.full((1, 70000), -1.0, dtype=torch.float16)
    x[0, 0] = 0.0
    want = torch.zeros_like(x)
    want[0, 0] = 1.0
    assert torch.equal(project_simplex(x), want)


# The three sorted-threshold projections as functions of (x, radius): the L1 ones solve
# the simplex problem on |x| and put the signs back.
THRESHOLD_KINDS = {
    "simplex": lambda x, r: project_simplex(x, z=r),
    "l1_ball": lambda x, r: project_lp(x, 1, "ball", r),
    "l1_sphere": lambda x, r: project_lp(x, 1, "sphere", r),
}


@pytest.mark.parametrize("kind", list(THRESHOLD_KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_projections_dominant_entry_is_the_exact_vertex(kind, dtype):
    # One entry above all others by at least the radius r: the answer is the vertex
    # ±r·e_0, locally constant in x (zero Jacobian), with dy/dr = ±e_0. The solver raises
    # the others to −r (relative to the max), exactly the threshold −r: the rounded prefix
    # sums of −r counted some in the support (r = 2.9 in float32, 3.423 in float64): ulp-
    # sized entries and Dy on 5 entries (dy₀/dx₀ = 0.875). x = r·e_0 is already a vertex
    # (idempotence), its zeros exactly at the threshold, which counts them outside (the
    # documented tie rule). Not for the ball: there ‖x‖₁ = r is the boundary, kept as is.
    f = THRESHOLD_KINDS[kind]
    sign = 1.0 if kind == "simplex" else -1.0
    for r0 in (2.9, 3.423):
        for top in (100.0, r0) if kind != "l1_ball" else (100.0,):
            x = torch.zeros(8, dtype=dtype)
            x[0] = sign * top
            r = torch.tensor(r0, dtype=dtype)
            want = torch.zeros(8, dtype=dtype)
            want[0] = sign * r
            assert torch.equal(f(x, r), want)
            # Reverse mode (x and a tensor r that require grad), then forward mode.
            jx, jr = jacobian(f, (x, r))
            assert torch.equal(jx, torch.zeros(8, 8, dtype=dtype))
            assert torch.equal(jr, want / r)
            xr, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
            g = torch.arange(1.0, 9.0, dtype=dtype)
            gx, gr = torch.autograd.grad(f(xr, rr), (xr, rr), g)
            assert torch.equal(gx, torch.zeros_like(x)) and float(gr) == sign
            with fwAD.dual_level():
                y = f(fwAD.make_dual(x, g), fwAD.make_dual(r, torch.ones_like(r)))
                assert torch.equal(fwAD.unpack_dual(y).tangent, want / r)


def _dominant_rows(n: int, rows: int, seed: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 rows of n entries with radii log-uniform in [1e-3, 1e3]: in two of three
    rows |x_0| exceeds the others by r·U(1, 3) (a vertex answer), in the rest by r·U(0, 1)
    (a support of several entries, the dominated ones still raised to −r)."""
    g = torch.Generator().manual_seed(seed)
    r = 10.0 ** (6 * torch.rand(rows, generator=g, dtype=F64) - 3)
    x = torch.randn(rows, n, generator=g, dtype=F64) * r[:, None]
    u = torch.rand(rows, generator=g, dtype=F64)
    gap = torch.where(torch.arange(rows) % 3 > 0, 1 + 2 * u, u)
    x[:, 0] = x.abs().amax(-1) + r * gap
    if signed:  # the L1 projections on |x|: random signs
        x *= torch.randint(0, 2, (rows, n), generator=g).to(F64) * 2 - 1
    return x, r


def _exact_threshold_row(x: list[float], r: float, kind: str) -> tuple[list, list, bool]:
    """(answer, support, inside the ball) in exact rational arithmetic, by the sort-based
    formula on a = x (simplex) or |x| (L1): θ = (Σ_{i≤ρ} u_i − r)/ρ for the largest ρ
    with u_ρ > that value (u = a sorted descending); the support is a_i > θ. The ball
    keeps x where Σ|x| ≤ r."""
    from fractions import Fraction

    a = [Fraction(v) if kind == "simplex" else abs(Fraction(v)) for v in x]
    if kind == "l1_ball" and sum(a) <= Fraction(r):
        return list(x), [v != 0 for v in x], True
    u = sorted(a, reverse=True)
    theta = [(sum(u[:k]) - Fraction(r)) / k for k in range(1, len(u) + 1)]
    theta = max(t for t, uk in zip(theta, u) if uk > t)
    y = [math.copysign(float(max(ai - theta, Fraction(0))), v) for ai, v in zip(a, x)]
    return y, [ai > theta for ai in a], False


@pytest.mark.parametrize("kind", list(THRESHOLD_KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_projections_dominant_entry_rows_match_exact_reference(kind, dtype):
    # Random rows with one dominant entry (one in 14 had a spurious support before), each
    # against the rational sort-based answer for its own values: the same support, the
    # exact vertex where the support is one entry, the answer to rounding elsewhere, and
    # the Jacobians of that exact support, Dy = diag(m) − s sᵀ/|S| and dy/dr = s/|S|
    # (s = sign(x) on the support S, m = |s|).
    f = THRESHOLD_KINDS[kind]
    eps = torch.finfo(dtype).eps
    for n in range(2, 13):
        x64, r64 = _dominant_rows(n, 24, seed=300 + n, signed=kind != "simplex")
        x, r = x64.to(dtype), r64.to(dtype)
        exact = [_exact_threshold_row(xi, ri, kind) for xi, ri in zip(x.tolist(), r.tolist())]
        want = torch.tensor([e[0] for e in exact], dtype=F64)
        m = torch.tensor([e[1] for e in exact], dtype=F64)
        inside = torch.tensor([[e[2]] for e in exact])
        s = m * x.to(F64).sign() if kind != "simplex" else m
        xr, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
        y = f(xr, rr)
        assert torch.equal(y != 0, m.bool())
        vertex = m.sum(-1) == 1
        assert vertex.sum() >= 12 and torch.equal(y[vertex].to(F64), want[vertex])
        err = (y.detach().to(F64) - want).abs().amax(-1)
        assert (err <= 4 * n * eps * r64).all()
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(n), dtype=dtype)
        gx, gr = torch.autograd.grad(y, (xr, rr), g)
        g64 = g.to(F64)
        k = m.sum(-1, keepdim=True)
        sg = (s * g64).sum(-1, keepdim=True)
        # Inside the ball y = x: Dy = I, dy/dr = 0.
        want_gx = torch.where(inside, g64, m * g64 - s * sg / k)
        want_gr = torch.where(inside, 0.0, sg / k).squeeze(-1)
        torch.testing.assert_close(gx.to(F64), want_gx, rtol=0, atol=8 * eps)
        torch.testing.assert_close(gr.to(F64), want_gr, rtol=0, atol=8 * eps)
        if dtype == F64:  # central differences, h far inside every row's margins
            h = 1e-7 * r64[:, None]
            fd = torch.stack([(f(x64 + h * e, r64) - f(x64 - h * e, r64)).mul(g).sum(-1)
                              for e in torch.eye(n, dtype=F64)], -1) / (2 * h)
            torch.testing.assert_close(gx, fd, rtol=0, atol=1e-6)
            fr = ((f(x64, r64 + h[:, 0]) - f(x64, r64 - h[:, 0])) * g).sum(-1) / (2 * h[:, 0])
            torch.testing.assert_close(gr, fr, rtol=0, atol=1e-6)


def _l2_vjp_closed_form(x: torch.Tensor, r: float, g: torch.Tensor):
    """(r/‖x‖)(I − ûûᵀ)g for û = x/‖x‖ (x of moderate size)."""
    u = x / x.norm(dim=-1, keepdim=True)
    return (g - u * (u * g).sum(-1, keepdim=True)) * (r / x.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("mode", MODES)
def test_project_l2_grad_tiny_radius(mode):
    # Issue 10: the backward divided by r², which underflows for r = 1e-300: Inf grads.
    x = torch.tensor([[3.0, 4.0, 1.0], [-1.0, 2.0, 0.5]], dtype=F64, requires_grad=True)
    g = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 2.0]], dtype=F64)
    r = 1e-300
    y = project_lp(x, 2, mode, r)
    (grad,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(grad, _l2_vjp_closed_form(x.detach(), r, g), rtol=1e-14, atol=0)
    rr = torch.tensor([r, r], dtype=F64, requires_grad=True)
    (grad_r,) = torch.autograd.grad(project_lp(x.detach(), 2, mode, rr), rr, g)
    u = x.detach() / x.detach().norm(dim=-1, keepdim=True)
    torch.testing.assert_close(grad_r, (u * g).sum(-1), rtol=1e-14, atol=0)


def test_project_l2_subnormal_input():
    # Exact subnormals: [3, 4, 1]·2^-1040. y = r x/‖x‖ and Dy = (r/‖x‖)(I − ûûᵀ).
    base = torch.tensor([[3.0, 4.0, 1.0]], dtype=F64)
    x = (base * 2.0**-1040).requires_grad_(True)
    assert x.detach().abs().max() < torch.finfo(F64).tiny
    g = torch.tensor([[1.0, 2.0, -1.0]], dtype=F64)
    r = 1e-10
    y = project_lp(x, 2, "sphere", r)
    torch.testing.assert_close(y.detach(), r * base / base.norm(), rtol=1e-15, atol=0)
    (grad,) = torch.autograd.grad(y, x, g)
    want = _l2_vjp_closed_form(base, r, g) * 2.0**520 * 2.0**520  # 2^1040 > max double
    torch.testing.assert_close(grad, want, rtol=1e-14, atol=0)


def test_project_l2_squares_in_subnormal_range():
    # Entries ~2^-520: their squares are subnormal (bits lost) but the answer is O(1).
    base = torch.tensor([[3.0, 4.0, 1.0], [1.0, 1.0, 1.0]], dtype=F64)
    y = project_lp(base * 2.0**-520, 2, "sphere", 1.0)
    torch.testing.assert_close(y, base / base.norm(dim=-1, keepdim=True), rtol=1e-15, atol=0)


def test_project_l2_gradient_overflow_warns():
    # r/‖x‖ = 2^1060/√26 > float64 max: the gradient cannot be represented.
    x = (torch.tensor([[3.0, 4.0, 1.0]], dtype=F64) * 2.0**-1060).requires_grad_(True)
    y = project_lp(x, 2, "sphere", 1.0)
    with pytest.warns(cddn.errors.GradientWarning, match="overflows"):
        torch.autograd.grad(y, x, torch.ones_like(y))


# --------------------------------------------------------------------------- simplex radius


def test_project_simplex_radius_known_values():
    # Support {1, 0.5}: τ = (1.5 − 2)/2 = −0.25, y = x − τ on the support, sum 2.
    x = torch.tensor([1.0, 0.5, -1.0], dtype=F64)
    want = torch.tensor([1.25, 0.75, 0.0], dtype=F64)
    torch.testing.assert_close(project_simplex(x, z=2.0), want)
    # Equal large entries share z; a tiny z goes to the largest entry alone.
    torch.testing.assert_close(project_simplex(torch.full((3,), 1e7), z=6.0), torch.full((3,), 2.0))
    tiny = torch.tensor([1e-30, 0.0, 0.0], dtype=F64)
    torch.testing.assert_close(project_simplex(x, z=1e-30), tiny, rtol=1e-15, atol=0)
    # Per-row radii: z broadcasts over the batch shape.
    xb = torch.stack([x, x])
    zb = torch.tensor([1.0, 2.0], dtype=F64)
    yb = project_simplex(xb, z=zb)
    torch.testing.assert_close(yb.sum(-1), zb)
    torch.testing.assert_close(yb[1], project_simplex(x, z=2.0))


def test_project_simplex_radius_grad():
    x = _x(4, 6, scale=1.0, seed=41).requires_grad_(True)
    z = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=F64, requires_grad=True)
    assert gradcheck(lambda a, b: project_simplex(a, z=b), (x, z))
    # Closed form: dy/dz = m/|S| (m the support indicator).
    y = project_simplex(x.detach(), z=z.detach())
    m = (y > 0).to(F64)
    g = _x(4, 6, seed=42)
    (gz,) = torch.autograd.grad(project_simplex(x.detach(), z=z), z, g)
    torch.testing.assert_close(gz, (m * g).sum(-1) / m.sum(-1))


def test_simplex_projection_module_radius():
    proj = SimplexProjection(z=nn.Parameter(torch.tensor(2.0, dtype=F64)))
    assert [n for n, _ in proj.named_parameters()] == ["z"]
    assert repr(proj) == "SimplexProjection(dim=-1, z=Parameter(2.0))"
    x = _x(3, 5, seed=43)
    proj(x).sum().backward()
    # Σy = z per row, so d/dz Σ_rows Σy = 3.
    torch.testing.assert_close(proj.z.grad, torch.tensor(3.0, dtype=F64))
    torch.testing.assert_close(SimplexProjection(z=0.5)(x), project_simplex(x, z=0.5))


def test_projection_radius_on_another_device_is_refused(on_other_device):
    # The policy of linear_fit, tv_denoise, sinkhorn, robust_pool: refused with an
    # InputError naming the option and both devices, not moved (radius and z were moved
    # to x's device silently, a hidden copy at every call).
    from convexddn.errors import InputError

    x = _x(3, 4)
    other = on_other_device(torch.tensor(0.7, dtype=F64))
    with pytest.raises(InputError, match=r"radius must be on x's device cpu, got cuda:0"):
        project_lp(x, 2, "ball", other)
    with pytest.raises(InputError, match=r"radius must be on x's device cpu, got cuda:0"):
        LpProjection(1, "sphere", radius=nn.Parameter(other))(x)
    with pytest.raises(InputError, match=r"z must be on x's device cpu, got cuda:0"):
        project_simplex(x, z=other)
    with pytest.raises(InputError, match=r"z must be on x's device cpu, got cuda:0"):
        SimplexProjection(z=nn.Parameter(other))(x)


def test_project_simplex_radius_invalid():
    x = _x(2, 3)
    with pytest.raises(OptionError, match=r"z must be finite and > 0"):
        project_simplex(x, z=0.0)
    with pytest.raises(OptionError, match=r"z must be finite and > 0"):
        project_simplex(x, z=torch.tensor([1.0, -1.0]))
    with pytest.raises(ShapeError, match=r"z must broadcast"):
        project_simplex(x, z=torch.ones(3))
    with pytest.raises(DTypeError, match="z must have a floating-point dtype"):
        project_simplex(x, z=torch.tensor([1, 2]))
    with pytest.raises(OptionError, match="z must be"):
        SimplexProjection(z=-1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_projection_numerical_range_cuda():
    dev = torch.device("cuda")
    x = torch.tensor([[1e30, -1e30, 3e29]], device=dev)
    assert project_lp(x, 1, "sphere", 1.0).cpu().tolist() == [[0.5, -0.5, 0.0]]
    xs = torch.tensor([[3.0, 4.0, 1.0]], dtype=F64, device=dev, requires_grad=True)
    g = torch.tensor([[1.0, 2.0, -1.0]], dtype=F64, device=dev)
    (grad,) = torch.autograd.grad(project_lp(xs, 2, "sphere", 1e-300), xs, g)
    torch.testing.assert_close(grad.cpu(), _l2_vjp_closed_form(xs.detach().cpu(), 1e-300, g.cpu()),
                               rtol=1e-14, atol=0)
    z = torch.tensor([1.0, 2.0], dtype=F64, device=dev, requires_grad=True)
    xb = torch.tensor([[1.0, 0.5, -1.0], [1.0, 0.5, -1.0]], dtype=F64, device=dev)
    y = project_simplex(xb, z=z)
    torch.testing.assert_close(y[1].cpu(), torch.tensor([1.25, 0.75, 0.0], dtype=F64))
    (gz,) = torch.autograd.grad(y.sum(), z)
    torch.testing.assert_close(gz.cpu(), torch.ones(2, dtype=F64))


def test_projections_long_16bit_rows_count_positions_in_float32():
    # Positions counted in float16 are inexact beyond 2048 and inf beyond 65504: a row
    # of 70000 raised an index error. Expected: the one zero entry stays, the others
    # (all -1) share what is left of the radius 1 equally, as |y|'s sum says.
    x = torch.full((1, 70000), -1.0, dtype=torch.float16)
    x[0, 0] = 0.0
    y = project_lp(x, 1, "ball", 1.0)
    assert y.dtype == torch.float16 and bool(torch.isfinite(y).all())
    assert abs(float(y.float().abs().sum()) - 1.0) < 5e-3 and float(y[0, 0]) == 0.0
    s = project_simplex(torch.zeros(2, 70000, dtype=torch.bfloat16))
    torch.testing.assert_close(s.float().sum(-1), torch.ones(2), rtol=0, atol=1e-2)


def test_simplex_forward_mode_stays_on_the_simplex_at_ties():
    # Forward mode through the sort's ties gave [0, -1.3, 0.2, 0] at [1, 0, 0, -0.5]
    # (dominated entries at the threshold): a tangent leaving the simplex. The Function's
    # jvp is Dy·v with Dy = diag(m) − m mᵀ/|S| (symmetric: the reverse product, J v).
    from convexddn.nodes.projection import project_simplex
    x = torch.tensor([[1.0, 0.0, 0.0, -0.5], [0.3, 0.2, -0.1, 0.25]], dtype=torch.float64)
    v = torch.tensor([[0.1, -1.3, 0.2, 0.4], [1.0, -0.5, 0.3, 0.2]], dtype=torch.float64)
    _, t = torch.func.jvp(project_simplex, (x,), (v,))
    xr = x.clone().requires_grad_()
    rev = torch.autograd.grad(project_simplex(xr), xr, v)[0]
    torch.testing.assert_close(t, rev, atol=1e-15, rtol=0)
    torch.testing.assert_close(t[0], torch.zeros(4, dtype=torch.float64), atol=0, rtol=0)
    h = 1e-7  # away from ties: the central difference
    torch.testing.assert_close(t[1], ((project_simplex(x + h * v) - project_simplex(x - h * v)) / (2 * h))[1],
                               atol=1e-7, rtol=0)


def test_l1_ball_keeps_tiny_rows_inside_a_huge_radius():
    """float32, r = 3e38: n·r overflows, so rows are solved on (2^-k x, 2^-k r); inside
    rows of tiny entries lost bits there (1.1258e-40 came back as 1.1264e-40, entries of
    1e-40 and below vanished). Reference: a row inside the ball is its own projection."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 1e-38
    x[0, :4] = torch.tensor([1.1258e-40, -3e-45, 0.0, 2e-39])
    y = project_lp(x, 1, "ball", 3e38)
    assert torch.equal(y, x)


_BEYOND = [(torch.float16, 1e5, torch.float32), (torch.bfloat16, 1e39, F64), (torch.float32, 1e39, F64)]
_FITTING = [("simplex", None), (1, "ball"), (1, "sphere"), (2, "ball"), (math.inf, "ball")]


def _project_any(x, p, mode, r):
    return project_simplex(x, -1, r) if p == "simplex" else project_lp(x, p, mode, r)


def _check_beyond_range_invariants(x, y, p, mode, r):
    """Checks that do not run the code: the simplex is y ≥ 0 with Σy = z, the L1 sphere
    ‖y‖₁ = r with sign(y) = sign(x), the balls hold ‖y‖ ≤ r; to the rounding of x's
    dtype (half an ulp per entry). Here r/n ≫ max|x| (x inside every ball), so every
    coordinate is in the support and the closed forms hold: simplex y = x + (z − Σx)/n,
    L1 sphere y = x + sign(x)(r − ‖x‖₁)/n (Gould et al.; the nearest facet)."""
    eps, n = torch.finfo(x.dtype).eps, x.shape[-1]
    xd, yd = x.double(), y.double()
    if p == "simplex":
        assert bool((y >= 0).all())
        torch.testing.assert_close(yd, xd + (r - xd.sum(-1, keepdim=True)) / n, rtol=eps, atol=0)
        assert bool(((yd.sum(-1) - r).abs() <= eps * r).all())
    elif mode == "sphere":  # p = 1
        torch.testing.assert_close(yd, xd + xd.sign() * (r - xd.abs().sum(-1, keepdim=True)) / n,
                                   rtol=eps, atol=0)
        assert torch.equal(y.sign(), x.sign())
        assert bool(((yd.abs().sum(-1) - r).abs() <= eps * r).all())
    else:
        assert bool((torch.linalg.vector_norm(yd, ord=p, dim=-1) <= r).all())
        assert torch.equal(y, x)  # inside the ball: x itself


@pytest.mark.parametrize("dtype,r,wide", _BEYOND)
@pytest.mark.parametrize("p,mode", _FITTING)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_projection_radius_beyond_the_dtype_range(dtype, r, wide, p, mode, as_tensor):
    """A radius beyond the largest float of x's dtype, with a result that fits it:
    float16 x with z = 1e5 raised torch's "value cannot be converted to type c10::Half
    without overflow" (scalar clamps), a tensor radius cast to float16 became Inf and
    reached the "threshold overflows after rescaling" guard (RuntimeError), and the L2
    ball with it came back 1 ulp off x. Reference: the same call in the wider dtype,
    rounded once; the balls keep x itself."""
    x = _x(3, 9, seed=2, dtype=dtype)
    radius = torch.full((3,), r, dtype=wide) if as_tensor else r
    y = _project_any(x, p, mode, radius)
    want = _project_any(x.to(wide), p, mode, radius).to(dtype)
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    assert torch.equal(y, want)
    _check_beyond_range_invariants(x, y, p, mode, r)


@pytest.mark.parametrize("p", [1, 2, math.inf, "simplex"])
def test_projection_radius_beyond_the_dtype_range_grad(p):
    """Gradients through the wider solve: those of the float32 call on the same values
    (float16 x, radius 1e5 as a float32 tensor that requires grad; the L2 and L∞
    spheres of that radius do not fit float16)."""
    mode = {1: "sphere", "simplex": None}.get(p, "ball")
    x16 = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.0, 3.0, -2.0, 0.0]], dtype=torch.float16)
    g = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.25, 1.0, -1.0, 2.0]])
    out = []
    for x in (x16, x16.float()):
        xg = x.clone().requires_grad_()
        r = torch.tensor([1e5, 2e5], requires_grad=True)
        out.append(torch.autograd.grad((_project_any(xg, p, mode, r).float() * g).sum(), [xg, r]))
    torch.testing.assert_close(out[0][0], out[1][0].half(), rtol=0, atol=0)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=0, atol=0)
    # The float32 gradients against the float64 ones at the same values, and those
    # against finite differences (the 0 moved to 0.125: the L1 sphere's sign has a kink
    # there, the tie rule).
    x64 = x16.double().requires_grad_()
    r64 = torch.tensor([1e5, 2e5], dtype=F64, requires_grad=True)
    xs = torch.where(x64 == 0, 0.125, x64).detach().requires_grad_()
    assert gradcheck(lambda a, b: _project_any(a, p, mode, b), (xs, r64))
    want = torch.autograd.grad((_project_any(x64, p, mode, r64) * g.double()).sum(), [x64, r64])
    for got, ref in zip(out[1], want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_projection_that_does_not_fit_the_dtype_is_a_solver_error(as_tensor):
    """A result beyond the largest float of x's dtype (float16 max 65504): by hand, the
    simplex of one entry is z, the L∞ sphere pushes the largest entry to ±r, the L2
    sphere of [3, 4] is r·[0.6, 0.8]. A SolverError (not torch's RuntimeError, not Inf)
    names the dtype."""
    from convexddn.errors import SolverError

    r = torch.tensor(1e5) if as_tensor else 1e5
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float16)
    for call in (lambda: project_simplex(x[:, :1], z=r), lambda: project_lp(x, math.inf, "sphere", r),
                 lambda: project_lp(x, 2, "sphere", r)):
        with pytest.raises(SolverError, match=r"does not fit torch.float16 for 1 of 1 vector"):
            call()
    y = project_lp(x, 2, "sphere", r / 2)  # 3e4, 4e4: fits
    # r·[0.6, 0.8] rounded once; a tensor radius is x's dtype's (5e4 -> 49984: [29984, 40000])
    rh = float(torch.tensor(5e4).half()) if as_tensor else 5e4
    assert torch.equal(y, (rh * torch.tensor([[0.6, 0.8]], dtype=F64)).half())


@pytest.mark.parametrize("dtype,r", [(torch.float32, 3e38), (F64, 1e308), (torch.float16, 6e4)])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_project_l2_ball_keeps_x_where_r_over_norm_overflows(dtype, r, as_tensor):
    """r/‖x‖ overflows (entries ~1e-3, r near the largest float): the rescaled path
    returned (x/a)·a, 1 ulp off x in ~40% of the rows although x is inside the ball.
    Closed form: x itself, gradient the identity for x and 0 for r."""
    x = _x(200, 7, scale=1e-3, seed=9, dtype=dtype).requires_grad_()
    radius = torch.full((200,), r, dtype=dtype, requires_grad=True) if as_tensor else r
    y = project_lp(x, 2, "ball", radius)
    assert torch.equal(y.detach(), x.detach())
    g = _x(200, 7, seed=10, dtype=dtype)
    grads = torch.autograd.grad(y, [x, radius] if as_tensor else [x], g)
    assert torch.equal(grads[0], g)
    if as_tensor:
        assert torch.equal(grads[1], torch.zeros_like(radius))


# --------------------------------------------------------------------------- gradient range

F32_BIG = 3e38  # near float32's largest, 3.4e38


def _one_hot_rows(n_rows: int = 3, n: int = 5) -> torch.Tensor:
    x = torch.zeros(n_rows, n)
    x[:, 0] = 1.0
    return x


def test_project_l2_sphere_grad_overflow_float32_warns():
    """r = 3e38, ‖x‖ = 1: Dy = 3e38·(I − ûûᵀ), so an incoming 2 gives 6e38 > float32's
    range. r/‖x‖ itself is finite (the existing overflow warning does not apply)."""
    x = _one_hot_rows().requires_grad_(True)
    y = project_lp(x, 2, "sphere", F32_BIG)
    with pytest.warns(GradientWarning, match=r"3 of 3 batch element.*exceeds the range of torch.float32.*float64"):
        (grad,) = torch.autograd.grad(y, x, torch.full_like(y, 2.0))
    assert not torch.isfinite(grad).all()


@pytest.mark.parametrize("dim", [-1, 0])
def test_project_l2_sphere_grad_overflow_names_rows(dim):
    """Row 1 has ‖x‖ = 100 (gradient 6e36, finite); rows 0 and 2 overflow."""
    x = _one_hot_rows()
    x[1, 1] = 100.0
    x = (x if dim == -1 else x.T.contiguous()).requires_grad_(True)
    y = project_lp(x, 2, "sphere", F32_BIG, dim=dim)
    with pytest.warns(GradientWarning, match=r"x at 2 of 3 batch element\(s\) \(indices \[\(0,\), \(2,\)\]\)"):
        torch.autograd.grad(y, x, torch.full_like(y, 2.0))


BRANCHES = [(p, mode) for p in (1, 2, "inf") for mode in MODES] + [("simplex", None)]


def _project(p, mode, x, r):
    return project_simplex(x, z=r) if p == "simplex" else project_lp(x, p, mode, r)


@pytest.mark.parametrize("p,mode", BRANCHES)
@pytest.mark.parametrize("incoming", [1.0, F32_BIG])
def test_projection_backward_reads_nothing(p, mode, incoming, host_reads):
    """No backward reads a value back to the host (no sync on CUDA): the entries of Dy
    are at most 1 (the L1, L∞ and L2 balls and spheres from inside, the simplex), and
    the L2 sphere's gain r/‖x‖ (here < 1) is checked in the forward. An incoming 3e38
    overflows the sums sᵀv to Inf for rows outside the ball: torch's ordinary overflow,
    no warning. A gradient check there read the host once per backward, and warned."""
    x = (torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) + 0.5).requires_grad_(True)
    r = torch.tensor([0.5, 1.0, 20.0], requires_grad=True)  # outside, outside, inside
    y = _project(p, mode, x, r)
    v = incoming * torch.randn(3, 5, generator=torch.Generator().manual_seed(1)).sign()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with host_reads.counting():
            grads = torch.autograd.grad(y, [x, r], v)
    assert host_reads.count == 0
    if incoming == 1.0:
        assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_project_l2_sphere_steep_gain_checks_in_backward_only(host_reads):
    """The sphere's check runs where r/‖x‖ exceeds gain_limit (float32: max/2^20): its
    backward reads the host once when flagged (3e38·1e-3 fits: silent; with an incoming
    2 it warns, tests above), none otherwise. An ordinary forward reads once (the flag is
    part of its input check); a steep one takes the rescaled path, which reads the flags
    with its own checks."""
    counts = []
    for r, want in ((1.0, 0), (F32_BIG, 1)):
        x = _one_hot_rows().requires_grad_(True)
        with host_reads.counting():
            y = project_lp(x, 2, "sphere", r)
        assert host_reads.count == (3 if want else 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with host_reads.counting():
                (grad,) = torch.autograd.grad(y, x, torch.full_like(y, 1e-3))
        assert bool(torch.isfinite(grad).all())
        counts.append(host_reads.count)
    assert counts == [0, 1]


def test_project_l2_sphere_half_gradient_sums_in_float32(host_reads):
    """float16, gain ≈ 1000 > √65504 (flagged): the gradient 1000·v is finite in every
    entry, but its sum (127 entries) overflows float16. Summed in float32 the check is one
    read and silent; in float16 the sum was Inf and sent it down the exact path."""
    x = torch.zeros(1, 128, dtype=torch.float16)
    x[0, 0] = 1e-3
    x.requires_grad_(True)
    y = project_lp(x, 2, "sphere", 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with host_reads.counting():
            (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert host_reads.count == 1
    assert bool(torch.isfinite(grad).all()) and float(grad[0, 1:].float().sum()) > 65504


def test_projection_wide_radius_costs_no_host_read(host_reads):
    """A tensor radius of a wider dtype than x (float64 with float32 x; float32 with
    float16 x under AMP) is read once, in its positivity check, which also reads its
    maximum: the same count as a radius of x's dtype (an amax read was added)."""
    x = _x(4, 6, seed=3, dtype=torch.float32)
    calls = [lambda r: project_lp(x, 2, "ball", r), lambda r: project_lp(x, 1, "sphere", r),
             lambda r: project_lp(x, math.inf, "ball", r), lambda r: project_simplex(x, z=r)]
    for call in calls:
        counts = []
        for dtype in (torch.float32, F64):
            with host_reads.counting():
                call(torch.full((4,), 2.0, dtype=dtype))
            counts.append(host_reads.count)
        assert counts[0] == counts[1], counts


def test_projection_radius_device_is_checked_before_its_values(host_reads, on_other_device):
    """A radius on another device is refused before any of its values is read (the
    positivity check and the range check read it first: a sync on the other device)."""
    from convexddn.errors import InputError

    x = _x(3, 4, dtype=torch.float32)
    other = on_other_device(torch.tensor(0.7, dtype=F64))
    for call in (lambda: project_lp(x, 2, "ball", other), lambda: project_simplex(x, z=other)):
        with host_reads.counting(), pytest.raises(InputError, match="must be on x's device"):
            call()
        assert host_reads.count == 0


@pytest.mark.parametrize("p", [1, 2])
def test_project_lp_ball_inside_grad_near_float_max(p):
    """Inside the ball Dy = I, so the gradient is the incoming one, however large: the
    outside-only term sᵀv (overflowing to Inf here) was masked by a product, Inf·0 = NaN."""
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    x = (0.9 * x / _norm(x, p).unsqueeze(-1)).requires_grad_(True)
    v = F32_BIG * x.detach().sign()
    y = project_lp(x, p, "ball", 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (grad,) = torch.autograd.grad(y, x, v)
    assert torch.equal(grad, v)


@pytest.mark.parametrize("p,mode", BRANCHES)
def test_projection_grad_float32_silent(p, mode):
    """Ordinary float32 rows, inside and outside the ball, radius requiring grad: no warning."""
    x = (3 * torch.randn(4, 6, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    r = torch.tensor([0.5, 1.0, 20.0, 50.0], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = _project(p, mode, x, r)
        grads = torch.autograd.grad(y, [x, r], torch.randn_like(y))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1000, 5000])
def test_simplex_and_l1_long_half_rows(dtype, n):
    """Two equal maxima and a long tail: the answer is 1/2 on each maximum (exact in
    every dtype). The prefix sums were taken in the input's dtype, where they stop
    growing after a few hundred entries: bfloat16 returned 1.0 on both (sum 2), float16
    0.991 on both, and the L1 ball the same point (‖y‖₁ = 2 for radius 1)."""
    x = torch.linspace(0.0, 2.0, n, dtype=torch.float64)
    x[:2] = 3.0
    want = torch.zeros(n, dtype=torch.float64)
    want[:2] = 0.5
    for y in (project_simplex(x.to(dtype), z=1.0), project_lp(x.to(dtype), 1, "ball", 1.0)):
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), want, rtol=0, atol=0)


# --------------------------------------------------------------------------- forward mode

def _fwd_tangent(p, mode, x, r, vx, vr, requires_grad=False):
    """ẏ by torch.autograd.forward_ad (a ``None`` tangent: that input is not dual)."""
    if requires_grad:  # as inside a model that also records the reverse mode
        x, r = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
    with fwAD.dual_level():
        xd = x if vx is None else fwAD.make_dual(x, vx)
        rd = r if vr is None else fwAD.make_dual(r, vr)
        return fwAD.unpack_dual(project_lp(xd, p, mode, rd)).tangent.detach()


def _reverse_jvp(p, mode, x, r, vx, vr):
    """J·v from the reverse mode (the backward's vjps on the basis vectors of y)."""
    jx, jr = jacobian(lambda a, b: project_lp(a, p, mode, b), (x, r))
    n = x.numel()
    return (jx.reshape(n, -1) @ vx.reshape(-1) + jr.reshape(n, -1) @ vr.reshape(-1)).reshape(x.shape)


def _generic_batch(seed):
    """Rows inside (scale 0.1) and outside (scale 3) every ball: no ties, no zeros."""
    x = torch.cat([_x(3, 5, scale=0.1, seed=seed), _x(3, 5, scale=3.0, seed=seed + 1)])
    r = torch.tensor([1.0, 0.7, 1.3, 0.9, 1.1, 0.6], dtype=F64)
    return x, r


@pytest.mark.parametrize("p,mode", CASES)
def test_project_lp_forward_mode_matches_finite_differences(p, mode):
    """ẏ from forward_ad equals the central difference at generic points, for tangents
    in x, in the (tensor) radius and in both, with and without x, r requiring grad; and
    gradcheck(check_forward_ad=True) passes. The Functions had no jvp: where the inputs
    also required grad forward mode raised NotImplementedError; where not, p=1 with a
    dual radius raised (an out= op), and p=2, inf ran torch's derivatives of the ops
    (right at these points: gradcheck alone passed there)."""
    x, r = _generic_batch(seed=40)
    vx, vr = _x(6, 5, seed=42), _x(6, seed=43)
    h = 1e-6
    for tx, tr in ((vx, None), (None, vr), (vx, vr)):
        dx = torch.zeros_like(x) if tx is None else tx
        dr = torch.zeros_like(r) if tr is None else tr
        fd = (project_lp(x + h * dx, p, mode, r + h * dr) - project_lp(x - h * dx, p, mode, r - h * dr)) / (2 * h)
        for requires_grad in (False, True):
            t = _fwd_tangent(p, mode, x, r, tx, tr, requires_grad)
            torch.testing.assert_close(t, fd, atol=1e-7, rtol=1e-6)
    x, r = _generic_batch(seed=44)
    assert gradcheck(lambda a, b: project_lp(a, p, mode, b),
                     (x.requires_grad_(True), r.requires_grad_(True)), check_forward_ad=True)


def _kink_rows(p, mode):
    """A non-differentiable row per case and its radius: where the Jacobian is the
    backward's one-sided choice (module docstring), not torch's derivative of the ops."""
    if p == math.inf:  # two coordinates at |x_i| = r: pinned (Dy = 0 there)
        return torch.tensor([[1.0, 0.3, -1.0, 0.2, 0.5]], dtype=F64), torch.tensor([1.0], dtype=F64)
    if p == 2 and mode == "sphere":  # x = 0: no derivative, zero in x and a warning
        return torch.zeros(1, 5, dtype=F64), torch.tensor([1.5], dtype=F64)
    if p == 2:  # on the boundary ‖x‖ = r exactly: the inside derivative (identity)
        return torch.tensor([[3.0, 4.0, 0.0, 0.0, 0.0]], dtype=F64), torch.tensor([5.0], dtype=F64)
    # p = 1: a coordinate 0 on the sphere from inside (tie rule: its sign is +); the
    # ball: inside (Dy = I)
    return torch.tensor([[0.1, 0.0, -0.2, 0.3, 0.05]], dtype=F64), torch.tensor([2.0], dtype=F64)


def _gradient_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, GradientWarning)]


@pytest.mark.parametrize("p,mode", CASES)
def test_project_lp_func_jvp_matches_forward_ad_and_reverse_mode(p, mode):
    """torch.func.jvp runs the same jvp as forward_ad, and both apply the backward's
    Jacobian (reverse-mode vjps on the basis vectors), also at the kinks of
    :func:`_kink_rows` (the reverse mode's one-sided choice, with its warning for the
    sphere at x = 0); so does torch.func.jacfwd (the jvp vmapped over tangents). Without
    the Function: p=1 with a tangent in the radius raised, p=inf passed ẋ at |x_i| = r,
    the L2 ball took the outside derivative on its boundary, the sphere at x = 0 was silent."""
    x, r = _generic_batch(seed=45)
    xk, rk = _kink_rows(p, mode)
    x, r = torch.cat([x, xk]), torch.cat([r, rk])
    vx, vr = _x(*x.shape, seed=46), _x(r.numel(), seed=47)
    f = lambda a, b: project_lp(a, p, mode, b)
    t, w_func = _gradient_warnings(lambda: torch.func.jvp(f, (x, r), (vx, vr))[1])
    t_fwd, w_fwd = _gradient_warnings(lambda: _fwd_tangent(p, mode, x, r, vx, vr))
    rev, w_rev = _gradient_warnings(lambda: _reverse_jvp(p, mode, x, r, vx, vr))
    jac_fwd, w_jacfwd = _gradient_warnings(lambda: torch.func.jacfwd(f, argnums=(0, 1))(x, r))
    torch.testing.assert_close(t, t_fwd, atol=0, rtol=0)
    torch.testing.assert_close(t, rev, atol=1e-14, rtol=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientWarning)  # (counted above)
        torch.testing.assert_close(jac_fwd, jacobian(f, (x, r)), atol=1e-15, rtol=0)
    at_zero = p == 2 and mode == "sphere"
    for caught in (w_func, w_fwd, w_jacfwd):  # one call, one warning
        assert len(caught) == (1 if at_zero else 0), caught
    assert bool(w_rev) == at_zero  # (one per backward: one per entry of y)
    assert all("1 row(s) are x = 0" in m for m in w_func + w_fwd + w_rev + w_jacfwd)
    if at_zero:  # the radius still moves the point r·e₀: ẏ = e₀ ṙ there
        torch.testing.assert_close(t[-1], vr[-1] * torch.eye(5, dtype=F64)[0], atol=0, rtol=0)


def test_project_l1_forward_mode_tensor_radius():
    """Review case (a): p=1 with a tensor radius raised NotImplementedError in forward
    mode (torch.maximum(..., out=t) has no forward formula). x = [2, 0.3, 1.1, −0.5],
    r = 1: θ = 1.05, y = [0.95, 0, 0.05, 0], support S = {0, 2}, s = [1, 0, 1, 0], so
    ẏ = m∘ẋ − s(sᵀẋ − ṙ)/2: [0.25, 0, −0.25, 0] for ṙ = 0 and + s·ṙ/2 for ṙ = 0.4."""
    x = torch.tensor([[2.0, 0.3, 1.1, -0.5]], dtype=F64)
    vx = torch.tensor([[1.0, -2.0, 0.5, 0.3]], dtype=F64)
    r = torch.tensor(1.0, dtype=F64)
    want = torch.tensor([[0.25, 0.0, -0.25, 0.0]], dtype=F64)
    for mode in MODES:  # outside the ball the sphere is the ball
        torch.testing.assert_close(_fwd_tangent(1, mode, x, r, vx, None), want, atol=1e-15, rtol=0)
        vr = torch.tensor(0.4, dtype=F64)
        t = _fwd_tangent(1, mode, x, r, vx, vr)
        torch.testing.assert_close(t, want + torch.tensor([[0.2, 0.0, 0.2, 0.0]], dtype=F64), atol=1e-15, rtol=0)
        torch.testing.assert_close(t, _reverse_jvp(1, mode, x, r, vx, vr), atol=1e-15, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_project_linf_forward_mode_at_the_clamp_bound(mode):
    """Review case (b): at |x_i| = r the backward's Dy is 0 (docstring: the coordinate
    is pinned, where torch.clamp passes 1); forward mode gave the clamp's 1. Now it is
    the reverse mode's value: J from vjps on the basis vectors, J·ẋ = [0, 1, 0], and
    ẏ = sign(y)·ṙ on the pinned coordinates for a tangent in the radius."""
    x = torch.tensor([1.0, 0.3, -1.0], dtype=F64)
    vx = torch.ones(3, dtype=F64)
    r = torch.tensor(1.0, dtype=F64)
    xr = x.clone().requires_grad_(True)
    y = project_lp(xr, math.inf, mode, 1.0)
    jac = torch.stack([torch.autograd.grad(y[i], xr, retain_graph=True)[0] for i in range(3)])
    t = _fwd_tangent(math.inf, mode, x, r, vx, None)
    torch.testing.assert_close(t, jac @ vx, atol=0, rtol=0)
    torch.testing.assert_close(t, torch.tensor([0.0, 1.0, 0.0], dtype=F64), atol=0, rtol=0)
    t_r = _fwd_tangent(math.inf, mode, x, r, None, torch.tensor(0.5, dtype=F64))
    torch.testing.assert_close(t_r, torch.tensor([0.5, 0.0, -0.5], dtype=F64), atol=0, rtol=0)


def test_project_l2_sphere_zero_forward_mode_warns():
    """Review case (c): at x = 0 the sphere has no derivative; reverse mode warns
    (GradientWarning) and sets the gradient in x to zero, forward mode gave the zero
    tangent silently. Now it warns the same (the rows counted), in forward_ad and
    torch.func.jvp, and only where the tangent in x is asked for (as the backward does
    where x requires grad); other rows keep (r/‖x‖)(ẋ − ûûᵀẋ)."""
    x = torch.tensor([[0.0, 0, 0], [3.0, 4.0, 0], [0.0, 0, 0]], dtype=F64)
    r = torch.tensor(1.5, dtype=F64)
    vx = torch.tensor([[0.3, -0.7, 0.2], [1.0, 1.0, 1.0], [0.5, 0.1, -0.2]], dtype=F64)
    u = torch.tensor([0.6, 0.8, 0.0], dtype=F64)
    with pytest.warns(GradientWarning, match=r"2 row\(s\) are x = 0"):
        t = _fwd_tangent(2, "sphere", x, r, vx, None)
    assert torch.equal(t[[0, 2]], torch.zeros(2, 3, dtype=F64))
    torch.testing.assert_close(t[1], 0.3 * (torch.ones(3, dtype=F64) - u * u.sum()))
    with pytest.warns(GradientWarning, match=r"2 row\(s\) are x = 0"):
        _, t_func = torch.func.jvp(lambda a: project_lp(a, 2, "sphere", r), (x,), (vx,))
    torch.testing.assert_close(t_func, t, atol=0, rtol=0)
    with warnings.catch_warnings():  # a tangent in the radius only: defined, silent
        warnings.simplefilter("error")
        t_r = _fwd_tangent(2, "sphere", x, r, None, torch.tensor(2.0, dtype=F64))
    e0 = torch.eye(3, dtype=F64)[0]  # y = r·e₀ at x = 0, r·û elsewhere: ẏ = ṙ·e₀, ṙ·û
    torch.testing.assert_close(t_r, 2.0 * torch.stack([e0, u, e0]))


@pytest.mark.parametrize("dim", [-1, 1])
def test_project_l2_overflow_warnings_name_the_batch_index(dim):
    """They named (1, 2) of a (2, 3) batch as "flat indices [5]"; now (1, 2), whichever dim is
    projected. The sphere above (r = 3e38, incoming 2) overflows where ‖x‖ = 1, at (1, 2)
    only: ‖x‖ = 100 elsewhere."""
    x = torch.zeros(2, 3, 5)
    x[..., 0] = 100.0
    x[1, 2, 0] = 1.0
    x = x.movedim(-1, dim).contiguous()
    named = r"at 1 of 6 batch element\(s\) \(indices \[\(1, 2\)\]\)"
    xg = x.clone().requires_grad_(True)
    y = project_lp(xg, 2, "sphere", F32_BIG, dim=dim)
    with pytest.warns(GradientWarning, match="x " + named):
        torch.autograd.grad(y, xg, torch.full_like(y, 2.0))
    with pytest.warns(GradientWarning, match="forward mode.*" + named):
        torch.func.jvp(lambda t: project_lp(t, 2, "sphere", F32_BIG, dim=dim), (x,), (torch.full_like(x, 2.0),))


def test_project_l2_sphere_steep_gain_forward_mode_warns():
    """The backward's overflow check in forward mode too: r = 3e38, ‖x‖ = 1 gives the
    tangent 3e38·(ẋ − ûûᵀẋ), beyond float32 for ẋ = 2 (rows 0, 2; row 1 has ‖x‖ = 100),
    named as the backward names them; ẋ = 1e-3 fits, silently. Forward mode gave Inf
    without a word."""
    x = _one_hot_rows()
    x[1, 0] = 100.0
    r = torch.tensor(F32_BIG)
    with pytest.warns(GradientWarning, match=r"forward mode.*2 of 3 batch element\(s\) \(indices \[\(0,\), \(2,\)\]\)"):
        t = _fwd_tangent(2, "sphere", x, r, torch.full_like(x, 2.0), None)
    assert torch.isfinite(t).all(-1).tolist() == [False, True, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bool(torch.isfinite(_fwd_tangent(2, "sphere", x, r, torch.full_like(x, 1e-3), None)).all())


@pytest.mark.parametrize("dtype, big, r", [(torch.float32, 1e11, 1e-33), (torch.float64, 1e100, 1e-220)])
@pytest.mark.parametrize("mode", ["ball", "sphere"])
def test_l2_projection_with_a_subnormal_scale_is_exact(dtype, big, r, mode):
    # r/‖x‖ below the smallest normal number has lost bits: x·(r/‖x‖) came back 30 % off
    # in float32 (y/r = [0.42, 0.56] for [0.6, 0.8]), silently, and right only when
    # another row sent the batch down the rescaled path.
    x = torch.tensor([[3 * big, 4 * big]], dtype=dtype)
    y = project_lp(x, 2, mode, r)
    torch.testing.assert_close(y / r, torch.tensor([[0.6, 0.8]], dtype=dtype), rtol=4 * torch.finfo(dtype).eps, atol=0)
    both = project_lp(torch.cat([x, torch.zeros_like(x)]), 2, mode, r) if mode == "ball" else y
    assert torch.equal(both[:1], y)


@pytest.mark.parametrize("kind", ["simplex", "l1 ball", "l1 sphere"])
def test_float16_simplex_and_l1_derivatives_sum_in_float32(kind):
    # |S| and sᵀv were summed in float16: n = 1000 entries of 1 with an incoming gradient
    # of 100 gave −inf (sᵀv = 1e5 > 65504); the true gradient is v − mean v = 0 and the
    # radius's mean v = 100. Forward mode alike.
    x = torch.ones(1, 1000, dtype=torch.float16, requires_grad=True)
    r = torch.tensor([500.0], dtype=torch.float16, requires_grad=True)
    fn = {"simplex": lambda x_, r_: project_simplex(x_, z=r_),
          "l1 ball": lambda x_, r_: project_lp(x_, 1, "ball", r_),
          "l1 sphere": lambda x_, r_: project_lp(x_, 1, "sphere", r_)}[kind]
    gx, gr = torch.autograd.grad(fn(x, r), (x, r), torch.full((1, 1000), 100.0, dtype=torch.float16))
    assert torch.equal(gx, torch.zeros_like(gx)) and gr.item() == 100.0
    v = torch.full((1, 1000), 100.0, dtype=torch.float16)
    _, t = torch.func.jvp(lambda x_: fn(x_, r.detach()), (x.detach(),), (v,))
    assert torch.equal(t, torch.zeros_like(t))


def test_l2_ball_point_on_the_boundary_with_a_float_radius():
    # radius = ‖x‖ exactly (a float): torch's float / tensor is r·(1/‖x‖), 1 ulp below 1
    # for 137 of 1000 such rows, and the point came back x(1 − ulp) with the outside
    # Jacobian (0.44 off the identity the docs promise); a tensor radius was exact.
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x = torch.randn(5, dtype=torch.float64, generator=g)
        r = float(torch.linalg.vector_norm(x))
        J = torch.autograd.functional.jacobian(lambda v: project_lp(v, 2, "ball", r), x)
        assert torch.equal(project_lp(x, 2, "ball", r), x)
        assert torch.equal(J, torch.eye(5, dtype=torch.float64))


@pytest.mark.parametrize("dtype, scale, r", [(torch.float16, 1e-3, 1e-6), (torch.float32, 1e-3, 1e-41),
                                             (torch.bfloat16, 1e-3, 1e-39)])
@pytest.mark.parametrize("mode", ["ball", "sphere"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_l2_derivatives_with_a_subnormal_output_take_the_direction_from_x(dtype, scale, r, mode, as_tensor):
    # y = r·x/‖x‖ below the dtype's normal range keeps a few bits; the backward took û
    # from it (and r/‖x‖ from r rounded there): gradients 4.9 % off in float16 (r = 1e-6),
    # 3.6 % in bfloat16 (1e-39), 4.7e-5 in float32 (1e-41), silently. Closed form in
    # float64 on the same x: (r/‖x‖)(I − ûûᵀ)v, and dy/dr = û (x outside the ball).
    x = _x(4, 6, scale=scale, seed=3).to(dtype)
    v = (1 + torch.rand(4, 6, generator=torch.Generator().manual_seed(4), dtype=F64)).to(dtype)
    radius = torch.tensor(r, dtype=dtype) if as_tensor else r
    r64 = float(radius) if as_tensor else r  # (a tensor radius: the dtype's own value)
    want = _l2_vjp_closed_form(x.double(), r64, v.double())
    xl = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(project_lp(xl, 2, mode, radius), xl, v)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(grad.double(), want, rtol=2 * eps, atol=2 * eps * float(want.abs().max()))
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(project_lp(fwAD.make_dual(x, v), 2, mode, radius)).tangent
    torch.testing.assert_close(tangent.double(), want, rtol=2 * eps, atol=2 * eps * float(want.abs().max()))
    if as_tensor:
        rl = radius.clone().requires_grad_()
        (grad_r,) = torch.autograd.grad(project_lp(x, 2, mode, rl), rl, v)
        u = x.double() / x.double().norm(dim=-1, keepdim=True)
        torch.testing.assert_close(grad_r.double(), (u * v.double()).sum(), rtol=2 * eps, atol=0)


def test_l2_saves_x_only_for_a_radius_below_the_normal_range():
    # x is saved (for û) only where the forward found some r below tiny/eps: a learned radius
    # of ordinary size keeps the memory and in-place semantics of before (x changed in place
    # after the call, as a plain y = r·x/‖x‖ node allows).
    # (A float radius below x's normal range is solved in float64 (ranges.wide_dtype), where it is
    # ordinary: x is not saved there.)
    for r, saved in ((torch.tensor(0.5, requires_grad=True), False), (torch.tensor(1e-41, requires_grad=True), True),
                     (0.5, False), (1e-41, False)):
        x = _x(3, 4, seed=5).float().requires_grad_() * 1.0
        y = project_lp(x, 2, "sphere", r)
        x.add_(1.0)
        if saved:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.sum().backward()
        else:
            y.sum().backward()


def _exact_simplex_support(v: np.ndarray, z: float) -> np.ndarray:
    """The support of the projection of v onto {u ≥ 0, Σu = z} in exact arithmetic
    (Fractions: the float16 values and z are dyadic), by Duchi et al.'s sort."""
    q = [Fraction(float(t)) for t in v]
    u = sorted(q, reverse=True)
    rho = max(j for j in range(1, len(u) + 1) if u[j - 1] - (sum(u[:j]) - Fraction(z)) / j > 0)
    tau = (sum(u[:rho]) - Fraction(z)) / rho
    return np.array([t > tau for t in q])


# Near-kinks in float16: an entry whose exact y is a subnormal that rounds to 0
# (simplex [1, 6e-8, -1]: y₂ = 2^-25 → 0), or a row whose ‖x‖₁ exceeds r by 2^-24 (L1
# ball, where x − max|x| rounded in float16 gave θ = r − max and the row counted as
# inside): the backward took the other side's derivative (the support read from the
# rounded y). Reference: the exact projection's Jacobian of the same float16 values,
# I − 11ᵀ/|S| on S (simplex), diag(m) − (s∘m)(s∘m)ᵀ/|S| (L1 outside the ball).
NEAR_KINKS = [
    ("simplex", [1.0, 6e-8, -1.0], 1.0),
    ("l1 ball", [1.0, 6e-8, 0.0], 1.0),
    ("l1 ball", [-1.0, -6e-8, 0.0, 0.5, -3e-8], 1.5),
    ("l1 sphere", [-1.0, -6e-8, 0.0, 0.5, -3e-8], 1.5),
    # z beyond float16's largest float: solved wider, where float32 rounded x − max (2^-24 − 32768 → −32768)
    # and took the support {1, 2} (the L1 ball: inside), not {1, 2, 3}
    ("simplex", [32768.0, 32752.0, 6e-8], 65520.0),
    ("l1 ball", [32768.0, 32752.0, 6e-8], 65520.0),
    ("l1 sphere", [32768.0, -32752.0, 6e-8], 65520.0),
]


@pytest.mark.parametrize("kind,values,z", NEAR_KINKS)
def test_float16_near_kink_jacobian_is_the_exact_projections(kind, values, z):
    x = torch.tensor(values, dtype=torch.float16)
    fn = {"simplex": lambda t: project_simplex(t, z=z), "l1 ball": lambda t: project_lp(t, 1, "ball", z),
          "l1 sphere": lambda t: project_lp(t, 1, "sphere", z)}[kind]
    xs = x.double().numpy()
    s = np.ones_like(xs) if kind == "simplex" else np.sign(xs)
    m = _exact_simplex_support(s * xs, z)
    assert np.abs(xs).sum() > z or kind == "simplex"  # outside the ball: no identity rows
    sm = s * m
    ref = np.diag(m.astype(float)) - np.outer(sm, sm) / m.sum()
    xr = x.clone().requires_grad_()
    rows = [torch.autograd.grad(fn(xr)[i], xr)[0] for i in range(x.numel())]
    torch.testing.assert_close(torch.stack(rows).double(), torch.from_numpy(ref), rtol=0, atol=1e-3)
    n = x.numel()  # forward mode (the jvp): the Jacobian's columns
    cols = [torch.func.jvp(fn, (x,), (torch.eye(n, dtype=torch.float16)[j],))[1] for j in range(n)]
    torch.testing.assert_close(torch.stack(cols, -1).double(), torch.from_numpy(ref), rtol=0, atol=1e-3)


@pytest.mark.parametrize("values,r", [([1.0, 2.0**-12], 1.0), ([3.0, 4.0, 2.0**-10], 5.0), ([0.6, 0.8, 2.0**-12], 1.0),
                                      ([60000.0, 30000.0, 0.25], 67082.0393254)])  # r > 65504: solved wider
def test_float16_l2_ball_near_its_boundary_takes_the_exact_side(values, r):
    """‖x‖ exceeds r by less than float16's rounding ([1, 2^-12]: 1 + 2^-25), so the norm
    and r/‖x‖ rounded to r and 1 and the row took the inside derivative I, where the exact
    projection of these float16 values is outside: (r/‖x‖)(I − ûûᵀ), computed here in float64
    (the third case is inside: I)."""
    x = torch.tensor(values, dtype=torch.float16)
    x64 = x.double()
    n, norm = x.numel(), x64.norm()
    u = x64 / norm
    ref = (r / norm) * (torch.eye(n, dtype=F64) - torch.outer(u, u)) if norm > r else torch.eye(n, dtype=F64)
    xr = x.clone().requires_grad_()
    rows = torch.stack([torch.autograd.grad(project_lp(xr, 2, "ball", r)[i], xr)[0] for i in range(n)])
    torch.testing.assert_close(rows.double(), ref, rtol=0, atol=1e-3)
    cols = [torch.func.jvp(lambda t: project_lp(t, 2, "ball", r), (x,), (torch.eye(n, dtype=torch.float16)[j],))[1]
            for j in range(n)]
    torch.testing.assert_close(torch.stack(cols, -1).double(), ref, rtol=0, atol=1e-3)


_SMALL_L2 = [  # (dtype, x, r): ‖x‖ below ranges._small_norm(dtype), within 1e-3 of r
    (torch.float16, [-0.00478363037109375, -0.00859832763671875, 0.004535675048828125], 0.010833740234375),
    (torch.float16, [0.0440673828125, -0.02508544921875, 0.003704071044921875], 0.05084228515625),
    (torch.bfloat16, [1.685380498076794e-23, -1.6233419521353168e-23, 5.686866711302065e-24], 2.409163534060693e-23),
]


@pytest.mark.parametrize("dtype,values,r", _SMALL_L2)
def test_16bit_small_norm_l2_ball_takes_the_exact_side(dtype, values, r):
    """Rows with ‖x‖ below sqrt(tiny/eps) are rescaled by a = max|x|: x/a was rounded to x's
    dtype before the norm, which moved ‖x‖ by up to 2^-11 (float16) and put rows within that
    of r on the other side (the first is outside by ‖x‖² − r² = +1.7e-8 and got Dy = I; the
    others are inside and got the outside Jacobian). The side from exact rationals, the
    Jacobian in float64 closed form: (r/‖x‖)(I − ûûᵀ) outside, I inside."""
    x = torch.tensor(values, dtype=dtype)
    assert float(torch.tensor(r, dtype=dtype)) == r
    outside = sum(Fraction(float(v)) ** 2 for v in x.tolist()) > Fraction(r) ** 2
    x64, n = x.double(), x.numel()
    u = x64 / x64.norm()
    ref = (r / x64.norm()) * (torch.eye(n, dtype=F64) - torch.outer(u, u)) if outside else torch.eye(n, dtype=F64)
    xr = x.clone().requires_grad_()
    rows = torch.stack([torch.autograd.grad(project_lp(xr, 2, "ball", r)[i], xr)[0] for i in range(n)])
    torch.testing.assert_close(rows.double(), ref, rtol=0, atol=1e-2)
    cols = [torch.func.jvp(lambda t: project_lp(t, 2, "ball", r), (x,), (torch.eye(n, dtype=dtype)[j],))[1]
            for j in range(n)]
    torch.testing.assert_close(torch.stack(cols, -1).double(), ref, rtol=0, atol=1e-2)


@pytest.mark.parametrize("dtype,values,r", [
    (torch.float16, [0.0024852752685546875, -0.0004334449768066406, -0.00362396240234375], 0.0161285400390625),
    (torch.bfloat16, [-4.006656092053728e-25, -4.9436966297114545e-25, -1.1890721305449773e-24],
     2.358757215483243e-25),
])
def test_16bit_small_norm_l2_sphere_is_correctly_rounded(dtype, values, r):
    """The sphere's rescaled path (‖x‖ < sqrt(tiny/eps)) formed y from x/a rounded to x's
    dtype, then rounded again: entries came back 1-2 ulps off (float16 y₂ = -0.001584
    for -0.0015831). Reference: r·x/‖x‖ with mpmath at 200 bits, rounded once to x's dtype."""
    mpmath = pytest.importorskip("mpmath")

    x = torch.tensor(values, dtype=dtype)
    with mpmath.workprec(200):
        norm = mpmath.sqrt(sum(mpmath.mpf(v) ** 2 for v in x.tolist()))
        exact = [float(mpmath.mpf(v) * mpmath.mpf(r) / norm) for v in x.tolist()]
    # float64 holds each exact value to 2^-53: one rounding to 8/11 bits from there is the correct one
    # unless it is a tie, which these values are not.
    torch.testing.assert_close(project_lp(x, 2, "sphere", r), torch.tensor(exact, dtype=F64).to(dtype), rtol=0, atol=0)


# (2, 6, 9 | 11) scaled by 3/256 (and by powers of two): ‖x‖ = r exactly, checked in rationals.
_PYTH = ([0.0234375, -0.0703125, -0.10546875], 0.12890625)


@pytest.mark.parametrize("dtype,shift", [(torch.float16, 0), (torch.bfloat16, -70), (torch.float64, -700),
                                         (torch.float32, 4), (torch.float32, -75)])
def test_l2_ball_exact_boundary_takes_the_inside_derivative(dtype, shift):
    """A row exactly on the L2 ball's boundary gets y = x, J = I and ∂y/∂r = 0 (the documented
    inside derivative): the rescaled path divided by max|x| (rounded), and float32's norm is a few
    ulp off; float16 [0.0234375, -0.0703125, -0.10546875] at r = 0.12890625 got max|J − I| = 0.67."""
    x0 = [v * 2.0 ** shift for v in _PYTH[0]]
    r0 = _PYTH[1] * 2.0 ** shift
    if dtype == torch.float32 and shift == 4:  # the tester's float32 row (m = 2, 4, 4 | 6 times c)
        x0, r0 = [1.8951797485351562, 3.7903594970703125, 3.7903594970703125], 5.685539245605469
    assert sum(Fraction(v) ** 2 for v in x0) == Fraction(r0) ** 2  # the reference: exact rationals
    x = torch.tensor(x0, dtype=dtype)
    assert x.double().tolist() == x0
    J = jacobian(lambda v: project_lp(v, 2, "ball", r0), x)
    assert torch.equal(project_lp(x, 2, "ball", r0), x)
    assert torch.equal(J, torch.eye(3, dtype=dtype))
    r = torch.tensor(r0, dtype=dtype, requires_grad=True)
    (g,) = torch.autograd.grad(project_lp(x, 2, "ball", r).sum(), r)
    assert g.item() == 0.0


def test_l2_ball_float32_rows_just_outside_take_the_outside_derivative():
    """Float32 rows within a few ulp of the sphere: the side decided in float64 reaches the
    backward. The saved scale ratio/a (1 − 7.4e-9 for the row below) rounded to 1.0 in float32,
    and the backward, which reads the side from scale < 1, gave the inside J = I to rows outside
    (tester: 38 of 960). Reference: the side from exact rationals, the outside VJP
    (r/‖x‖)(v − û ûᵀv) in float64."""
    g = torch.Generator().manual_seed(5)
    rows = [[-1.7613080739974976, 1.2661904096603394, 0.18554872274398804]]
    r = 2.177124834060669
    base = torch.randn(300, 3, dtype=F64, generator=g)
    base = base / base.norm(dim=-1, keepdim=True) * r  # on the sphere, then a few float32 ulps either way
    x = torch.cat([torch.tensor(rows, dtype=F64), base]).float()
    x = x * (1 + torch.randint(-5, 6, (x.shape[0], 1), generator=g).float() * 2.0 ** -24)
    v = torch.randn(x.shape, dtype=torch.float32, generator=g)
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(project_lp(xg, 2, "ball", r), xg, v)
    outside = [sum(Fraction(float(t)) ** 2 for t in row) > Fraction(r) ** 2 for row in x.tolist()]
    assert outside[0] and 20 < sum(outside) < 280
    x64, v64 = x.double(), v.double()
    nrm = x64.norm(dim=-1, keepdim=True)
    u = x64 / nrm
    want = (r / nrm) * (v64 - u * (u * v64).sum(-1, keepdim=True))
    for i, out in enumerate(outside):
        if out:
            torch.testing.assert_close(gx[i].double(), want[i], rtol=0, atol=1e-6)
        else:
            assert torch.equal(gx[i], v[i]), i  # inside or on the sphere: J = I


def test_l2_ball_row_does_not_depend_on_its_batch():
    """The same float64 boundary row got J = I alone and the outside J beside [1e-200, 0, 0]
    (one tiny row sent the whole batch through the rescaled path): each row decides alone."""
    row, r = _PYTH
    for batch in ([row], [row, [1e-200, 0.0, 0.0]], [row, [0.0, 0.0, 0.0]]):
        x = torch.tensor(batch, dtype=F64)
        J = jacobian(lambda v: project_lp(v, 2, "ball", r), x)[0, :, 0, :]
        assert torch.equal(J, torch.eye(3, dtype=F64)), batch


@pytest.mark.parametrize("p", [1, 2, math.inf])
@pytest.mark.parametrize("xdt,rdt,rv", [(torch.float32, F64, 1e-300), (torch.float32, F64, 1e-46),
                                        (torch.float16, torch.float32, 1e-8)])
def test_radius_below_x_dtype_range_keeps_its_gradient(p, xdt, rdt, rv):
    """A learnable radius that x's dtype rounds to 0 or a subnormal is solved in float64: its
    gradient was 0 for p = 1 and ∞ (float32 x, float64 radius 1e-46: −0.7, −0.6 expected). Closed
    forms at r → 0 for x = [0.5, −2, 1], v = [0.3, 0.7, −0.2]: p = 1, the largest entry alone,
    sign(−2)·0.7; p = ∞, Σ sign(x_i) v_i = 0.3 − 0.7 − 0.2; p = 2, ûᵀv = (0.15 − 1.4 − 0.2)/√5.25.
    (16-bit x: the incoming gradient is rounded to x's dtype, hence the tolerance.)"""
    x = torch.tensor([[0.5, -2.0, 1.0]], dtype=xdt)
    v = torch.tensor([[0.3, 0.7, -0.2]], dtype=F64)
    r = torch.tensor([rv], dtype=rdt, requires_grad=True)
    (g,) = torch.autograd.grad((project_lp(x, p, "ball", r).double() * v).sum(), r)
    want = {1: -0.7, math.inf: 0.3 - 0.7 - 0.2, 2: (0.15 - 1.4 - 0.2) / math.sqrt(5.25)}[p]
    tol = 1e-6 if xdt == torch.float32 else 2e-3
    assert abs(g.item() - want) <= tol * abs(want)


def test_radius_below_x_dtype_range_on_the_sphere_warns():
    """Solved in float64, a sphere row that rounds to zero in x's dtype still warns."""
    x = torch.tensor([[0.5, -2.0, 1.0]], dtype=torch.float32)
    with pytest.warns(cddn.errors.ConvexDDNWarning, match="rounded to zero"):
        y = project_lp(x, math.inf, "sphere", torch.tensor([1e-46], dtype=F64))
    assert torch.equal(y, torch.zeros_like(x))


def test_linf_backward_selects_instead_of_masking_inf():
    """torch.clamp's VJP: an Inf incoming gradient on a pinned coordinate does not reach grad_x
    (it was NaN, Inf·0), and one on a free coordinate does not reach grad_r (was NaN)."""
    x = torch.tensor([3.0, 0.5, -2.0], dtype=F64, requires_grad=True)
    r = torch.tensor(1.0, dtype=F64, requires_grad=True)
    gx, gr = torch.autograd.grad(project_lp(x, math.inf, "ball", r), [x, r],
                                 torch.tensor([math.inf, 1.0, 0.0], dtype=F64))
    assert gx.tolist() == [0.0, 1.0, 0.0] and gr.item() == math.inf
    gx, gr = torch.autograd.grad(project_lp(x, math.inf, "ball", r), [x, r],
                                 torch.tensor([0.0, math.inf, 0.0], dtype=F64))
    assert gx.tolist() == [0.0, math.inf, 0.0] and gr.item() == 0.0
    with fwAD.dual_level():  # forward mode alike: an Inf tangent on a pinned coordinate stays out
        t = fwAD.unpack_dual(project_lp(fwAD.make_dual(x.detach(), torch.tensor([math.inf, 1.0, 0.0], dtype=F64)),
                                        math.inf, "ball", 1.0)).tangent
    assert t.tolist() == [0.0, 1.0, 0.0]


def test_compiled_l2_sphere_at_zero_warns_where_the_graph_may_break():
    """Under torch.compile (fullgraph=False) the sphere at x = 0 returned its zero gradient
    silently; it now reads the rows back as eager does. fullgraph=True reads nothing (documented)."""
    torch._dynamo.reset()
    f = torch.compile(lambda v: project_lp(v, 2, "sphere", 1.0), backend="aot_eager")
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]], dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (dynamo's own graph-break notes)
        with pytest.warns(GradientWarning, match="1 row"):
            (g,) = torch.autograd.grad(f(x)[:, 1].sum(), x)
    assert g[0].tolist() == [0.0, 0.0, 0.0]
    # Row 1: Dy = (1/3)(I − ûûᵀ), û = (1, 2, 2)/3; column sums of row 1 of Dy: (−2, 5, −4)/27.
    torch.testing.assert_close(g[1], torch.tensor([-2 / 27, 5 / 27, -4 / 27], dtype=F64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("mode", ["ball", "sphere"])
def test_l2_long_float64_rows_keep_full_accuracy(mode):
    """vector_norm accumulated a long float64 row in a few sequential lanes: n = 1e5 entries
    1 + 1e-6·randn, r = 10, y was 301 eps off. Reference: the entries are float32 values, so their
    squares are exact in float64 and math.fsum rounds their sum once (the norm within 1 ulp)."""
    g = torch.Generator().manual_seed(4)
    x = (1.0 + 1e-6 * torch.randn(30000, generator=g)).double()
    norm = math.sqrt(math.fsum(v * v for v in x.tolist()))
    want = x * (10.0 / norm)
    got = project_lp(x, 2, mode, 10.0)
    assert float((got - want).abs().max() / want.abs().max()) <= 4 * torch.finfo(F64).eps


def test_projection_inf_cotangent_off_the_support_gives_zero():
    # Dy's column is 0 off the support, so an Inf there contributes exactly 0 (was 0·Inf:
    # grad_x = [nan, nan, nan] for both).
    x = torch.tensor([2.0, 0.1, -1.0], dtype=F64, requires_grad=True)
    v = torch.tensor([1.0, 0.0, math.inf], dtype=F64)
    (gs,) = torch.autograd.grad(project_simplex(x), x, v)
    assert torch.equal(gs, torch.zeros(3, dtype=F64))
    (gl,) = torch.autograd.grad(project_lp(x, p=1, radius=1.0), x, v)
    assert torch.equal(gl, torch.zeros(3, dtype=F64))
    # Forward mode, the same Jacobian: an Inf tangent there contributes 0 too.
    with fwAD.dual_level():
        for fn in (project_simplex, lambda a: project_lp(a, p=1, radius=1.0)):
            t = fwAD.unpack_dual(fn(fwAD.make_dual(x.detach(), v))).tangent
            assert torch.equal(t, torch.zeros(3, dtype=F64))


def test_a_float_radius_below_the_dtype_s_range_keeps_the_inside_gradient():
    """float32 zeros inside the L∞ ball of radius 1e-50 (which rounds to 0 in float32): the backward
    read them as pinned at the face (slack r − |y| = 0), gradient 0 for the identity, silently; p = 1
    and 2 gave ones. A float radius below x's range is solved in float64, as a tensor one is."""
    for p in (1, 2, math.inf):
        x = torch.zeros(3, requires_grad=True)
        y = project_lp(x, p, "ball", 1e-50)
        assert y.dtype == torch.float32
        (grad,) = torch.autograd.grad(y.sum(), [x])
        assert torch.equal(grad, torch.ones(3)), p


def test_sphere_of_a_huge_radius_keeps_a_subnormal_row_s_direction():
    """x = (3, 4)·1e-320 onto the sphere of radius 1e300: r/‖x‖ overflows, and that inf read as x = 0,
    r·e₀ returned (and the backward warned of x = 0); the answer is r·(0.6, 0.8), formed as r·(x/‖x‖)."""
    x = torch.tensor([3e-320, 4e-320], dtype=torch.float64)
    y = project_lp(x, 2, "sphere", 1e300)
    torch.testing.assert_close(y, torch.tensor([6e299, 8e299], dtype=torch.float64), rtol=4e-16, atol=0)
    assert torch.equal(project_lp(torch.zeros(2, dtype=torch.float64), 2, "sphere", 1e300),
                       torch.tensor([1e300, 0.0], dtype=torch.float64))  # (x = 0 stays r·e₀)
