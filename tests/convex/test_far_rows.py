"""far_rows: a huge inactive bound no longer sets the batched path's unit.

The program is a projection onto the nonnegative orthant with an extra bound of size R
that is inactive for the seeded inputs (|x| < 3): its solution is y = relu(x) and
dy/dx = diag(x > 0), whatever R (closed form, the reference of every test here)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import cvxpy as cp
import pytest
import torch

import convexddn as cddn
from convexddn.convex.batched import BatchedProgram
from convexddn.convex.equilibration import equilibrate
from convexddn.convex.far_rows import objective_size

sys.path.insert(0, str(Path(__file__).parent))
from test_per_element import _simplex_projection  # noqa: E402  (the closed form, by one sort)
from test_reliability import _scaled_qp  # noqa: E402

F64 = torch.float64
N, B = 6, 8
BOUNDS = {
    "norm": lambda y, R: [y >= 0, cp.norm(y, 2) <= R],  # CVXPY adds a cost-free t: norm(y) <= t, t <= R
    "upper": lambda y, R: [y >= 0, y <= R],
    "sum": lambda y, R: [y >= 0, cp.sum(y) <= R],
}


def _problem(kind: str, R: float):
    x = cp.Parameter(N, name="x")
    y = cp.Variable(N, name="y")
    return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), BOUNDS[kind](y, R)), x, y


def _inputs(dtype=F64) -> torch.Tensor:
    X = torch.randn(B, N, dtype=F64, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert X.abs().max() < 3 and X.abs().min() > 5e-3  # the bound inactive, every x_i away from the kink
    return X


@pytest.mark.parametrize("kind", sorted(BOUNDS))
@pytest.mark.parametrize("R", [1e2, 1e3, 1e6, 1e10, 1e12])
def test_convex_layer_huge_inactive_bound_batched(kind, R):
    """Before: relu(x) 5e-10 (norm, R = 1e3) to 7e-8 (norm, 1e6; sum, 1e12: 1.7e-8) off on the
    batched path, and under norm(y) <= 1e10 three elements fell back per element with a
    SolverWarning and a false GradientWarning; now y to rounding and dy/dx = diag(x > 0),
    every element certified by the batched iterations, without a warning."""
    prob, x, y = _problem(kind, R)
    layer = cddn.ConvexLayer(prob, [x], [y])
    X = _inputs().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Y = layer(X)
        G, = torch.autograd.grad(Y.sum(), X)
    assert layer.last_solve.solvers == ["batched"] * B  # (no second opinion, no per-element fallback)
    torch.testing.assert_close(Y, X.detach().clamp_min(0), atol=4e-15, rtol=0)
    torch.testing.assert_close(G, (X.detach() > 0).to(F64), atol=1e-13, rtol=0)


@pytest.mark.parametrize("kind", sorted(BOUNDS))
@pytest.mark.parametrize("R", [1e3, 1e6])
def test_convex_layer_huge_inactive_bound_agrees_with_per_element(kind, R):
    """The batched path agrees with the per-element path (Clarabel, then its Newton polish)
    to rounding: before, 5e-10 to 7e-8 apart."""
    prob, x, y = _problem(kind, R)
    X = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the per-element path's own notes are not what this is about)
        want = cddn.ConvexLayer(prob, [x], [y], solver="Clarabel")(X)
    got = cddn.ConvexLayer(prob, [x], [y])(X)
    torch.testing.assert_close(want, X.clamp_min(0), atol=1e-12, rtol=0)  # (the reference is right)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("R", [1e4, 1e6])
def test_batched_program_huge_inactive_bound_float32(R):
    """Solved in float32: before, under norm(y) <= 1e4 two elements of eight and at 1e6 all
    eight ended in numerical trouble (up to 20 off); now all solved to float32 rounding."""
    prob, x, y = _problem("norm", R)
    program = BatchedProgram(prob, [x], [y], dtype=torch.float32, tol=1e-6, tol_accept=1e-6, tol_error=1e-4)
    X = _inputs(torch.float32)
    (Y,), info = program(X)
    assert info.solved.all()
    torch.testing.assert_close(Y, X.clamp_min(0), atol=4e-7, rtol=0)


def test_objective_size_ignores_cost_free_variables():
    """The epigraph t of norm(y) <= t, t <= R sits anywhere in [‖y‖, R] (~R/2 at the
    interior point): the solution's size is read from the variables with a cost only."""
    prob, x, y = _problem("norm", 1e10)
    program = BatchedProgram(prob, [x], [y])
    data = program.data
    P, q, A, b, _ = data.fill(data.parameter_vector([_inputs()], B))
    d = equilibrate(P, q, A, b, data.layout)
    assert bool(((P != 0).any(1) | (q != 0)).all(0).logical_not().any())  # (a cost-free column exists)
    costed = (d.P != 0).any(1) | (d.q != 0)
    xs = torch.full_like(d.q, 0.5).masked_fill(costed, 1e-9)  # cost-free columns at 0.5, the others at 1e-9
    size = objective_size(d, xs)
    torch.testing.assert_close(size, torch.full((B,), 1e-9, dtype=F64))


@pytest.mark.parametrize("scale", [1e7, 3e7])
def test_convex_layer_badly_scaled_qp_certified_by_batched_iterations(scale):
    """min ½‖s·y‖² + s²y₁ − s²y₂ + y₃ s.t. y₁ ≤ s², y₃ ≤ 1 (tests/convex/test_reliability.py's
    _scaled_qp): the far bound y₁ ≤ s² inflated σ and the batched iterations left it to
    Clarabel's second opinion; relaxed, they certify it themselves. y* = (−1, 1, −1/s²),
    dy/dq = −I/s² (constraints inactive)."""
    layer, data, want = _scaled_qp(scale)
    q = data[1].clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(data[0], q, data[2], data[3])
        w = torch.tensor([0.3, -1.2, 2.0], dtype=F64)
        (g,) = torch.autograd.grad(y @ w, q)
    assert layer.last_solve.solvers == ["batched"] and layer.last_solve.statuses == ["solved"]
    torch.testing.assert_close(y, want, atol=1e-15, rtol=0)
    torch.testing.assert_close(g * scale ** 2, -w, atol=1e-12, rtol=0)


def test_convex_layer_far_bound_mixed_batch():
    """A batch where the norm bound r is huge (inactive) for some elements and active for
    others: y = relu(x) min(1, r / ‖relu(x)‖) (the projection onto the ball ∩ orthant, closed
    form). The relaxed elements are solved again apart; the others keep their first solve.
    Before: the elements at r = 1e10, 1e12 went per element (SolverWarning), r = 1e6 was
    9e-10 off."""
    x = cp.Parameter(N, name="x")
    r = cp.Parameter(nonneg=True, name="r")
    y = cp.Variable(N, name="y")
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [y >= 0, cp.norm(y, 2) <= r])
    layer = cddn.ConvexLayer(prob, [x, r], [y])
    X = torch.randn(B, N, dtype=F64, generator=torch.Generator().manual_seed(1))
    R = torch.tensor([1e10, 0.5, 1e3, 0.1, 1e12, 1.0, 1e6, 3.0], dtype=F64)
    relu = X.clamp_min(0)
    want = relu * torch.clamp(R[:, None] / relu.norm(dim=1, keepdim=True), max=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Y = layer(X, R)
    assert layer.last_solve.solvers == ["batched"] * B
    torch.testing.assert_close(Y, want, atol=4e-15, rtol=0)


@pytest.mark.parametrize("kind", ["norm", "upper"])
@pytest.mark.parametrize("R", [1e3, 1e10, 1e12])
def test_convex_layer_far_bound_beside_an_equality(kind, R):
    """The simplex projection (sum(y) == 1, y >= 0) beside a huge inactive bound: the
    equality takes the iterations to the null-space form, and in the unit R its right-hand
    side is ~1/R, so the first point's multipliers came out ~1 (a dual direction that costs
    ~nothing there) beside a solution of 1e-13. Before: 4.3e-11 off (norm, R = 1e3), 1e-8
    (upper, 1e10), the rest per element with a SolverWarning; now to rounding, batched."""
    x = cp.Parameter(N, name="x")
    y = cp.Variable(N, name="y")
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [cp.sum(y) == 1] + BOUNDS[kind](y, R))
    layer = cddn.ConvexLayer(prob, [x], [y])
    X = 2 * torch.randn(B, N, dtype=F64, generator=torch.Generator().manual_seed(3))
    want = torch.stack([torch.from_numpy(_simplex_projection(v.numpy())) for v in X])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Y = layer(X)
    assert layer.last_solve.solvers == ["batched"] * B
    torch.testing.assert_close(Y, want, atol=4e-15, rtol=0)
