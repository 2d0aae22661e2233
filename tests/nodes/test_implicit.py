"""Tests of convexddn.nodes.implicit: DeclarativeNode and the generic implicit backward.

Every expected value comes from a closed form written out here (or from autograd
through an independent closed-form expression), never from the code under test.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import convexddn.nodes.linear_solvers as linear_solvers
from convexddn.errors import (
    DTypeError,
    GradientWarning,
    NonFiniteError,
    OptionError,
    ShapeError,
    SolverError,
)
from convexddn.nodes.declarative import DeclarativeNode
from convexddn.nodes.implicit import declarative_vjp
from convexddn.nodes.linear_solvers import solve_kkt_dense

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
        Qs = 0.5 * (self.Q + self.Q.T)
        return torch.linalg.solve(Qs, x.T).T


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
    node = SumToOne()
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
    grad = _vjp(SumToOne(), x, v)  # m + p = 71 > 64
    torch.testing.assert_close(grad, v - v.mean(-1, keepdim=True))
    with pytest.raises(AssertionError, match="dense solve used"):
        _vjp(SumToOne(dense_max=100), x, v)


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
    with pytest.raises(ShapeError, match="at least one dimension"):
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
        Wrong()(torch.randn(2, 3, 4, dtype=DT))
    assert info.value.indices == [(0, 1), (1, 1)]
    with pytest.raises(SolverError, match="NaN") as info:
        Wrong()(torch.randn(4, 4, dtype=DT)[0])  # unbatched: x of shape (4,)
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
            return y.sum(-1) - 1

    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    with pytest.raises(ShapeError, match="equality_constraints"):
        Wrong()(x).sum().backward()


def test_invalid_options():
    with pytest.raises(OptionError, match="linear_solver"):
        Mean(linear_solver="lu")
    with pytest.raises(OptionError, match="active_tol"):
        Mean(active_tol=0.0)


def test_missing_methods():
    with pytest.raises(NotImplementedError, match="solve"):
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
