"""A user's ``linear_solver`` is judged by the system it was given (_custom_solver_check).

Only its shapes and finite values were checked: a CG truncated at 5 iterations (condition
1e3, m = 30) gave a gradient 1.6 off (relative), without a warning. Its answer's KKT residual
is now measured (one more Hessian-vector product, batched); above the built-in CG's tolerance
the elements are solved again by the built-in solver, and a GradientWarning names them.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from convexddn.errors import ConvexDDNWarning, GradientWarning
from convexddn.nodes.declarative import DeclarativeNode
from convexddn.nodes.linear_solvers import solve_kkt_dense

DT = torch.float64


def _cg(iters: int):
    """Plain CG on H w = v (no constraints), ``iters`` steps, batched."""
    def solver(hvp, A, inactive, v, **kw):
        w, r = torch.zeros_like(v), v.clone()
        p = r.clone()
        for _ in range(iters):
            Hp = hvp(p[None])[0]
            rr = (r * r).sum(-1, keepdim=True)
            a = rr / (p * Hp).sum(-1, keepdim=True).clamp_min(1e-300)
            w, r_new = w + a * p, r - a * Hp
            p = r_new + (r_new * r_new).sum(-1, keepdim=True) / rr.clamp_min(1e-300) * p
            r = r_new
        return w, None
    return solver


def _exact_but(bad: int | None):
    """H formed from m products and solved exactly; element ``bad`` (flat) answered with v."""
    def solver(hvp, A, inactive, v, **kw):
        batch, m = v.shape
        eye = torch.eye(m, dtype=v.dtype).unsqueeze(1).expand(m, batch, m)
        H = hvp(eye).permute(1, 2, 0)  # (B, m, m), column j = H e_j
        w = torch.linalg.solve(H, v)
        if bad is not None:
            w[bad] = v[bad]
        return w, None
    return solver


class _Ridge(DeclarativeNode):
    """y = argmin ½ (y − x)ᵀQ(y − x) + ½‖y‖²: y = (Q + I)⁻¹Q x, x̄ = Q(Q + I)⁻¹ v."""

    def __init__(self, Q, **kw):
        super().__init__(**kw)
        self.register_buffer("Q", Q)

    def objective(self, x, y):
        d = y - x
        return 0.5 * (d * (d @ self.Q)).sum(-1) + 0.5 * (y * y).sum(-1)

    def solve(self, x):
        return torch.linalg.solve(self.Q + torch.eye(len(self.Q), dtype=DT), (x @ self.Q).mT).mT

    def exact_grad(self, v):
        return (torch.linalg.solve(self.Q + torch.eye(len(self.Q), dtype=DT), v.mT).mT) @ self.Q


def _problem(batch=(3,), seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(30, 30, dtype=DT, generator=g))[0]
    Q = U @ torch.diag(torch.logspace(0, 3, 30, dtype=DT)) @ U.T
    return Q, torch.randn(*batch, 30, dtype=DT, generator=g), torch.randn(*batch, 30, dtype=DT, generator=g)


def _grad(node, x, v):
    xr = x.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (node(xr) * v).sum().backward()
    return xr.grad, [w for w in caught if issubclass(w.category, ConvexDDNWarning)]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_truncated_custom_solver_is_solved_again_and_warned():
    """CG stopped at 5 steps: the gradient was 1.6 off, silently; now the built-in solver's
    (closed form to 1e-9), with a GradientWarning giving the residual."""
    Q, x, v = _problem()
    node = _Ridge(Q, linear_solver=_cg(5))
    g, caught = _grad(node, x, v)
    assert _rel(g, node.exact_grad(v)) < 1e-9
    assert len(caught) == 1 and caught[0].category is GradientWarning
    text = str(caught[0].message)
    assert "custom linear_solver's answer does not solve the KKT system" in text and "3 of 3" in text
    assert "> tol=1e-10" in text and "solved again by the built-in solver" in text


def test_exact_custom_solver_stays_silent():
    """The same CG run 60 steps solves the system: no warning, its own (exact) gradient."""
    Q, x, v = _problem()
    node = _Ridge(Q, linear_solver=_cg(60))
    g, caught = _grad(node, x, v)
    assert not caught
    assert _rel(g, node.exact_grad(v)) < 1e-9


def test_only_the_failing_element_is_named_in_the_callers_batch_shape():
    """Batch shape (2, 2), element (1, 0) answered with v: named as (1, 0), 1 of 4; every
    element's gradient is the closed form's."""
    Q, x, v = _problem(batch=(2, 2), seed=1)
    node = _Ridge(Q, linear_solver=_exact_but(2), batch_dims=2)
    g, caught = _grad(node, x, v)
    assert len(caught) == 1
    assert "1 of 4 batch element(s) (indices [(1, 0)])" in str(caught[0].message)
    torch.testing.assert_close(g, node.exact_grad(v), rtol=1e-9, atol=1e-12)
    silent = _Ridge(Q, linear_solver=_exact_but(None), batch_dims=2)
    g2, caught2 = _grad(silent, x, v)
    assert not caught2
    torch.testing.assert_close(g2, node.exact_grad(v), rtol=1e-9, atol=1e-12)


class _Simplex(DeclarativeNode):
    """y = argmin ½‖y − x‖² s.t. Σy = 1, y ≥ 0 (an equality, active and inactive bounds):
    x̄ = v − mean(v) on the support, 0 off it."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return y.sum(-1, keepdim=True) - 1.0

    def inequality_constraints(self, x, y):
        return -y

    def solve(self, x):
        s, _ = torch.sort(x, dim=-1, descending=True)
        css = s.cumsum(-1) - 1.0
        k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
        rho = ((s - css / k) > 0).sum(-1, keepdim=True)
        tau = css.gather(-1, rho - 1) / rho.to(x.dtype)
        return (x - tau).clamp_min(0.0)


def _simplex_grad(y, v):
    on = (y > 0).to(v.dtype)
    return on * (v - (on * v).sum(-1, keepdim=True) / on.sum(-1, keepdim=True))


@pytest.mark.parametrize("ignores_constraints", [False, True])
def test_constrained_custom_solver(ignores_constraints):
    """The built-in dense solve passed as a callable (multipliers pinned on inactive bounds)
    passes silently; a solver that ignores the constraints (w = H⁻¹v, μ = 0) is named and
    replaced: the gradient is the closed form's either way."""
    x = torch.tensor([[0.9, 0.1, -0.5, 0.4], [0.2, 0.3, 0.25, -1.0]], dtype=DT)
    v = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.3, 1.0, -1.5, 2.0]], dtype=DT)

    def unconstrained(hvp, A, inactive, v, **kw):
        return v.clone(), torch.zeros(A.shape[:2], dtype=v.dtype)

    node = _Simplex(linear_solver=unconstrained if ignores_constraints else solve_kkt_dense)
    g, caught = _grad(node, x, v)
    torch.testing.assert_close(g, _simplex_grad(node.solve(x), v), rtol=1e-9, atol=1e-12)
    if ignores_constraints:
        assert len(caught) == 1 and "2 of 2" in str(caught[0].message)
    else:
        assert not caught


def test_truncated_custom_solver_in_forward_mode():
    """Forward mode solves the same system with the same solver: the tangent ẏ = (Q + I)⁻¹Q ẋ,
    not the truncated CG's, with the warning."""
    import torch.autograd.forward_ad as fwAD

    Q, x, dx = _problem(seed=2)
    node = _Ridge(Q, linear_solver=_cg(5))
    with warnings.catch_warnings(record=True) as caught, fwAD.dual_level():
        warnings.simplefilter("always")
        dy = fwAD.unpack_dual(node(fwAD.make_dual(x, dx))).tangent
    assert any("custom linear_solver's answer" in str(w.message) for w in caught)
    exact = torch.linalg.solve(Q + torch.eye(30, dtype=DT), (dx @ Q).mT).mT
    assert _rel(dy, exact) < 1e-9
