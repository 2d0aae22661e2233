"""Tests of convexddn.nodes.degeneracy: where dependent active constraints (LICQ fails)
reach the implicit derivative of a DeclarativeNode.

Expected values are closed forms written out here, never the code's own output.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from convexddn.errors import GradientWarning, SolverError
from convexddn.nodes.declarative import DeclarativeNode

DT = torch.float64
LICQ = "LICQ fails"


class _Ball(DeclarativeNode):
    """Projection onto ‖y‖² ≤ 1 written with a redundant box y ≤ 1 (the ball lies inside it):
    y = x/‖x‖ outside the ball, dy/dx = (I − y yᵀ)/‖x‖. At x = (3, 0, 0) the face y₀ ≤ 1
    touches the ball at the solution: both active, with parallel gradients."""

    def __init__(self, box: bool = True, **kw):
        super().__init__(**kw)
        self.box = box

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        ball = (y * y).sum(-1, keepdim=True) - 1
        return torch.cat([ball, y - 1], -1) if self.box else ball

    def solve(self, x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1.0)


def _sphere_jacobian(x: torch.Tensor) -> torch.Tensor:
    n = x.norm(dim=-1, keepdim=True)
    y = x / n
    return (torch.eye(x.shape[-1], dtype=x.dtype) - y.unsqueeze(-1) * y.unsqueeze(-2)) / n.unsqueeze(-1)


def _caught(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(m.message) for m in w if issubclass(m.category, GradientWarning)]


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_a_redundant_bound_touching_a_ball_warns(solver):
    # The minimum-norm split of the multiplier between the ball and the face (½, not 1,
    # on the ball) enters the Hessian through the ball's curvature: dy1/dx1 came out 1/2
    # (exact 1/3) with no warning. Element 1 does not touch the face: exact and unnamed.
    x = torch.tensor([[3.0, 0.0, 0.0], [3.0, 0.5, 0.0]], dtype=DT, requires_grad=True)
    v = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]], dtype=DT)
    _, msgs = _caught(lambda: _Ball(linear_solver=solver)(x).backward(v))
    named = [m for m in msgs if LICQ in m]
    assert len(named) == 1 and "indices [(0,)]" in named[0], msgs
    exact = (v.unsqueeze(-2) @ _sphere_jacobian(x.detach())).squeeze(-2)
    torch.testing.assert_close(x.grad[1], exact[1])


def test_a_redundant_bound_touching_a_ball_warns_in_forward_mode():
    x = torch.tensor([[3.0, 0.0, 0.0]], dtype=DT)
    with fwAD.dual_level():
        _, msgs = _caught(lambda: _Ball()(fwAD.make_dual(x, torch.tensor([[0.0, 1.0, 0.0]], dtype=DT))))
    assert any(LICQ in m and "tangent" in m for m in msgs), msgs


class _Broken(_Ball):
    """:class:`_Ball` whose solve returns NaN for element (1, 2) of a (2, 3) batch (row 5)."""

    def solve(self, x):
        y = super().solve(x)
        y[5] = float("nan")
        return y


def test_a_declarative_node_names_elements_in_the_callers_batch_shape():
    """A DeclarativeNode solves a (2, 3) batch as 6 flattened rows, and its backward's and
    jvp's warnings named (1, 2) as "flat indices [5]", which the caller cannot index with:
    now (1, 2), as the forward's SolverError names it (and its ``indices``)."""
    x = torch.tensor([3.0, 0.5, 0.0], dtype=DT).repeat(2, 3, 1)
    x[1, 2, 1] = 0.0  # only (1, 2) touches the face y0 <= 1
    named = "1 of 6 batch element(s) (indices [(1, 2)])"
    v = torch.zeros(2, 3, 3, dtype=DT)
    v[..., 1] = 1.0
    xr = x.clone().requires_grad_()
    _, msgs = _caught(lambda: _Ball(batch_dims=2)(xr).backward(v))
    assert [m for m in msgs if LICQ in m and named in m], msgs
    with fwAD.dual_level():
        _, msgs = _caught(lambda: _Ball(batch_dims=2)(fwAD.make_dual(x, v)))
    assert [m for m in msgs if LICQ in m and "tangent" in m and named in m], msgs
    v[1, 2, 0] = float("nan")  # (upstream's NaN: propagated to (1, 2) alone, silently, as torch does)
    xr = x.clone().requires_grad_()
    _, msgs = _caught(lambda: _Ball(batch_dims=2)(xr).backward(v))
    assert not [m for m in msgs if "incoming gradient" in m], msgs
    assert xr.grad[1, 2].isnan().all() and not xr.grad.view(6, 3)[:5].isnan().any()
    with pytest.raises(SolverError, match=r"returned NaN or Inf for 1 of 6 .*\[\(1, 2\)\]") as err:
        _Broken(batch_dims=2)(x)
    assert err.value.indices == [(1, 2)]

def test_the_ball_alone_is_exact_and_quiet():
    x = torch.tensor([[3.0, 0.0, 0.0]], dtype=DT, requires_grad=True)
    v = torch.tensor([[0.2, 1.0, -0.5]], dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        _Ball(box=False)(x).backward(v)
    torch.testing.assert_close(x.grad, (v.unsqueeze(-2) @ _sphere_jacobian(x.detach())).squeeze(-2))


class _Sphere(DeclarativeNode):
    """argmin ½‖y − x‖² s.t. ‖y‖² = r²: at r = 0 the feasible set is {0}, dy/dx = 0, and the
    constraint's gradient 2y vanishes there."""

    def objective(self, x, r, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, r, y):
        return (y * y).sum(-1, keepdim=True) - r ** 2

    def solve(self, x, r):
        return r * x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)


class _Pin(DeclarativeNode):
    """argmin ½‖y − x‖² s.t. y₀² = 0: y = (0, x₁), dy/dx = diag(0, 1)."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return y[:, :1] ** 2

    def solve(self, x):
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:]], -1)


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_an_equality_with_a_vanishing_gradient_warns(solver):
    # Its null Jacobian row was pinned like an inactive constraint: the gradient of
    # the unconstrained problem (x.grad = v; exact 0), silently.
    x = torch.zeros(1, 3, dtype=DT, requires_grad=True)
    r = torch.zeros(1, 1, dtype=DT, requires_grad=True)
    _, msgs = _caught(lambda: _Sphere(linear_solver=solver)(x, r).backward(
        torch.tensor([[1.0, 2.0, 3.0]], dtype=DT)))
    assert any(LICQ in m for m in msgs), msgs
    x = torch.tensor([[0.0, 2.0]], dtype=DT, requires_grad=True)
    _, msgs = _caught(lambda: _Pin(linear_solver=solver)(x).sum().backward())
    assert any(LICQ in m for m in msgs), msgs


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_a_derivative_the_split_does_not_reach_is_quiet(solver):
    # y₀² = 0 with an incoming gradient on y₁ only: every split of the multipliers gives
    # the same (exact) gradient (0, 1), so there is nothing to warn about.
    x = torch.tensor([[0.0, 2.0]], dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        _Pin(linear_solver=solver)(x).backward(torch.tensor([[0.0, 1.0]], dtype=DT))
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 1.0]], dtype=DT))


class _Lens(DeclarativeNode):
    """Two unit disks centred at 0 and (2, 0) touching at (1, 0): the feasible set is that
    point, y ≡ (1, 0) and dy/dx = 0; the active gradients (2, 0) and (−2, 0) are parallel."""

    def __init__(self, equalities: bool = False, **kw):
        super().__init__(**kw)
        self.equalities = equalities

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def _disks(self, y):
        c = torch.tensor([2.0, 0.0], dtype=y.dtype)
        return torch.stack([(y * y).sum(-1) - 1, ((y - c) ** 2).sum(-1) - 1], -1)

    def equality_constraints(self, x, y):
        return self._disks(y) if self.equalities else None

    def inequality_constraints(self, x, y):
        return None if self.equalities else self._disks(y)

    def solve(self, x):
        return torch.tensor([[1.0, 0.0]], dtype=x.dtype).expand_as(x).clone()


class _LineDisk(DeclarativeNode):
    """y₁ ≤ 0 and ‖y − (0, 1)‖² ≤ 1: a half-plane tangent to a disk, feasible set {0}."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        c = torch.tensor([0.0, 1.0], dtype=y.dtype)
        return torch.stack([y[:, 1], ((y - c) ** 2).sum(-1) - 1], -1)

    def solve(self, x):
        return torch.zeros_like(x)


@pytest.mark.parametrize("solver", ["dense", "cg"])
@pytest.mark.parametrize("node, x", [
    (_Lens, [[3.0, 0.0], [-2.0, 0.0]]),
    (lambda **kw: _Lens(equalities=True, **kw), [[3.0, 0.0], [-2.0, 0.0]]),
    (_LineDisk, [[0.0, 3.0], [0.0, -3.0]]),
], ids=["disks", "disks-as-equalities", "half-plane-and-disk"])
def test_curved_constraints_meeting_at_one_point_warn(solver, node, x):
    # Exact gradient 0 (the feasible set is a point); 1/3, 1/4 or 1 came back, silently.
    x = torch.tensor(x, dtype=DT, requires_grad=True)
    _, msgs = _caught(lambda: node(linear_solver=solver)(x).sum().backward())
    assert any(LICQ in m and "2 of 2" in m for m in msgs), msgs


# ---- the degeneracy warnings name the node, as its other warnings do ----------------------


class _Flat(DeclarativeNode):
    """½(y₀ + y₁ − x)²: every y with y₀ + y₁ = x is a minimiser, the KKT system singular."""

    def objective(self, x, y):
        return 0.5 * (y.sum(-1) - x[..., 0]) ** 2

    def solve(self, x):
        return torch.cat([x, torch.zeros_like(x)], -1)


class _NearCollinear(DeclarativeNode):
    """½‖A y − b‖² with two columns of A 1e-6 apart: cond(AᵀA) ~ 1e12."""

    def objective(self, A, b, y):
        return 0.5 * ((A @ y.unsqueeze(-1)).squeeze(-1) - b).pow(2).sum(-1)

    def solve(self, A, b):
        return torch.linalg.lstsq(A, b.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)


class _TwinBounds(DeclarativeNode):
    """½(y − x)² s.t. y ≤ s, y ≤ t, at s = t < x: both active with the same gradient."""

    def objective(self, x, s, t, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, s, t, y):
        return torch.cat([y - s, y - t], -1)

    def solve(self, x, s, t):
        return torch.minimum(x, torch.minimum(s, t))


class _Maximiser(DeclarativeNode):
    """−½(y − x)² at y = x: stationary, a maximiser."""

    def objective(self, x, y):
        return -0.5 * ((y - x) ** 2).sum(-1)

    def solve(self, x):
        return x.clone()


def _near_collinear_inputs():
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(1, 10, 3, dtype=DT, generator=gen)
    A[:, :, 2] = A[:, :, 1] + 1e-6 * torch.randn(1, 10, dtype=DT, generator=gen)
    return A.requires_grad_(True), torch.randn(1, 10, dtype=DT, generator=gen)


@pytest.mark.parametrize("solver", ["dense", "cg"])
@pytest.mark.parametrize("node, inputs, text", [
    (_Flat, lambda: (torch.tensor([[1.0]], dtype=DT, requires_grad=True),),
     "_Flat: the KKT system of the implicit derivative is singular"),
    (_NearCollinear, _near_collinear_inputs, "_NearCollinear: the KKT system of the implicit derivative is ill-"),
    (_TwinBounds, lambda: tuple(torch.tensor([[v]], dtype=DT, requires_grad=True) for v in (2.0, 1.0, 1.0)),
     "_TwinBounds: the active constraints are linearly dependent"),
])
def test_the_degeneracy_warnings_name_the_node(solver, node, inputs, text):
    """The singular, ill-conditioned and dependent-constraints warnings came without the
    node's name ("the KKT system of the implicit derivative is ill-conditioned (condition
    number up to 2.8e+12) ..."), unlike the node's others ("Mean: ...")."""
    _, msgs = _caught(lambda: node(linear_solver=solver)(*inputs()).sum().backward())
    assert any(m.startswith(text) for m in msgs), msgs


def test_the_not_a_minimiser_warning_names_the_node():
    x = torch.tensor([[1.0, 2.0]], dtype=DT, requires_grad=True)
    _, msgs = _caught(lambda: _Maximiser(linear_solver="dense")(x).sum().backward())
    assert any(m.startswith("_Maximiser.solve returned a stationary point that is not a minimiser") for m in msgs), msgs
