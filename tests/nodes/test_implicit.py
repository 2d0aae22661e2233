"""Tests of convexddn.nodes.implicit: DeclarativeNode and the generic implicit backward.

Every expected value comes from a closed form written out here (or from autograd
through an independent closed-form expression), never from the code under test.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from convexddn.errors import (
    DTypeError,
    GradientWarning,
    InputError,
    NonFiniteError,
    OptionError,
    ProblemError,
    ShapeError,
    SolverError,
)
from convexddn.nodes import linear_solvers
from convexddn.nodes.declarative import DeclarativeNode
from convexddn.nodes.implicit import declarative_vjp
from convexddn.nodes.linear_solvers import solve_kkt_dense
from convexddn.testing import check_gradients

DT = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _vjp(node: torch.nn.Module, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    xg = x.clone().requires_grad_(True)
    y = node(xg)
    (g,) = torch.autograd.grad(y, xg, v)
    return g


# ---- example nodes ---------------------------------------------------------------------


class Mean(DeclarativeNode):
    """argmin_u sum_i (u - x_i)^2 = mean(x)."""

    def objective(self, x, y):
        return ((y - x) ** 2).sum(-1)

    def solve(self, x):
        return x.mean(-1, keepdim=True)


class Quadratic(DeclarativeNode):
    """argmin_u 1/2 u^T Q u - x^T u = Q^{-1} x, with Q a learnable parameter."""

    def __init__(self, Q: torch.Tensor, **kw):
        super().__init__(**kw)
        self.Q = torch.nn.Parameter(Q.clone())

    def objective(self, x, y):
        return 0.5 * ((y @ self.Q) * y).sum(-1) - (x * y).sum(-1)

    def solve(self, x):
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        Qs = 0.5 * (self.Q + self.Q.T)
        return torch.linalg.solve(Qs.to(work), x.to(work).T).T.to(x.dtype)


class SumToOne(DeclarativeNode):
    """Projection onto {u : sum(u) = 1}."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def solve(self, x):
        return x - (x.sum(-1, keepdim=True) - 1) / x.shape[-1]

    def equality_constraints(self, x, y):
        return y.sum(-1, keepdim=True) - 1


class Box(DeclarativeNode):
    """Projection onto the box [lo, hi]^n: a clamp."""

    lo, hi = -0.5, 1.0

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def solve(self, x):
        return x.clamp(self.lo, self.hi)

    def inequality_constraints(self, x, y):
        return torch.cat([self.lo - y, y - self.hi], dim=-1)


class Ball(DeclarativeNode):
    """Projection onto the unit ball {u : |u|^2 <= 1}."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def solve(self, x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1.0)

    def inequality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - 1


class MinNormLeastSquares(DeclarativeNode):
    """argmin_u 1/2 |M u - x|^2 with a wide M: H = M^T M is singular, y = M^+ x."""

    def __init__(self, M: torch.Tensor, **kw):
        super().__init__(**kw)
        self.register_buffer("M", M)

    def objective(self, x, y):
        return 0.5 * ((y @ self.M.T - x) ** 2).sum(-1)

    def solve(self, x):
        return x @ torch.linalg.pinv(self.M).T


class QuaternionMean(DeclarativeNode):
    """Average of N quaternions: top eigenvector of M = sum_i q_i q_i^T.

    The objective -u^T M u / u^T u is invariant to the scale (and sign) of u, so its
    Hessian is singular along u at the solution, as in the paper's quaternion example.
    """

    def objective(self, x, y):
        q = x.reshape(x.shape[0], -1, 4)
        proj = (q * y.unsqueeze(1)).sum(-1)
        return -(proj**2).sum(-1) / (y * y).sum(-1)

    def solve(self, x):
        q = x.reshape(x.shape[0], -1, 4)
        _, vecs = torch.linalg.eigh(q.transpose(1, 2) @ q)
        u = vecs[..., -1]
        return u * torch.sign(u[..., :1])


class QuaternionMeanOnSphere(QuaternionMean):
    """The same, with the scale fixed by |u|^2 = 1: the KKT matrix is regular."""

    def equality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - 1


def _quaternions(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    base = torch.tensor([0.8, 0.4, 0.4, 0.2], dtype=DT)
    q = base + 0.2 * torch.randn(batch, n, 4, generator=g, dtype=DT)
    q = q / q.norm(dim=-1, keepdim=True)
    return q.reshape(batch, 4 * n)


def _quaternion_mean_vjp(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Closed form: du = (lam I - M)^+ dM u for the unit top eigenvector u of M."""
    q = x.reshape(x.shape[0], -1, 4)
    M = q.transpose(1, 2) @ q
    evals, vecs = torch.linalg.eigh(M)
    u = vecs[..., -1] * torch.sign(vecs[..., :1, -1])
    lam = evals[..., -1]
    P = torch.linalg.pinv(lam[:, None, None] * torch.eye(4, dtype=DT) - M, hermitian=True)
    Pv = (P @ v.unsqueeze(-1)).squeeze(-1)
    # v^T P dM u with dM = sum_i dq_i q_i^T + q_i dq_i^T.
    grad = (q @ u.unsqueeze(-1)) * Pv.unsqueeze(1) + (q @ Pv.unsqueeze(-1)) * u.unsqueeze(1)
    return grad.reshape(x.shape)


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    A = torch.randn(n, n, generator=_gen(seed), dtype=DT)
    return A @ A.T / n + torch.eye(n, dtype=DT)


# ---- unconstrained (Prop. 4.4) -----------------------------------------------------------


def test_mean_value_and_jacobian():
    x = torch.randn(5, 7, generator=_gen(1), dtype=DT)
    v = torch.randn(5, 1, generator=_gen(2), dtype=DT)
    y = Mean()(x)
    torch.testing.assert_close(y, x.mean(-1, keepdim=True))
    torch.testing.assert_close(_vjp(Mean(), x, v), v.expand(5, 7) / 7)


def test_quadratic_jacobian_is_q_inverse():
    n = 6
    Q = _spd(n)
    x = torch.randn(4, n, generator=_gen(1), dtype=DT)
    v = torch.randn(4, n, generator=_gen(2), dtype=DT)
    node = Quadratic(Q)
    torch.testing.assert_close(node(x), x @ torch.linalg.inv(Q))
    torch.testing.assert_close(_vjp(node, x, v), v @ torch.linalg.inv(Q))


def test_quadratic_parameter_grad():
    n = 5
    Q = _spd(n, seed=3)
    x = torch.randn(3, n, generator=_gen(4), dtype=DT)
    v = torch.randn(3, n, generator=_gen(5), dtype=DT)
    node = Quadratic(Q)
    (node(x) * v).sum().backward()
    Qr = Q.clone().requires_grad_(True)
    ref = torch.linalg.solve(0.5 * (Qr + Qr.T), x.T).T
    (gQ,) = torch.autograd.grad((ref * v).sum(), Qr)
    torch.testing.assert_close(node.Q.grad, gQ)


# ---- equality constraints (Prop. 4.5) ----------------------------------------------------


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_sum_to_one_projection_jacobian(solver):
    n = 6
    x = torch.randn(4, n, generator=_gen(1), dtype=DT)
    v = torch.randn(4, n, generator=_gen(2), dtype=DT)
    node = SumToOne(linear_solver=solver)
    y = node(x)
    torch.testing.assert_close(y.sum(-1), torch.ones(4, dtype=DT))
    J = torch.eye(n, dtype=DT) - torch.ones(n, n, dtype=DT) / n
    torch.testing.assert_close(_vjp(node, x, v), v @ J)


class Hyperplane(DeclarativeNode):
    """Projection of z onto {u : sum(u) = b} for x = (z, b): the constraint depends on x."""

    def objective(self, x, y):
        return 0.5 * ((y - x[:, :-1]) ** 2).sum(-1)

    def solve(self, x):
        z, b = x[:, :-1], x[:, -1:]
        return z - (z.sum(-1, keepdim=True) - b) / z.shape[-1]

    def equality_constraints(self, x, y):
        return y.sum(-1, keepdim=True) - x[:, -1:]


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_constraint_depending_on_x(solver):
    m = 5
    x = torch.randn(3, m + 1, generator=_gen(4), dtype=DT)
    v = torch.randn(3, m, generator=_gen(5), dtype=DT)
    grad = _vjp(Hyperplane(linear_solver=solver), x, v)
    # dy/dz = I - 11^T/m and dy/db = 1/m.
    torch.testing.assert_close(grad[:, :-1], v - v.mean(-1, keepdim=True))
    torch.testing.assert_close(grad[:, -1], v.mean(-1))


# ---- inequality constraints (Prop. 4.6) --------------------------------------------------


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_box_projection_active_and_inactive(solver):
    # Coordinates 0 and 3 clip (upper and lower bound active), 1 and 2 are inside.
    x = torch.tensor([[1.7, 0.2, -0.3, -2.0]], dtype=DT)
    v = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=DT)
    node = Box(linear_solver=solver)
    torch.testing.assert_close(node(x), torch.tensor([[1.0, 0.2, -0.3, -0.5]], dtype=DT))
    torch.testing.assert_close(_vjp(node, x, v), torch.tensor([[0.0, 2.0, 3.0, 0.0]], dtype=DT))


class RadiusBall(DeclarativeNode):
    """Projection of z onto the ball of radius rho for x = (z, rho)."""

    def objective(self, x, y):
        return 0.5 * ((y - x[:, :-1]) ** 2).sum(-1)

    def solve(self, x):
        z, rho = x[:, :-1], x[:, -1:]
        return z * (rho / z.norm(dim=-1, keepdim=True)).clamp_max(1.0)

    def inequality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - x[:, -1:] ** 2


def test_ball_radius_gradient():
    z = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=DT)  # |z| = 5 (outside), 0.5 (inside)
    x = torch.cat([z, torch.full((2, 1), 2.0, dtype=DT)], dim=-1)
    v = torch.tensor([[1.0, -2.0], [0.5, 1.5]], dtype=DT)
    grad = _vjp(RadiusBall(), x, v)
    u = z[0] / 5.0
    expected_outside = torch.cat([(v[0] - (v[0] @ u) * u) * 2.0 / 5.0, (v[0] @ u)[None]])
    torch.testing.assert_close(grad[0], expected_outside)
    torch.testing.assert_close(grad[1], torch.tensor([0.5, 1.5, 0.0], dtype=DT))


def test_ball_projection_mixed_active_sets():
    g = _gen(3)
    x = torch.randn(6, 3, generator=g, dtype=DT)
    x[:3] *= 2.0 / x[:3].norm(dim=-1, keepdim=True)  # outside: constraint active
    x[3:] *= 0.5 / x[3:].norm(dim=-1, keepdim=True)  # inside: constraint inactive
    v = torch.randn(6, 3, generator=g, dtype=DT)
    grad = _vjp(Ball(), x, v)
    r = x.norm(dim=-1, keepdim=True)
    y = x / r
    outside = (v - (v * y).sum(-1, keepdim=True) * y) / r
    torch.testing.assert_close(grad[:3], outside[:3])
    torch.testing.assert_close(grad[3:], v[3:])


# ---- singular Hessians (§4.7.4) ----------------------------------------------------------


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_singular_hessian_min_norm_least_squares(solver):
    M = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 2.0]], dtype=DT)
    x = torch.randn(4, 2, generator=_gen(1), dtype=DT)
    v = torch.randn(4, 3, generator=_gen(2), dtype=DT)
    node = MinNormLeastSquares(M, linear_solver=solver)
    with pytest.warns(GradientWarning, match="singular|did not reach"):
        grad = _vjp(node, x, v)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, v @ torch.linalg.pinv(M))


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_quaternion_mean_singular_hessian_uses_pseudo_inverse(solver):
    x = _quaternions(3, 5)
    v = torch.randn(3, 4, generator=_gen(7), dtype=DT)
    node = QuaternionMean(linear_solver=solver)
    with pytest.warns(GradientWarning):
        grad = _vjp(node, x, v)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, _quaternion_mean_vjp(x, v))


def test_quaternion_mean_on_sphere_is_regular():
    x = _quaternions(3, 5, seed=1)
    v = torch.randn(3, 4, generator=_gen(8), dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        grad = _vjp(QuaternionMeanOnSphere(linear_solver="dense"), x, v)
    torch.testing.assert_close(grad, _quaternion_mean_vjp(x, v))


def test_zero_hessian_warns_and_gives_finite_gradient():
    class Flat(DeclarativeNode):
        def objective(self, x, y):
            return (x**2).sum(-1) + 0.0 * y.sum(-1)

        def solve(self, x):
            return torch.zeros_like(x[:, :2])

    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    with pytest.warns(GradientWarning, match="singular"):
        Flat()(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros_like(x))


# ---- gradcheck, batching, solvers --------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [Mean, lambda: Quadratic(_spd(4)), SumToOne, Box, Ball, QuaternionMeanOnSphere],
    ids=["mean", "quadratic", "sum_to_one", "box", "ball", "quaternion_sphere"],
)
def test_gradcheck_float64(make):
    node = make()
    if isinstance(node, QuaternionMean):
        x = _quaternions(2, 3, seed=2)
    else:
        x = torch.randn(3, 4, generator=_gen(11), dtype=DT)
        if isinstance(node, Box):
            x = x.clamp(-1.2, 1.5)
            x = torch.where((x - node.lo).abs() < 0.05, x - 0.1, x)
            x = torch.where((x - node.hi).abs() < 0.05, x + 0.1, x)
        if isinstance(node, Ball):
            x[0] *= 3.0 / x[0].norm()
            x[1] *= 0.3 / x[1].norm()
    assert torch.autograd.gradcheck(node, (x.requires_grad_(True),))


@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
def test_batch_shapes(batch):
    n = 5
    x = torch.randn(*batch, n, generator=_gen(2), dtype=DT)
    v = torch.randn(*batch, n, generator=_gen(3), dtype=DT)
    node = SumToOne(batch_dims=len(batch))
    y = node(x)
    assert y.shape == (*batch, n)
    torch.testing.assert_close(y, x - (x.sum(-1, keepdim=True) - 1) / n)
    J = torch.eye(n, dtype=DT) - torch.ones(n, n, dtype=DT) / n
    torch.testing.assert_close(_vjp(node, x, v), v @ J)


def test_empty_batch():
    x = torch.zeros(0, 3, dtype=DT, requires_grad=True)
    y = SumToOne()(x)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 3)


def test_float32_keeps_dtype_and_matches_float64():
    Q = _spd(4)
    x = torch.randn(3, 4, generator=_gen(5), dtype=DT)
    v = torch.randn(3, 4, generator=_gen(6), dtype=DT)
    node32 = Quadratic(Q.float())
    y = node32(x.float())
    assert y.dtype == torch.float32
    grad32 = _vjp(node32, x.float(), v.float())
    assert grad32.dtype == torch.float32
    torch.testing.assert_close(grad32.double(), v @ torch.linalg.inv(Q), rtol=1e-4, atol=1e-5)


def test_cg_agrees_with_dense_for_large_output():
    n = 80
    Q = _spd(n, seed=9)
    x = torch.randn(3, n, generator=_gen(1), dtype=DT)
    v = torch.randn(3, n, generator=_gen(2), dtype=DT)
    g_cg = _vjp(Quadratic(Q, linear_solver="cg"), x, v)
    g_dense = _vjp(Quadratic(Q, linear_solver="dense"), x, v)
    torch.testing.assert_close(g_cg, g_dense)
    torch.testing.assert_close(g_cg, v @ torch.linalg.inv(Q))


def test_auto_uses_cg_above_dense_max(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("dense solve used for m > dense_max")

    monkeypatch.setattr(linear_solvers, "solve_kkt_dense", refuse)
    n = 70
    x = torch.randn(2, n, generator=_gen(1), dtype=DT)
    v = torch.randn(2, n, generator=_gen(2), dtype=DT)
    grad = _vjp(SumToOne(dense_max=64), x, v)  # m + p = 71 > 64
    torch.testing.assert_close(grad, v - v.mean(-1, keepdim=True))
    with pytest.raises(AssertionError, match="dense solve used"):
        _vjp(SumToOne(dense_max=100), x, v)
    with pytest.raises(AssertionError, match="dense solve used"):
        _vjp(SumToOne(), x, v)  # the measured default, DENSE_MAX, is above 71


def test_declarative_vjp_with_custom_linear_solver():
    calls = []

    def solver(hvp, A, inactive, v):
        calls.append((None if A is None else tuple(A.shape), tuple(v.shape)))
        return solve_kkt_dense(hvp, A, inactive, v)

    n = 4
    x = torch.randn(3, n, generator=_gen(1), dtype=DT)
    y = x - (x.sum(-1, keepdim=True) - 1) / n
    v = torch.randn(3, n, generator=_gen(2), dtype=DT)
    grad_x, grad_params = declarative_vjp(
        lambda x, y: 0.5 * ((y - x) ** 2).sum(-1),
        x,
        y,
        v,
        equality_constraints=lambda x, y: y.sum(-1, keepdim=True) - 1,
        linear_solver=solver,
    )
    assert calls == [((3, 1, n), (3, n))]
    assert grad_params == ()
    torch.testing.assert_close(grad_x, v - v.mean(-1, keepdim=True))


def test_extra_repr_lists_options():
    text = repr(SumToOne(linear_solver="cg", dense_max=8))
    assert "linear_solver='cg'" in text and "dense_max=8" in text


# ---- errors ------------------------------------------------------------------------------


def test_invalid_integer_input():
    with pytest.raises(DTypeError, match="x"):
        Mean()(torch.ones(2, 3, dtype=torch.int64))


def test_invalid_non_finite_input():
    x = torch.ones(2, 3, dtype=DT)
    x[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="1 NaN"):
        Mean()(x)


def test_invalid_scalar_input():
    with pytest.raises(ShapeError, match="at least batch_dims=1 dimension"):
        Mean()(torch.tensor(1.0))


def test_invalid_solve_batch_shape():
    class Wrong(Mean):
        def solve(self, x):
            return x.mean(-1, keepdim=True)[:1]

    with pytest.raises(ShapeError, match=r"Wrong\.solve.*B = 3"):
        Wrong()(torch.randn(3, 4, dtype=DT))


def test_invalid_solve_dtype():
    class Wrong(Mean):
        def solve(self, x):
            return x.mean(-1, keepdim=True).float()

    with pytest.raises(DTypeError, match=r"solve.*float64.*float32"):
        Wrong()(torch.randn(3, 4, dtype=DT))


def test_invalid_solve_non_finite():
    class Wrong(Mean):
        def solve(self, x):
            # solve sees the flattened (6, 4) batch; rows 1 and 4 are (0, 1) and (1, 1).
            y = x.mean(-1, keepdim=True)
            if y.shape[0] == 1:
                return y * float("nan")
            y[[1, 4]] = float("inf")
            return y

    with pytest.raises(SolverError, match="Inf") as info:
        Wrong(batch_dims=2)(torch.randn(2, 3, 4, dtype=DT))
    assert info.value.indices == [(0, 1), (1, 1)]
    with pytest.raises(SolverError, match="NaN") as info:
        Wrong(batch_dims=0)(torch.randn(4, dtype=DT))  # unbatched: x of shape (4,)
    assert info.value.indices == [()]


def test_invalid_objective_shape():
    class Wrong(Mean):
        def objective(self, x, y):
            return ((y - x) ** 2)

    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    with pytest.raises(ShapeError, match=r"objective.*\(3,\)"):
        Wrong()(x).sum().backward()


def test_invalid_constraint_shape():
    class Wrong(SumToOne):
        def equality_constraints(self, x, y):
            return (y.sum(-1) - 1)[:1]  # one row for a batch of 3

    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    with pytest.raises(ShapeError, match="equality_constraints"):
        Wrong()(x).sum().backward()


def test_invalid_options():
    with pytest.raises(OptionError, match="linear_solver"):
        Mean(linear_solver="lu")
    with pytest.raises(OptionError, match="active_tol"):
        Mean(active_tol=0.0)


def test_missing_methods():
    with pytest.raises(ProblemError, match="must define objective and solve"):
        DeclarativeNode()(torch.randn(2, 3))


def test_non_finite_hessian_warns_and_gives_finite_gradient():
    class SqrtAtZero(DeclarativeNode):
        # |u - x| is not twice differentiable at its minimiser u = x.
        def objective(self, x, y):
            return ((y - x) ** 2).sum(-1).sqrt()

        def solve(self, x):
            return x.clone()

    x = torch.randn(3, 2, dtype=DT, requires_grad=True)
    with pytest.warns(GradientWarning):
        SqrtAtZero()(x).sum().backward()
    assert torch.isfinite(x.grad).all()


# ---- issue 12: any number of inputs of any shape, parameters, closed-over tensors ------


class LowRank(DeclarativeNode):
    """Y (B, 3, 3) = argmin ½‖Y − M‖² + ½α‖Y‖², M = (P₃ P₃ᵀ) ∘ q (column j times q_j).

    Inputs P (B, 4, 2) (row 3 unused) and q (B, 3); α = softplus(a) a parameter.
    Closed form: Y = M / (1 + α).
    """

    def __init__(self, **kw):
        super().__init__(**kw)
        self.a = torch.nn.Parameter(torch.tensor(0.3, dtype=DT))

    @staticmethod
    def target(P, q):
        P3 = P[:, :3]
        return (P3 @ P3.transpose(1, 2)) * q.unsqueeze(1)

    def objective(self, P, q, *, y):
        alpha = torch.nn.functional.softplus(self.a)
        return 0.5 * ((y - self.target(P, q)) ** 2).sum((1, 2)) + 0.5 * alpha * (y**2).sum((1, 2))

    def solve(self, P, q):
        return self.target(P, q) / (1 + torch.nn.functional.softplus(self.a))


def test_two_inputs_any_shapes_closed_form():
    P = torch.randn(5, 4, 2, generator=_gen(1), dtype=DT, requires_grad=True)
    q = torch.randn(5, 3, generator=_gen(2), dtype=DT, requires_grad=True)
    v = torch.randn(5, 3, 3, generator=_gen(3), dtype=DT)
    node = LowRank()
    y = node(P, q)
    assert y.shape == (5, 3, 3)
    gP, gq, ga = torch.autograd.grad(y, (P, q, node.a), v)
    # Reference: autograd through the closed form (an independent expression).
    Pr, qr = P.detach().requires_grad_(True), q.detach().requires_grad_(True)
    ar = node.a.detach().clone().requires_grad_(True)
    ref = LowRank.target(Pr, qr) / (1 + torch.nn.functional.softplus(ar))
    want = torch.autograd.grad(ref, (Pr, qr, ar), v)
    for got, exp in zip((gP, gq, ga), want):
        torch.testing.assert_close(got, exp)
    assert torch.equal(gP[:, 3], torch.zeros_like(gP[:, 3]))  # the unused row


def test_two_inputs_gradcheck_and_parameter_check():
    P = torch.randn(2, 4, 2, generator=_gen(4), dtype=DT, requires_grad=True)
    q = torch.randn(2, 3, generator=_gen(5), dtype=DT, requires_grad=True)
    node = LowRank()
    assert torch.autograd.gradcheck(node, (P, q))
    report = check_gradients(node, P, q)
    assert report.ok and report.wrt == ("input 0", "input 1", "param a")
    assert report.max_abs_error < 1e-8


def test_positional_y_and_legacy_single_input():
    # def objective(self, x, y) (the old form) and def objective(self, x, *, y) agree.
    class KeywordMean(DeclarativeNode):
        def objective(self, x, *, y):
            return ((y - x) ** 2).sum(-1)

        def solve(self, x):
            return x.mean(-1, keepdim=True)

    x = torch.randn(3, 5, generator=_gen(6), dtype=DT)
    v = torch.randn(3, 1, generator=_gen(7), dtype=DT)
    torch.testing.assert_close(_vjp(KeywordMean(), x, v), _vjp(Mean(), x, v))


@pytest.mark.parametrize("batch_dims", [0, 1, 2])
def test_batch_dims_option(batch_dims):
    batch = (2, 3)[:batch_dims]
    P = torch.randn(*batch, 4, 2, generator=_gen(8), dtype=DT)
    q = torch.randn(*batch, 3, generator=_gen(9), dtype=DT)
    node = LowRank(batch_dims=batch_dims)
    y = node(P, q)
    assert y.shape == (*batch, 3, 3)
    flat = LowRank()(P.reshape(-1, 4, 2), q.reshape(-1, 3))
    torch.testing.assert_close(y.reshape(-1, 3, 3), flat)


def test_mismatched_batch_shapes_and_input_count():
    P = torch.randn(2, 4, 2, dtype=DT)
    # (named by solve's parameters, P and q; they were "input 0" and "input 1")
    with pytest.raises(ShapeError, match=r"batch shape of P, \(2,\).*; q has shape \(3, 3\)"):
        LowRank()(P, torch.randn(3, 3, dtype=DT))
    with pytest.raises(InputError, match="called with 1 input"):
        LowRank()(P)
    with pytest.raises(DTypeError, match="one dtype: P is torch.float64, q is torch.float32"):
        LowRank()(P, torch.randn(2, 3))


def test_closed_over_tensor_requiring_grad_raises():
    w = torch.tensor(2.0, dtype=DT, requires_grad=True)

    class Closed(DeclarativeNode):
        def objective(self, x, y):
            return ((y - w * x) ** 2).sum(-1)

        def solve(self, x):
            return w.detach() * x

    x = torch.randn(2, 3, dtype=DT)
    # Nothing else requires grad: the forward itself catches it (else w.grad = None).
    with pytest.raises(InputError, match=r"neither an input nor a parameter.*nn\.Parameter"):
        Closed()(x)
    with pytest.raises(InputError, match="Pass it as an input"):
        Closed()(x.requires_grad_(True)).sum().backward()
    assert w.grad is None and x.grad is None


def test_buffer_requiring_grad_is_closed_over_too():
    class Buffered(Mean):
        def __init__(self):
            super().__init__()
            self.register_buffer("s", torch.tensor(1.5, dtype=DT, requires_grad=True))

        def objective(self, x, y):
            return self.s * ((y - x) ** 2).sum(-1)

    with pytest.raises(InputError, match="neither an input nor a parameter"):
        Buffered()(torch.randn(2, 3, dtype=DT))


def test_float32_parameters_and_buffers_in_float64_backward():
    # The backward evaluates the objective in float64: float32 parameters and buffers
    # are cast for it (y @ Q with Q float32 would otherwise fail in float64).
    Q = _spd(4, seed=10)
    node = Quadratic(Q.float())
    x = torch.randn(3, 4, generator=_gen(11), dtype=DT).float()
    v = torch.randn(3, 4, generator=_gen(12), dtype=DT)
    (node(x) * v.float()).sum().backward()
    assert node.Q.grad.dtype == torch.float32 and node.Q.dtype == torch.float32
    Qr = node.Q.detach().double().requires_grad_(True)
    ref = torch.linalg.solve(0.5 * (Qr + Qr.T), x.double().T).T
    (gQ,) = torch.autograd.grad((ref * v).sum(), Qr)
    torch.testing.assert_close(node.Q.grad.double(), gQ, rtol=1e-5, atol=1e-6)


# ---- float32 / half precision: float64-grade gradients ---------------------------------


class LeastSquares(DeclarativeNode):
    """y = argmin ½‖A y − b‖², two inputs A (B, n, m) and b (B, n)."""

    def objective(self, A, b, y):
        return 0.5 * ((A @ y.unsqueeze(-1)).squeeze(-1) - b).pow(2).sum(-1)

    def solve(self, A, b):
        work = torch.float32 if A.dtype in (torch.float16, torch.bfloat16) else A.dtype
        y = torch.linalg.lstsq(A.to(work), b.to(work).unsqueeze(-1)).solution
        return y.squeeze(-1).to(A.dtype)


def _ill_conditioned_ls(batch=2, n=20, m=8, cond_h=9e5, seed=0):
    g = _gen(seed)
    s = torch.logspace(0, -0.5 * torch.log10(torch.tensor(cond_h)).item(), m, dtype=DT)
    A = torch.stack([
        torch.linalg.qr(torch.randn(n, m, generator=g, dtype=DT))[0] @ torch.diag(s)
        @ torch.linalg.qr(torch.randn(m, m, generator=g, dtype=DT))[0].T
        for _ in range(batch)
    ])
    return A, torch.randn(batch, n, generator=g, dtype=DT)


def _ls_vjp(A, b, v):
    """Closed-form VJP of y = A⁺b (full column rank): (Ā, b̄) = (r wᵀ − A w yᵀ, A w)."""
    H = A.transpose(1, 2) @ A
    y = torch.linalg.solve(H, A.transpose(1, 2) @ b.unsqueeze(-1)).squeeze(-1)
    w = torch.linalg.solve(H, v.unsqueeze(-1)).squeeze(-1)
    r = b - (A @ y.unsqueeze(-1)).squeeze(-1)
    Aw = (A @ w.unsqueeze(-1)).squeeze(-1)
    return r.unsqueeze(-1) * w.unsqueeze(1) - Aw.unsqueeze(-1) * y.unsqueeze(1), Aw


def test_float32_ill_conditioned_least_squares():
    # Issue 12: condition number 9e5 in float32 was called singular (float32 round-off)
    # and the pseudo-inverse gave gradients ~100 % off. Now formed and solved in float64.
    A, b = _ill_conditioned_ls()
    A32, b32 = A.float().requires_grad_(True), b.float().requires_grad_(True)
    v = torch.randn(2, 8, generator=_gen(13), dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        gA, gb = torch.autograd.grad(LeastSquares()(A32, b32), (A32, b32), v.float())
    assert gA.dtype == torch.float32
    want_A, want_b = _ls_vjp(A32.detach().double(), b32.detach().double(), v)
    assert (gA.double() - want_A).norm() / want_A.norm() < 1e-4
    assert (gb.double() - want_b).norm() / want_b.norm() < 1e-5


class AllEigenvectors(DeclarativeNode):
    """All eigenvectors V (B, N, N) of a symmetric X: stationary points of
    Σ_k v_kᵀ X v_k on ‖v_k‖ = 1 (saddle points but one: the KKT matrix is indefinite)."""

    def objective(self, X, y):
        return -0.5 * (y * (X @ y)).sum((-1, -2))

    def equality_constraints(self, X, y):
        return (y * y).sum(-2) - 1

    def solve(self, X):
        return torch.linalg.eigh(X)[1]


def _eig_vjp(X, G, V_signs):
    """Closed form: X̄ = sym(V (F ∘ VᵀG) Vᵀ), F_ji = 1/(λ_i − λ_j), F_ii = 0.

    Each eigenvector's sign is taken from ``V_signs`` (the node's output).
    """
    lam, V = torch.linalg.eigh(X)
    V = V * torch.sign((V * V_signs).sum(-2, keepdim=True))
    diff = lam.unsqueeze(-2) - lam.unsqueeze(-1)  # [j, i] = λ_i − λ_j
    eye = torch.eye(lam.shape[-1], dtype=torch.bool)
    F = torch.where(eye, 0.0, 1.0 / torch.where(eye, 1.0, diff))
    gX = V @ (F * (V.transpose(-1, -2) @ G)) @ V.transpose(-1, -2)
    return 0.5 * (gX + gX.transpose(-1, -2))


@pytest.mark.parametrize("solver", ["dense", "cg"])
@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_all_eigenvectors(solver, dtype):
    # Issue 12: float32 was called singular and the CG path failed on this indefinite
    # KKT system (gradient ~100 % off); CG now falls back to the dense solve.
    g = _gen(14)
    X = torch.randn(2, 6, 6, generator=g, dtype=DT)
    X = (0.5 * (X + X.transpose(1, 2))).to(dtype).requires_grad_(True)
    G = torch.randn(2, 6, 6, generator=g, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        # (saddle points by design: the second-order check is off for this node)
        V = AllEigenvectors(linear_solver=solver, check_minimum=False)(X)
        (gX,) = torch.autograd.grad(V, X, G.to(dtype))
    gX = 0.5 * (gX + gX.transpose(1, 2)).double()
    want = _eig_vjp(X.detach().double(), G, V.detach().double())
    assert (gX - want).norm() / want.norm() < (1e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_backward(dtype):
    # Issue 10: raw linalg errors in backward for half dtypes.
    Q = _spd(4, seed=15)
    node = Quadratic(Q).to(dtype)
    x = torch.randn(3, 4, generator=_gen(16), dtype=DT).to(dtype).requires_grad_(True)
    v = torch.randn(3, 4, generator=_gen(17), dtype=DT)
    y = node(x)
    assert y.dtype == dtype
    (g,) = torch.autograd.grad(y, x, v.to(dtype))
    assert g.dtype == dtype
    Qh = node.Q.detach().double()
    want = v.to(dtype).double() @ torch.linalg.inv(0.5 * (Qh + Qh.T))
    torch.testing.assert_close(g.double(), want, rtol=2e-2, atol=2e-2)


def test_half_precision_overflow_warns():
    # A gradient finite in float64 but beyond float16's 65504 is Inf, with a warning.
    class Tiny(DeclarativeNode):
        def objective(self, x, y):
            return 0.5e-6 * (y**2).sum(-1) - (x * y).sum(-1)

        def solve(self, x):
            return x * 1e6

    x = torch.full((1, 2), 1e-3, dtype=torch.float16, requires_grad=True)
    with pytest.warns(GradientWarning, match="overflow"):
        (g,) = torch.autograd.grad(Tiny(check_solution=False)(x).sum(), x)
    assert torch.isinf(g).all()


# ---- issue 10: named errors at the first forward ------------------------------------------


def test_missing_super_init_raises_at_construction():
    class NoSuper(Mean):
        def __init__(self):
            self.scale = 2.0

    with pytest.raises(ProblemError, match=r"NoSuper\.__init__ must call super\(\)\.__init__\(\)"):
        NoSuper()


def test_missing_solve_raises_at_first_forward():
    class NoSolve(DeclarativeNode):
        def objective(self, x, y):
            return ((y - x) ** 2).sum(-1)

    x = torch.randn(2, 3, dtype=DT, requires_grad=True)
    with pytest.raises(ProblemError, match="NoSolve must define solve"):
        NoSolve()(x)


def test_wrong_shapes_raise_at_first_forward_before_any_backward():
    class WrongObjective(Mean):
        def objective(self, x, y):
            return (y - x) ** 2  # (B, n), not (B,)

    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    w = torch.ones(1, dtype=DT, requires_grad=True)
    with pytest.raises(ShapeError, match=r"objective must return shape \(B,\) = \(3,\)"):
        (w * x).sum() + WrongObjective()(x).sum()  # the error comes in forward
    assert x.grad is None and w.grad is None

    class WrongSolve(Mean):
        def solve(self, x):
            return x.mean(-1, keepdim=True)[1:]

    with pytest.raises(ShapeError, match=r"WrongSolve\.solve must return shape \(B, .*B = 3"):
        WrongSolve()(x)


def test_objective_that_ignores_y_raises():
    # Issue 10: y.detach() in the objective gave a zero gradient silently.
    class Detached(DeclarativeNode):
        def objective(self, x, y):
            return ((y.detach() - x) ** 2).sum(-1)

        def solve(self, x):
            return x.clone()

    with pytest.raises(ProblemError, match="does not depend on y"):
        Detached()(torch.randn(2, 3, dtype=DT, requires_grad=True))


def test_unused_input_warns():
    class IgnoresQ(DeclarativeNode):
        def objective(self, x, q, y):
            return ((y - x) ** 2).sum(-1)

        def solve(self, x, q):
            return x.clone()

    with pytest.warns(GradientWarning, match=r"input\(s\) \[1\] require grad"):
        IgnoresQ()(torch.randn(2, 3, dtype=DT), torch.randn(2, 3, dtype=DT, requires_grad=True))


@pytest.mark.parametrize(
    "option, value",
    [("cg_max_iter", 2.5), ("dense_max", 2.7), ("dense_max", 1e9), ("batch_dims", -1),
     ("check_solution", "yes"), ("solution_tol", 0.0), ("implicit_dtype", torch.float16),
     ("cg_tol", -1.0)],
)
def test_invalid_options_named(option, value):
    with pytest.raises(OptionError, match=option):
        Mean(**{option: value})


# ---- issue 12: is the returned point a KKT point? --------------------------------------


def test_non_stationary_solution_raises_with_indices():
    class Half(Mean):
        def solve(self, x):
            y = x.mean(-1, keepdim=True)
            y[1] *= 0.5  # element 1 is not the minimiser
            return y

    x = torch.randn(3, 4, generator=_gen(18), dtype=DT) + 3.0
    with pytest.raises(SolverError, match="not a KKT point") as info:
        Half()(x.requires_grad_(True)).sum().backward()
    assert info.value.indices == [(1,)]
    # The check can be turned off.
    Half(check_solution=False)(x).sum().backward()


def test_slightly_non_stationary_solution_warns():
    class Sloppy(Mean):
        def solve(self, x):
            return x.mean(-1, keepdim=True) * (1 + 1e-4)

    x = torch.randn(3, 4, generator=_gen(19), dtype=DT) + 3.0
    with pytest.warns(GradientWarning, match=r"only approximately for 3 of 3"):
        Sloppy()(x.requires_grad_(True)).sum().backward()


def test_solution_just_inside_active_constraint_is_rejected():
    # Issue 12: a solution 3e-6 inside its active constraint counts as interior, where
    # the unconstrained gradient (the identity) is wrong; stationarity fails there.
    class ShortBall(Ball):
        def solve(self, x):
            return super().solve(x) * (1 - 3e-6)

    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=DT, requires_grad=True)
    with pytest.raises(SolverError, match="not a KKT point") as info:
        ShortBall()(x).sum().backward()
    assert info.value.indices == [(0,)]


def test_non_smooth_objective_at_kink_is_reported():
    # Total variation ½‖y − x‖² + λ Σ|y_{i+1} − y_i| at a fused solution: autograd's
    # subgradient 0 of |·| at 0 makes y look non-stationary (the derivative does not
    # exist there); today's code gave the identity Jacobian silently. The kink probe
    # names the kink (before the stationarity check, which fails too).
    class TV(DeclarativeNode):
        lam = 0.5

        def objective(self, x, y):
            return 0.5 * ((y - x) ** 2).sum(-1) + self.lam * (y[:, 1:] - y[:, :-1]).abs().sum(-1)

        def solve(self, x):
            return x.mean(-1, keepdim=True).expand_as(x).clone()  # fused: exact for small gaps

    x = torch.tensor([[0.0, 0.2, 0.1]], dtype=DT, requires_grad=True)
    with pytest.raises((SolverError, GradientWarning)) as info, warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        TV()(x).sum().backward()
    assert "KKT" in str(info.value) or "has a kink there" in str(info.value)


def test_strict_complementarity_failure_warns():
    x = torch.tensor([[1.0, 0.2, -0.3, -2.0]], dtype=DT, requires_grad=True)  # x_0 = hi
    with pytest.warns(GradientWarning, match="strict complementarity"):
        Box()(x).sum().backward()


# ---- issue 10: singular systems on both paths, dependent constraints, scale --------------


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_singular_hessian_consistent_rhs_warns_on_both_paths(solver):
    # v in the range of H: CG converges quietly to the min-norm solution; the probe must
    # still reveal that H is singular (the solution y = M⁺x is not unique).
    M = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 2.0]], dtype=DT)
    x = torch.randn(4, 2, generator=_gen(20), dtype=DT)
    v = torch.randn(4, 3, generator=_gen(21), dtype=DT) @ (M.T @ M)
    with pytest.warns(GradientWarning, match="singular"):
        grad = _vjp(MinNormLeastSquares(M, linear_solver=solver), x, v)
    torch.testing.assert_close(grad, v @ torch.linalg.pinv(M))


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_dependent_constraints(solver):
    # Written twice, the constraint has non-unique multipliers. That matters (and is
    # reported) only where the data can break the redundancy: (c, 2c) holds for every b,
    # and the gradient is unique (it was warned about); Σy = b and Σy = b' at b' = b split
    # the gradient between b and b' in any way, which is warned. The gradient in z is
    # right either way.
    class HyperplaneTwice(Hyperplane):
        def equality_constraints(self, x, y):
            c = super().equality_constraints(x, y)
            return torch.cat([c, 2 * c], -1)

    class HyperplaneSplit(Hyperplane):  # x = (z, b, b')
        def objective(self, x, y):
            return super().objective(x[:, :-1], y)

        def solve(self, x):
            return super().solve(x[:, :-1])

        def equality_constraints(self, x, y):
            return torch.cat([y.sum(-1, keepdim=True) - x[:, -2:-1], y.sum(-1, keepdim=True) - x[:, -1:]], -1)

    class SumToOneTwice(SumToOne):
        def equality_constraints(self, x, y):
            c = super().equality_constraints(x, y)
            return torch.cat([c, 2 * c], -1)

    m = 5
    x = torch.randn(3, m + 1, generator=_gen(22), dtype=DT)
    v = torch.randn(3, m, generator=_gen(23), dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        grad = _vjp(HyperplaneTwice(linear_solver=solver), x, v)
    torch.testing.assert_close(grad[:, :-1], v - v.mean(-1, keepdim=True))
    torch.testing.assert_close(grad[:, -1], v.mean(-1))
    with pytest.warns(GradientWarning, match="linearly dependent"):
        grad = _vjp(HyperplaneSplit(linear_solver=solver), torch.cat([x, x[:, -1:]], -1), v)
    torch.testing.assert_close(grad[:, :m], v - v.mean(-1, keepdim=True))
    torch.testing.assert_close(grad[:, m] + grad[:, m + 1], v.mean(-1))  # the split is not unique
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        grad = _vjp(SumToOneTwice(linear_solver=solver), x[:, :m], v)
    torch.testing.assert_close(grad, v - v.mean(-1, keepdim=True))


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_singularity_test_is_scale_aware(solver):
    # Objective ×1e12 and the constraint ×1e-6: the KKT matrix mixes scales 1e12 and
    # 1e-6, an unscaled eigenvalue test calls it singular; it is perfectly regular.
    class Scaled(SumToOne):
        def objective(self, x, y):
            return 1e12 * super().objective(x, y)

        def equality_constraints(self, x, y):
            return 1e-6 * super().equality_constraints(x, y)

    n = 6
    x = torch.randn(2, n, generator=_gen(24), dtype=DT)
    v = torch.randn(2, n, generator=_gen(25), dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        grad = _vjp(Scaled(linear_solver=solver), x, v)
    torch.testing.assert_close(grad, v - v.mean(-1, keepdim=True))


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_ill_conditioned_hessian_warns(solver):
    U = torch.linalg.qr(torch.randn(6, 6, generator=_gen(26), dtype=DT))[0]
    Q = U @ torch.diag(torch.logspace(0, 12, 6, dtype=DT)) @ U.T
    x = torch.randn(2, 6, generator=_gen(27), dtype=DT)
    with pytest.warns(GradientWarning, match="ill-conditioned"):
        # (cg_max_iter only with "cg": "dense" never runs CG, and refuses it)
        node = Quadratic(Q, linear_solver=solver, cg_max_iter=60 if solver == "cg" else None)
        _vjp(node, x, torch.ones(2, 6, dtype=DT))


def test_auto_rule_uses_batch_and_size(monkeypatch):
    used = []
    monkeypatch.setattr(linear_solvers, "solve_kkt_dense",
                        lambda *a, **k: used.append("dense") or solve_kkt_dense(*a, **k))
    n = 300  # N = 301: N^3 = 2.7e7 <= DENSE_WORK for one element, 16 N^3 is not
    for batch in (1, 16):
        x = torch.randn(batch, n, generator=_gen(28), dtype=DT)
        _vjp(SumToOne(), x, torch.randn(batch, n, generator=_gen(29), dtype=DT))
    assert used == ["dense"]


def test_double_backward_raises_clearly():
    x = torch.randn(2, 3, generator=_gen(30), dtype=DT, requires_grad=True)
    y = SumToOne()(x)
    (g,) = torch.autograd.grad((y**2).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="^SumToOne does not support double backward") as info:
        g.sum().backward()
    assert isinstance(info.value, ProblemError)  # a convexddn error too
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.gradgradcheck(SumToOne(), (x,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_cuda_two_inputs_parameters_and_checks(solver):
    """The whole backward (checks, both linear solvers, float64 casts) on CUDA tensors."""
    dev = torch.device("cuda")
    P = torch.randn(3, 4, 2, generator=_gen(31), dtype=DT).to(dev).requires_grad_(True)
    q = torch.randn(3, 3, generator=_gen(32), dtype=DT).to(dev).requires_grad_(True)
    node = LowRank(linear_solver=solver).to(dev)
    v = torch.randn(3, 3, 3, generator=_gen(33), dtype=DT).to(dev)
    gP, gq, ga = torch.autograd.grad(node(P, q), (P, q, node.a), v)
    assert gP.device.type == "cuda" and gq.device.type == "cuda"
    cpu = LowRank()
    ref = torch.autograd.grad(cpu(P.detach().cpu().requires_grad_(True),
                                  q.detach().cpu().requires_grad_(True)), (cpu.a,), v.cpu())
    torch.testing.assert_close(ga.cpu(), ref[0])
    A, b = _ill_conditioned_ls()
    A32 = A.float().to(dev).requires_grad_(True)
    (gA,) = torch.autograd.grad(LeastSquares(linear_solver=solver)(A32, b.float().to(dev)), A32,
                                torch.ones(2, 8, device=dev))
    want, _ = _ls_vjp(A32.detach().double().cpu(), b.float().double(), torch.ones(2, 8, dtype=DT))
    assert (gA.double().cpu() - want).norm() / want.norm() < 1e-4


# ---- audit of DeclarativeNode: activity, scale floor, degenerate vertices, aliasing ----


class RadiusBallSq(DeclarativeNode):
    """Projection onto the ball of radius R, written as |u|² − R² <= 0 (scale R²)."""

    R = 10.0

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - self.R**2

    def solve(self, x):
        n = x.norm(dim=-1, keepdim=True)
        return torch.where(n > self.R, self.R * x / n, x)


def _ball_projection_vjp(x: torch.Tensor, v: torch.Tensor, R: float) -> torch.Tensor:
    """vᵀ Dy for y = R x/|x| outside the ball: (R/|x|)(v − x̂ (x̂ᵀv)); v inside."""
    n = x.norm(dim=-1, keepdim=True)
    xh = x / n
    out = (R / n) * (v - xh * (xh * v).sum(-1, keepdim=True))
    return torch.where(n > R, out, v)


@pytest.mark.parametrize("dtype, R", [(torch.float32, 10.0), (torch.float64, 1e5),
                                      (torch.float64, 1e7)])
def test_activity_test_is_relative_to_the_constraint_scale(dtype, R):
    # A correctly rounded boundary point has g ≈ −1e-5 (float32, R = 10) or far more
    # (float64, R = 1e7): an absolute active_tol dropped the constraint and rejected it.
    class Node(RadiusBallSq):
        pass

    Node.R = R
    x = 3 * R * torch.randn(64, 3, generator=_gen(40), dtype=torch.float64)
    v = torch.randn(64, 3, generator=_gen(41), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        grad = _vjp(Node(), x.to(dtype), v.to(dtype))
    want = _ball_projection_vjp(x, v, R)
    assert (grad.double() - want).abs().max() <= (1e-4 if dtype == torch.float32 else 1e-9)


def test_exact_minimiser_at_the_origin_is_accepted():
    # A zero (padding) row: the iterative solve stops at y ~ 1e-60, an exact minimiser
    # whose own scale is ~0; the stationarity residual must not be divided by ~0.
    class PseudoHuberMean(DeclarativeNode):
        def objective(self, x, y):
            return (torch.sqrt(1 + (y - x) ** 2) - 1).sum(-1)

        def solve(self, x):
            y = x.mean(-1, keepdim=True) + 1.0
            for _ in range(200):
                r = y - x
                y = y - 0.5 * (r / torch.sqrt(1 + r * r)).mean(-1, keepdim=True)
            return y

    x = torch.randn(4, 5, generator=_gen(42), dtype=DT)
    x[2] = 0
    xg = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        y = PseudoHuberMean()(xg)
        y.sum().backward()
    assert 0 < y[2].abs().item() < 1e-30
    # Implicit function theorem: dy/dx_i = w_i / Σ w, w_i = (1 + (y − x_i)²)^(−3/2).
    w = (1 + (y.detach() - x) ** 2) ** -1.5
    torch.testing.assert_close(xg.grad, w / w.sum(-1, keepdim=True))
    # A truly non-stationary point of the same batch is still rejected.
    class Off(PseudoHuberMean):
        def solve(self, x):
            y = super().solve(x)
            y[1] += 0.5
            return y

    with pytest.raises(SolverError, match="not a KKT point") as info:
        Off()(x.clone().requires_grad_(True)).sum().backward()
    assert info.value.indices == [(1,)]


class Corner(DeclarativeNode):
    """½|u − x|² on {u0 <= 1, u1 <= 1, u0 + u1 <= 2}: the third constraint is redundant."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return torch.stack([y[:, 0] - 1, y[:, 1] - 1, y[:, 0] + y[:, 1] - 2], -1)

    def solve(self, x):
        return x.clamp(max=1.0)


@pytest.mark.parametrize("x1", [1.2, 1.5, 2.0])
def test_degenerate_vertex_with_nonnegative_multipliers_is_a_kkt_point(x1):
    # At y = (1, 1) all three constraints are active in 2-D. λ = (2 − t, x1 − 1 − t, t),
    # 0 < t < x1 − 1, are valid (strictly positive) multipliers, but the minimum-norm
    # ones have λ_1 < 0: that raised SolverError (x1 = 1.2) or warned (1.5).
    x = torch.tensor([[3.0, x1], [0.3, 0.4]], dtype=DT)
    v = torch.randn(2, 2, generator=_gen(43), dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        grad = _vjp(Corner(), x, v)
    # y = min(x, 1): Dy = diag(x < 1).
    torch.testing.assert_close(grad, v * (x < 1))


def test_simplex_with_box_at_a_degenerate_vertex():
    class SimplexBox(DeclarativeNode):
        def objective(self, x, y):
            return 0.5 * ((y - x) ** 2).sum(-1)

        def equality_constraints(self, x, y):
            return y.sum(-1, keepdim=True) - 1

        def inequality_constraints(self, x, y):
            return torch.cat([-y, y - 1], -1)

        def solve(self, x):  # x = [5, 1, 0, -1]: the projection is e_0 (τ = 4)
            return torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).to(x.dtype)

    x = torch.tensor([[5.0, 1.0, 0.0, -1.0]], dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        grad = _vjp(SimplexBox(), x, torch.randn(1, 4, generator=_gen(44), dtype=DT))
    # y = e_0 on an open neighbourhood of x (x_0 − τ = 1 > 0 > x_i − τ): Dy = 0.
    torch.testing.assert_close(grad, torch.zeros(1, 4, dtype=DT))


def test_degenerate_vertex_with_a_genuine_zero_multiplier_still_warns():
    # x = (3, 1): y = (1, 1) with ∇f = (−2, 0). λ_0 + λ_2 = 2 and λ_1 + λ_2 = 0 leave
    # λ = (2, 0, 0) as the only nonnegative multiplier: y_1 <= 1 is weakly active, and
    # only one-sided derivatives exist (x_1 crossing 1).
    with pytest.warns(GradientWarning, match="strict complementarity"):
        _vjp(Corner(), torch.tensor([[3.0, 1.0]], dtype=DT), torch.ones(1, 2, dtype=DT))


def test_non_finite_constraint_jacobian_raises_problem_error():
    class HalfNormBall(DeclarativeNode):  # Σ|u|^½ <= 1: not differentiable at u_i = 0
        def objective(self, x, y):
            return 0.5 * ((y - x) ** 2).sum(-1)

        def inequality_constraints(self, x, y):
            return (y.abs() ** 0.5).sum(-1, keepdim=True) - 1

        def solve(self, x):
            return torch.tensor([[1.0, 0.0]], dtype=x.dtype).expand_as(x)

    x = torch.tensor([[3.0, 0.1]], dtype=DT, requires_grad=True)
    with pytest.raises(ProblemError, match=r"inequality_constraints.*non-finite.*\[0\]"):
        HalfNormBall()(x).sum().backward()


@pytest.mark.parametrize("kind", ["buffer", "parameter view"])
def test_output_never_aliases_module_state(kind):
    class Cached(DeclarativeNode):
        def __init__(self):
            super().__init__()
            self.register_buffer("out", torch.zeros(2, 3, dtype=DT))
            self.c = torch.nn.Parameter(torch.ones(1, 3, dtype=DT))

        def objective(self, x, y):
            return 0.5 * ((y - x - self.c) ** 2).sum(-1)

        def solve(self, x):
            if kind == "buffer":
                return self.out.copy_(x + self.c)
            return self.c.expand(x.shape[0], 3) if bool((x == 0).all()) else x + self.c

    node = Cached()
    x1 = torch.zeros(2, 3, dtype=DT, requires_grad=True)
    y1 = node(x1)
    before = y1.detach().clone()
    node(torch.randn(2, 3, generator=_gen(45), dtype=DT))
    if kind == "parameter view":
        with torch.no_grad():
            node.c.add_(1.0)  # a training step: must not change the earlier output
    assert torch.equal(y1.detach(), before)
    if kind == "buffer":
        y1.sum().backward()  # y = x + c: the gradient is ones
        torch.testing.assert_close(x1.grad, torch.ones(2, 3, dtype=DT))


def test_keyword_inputs_and_solve_device_are_checked():
    with pytest.raises(InputError, match=r"positionally.*\['x'\]"):
        Mean()(x=torch.randn(2, 3, dtype=DT))

    class Elsewhere(Mean):
        def solve(self, x):
            return torch.empty(x.shape[0], 1, dtype=x.dtype, device="meta")

    with pytest.raises(InputError, match="Elsewhere.solve.*device"):
        Elsewhere()(torch.randn(2, 3, dtype=DT))


def test_independent_active_constraints_skip_the_nnls(monkeypatch):
    # With independent active constraints the multipliers are unique, so the NNLS
    # fallback cannot change them: it ran anyway on rounding-level negative or weakly
    # active multipliers (a box with half the coordinates on a bound: 60 batched pinv
    # calls and 20x the backward time). The result (the warning) is the same.
    import convexddn.nodes.multipliers as mult
    import convexddn.nodes.optimality as opt

    calls = []
    nnls = mult.nonnegative_multipliers
    counting = lambda *a, **k: calls.append(1) or nnls(*a, **k)  # noqa: E731
    monkeypatch.setattr(mult, "nonnegative_multipliers", counting)
    monkeypatch.setattr(opt, "nonnegative_multipliers", counting)

    class Box(DeclarativeNode):
        def objective(self, x, y):
            return 0.5 * ((y - x) ** 2).sum(-1)

        def inequality_constraints(self, x, y):
            return torch.cat([-y, y - 1], -1)

        def solve(self, x):
            return x.clamp(0, 1)

    gen = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(4, 32, generator=gen, dtype=torch.float64)
    x[:, ::2] = torch.where(x[:, ::2] > 0.5, 1.0, 0.0)  # exactly on a bound: weakly active
    x.requires_grad_()
    with pytest.warns(GradientWarning):
        Box()(x).sum().backward()
    assert calls == []
    # The derivative where it exists: 1 strictly inside (0, 1), 0 strictly outside.
    inside = (x.detach() > 0) & (x.detach() < 1)
    outside = (x.detach() < 0) | (x.detach() > 1)
    assert torch.equal(x.grad[inside], torch.ones(int(inside.sum()), dtype=torch.float64))
    assert torch.equal(x.grad[outside], torch.zeros(int(outside.sum()), dtype=torch.float64))


def _simplex_node(scale: float = 1.0) -> type[DeclarativeNode]:
    """The projection onto the simplex as a DeclarativeNode, y ≥ 0 written as −scale·y ≤ 0."""
    from convexddn.functional import project_simplex

    class Simplex(DeclarativeNode):
        def objective(self, x, y):
            return 0.5 * ((y - x) ** 2).sum(-1)

        def equality_constraints(self, x, y):
            return y.sum(-1, keepdim=True) - 1

        def inequality_constraints(self, x, y):
            return -scale * y

        def solve(self, x):
            return project_simplex(x)

    return Simplex


def test_cg_at_a_vertex_no_false_ill_conditioning_warning():
    # At a vertex of the simplex the active constraints leave no free direction: CG's
    # projected probe was rounding noise, never "converged" relative to itself, and the
    # element was reported ill-conditioned (condition number 1.2e4, below the 1e10
    # threshold the message quotes). The gradients of CG and the dense solve agree.
    Simplex = _simplex_node()
    x0 = torch.tensor([[0.5, 0.2, 0.1], [0.0, 3.0, 0.0]], dtype=DT)
    for w in (torch.tensor([[1.0, -2.0, 0.5], [0.3, 1.0, -1.0]], dtype=DT),
              torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=DT)):  # the audit's y[0].sum()
        grads = {}
        for solver in ("dense", "cg"):
            x = x0.clone().requires_grad_()
            with warnings.catch_warnings():
                warnings.simplefilter("error", GradientWarning)
                (Simplex(linear_solver=solver)(x) * w).sum().backward()
            grads[solver] = x.grad
        torch.testing.assert_close(grads["cg"], grads["dense"], atol=1e-10, rtol=0)
        # Element 0 is inside a face: (I - 11ᵀ/3) w; the vertex element's gradient is 0.
        torch.testing.assert_close(grads["dense"][0], w[0] - w[0].mean(), atol=1e-12, rtol=0)
        assert grads["dense"][1].abs().max() < 1e-12


# ------------------------------------------------------------------ audit of 2026-12-02


class _LPVertex(DeclarativeNode):
    """max y0 + 0.3 y1 s.t. y0 + y1 <= x0, y0 - y1 <= x1: a linear objective whose data
    enter only the constraints; the unique vertex y = ((x0 + x1)/2, (x0 - x1)/2) has
    multipliers (0.65, 0.35) > 0."""

    def objective(self, x, y):
        return -(y[:, 0] + 0.3 * y[:, 1])

    def inequality_constraints(self, x, y):
        return torch.stack([y[:, 0] + y[:, 1] - x[:, 0], y[:, 0] - y[:, 1] - x[:, 1]], -1)

    def solve(self, x):
        return torch.stack([(x[:, 0] + x[:, 1]) / 2, (x[:, 0] - x[:, 1]) / 2], -1)


def test_linear_program_vertex_is_accepted_and_differentiated():
    """Its curvature H and cross term B are both 0, so the stationarity residual's scale
    was 0 and the rounding of the multipliers scored 1e292: every element was rejected as
    "not a KKT point". Reference: the closed form's Jacobian."""
    x = (torch.rand(4, 2, generator=_gen(1), dtype=DT) + 0.3).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        y = _LPVertex()(x)
        g = torch.randn(4, 2, generator=_gen(2), dtype=DT)
        (grad,) = torch.autograd.grad(y, x, g)
    J = torch.tensor([[0.5, 0.5], [0.5, -0.5]], dtype=DT)
    torch.testing.assert_close(grad, g @ J, rtol=0, atol=1e-12)


class _BallAtOrigin(DeclarativeNode):
    """Projection onto the unit ball, its constraint written as the docs do."""

    def __init__(self, **kw):
        super().__init__(**kw)

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return y.norm(dim=-1, keepdim=True) - 1

    def solve(self, x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1.0)


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_inactive_constraint_not_differentiable_at_the_solution(solver):
    """At x = 0 (a zero-initialised layer before the node) the inactive constraint
    ‖y‖ - 1 has no derivative, and its multiplier 0 times autograd's NaN made the
    Lagrangian's derivatives NaN: the dense path returned a zero gradient with a false
    "singular" warning, CG raised torch's eigh error. Reference: ∂y/∂x = I inside the
    ball, the closed form's Jacobian on the sphere for the other element."""
    x = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0]], dtype=DT, requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (grad,) = torch.autograd.grad(_BallAtOrigin(linear_solver=solver)(x), x, g)
    u = x[1].detach() / 5.0
    torch.testing.assert_close(grad[0], g[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(grad[1], (g[1] - (g[1] @ u) * u) / 5.0, rtol=0, atol=1e-10)


class _PositiveBall(DeclarativeNode):
    """Projection onto {y >= 0, ‖y‖ <= 1}, the ball's constraint written by ``norm``."""

    def __init__(self, norm, **kw):
        super().__init__(**kw)
        self.norm = norm

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return torch.cat([-y, self.norm(y) - 1], -1)

    def solve(self, x):
        p = x.clamp(min=0)
        return p / p.norm(dim=-1, keepdim=True).clamp(min=1)


_NORMS = {"sqrt": lambda y: (y * y).sum(-1, keepdim=True).sqrt(), "norm": lambda y: y.norm(dim=-1, keepdim=True)}


@pytest.mark.parametrize("solver", ["dense", "cg"])
@pytest.mark.parametrize("norm", ["sqrt", "norm"])
def test_an_inactive_constraint_not_differentiable_there_stays_out_of_the_active_ones(norm, solver):
    """y = 0 (x < 0): the bounds are active, the ball inactive (value -1) and not differentiable at 0. Its
    0 · ∞ reached the bounds' derivatives through y: with sqrt the backward raised for the whole batch, blaming
    "active constraint(s) [0, 1, 2]" (Jacobian -I); with norm the Lagrangian's second derivatives were NaN and
    a warning said so. Reference (closed form): ∂y/∂x = 0 at y = 0, diag(1, 0, 1) for the second element (inside
    the ball, y₁ = 0 on its bound), (I − uuᵀ)/‖x‖ for the third, on the sphere (the ball active there, inactive
    in the others), in reverse and in forward mode."""
    x = torch.tensor([[-1.0, -2.0, -0.5], [0.3, -1.0, 0.2], [3.0, 0.5, 4.0]], dtype=DT, requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=DT)
    u = x[2].detach() / x[2].detach().norm()
    J = torch.stack([torch.zeros(3, 3, dtype=DT), torch.diag(torch.tensor([1.0, 0.0, 1.0], dtype=DT)),
                     (torch.eye(3, dtype=DT) - torch.outer(u, u)) / x[2].detach().norm()])
    node = _PositiveBall(_NORMS[norm], linear_solver=solver)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (grad,) = torch.autograd.grad(node(x), x, g)
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(node(fwAD.make_dual(x.detach(), g))).tangent
    want = torch.einsum("bi,bij->bj", g, J)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(tangent, want, rtol=0, atol=1e-10)


class _CoupledCorner(DeclarativeNode):
    """argmin ½(y − x)ᵀM(y − x) s.t. y₀, y₁ >= 0 and ‖(y₀, y₁)‖ <= 1 (written with sqrt); solve
    for x where both bounds are active: y = (0, 0, x₂ + (M₂₀x₀ + M₂₁x₁)/M₂₂)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("M", torch.tensor([[2.0, 0.5, 0.3], [0.5, 2.0, 0.2], [0.3, 0.2, 1.0]], dtype=DT))

    def objective(self, x, y):
        d = y - x
        return 0.5 * (d * (d @ self.M)).sum(-1)

    def inequality_constraints(self, x, y):
        return torch.cat([-y[:, :2], (y[:, :2] ** 2).sum(-1, keepdim=True).sqrt() - 1], -1)

    def solve(self, x):
        M = self.M
        y2 = x[:, 2] + (M[2, 0] * x[:, 0] + M[2, 1] * x[:, 1]) / M[2, 2]
        return torch.stack([torch.zeros_like(y2), torch.zeros_like(y2), y2], -1)


def test_the_active_rows_keep_the_objectives_curvature_beside_an_isolated_inactive_row():
    """The bounds pin y₀, y₁ and the inactive ball (not differentiable at their 0) is kept out: the Hessian
    and the mixed derivative of the objective still give y₂'s row, (M₂₀, M₂₁, M₂₂)/M₂₂ (closed form)."""
    x = torch.tensor([[-1.0, -1.0, 1.5]], dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (J,) = torch.autograd.functional.jacobian(lambda z: _CoupledCorner()(z).sum(0), (x,))
    want = torch.zeros(3, 3, dtype=DT)
    want[2] = torch.tensor([0.3, 0.2, 1.0], dtype=DT)
    torch.testing.assert_close(J[:, 0], want, rtol=0, atol=1e-10)


class _RootBound(DeclarativeNode):
    """Projection onto {|y_0|^0.5 <= 0, ‖y‖ <= 10}: the first is active at y_0 = 0, where its
    derivative is infinite; the second is inactive."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return torch.cat([y[:, :1].abs().sqrt(), (y * y).sum(-1, keepdim=True).sqrt() - 10], -1)

    def solve(self, x):
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:]], -1)


def test_a_non_finite_jacobian_on_an_active_row_is_still_named():
    """The isolation of inactive rows does not hide an active one's infinite derivative:
    it is reported, naming that row (0) and not the inactive one (1)."""
    x = torch.tensor([[0.5, 1.0], [-0.2, 2.0]], dtype=DT, requires_grad=True)
    with pytest.raises(ProblemError, match=r"non-finite .* active constraint\(s\) \[0\] "):
        _RootBound()(x).sum().backward()


class _SqrtAtZero(DeclarativeNode):
    def objective(self, x, y):
        return ((y - x) ** 2).sum(-1).sqrt()

    def solve(self, x):
        return x.clone()


def test_cg_non_finite_hessian_warns_like_dense():
    """The CG path's condition estimate ran eigvalsh on the NaN Lanczos matrix and raised
    torch's raw LinAlgError for the whole batch; the dense path warns and gives finite
    gradients: so must CG."""
    x = torch.randn(3, 2, generator=_gen(3), dtype=DT, requires_grad=True)
    with pytest.warns(GradientWarning):
        _SqrtAtZero(linear_solver="cg")(x).sum().backward()
    assert torch.isfinite(x.grad).all()


class _ShiftByItem(DeclarativeNode):
    """solve returns x + s, but the objective reads s through .item() (a user's slip)."""

    def __init__(self):
        super().__init__()
        self.s = torch.nn.Parameter(torch.tensor(0.5, dtype=DT))

    def objective(self, x, y):
        return 0.5 * ((y - x - self.s.item()) ** 2).sum(-1)

    def solve(self, x):
        return x + self.s


def test_parameter_the_objective_does_not_track_is_warned():
    """Its gradient was a silent 0 (true: the number of entries); an input used the same
    way was already warned about."""
    x = torch.randn(2, 3, generator=_gen(4), dtype=DT)
    with pytest.warns(GradientWarning, match=r"parameter\(s\) \['s'\].*zero gradient"):
        _ShiftByItem()(x)


class _TwiceTheSameEquality(DeclarativeNode):
    """Σy = b and Σy = b' with b' = b: the split of the gradient between them is not unique."""

    def __init__(self, dtype):
        super().__init__()
        self.b = torch.nn.Parameter(torch.tensor([0.7], dtype=dtype))
        self.b2 = torch.nn.Parameter(torch.tensor([0.7], dtype=dtype))

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return torch.cat([y.sum(-1, keepdim=True) - self.b, y.sum(-1, keepdim=True) - self.b2], -1)

    def solve(self, x):
        return x - (x.sum(-1, keepdim=True) - self.b) / x.shape[-1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dependent_constraints_with_parameter_data_warned_in_float32(dtype):
    """The warning about dependent constraints (whose data then get non-unique
    multipliers) compared the parameters with the constraint graph's leaves, which for
    a float32 parameter were its float64 cast: float32 was never warned."""
    node = _TwiceTheSameEquality(dtype)
    x = torch.randn(3, 4, generator=_gen(5), dtype=dtype, requires_grad=True)
    with pytest.warns(GradientWarning, match="linearly dependent"):
        node(x).sum().backward()
    assert float(node.b.grad + node.b2.grad) == pytest.approx(3.0, rel=1e-6)  # ∂Σy/∂b = 1 per element


class _ScaledByBuffer(DeclarativeNode):
    """y = argmin ½ Σ w u² - x·u = x / w, with w a buffer; ``out`` a cache solve writes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.tensor([1.0, 2.0, 4.0], dtype=DT))
        self.register_buffer("out", torch.zeros(2, 3, dtype=DT))

    def objective(self, x, y):
        return 0.5 * (self.w * y * y).sum(-1) - (x * y).sum(-1)

    def solve(self, x):
        return self.out.copy_(x / self.w).clone()


def test_buffer_changed_in_place_before_backward_is_refused():
    """A buffer the objective reads, changed in place between forward and backward, was
    differentiated at its new value (×1.0000001: gradient 0.9999999 instead of 1) or
    called the solution wrong; a buffer solve only writes to (a cache) may change."""
    node = _ScaledByBuffer()
    x = torch.randn(2, 3, generator=_gen(6), dtype=DT, requires_grad=True)
    y = node(x)
    node(torch.randn(2, 3, generator=_gen(7), dtype=DT))  # rewrites the cache
    y.sum().backward()
    torch.testing.assert_close(x.grad, (1 / node.w).expand(2, 3), rtol=0, atol=1e-12)
    y = node(x)
    with torch.no_grad():
        node.w.mul_(1.0000001)
    with pytest.raises(InputError, match=r"\['w'\].*modified in place"):
        y.sum().backward()


class _ScaledByParameter(DeclarativeNode):
    """y = argmin ½ Σ (u − w x)² = w x, with w a parameter: dy/dx = w."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([2.0, 2.0, 2.0], dtype=DT))

    def objective(self, x, y):
        return 0.5 * ((y - self.w * x) ** 2).sum(-1)

    def solve(self, x):
        return self.w * x


@pytest.mark.parametrize("late", ["frozen", "buffer"])
def test_state_frozen_or_added_after_the_first_call_is_watched(late):
    """Only the state that did not require grad at the first call's probe was watched: a
    parameter frozen later (fine-tuning), or a buffer the objective reads registered
    later, changed in place between forward and backward gave dy/dx = 6 at x = 0 for
    the forward's 2 (the solution does not move there, so no check saw it), silently."""
    node = _ScaledByParameter()
    x = torch.zeros(1, 3, dtype=DT, requires_grad=True)
    node(x).sum().backward()  # the first call's probe
    if late == "frozen":
        node.w.requires_grad_(False)
        changed = node.w
    else:
        w = node.w.detach().clone()
        del node.w
        node.register_buffer("w", w)
        changed = node.w
    x = torch.zeros(1, 3, dtype=DT, requires_grad=True)
    y = node(x)
    with torch.no_grad():
        changed.mul_(3.0)
    with pytest.raises(InputError, match=r"\['w'\].*modified in place"):
        y.sum().backward()
    # After the change, a new forward differentiates at the new value (closed form w).
    x.grad = None
    node(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((1, 3), 6.0, dtype=DT), rtol=0, atol=1e-12)


class _ScaledByAnyBuffer(DeclarativeNode):
    """y = argmin ½ Σ (u − k x)² = k x with k a buffer of any dtype (a bool mask counts 2)."""

    def __init__(self, k, inference=False):
        super().__init__()
        if inference:
            with torch.inference_mode():
                k = k.clone()
        self.register_buffer("k", k)

    def _k(self, x):
        k = self.k.real if self.k.is_complex() else self.k
        return 2.0 * k.to(x.dtype) if k.dtype == torch.bool else k.to(x.dtype)

    def objective(self, x, y):
        return 0.5 * ((y - self._k(x) * x) ** 2).sum(-1)

    def solve(self, x):
        return self._k(x) * x


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex128])
def test_a_buffer_that_cannot_require_grad_is_watched_too(dtype):
    """Only floating buffers were watched (the probe finds what the problem reads through
    autograd): an integer, bool or complex buffer changed in place between forward and
    backward was differentiated at its new value (dy/dx = 6, or 0 for a flipped mask,
    where the forward solved with 2), silently."""
    k = torch.ones(3, dtype=torch.bool) if dtype == torch.bool else torch.full((3,), 2, dtype=dtype)
    node = _ScaledByAnyBuffer(k)
    x = torch.zeros(1, 3, dtype=DT, requires_grad=True)
    node(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((1, 3), 2.0, dtype=DT), rtol=0, atol=0)
    y = node(x)
    with torch.no_grad():
        node.k.logical_not_() if dtype == torch.bool else node.k.mul_(3)
    with pytest.raises(InputError, match=r"\['k'\].*modified in place"):
        y.sum().backward()


class _ThresholdedByBuffer(DeclarativeNode):
    """y = argmin ½(u − x)² + K/2 (u − 1)², K read from the float buffer ``k`` only
    non-differentiably: y = (x + K)/(1 + K), dy/dx = 1/(1 + K)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.register_buffer("k", torch.tensor(2.0, dtype=torch.float32))

    def _K(self):
        return self.k.item() if self.how == "item" else torch.where(self.k > 2.5, 6.0, 2.0).to(DT)

    def objective(self, x, y):
        return (0.5 * (y - x) ** 2 + 0.5 * self._K() * (y - 1) ** 2).sum(-1)

    def solve(self, x):
        return (x + self._K()) / (1 + self._K())


@pytest.mark.parametrize("how", ["item", "where"])
def test_a_float_buffer_read_without_a_gradient_is_watched(how):
    """A float buffer read through .item() or as a mask never reached the probe's graph:
    changed in place between forward and backward, the gradient was 1/7 (K = 6) where
    the forward solved with K = 2 (1/3), silently (at x = 1, y = 1 for every K)."""
    node = _ThresholdedByBuffer(how)
    x = torch.ones(1, 1, dtype=DT, requires_grad=True)
    node(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((1, 1), 1 / 3, dtype=DT), rtol=1e-12, atol=0)
    y = node(x)
    with torch.no_grad():
        node.k.mul_(3)
    with pytest.raises(InputError, match=r"\['k'\].*modified in place"):
        y.sum().backward()


def test_a_parameter_read_only_without_a_gradient_is_still_warned_idle():
    """Such a read does not make a parameter that requires grad differentiable: it keeps
    its warning (a complex one read through .item() lost it to the record of reads)."""

    class Idle(DeclarativeNode):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Parameter(torch.tensor(2.0 + 0.0j, dtype=torch.complex128))

        def objective(self, x, y):
            return (0.5 * (y - self.c.real.item() * x) ** 2).sum(-1)

        def solve(self, x):
            return 2.0 * x

    with pytest.warns(GradientWarning, match=r"parameter\(s\) \['c'\] require grad but neither"):
        Idle()(torch.ones(1, 2, dtype=DT, requires_grad=True))


def test_a_buffer_made_under_inference_mode():
    """A buffer made under torch.inference_mode() has no version counter: the forward
    raised torch's "Inference tensors do not track version counter". The backward now
    differentiates at the forward's value (dy/dx = k = 2)."""
    node = _ScaledByAnyBuffer(torch.full((3,), 2.0, dtype=DT), inference=True)
    x = torch.ones(1, 3, dtype=DT, requires_grad=True)
    node(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((1, 3), 2.0, dtype=DT), rtol=0, atol=0)


class _CubicAbs(DeclarativeNode):
    """y = argmin ½(u − x)² + 0.1|u|³, the cube written as sqrt(u²)³: C² everywhere, but
    autograd's second derivative at u = 0 is 0/0. For x >= 0, y = (√(1 + 1.2x) − 1)/0.6."""

    def objective(self, x, y):
        return (0.5 * (y - x) ** 2 + 0.1 * (y * y).sqrt() ** 3).sum(-1)

    def solve(self, x):
        return ((1 + 1.2 * x).sqrt() - 1) / 0.6


def test_non_finite_lagrangian_derivatives_are_named_not_called_singular():
    """Such an element got a zero gradient with the warning "singular: the solution is not
    locally unique" (false: it is unique). Now the warning says the derivatives are not
    finite there and names the element; the others keep their exact derivative
    1 / (1 + 0.6 y) (implicit function theorem on y − x + 0.3 y² = 0)."""
    x = torch.tensor([[0.0], [1.0], [2.5]], dtype=DT, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = _CubicAbs()(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
    texts = [str(w.message) for w in caught if issubclass(w.category, GradientWarning)]
    assert len(texts) == 1 and "NaN or Inf" in texts[0] and "[(0,)]" in texts[0], texts
    assert not any("singular" in t for t in texts)
    expected = 1 / (1 + 0.6 * y.detach())
    assert float(grad[0]) == 0.0
    torch.testing.assert_close(grad[1:], expected[1:], rtol=0, atol=1e-12)


class _NonNegWithError(DeclarativeNode):
    """Projection onto y >= 0 with a solver off by ``err`` (an interior-point solve)."""

    def __init__(self, err, **kw):
        super().__init__(**kw)
        self.err = err

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return -y

    def solve(self, x):
        return x.clamp_min(0) + self.err


@pytest.mark.parametrize("check", [True, False])
def test_bounds_active_at_a_solution_near_zero(check):
    """At y* = 0 (x < 0) the activity scale ‖∇g‖‖y‖ was ~0: a solve off by 1e-12 had every
    bound inactive — rejected as "not a KKT point", or with check_solution=False given the
    identity for the true zero Jacobian. Reference: the clamp's Jacobian diag(x > 0)."""
    x = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -2.0, 3.0]], dtype=DT, requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (grad,) = torch.autograd.grad(_NonNegWithError(1e-12, check_solution=check)(x), x, g)
    torch.testing.assert_close(grad, g * (x.detach() > 0), rtol=0, atol=1e-9)


class _EntropySoftmax(DeclarativeNode):
    """argmin Σ y log y − x·y s.t. Σ y = 1, y >= 0: softmax(x) (a non-quadratic objective
    with inequality constraints)."""

    def objective(self, x, y):
        return (y * torch.log(y)).sum(-1) - (x * y).sum(-1)

    def equality_constraints(self, x, y):
        return y.sum(-1, keepdim=True) - 1

    def inequality_constraints(self, x, y):
        return -y

    def solve(self, x):
        return torch.softmax(x, -1)


def test_non_quadratic_objective_with_inequalities():
    """The activity test's curvature probe freed the objective's autograd graph (log's
    saved tensors) and the backward raised "backward through the graph a second time"
    for every such node. Reference: softmax's Jacobian diag(s) − s sᵀ."""
    x = torch.randn(4, 5, generator=_gen(8), dtype=DT, requires_grad=True)
    g = torch.randn(4, 5, generator=_gen(9), dtype=DT)
    (grad,) = torch.autograd.grad(_EntropySoftmax()(x), x, g)
    s = torch.softmax(x.detach(), -1)
    torch.testing.assert_close(grad, s * g - s * (s * g).sum(-1, keepdim=True), rtol=0, atol=1e-10)


# ---- kinks: a solution where the Lagrangian's gradient jumps ------------------------------


class _SoftThreshold(DeclarativeNode):
    """½‖y − x‖² + ‖y‖₁: y = sign(x) max(|x| − 1, 0), dy/dx = diag(|x| > 1)."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1) + y.abs().sum(-1)

    def solve(self, x):
        return torch.sign(x) * torch.clamp(x.abs() - 1.0, min=0.0)


class _L1Ball(DeclarativeNode):
    """Projection onto the unit L1 ball, for inputs whose projection is the vertex e_0."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return y.abs().sum(-1) - 1.0

    def solve(self, x):
        y = torch.zeros_like(x)
        y[:, 0] = 1.0
        return y


def test_a_solution_at_a_kink_warns_and_zeroes_that_gradient():
    """Soft-thresholding at x_0 = 0 exactly (y_0 = 0, where |y_0| has its kink): autograd's
    |·|' = |·|'' = 0 there made y a smooth KKT point and the gradient that of ½‖y − x‖²,
    1 for a true 0, silently. Now a GradientWarning names the element and its gradient is
    zero; the other element, away from every kink, keeps its exact gradient."""
    x = torch.tensor([[0.0, 2.0, -3.0], [1.5, 2.0, -3.0]], dtype=DT, requires_grad=True)
    with pytest.warns(GradientWarning, match=r"jumps at the solution for 1 of 2 .*\[\(0,\)\].*kink"):
        (g,) = torch.autograd.grad(_SoftThreshold()(x).sum(), x)
    assert torch.equal(g[0], torch.zeros(3, dtype=DT))
    torch.testing.assert_close(g[1], torch.ones(3, dtype=DT), rtol=0, atol=1e-12)  # diag(|x| > 1)


def test_a_vertex_of_an_l1_ball_warns():
    """The projection of (2, 0) onto the L1 ball is the vertex (1, 0), where |y_1| has its
    kink inside an active constraint: dy_1/dx was (0, 1), for a true (0, 0) (the vertex
    stays put), silently."""
    x = torch.tensor([[2.0, 0.0]], dtype=DT, requires_grad=True)
    with pytest.warns(GradientWarning, match="kink"):
        (g,) = torch.autograd.grad(_L1Ball()(x)[:, 1].sum(), x)
    assert torch.equal(g, torch.zeros_like(g))


def test_forward_mode_at_a_kink_warns_too():
    import torch.autograd.forward_ad as fwAD

    x = torch.tensor([[0.0, 2.0, -3.0]], dtype=DT)
    with pytest.warns(GradientWarning, match="kink"), fwAD.dual_level():
        t = fwAD.unpack_dual(_SoftThreshold()(fwAD.make_dual(x, torch.ones_like(x)))).tangent
    assert torch.equal(t, torch.zeros_like(t))


def test_no_kink_no_warning_and_the_probe_can_be_skipped():
    """Away from the kinks (y_i 1e-7 from one and more, and a smooth but sharply curved
    objective) the probe is silent and the gradient exact; check_solution=False skips it
    at a kink (autograd's one-sided value, as before)."""
    x = torch.tensor([[1.0 + 1e-7, 2.0, -3.0, 1.1]], dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (g,) = torch.autograd.grad(_SoftThreshold()(x).sum(), x)

    class SharpHuber(DeclarativeNode):  # ½‖y − x‖² + Σ sqrt(y² + 1e-4): smooth, curvature 1e2
        def objective(self, x, y):
            return 0.5 * ((y - x) ** 2).sum(-1) + torch.sqrt(y * y + 1e-4).sum(-1)

        def solve(self, x):  # bisection on the increasing y − x + y / sqrt(y² + ε), root within x ± 1
            lo, hi = x - 1.0, x + 1.0
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                up = mid - x + mid / torch.sqrt(mid * mid + 1e-4) > 0
                lo, hi = torch.where(up, lo, mid), torch.where(up, mid, hi)
            return 0.5 * (lo + hi)

    xs = torch.tensor([[0.3, 2.0, -3.0, 1.02]], dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        check_gradients(SharpHuber(), xs)
    torch.testing.assert_close(g, torch.ones(1, 4, dtype=DT), rtol=0, atol=1e-12)  # diag(|x| > 1)
    x0 = torch.tensor([[0.0, 2.0, -3.0]], dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (g0,) = torch.autograd.grad(_SoftThreshold(check_solution=False)(x0).sum(), x0)
    torch.testing.assert_close(g0, torch.ones_like(g0))  # autograd's one-sided choice, unchecked


def test_no_kink_for_a_small_solution_beside_a_large_residual():
    """Least squares whose data lie mostly outside range(A): the residual is O(1), the
    solution 1e-3 to 6e-7. The probe's floor was measured in eps of ‖∇_y f‖ (0 at the
    optimum) while the rounding of ∇_y L at y ± δu is that of its terms (|Aᵀ||Ay − d|):
    the smallest solution was flagged and its gradient zeroed (0.36 off pinv(A))."""

    class LeastSquaresFit(DeclarativeNode):
        def objective(self, A, d, y):
            return ((A @ y.unsqueeze(-1)).squeeze(-1) - d).pow(2).sum(-1)

        def solve(self, A, d):
            return torch.linalg.lstsq(A, d.unsqueeze(-1)).solution.squeeze(-1)

    gen = _gen(5)
    A = torch.randn(3, 8, 3, dtype=DT, generator=gen)
    Q, _ = torch.linalg.qr(A)
    r = torch.randn(3, 8, dtype=DT, generator=gen)
    r = r - (Q @ (Q.mT @ r.unsqueeze(-1))).squeeze(-1)
    d = (r + torch.tensor([1.0, 1e-3, 1e-6], dtype=DT)[:, None] * torch.randn(3, 8, dtype=DT, generator=gen))
    d.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (g,) = torch.autograd.grad(LeastSquaresFit()(A, d).sum(), d)
    torch.testing.assert_close(g, torch.linalg.pinv(A).sum(-2), rtol=0, atol=1e-12)


def test_no_kink_near_one_in_float32_backward():
    """implicit_dtype=float32: soft-thresholding (λ = 0.5) at x = (2, 0.5001, -1.5) has
    y₁ = 1e-4, 800 float32 ulps of ‖y‖ from the kink; a probe step of 1e4 eps (1.2e-3 ‖y‖)
    crossed it and zeroed the gradient, for a true (1, 1, 1)."""

    class HalfThreshold(DeclarativeNode):
        def objective(self, x, y):
            return 0.5 * ((y - x) ** 2).sum(-1) + 0.5 * y.abs().sum(-1)

        def solve(self, x):
            return torch.sign(x) * torch.clamp(x.abs() - 0.5, min=0.0)

    x = torch.tensor([[2.0, 0.5001, -1.5]], dtype=torch.float32, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (g,) = torch.autograd.grad(HalfThreshold(implicit_dtype=torch.float32)(x).sum(), x)
    torch.testing.assert_close(g, torch.ones_like(g), rtol=0, atol=1e-5)


class _Softmax(DeclarativeNode):
    """argmin −xᵀy + Σ y log y s.t. Σ y = 1: softmax(x), smooth for every y > 0."""

    def objective(self, x, y):
        return (-x * y + y * torch.log(y)).sum(-1)

    def equality_constraints(self, x, y):
        return y.sum(-1, keepdim=True) - 1.0

    def solve(self, x):
        return torch.softmax(x, -1)


@pytest.mark.parametrize("dtype, spread", [(torch.float64, 8.0), (torch.float32, 4.0)])
def test_no_kink_where_the_curvature_changes_within_the_probe_step(dtype, spread):
    """Softmax entries a few probe steps above 0 (1e-14 ‖y‖ in float64, 1e-5 in float32
    with implicit_dtype=float32): the curvature 1/y_i of y log y changes within the step,
    so one step's difference departed from 2δHu by O(1) and 44 (float64) and 210 (float32)
    of 2000 smooth elements were flagged, their gradients zeroed (0.48 and 0.59 off). The
    reference is autograd through torch.softmax."""
    gen = _gen(0)
    x = (spread * torch.randn(2000, 8, dtype=torch.float64, generator=gen)).to(dtype).requires_grad_()
    v = torch.randn(2000, 8, dtype=torch.float64, generator=gen).to(dtype)
    (want,) = torch.autograd.grad((torch.softmax(x.double(), -1) * v.double()).sum(), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (g,) = torch.autograd.grad((_Softmax(implicit_dtype=dtype)(x) * v).sum(), x)
    torch.testing.assert_close(g, want, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)


def test_a_kink_with_an_equality_met_to_rounding_warns_and_does_not_raise():
    """½‖y − x‖² + |y_0| s.t. Σy = 1 at y_0 = 0 (the kink), the equality met to 1e-13: the
    flagged element's constraint rows were zeroed before the solution check, which then
    measured the rounding-level residual against zero rows and raised SolverError
    ("feasibility residual 4.5e+294") instead of the documented warning and zero gradient."""

    class L1Sum(DeclarativeNode):
        def objective(self, x, y):
            return 0.5 * ((y - x) ** 2).sum(-1) + y[..., 0].abs()

        def equality_constraints(self, x, y):
            return y.sum(-1, keepdim=True) - 1.0

        def solve(self, x):  # y_0 = 0 at x_0 = ν, the threshold; y_j = x_j − ν
            nu = (x[..., 1] + x[..., 2] - 1) / 2
            return torch.stack([torch.zeros_like(nu), x[..., 1] - nu, x[..., 2] - nu + 1e-13], -1)

    x = torch.tensor([[-0.1, 0.5, 0.3]], dtype=DT, requires_grad=True)
    with pytest.warns(GradientWarning, match="kink"):
        (g,) = torch.autograd.grad(L1Sum()(x)[:, 1].sum(), x)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("scale", [1e-14, 1e-16])
def test_constraints_in_small_units_keep_their_multipliers(scale):
    """y ≥ 0 written as −1e-14·y ≤ 0 beside Σy = 1: the multipliers' pinv cut those rows
    off relative to the equality's (a stationarity residual of 0.33 at an exact solution,
    SolverError). Rows are taken at unit length first; the gradient is the simplex
    projection's, (I − s sᵀ/|S|) on the support S (closed form)."""
    Simplex = _simplex_node(scale)
    gen = torch.Generator().manual_seed(0)
    x = (0.5 * torch.randn(3, 5, dtype=DT, generator=gen)).requires_grad_()
    w = torch.randn(3, 5, dtype=DT, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        y = Simplex()(x)
        (g,) = torch.autograd.grad(y, x, w)
    support = (y.detach() > 0).to(DT)
    expect = support * (w - (support * w).sum(-1, keepdim=True) / support.sum(-1, keepdim=True))
    torch.testing.assert_close(g, expect, atol=1e-12, rtol=0)


class _Quad(DeclarativeNode):
    """y = argmin ½uᵀHu − xᵀu = H⁻¹x (closed form), H a buffer."""

    def __init__(self, H, **kw):
        super().__init__(**kw)
        self.register_buffer("H", H)

    def objective(self, x, y):
        return 0.5 * (y * (y @ self.H.T)).sum(-1) - (x * y).sum(-1)

    def solve(self, x):
        return torch.linalg.solve(self.H, x.T).T


def test_cg_answer_beyond_its_error_bound_goes_to_the_dense_solve():
    # H of condition 7.5e9 (below the ill-conditioning warning): CG's relative residual
    # of 1e-10 left the gradient 29 % off, silently. cond·tol > 1e-4 now sends the
    # element to the dense solve (error ~cond·eps); the gradient is H⁻¹v.
    n = 60
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.linspace(1, 1.5, n - 1, dtype=torch.float64), torch.tensor([2e-10], dtype=torch.float64)])
    H = (Q * lam) @ Q.T
    c = torch.ones(1, n, dtype=torch.float64)
    c[0, -1] = 5e-11 * c.norm()
    v, exact = c @ Q.T, (c / lam) @ Q.T
    x = torch.randn(1, n, generator=g, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _Quad(0.5 * (H + H.T), linear_solver="cg")(x).backward(v)
    assert float((x.grad - exact).norm() / exact.norm()) < 1e-5


@pytest.mark.parametrize("scale", [1e160, 1e-200])
def test_cg_right_hand_side_of_extreme_size(scale):
    # CG's squared norms of v overflowed (1e160) or underflowed (1e-200), and the system
    # counted as solved at w = 0: a zero gradient, silently.
    H = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    x = torch.ones(1, 3, dtype=torch.float64, requires_grad=True)
    v = torch.full((1, 3), scale, dtype=torch.float64)
    _Quad(H, linear_solver="cg")(x).backward(v)
    torch.testing.assert_close(x.grad, v / torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64), rtol=1e-12, atol=0)


class _TwoPlanes(DeclarativeNode):
    """argmin ½‖u − x‖² s.t. u₀ = d₀ and s·(u₀ + δ u₁ − d₁) = 0: y = (d₀, (d₁ − d₀)/δ, x₂, …)."""

    def __init__(self, delta, s=1.0, **kw):
        super().__init__(**kw)
        self.delta, self.s = delta, s

    def objective(self, x, d, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, d, y):
        return torch.stack([y[:, 0] - d[:, 0], self.s * (y[:, 0] + self.delta * y[:, 1] - d[:, 1])], -1)

    def solve(self, x, d):
        y = x.clone()
        y[:, 0], y[:, 1] = d[:, 0], (d[:, 1] - d[:, 0]) / self.delta
        return y


@pytest.mark.parametrize("solver", ["cg", "dense"])
def test_nearly_parallel_constraints_and_constraint_units(solver):
    # Two constraints 1e-7 from parallel: CG's Gram inverse cut its eigenvalues σ² at
    # rcond and dropped one (grad_d 0.42 against ±7e6, silently). A constraint written
    # in units of 1e-20 lost its row in the forward mode's pseudo-inverse (ẏ₀ = 0, not
    # 1). Exact: grad_d = (v₀ − v₁/δ, v₁/δ); ẏ = (ḋ₀, (ḋ₁ − ḋ₀)/δ, ẋ₂, …).
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, generator=g, dtype=torch.float64, requires_grad=True)
    d = torch.randn(1, 2, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 5, generator=g, dtype=torch.float64)
    _TwoPlanes(1e-7, linear_solver=solver)(x, d).backward(v)
    want = torch.stack([v[:, 0] - v[:, 1] / 1e-7, v[:, 1] / 1e-7], -1)
    torch.testing.assert_close(d.grad, want, rtol=1e-6, atol=0)
    for s in (1e-20, 1e20):
        with fwAD.dual_level():
            y = _TwoPlanes(1.0, s, linear_solver=solver)(fwAD.make_dual(x.detach(), torch.ones_like(x)),
                                                         fwAD.make_dual(d.detach(), torch.tensor([[1.0, 2.0]],
                                                                                                 dtype=torch.float64)))
            tangent = fwAD.unpack_dual(y).tangent
        torch.testing.assert_close(tangent, torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64))


def test_cg_options_and_custom_solver_results_are_checked():
    H = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    with pytest.raises(OptionError, match="cg rcond must be a number in"):
        linear_solvers.solve_kkt_cg(lambda D: D @ H, None, None, torch.ones(1, 3, dtype=torch.float64), rcond=2.0)
    x = torch.ones(1, 3, dtype=torch.float64, requires_grad=True)
    node = _Quad(H, linear_solver=lambda hvp, A, inactive, v: (torch.ones_like(v, dtype=torch.int64), None))
    with pytest.raises(DTypeError, match="w must be real floating point, got torch.int64"):
        node(x).sum().backward()


def test_dense_positive_definite_system_is_not_called_singular():
    # Condition 5e12 at n = 300: within float64's reach (LU error ~ cond·eps), but the
    # old threshold 10·n·eps called it singular and its pseudo-inverse solution dropped
    # the soft direction (13 % off at n = 3000, with a "singular ... not locally unique"
    # warning). Now: the ill-conditioning warning and the LU solution.
    n = 300
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(-10, 2.7, n, dtype=torch.float64)
    H = (Q * lam) @ Q.T
    c = torch.ones(1, n, dtype=torch.float64)
    exact = (c / lam) @ Q.T
    x = torch.zeros(1, n, dtype=torch.float64, requires_grad=True)
    with pytest.warns(GradientWarning, match="ill-conditioned"):
        _Quad(0.5 * (H + H.T), linear_solver="dense")(x).backward(c @ Q.T)
    assert float((x.grad - exact).norm() / exact.norm()) < 1e-2


def test_float32_backward_warns_where_it_keeps_fewer_than_three_digits():
    # implicit_dtype=float32 on a system of condition 1e6: gradients 3 % off, and the
    # 1e10 threshold could never fire in float32 (the singular test, size·eps, fires
    # first). The threshold is now at most 1e-3/eps of the solve's dtype.
    n = 6
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    H = (Q * torch.logspace(0, 6, n, dtype=torch.float64)) @ Q.T
    x = torch.randn(1, n, generator=g, dtype=torch.float64, requires_grad=True)
    with pytest.warns(GradientWarning, match="ill-conditioned"):
        _Quad(0.5 * (H + H.T), implicit_dtype=torch.float32)(x).sum().backward()
    with warnings.catch_warnings():  # float64 keeps 10 digits there: quiet
        warnings.simplefilter("error", GradientWarning)
        _Quad(0.5 * (H + H.T))(x).sum().backward()


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_float32_backward_solves_a_system_float32_resolves(solver):
    # implicit_dtype=float32, n = 20, condition 1e6 < 1/eps = 8.4e6: the singularity test
    # n·eps (2.4e-6) called it singular ("not locally unique") and the pseudo-inverse
    # gradient was 81 % off, where a plain float32 solve is 0.3 % off (CG's dense fallback
    # the same). Reference: H⁻¹v in float64 for the float32 H (condition 1e6: ~1e-10 there).
    n = 20
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(0), dtype=DT))
    H = ((Q * torch.logspace(0, 6, n, dtype=DT)) @ Q.T).float()
    H = 0.5 * (H + H.T)
    x = torch.randn(4, n, generator=_gen(1)).requires_grad_(True)
    v = torch.randn(4, n, generator=_gen(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (_Quad(H, implicit_dtype=torch.float32, linear_solver=solver)(x) * v).sum().backward()
    said = [str(w.message) for w in caught if issubclass(w.category, GradientWarning)]
    assert said and all("ill-conditioned" in m and "singular" not in m for m in said)
    want = torch.linalg.solve(H.double(), v.double().T).T
    assert float((x.grad.double() - want).norm() / want.norm()) < 1e-2


class _Shrunk(DeclarativeNode):
    """y = x / s: argmin_y ½‖y − x/s‖² (dy/dx = 1/s, closed form)."""

    def __init__(self, s: float, **kw) -> None:
        super().__init__(**kw)
        self.s = s

    def objective(self, x, y):
        return 0.5 * ((y - x / self.s) ** 2).sum(-1)

    def solve(self, x):
        return x / self.s


@pytest.mark.parametrize("s,name,over", [(1e10, "x", 6), (1e-10, "_Shrunk.solve's output y", 6)],
                         ids=["input", "solution"])
def test_float32_backward_refuses_float64_data_beyond_its_range(s, name, over):
    # float64 data of 1e40 (or a solution of 1e40) with implicit_dtype=float32: the casts
    # made them Inf, the gradient came back zero (closed form: 1/s per entry) under a warning
    # that blamed the objective ("not twice differentiable"). Now an InputError names them.
    x = torch.full((2, 3), 1e40 if s > 1 else 1e30, dtype=torch.float64, requires_grad=True)
    y = _Shrunk(s, implicit_dtype=torch.float32)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no misleading warning on the way
        with pytest.raises(InputError, match=rf"^{name} must fit the backward's implicit_dtype torch.float32 .*"
                                             rf"±3\.40282e\+38; got {over} of 6 .*pass implicit_dtype=torch.float64"):
            y.sum().backward()
    (g,) = torch.autograd.grad(_Shrunk(s)(x).sum(), x)  # float64 (the default): the closed form
    torch.testing.assert_close(g, torch.full_like(x, 1 / s))
