"""Exact zeros the structure of a tridiagonal system forces in its solution
(:func:`convexddn.nodes._tridiagonal_scaled.snap_zeros`): partial pivoting is normwise, not
componentwise, backward stable, and left rounding (1.8e-15, 2e-31 refined) where the exact
answer is 0, whose row's componentwise backward error is then 1: well-conditioned systems raised
"too ill-conditioned" and their derivatives warned "inaccurate". Every value here against the
exact solution or a dense float64 solve."""
from __future__ import annotations

import warnings

import pytest
import torch

from convexddn.errors import GradientWarning, SolverError
from convexddn.functional import tridiagonal_solve
from convexddn.nodes import _tridiagonal_solver as _solver
from convexddn.nodes._tridiagonal_solver import solve_checked

F64 = torch.float64


def _dense(diag, lower, upper):
    return torch.diag_embed(diag) + torch.diag_embed(lower, -1) + torch.diag_embed(upper, 1)


def _decoupled():
    """cond₂ 71; row 0 is 4 x₀ = 0 (upper[0] = 0), its sub-diagonal entry -1.5 larger than 4's
    equilibrated size (a row interchange): exact solution (0, 15, 12, -5, -20, -33)."""
    x = torch.tensor([0.0, -3.0, -3.0, -2.0, -2.0, -3.0], dtype=F64)
    return x + 4, 0.5 * x[1:], 0.5 * x[:-1], x.clone()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decoupled_zero_row_is_solved_exactly(dtype):
    diag, lower, upper, rhs = (t.to(dtype) for t in _decoupled())
    want = torch.tensor([0.0, 15.0, 12.0, -5.0, -20.0, -33.0], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = tridiagonal_solve(diag, lower, upper, rhs)
        # two right-hand sides, and beside a dominant system in one batch
        X = tridiagonal_solve(diag, lower, upper, torch.stack([rhs, 2 * rhs], -1))
        B = tridiagonal_solve(torch.stack([diag, diag + 10]), torch.stack([lower, lower]),
                              torch.stack([upper, upper]), torch.stack([rhs, rhs]))
    assert x[0] == 0 and X[0, 0] == 0 and X[0, 1] == 0 and B[0, 0] == 0
    torch.testing.assert_close(x, want, rtol=4 * torch.finfo(dtype).eps, atol=0)
    torch.testing.assert_close(X, torch.stack([want, 2 * want], -1), rtol=4 * torch.finfo(dtype).eps, atol=0)


def test_the_derivatives_solve_has_the_same_zeros():
    # The forward on Aᵀ (lower and upper swapped), the upstream gradient g = (0, -3, ...): the
    # derivative solves A w = g, the decoupled row's. It warned "did not reach working accuracy".
    diag, lower, upper, g = _decoupled()
    d, lo, up = (t.clone().requires_grad_() for t in (diag, upper, lower))
    r = torch.linspace(-1, 1, 6, dtype=F64).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        y = tridiagonal_solve(d, lo, up, r)
        (grad_r,) = torch.autograd.grad((y * g).sum(), r)
    want = torch.linalg.solve(_dense(diag, lower, upper), g)
    assert grad_r[0] == 0
    torch.testing.assert_close(grad_r, want, rtol=1e-14, atol=1e-14)


def test_zero_diagonal_forces_a_zero():
    # Row 0: 0·x₀ + c₀ x₁ = 0, so x₁ = 0 (cond₂ 168, from a fuzz of sparse systems).
    diag = torch.tensor([0.0, 1.0885348864443611, 1.9921694387223072, 1.6470652942655635, -0.10376366968474426])
    lower = torch.tensor([-0.056644246278762946, -1.5224784261811797, -0.22296988919394886, 0.47163648162181315])
    upper = torch.tensor([0.287346781699631, -0.12936770650995644, 0.0, -0.8959259546712709])
    rhs = torch.tensor([0.0, 0.0, -1.5544398844790717, 1.1300546567180514, 0.6667449753721292])
    diag, lower, upper, rhs = (t.to(F64) for t in (diag, lower, upper, rhs))
    x = tridiagonal_solve(diag, lower, upper, rhs)
    assert x[1] == 0
    torch.testing.assert_close(x, torch.linalg.solve(_dense(diag, lower, upper), rhs), rtol=1e-13, atol=1e-13)


def test_the_snapped_route_is_replayed():
    # The route records the snap, and its replay (the unchecked path of torch.func's batched
    # derivatives) gives the same answer, bit for bit; jacrev's Jacobian in the rhs is A⁻¹.
    diag, lower, upper, rhs = _decoupled()
    A = tuple(t[None] for t in (diag, lower, upper))
    x1, route = solve_checked(*A, rhs[None, :, None], "t", (1,))
    assert int(route) >= _solver.SNAPPED
    x2, _ = solve_checked(*A, rhs[None, :, None], "t", (1,), route=route, check=False)
    assert torch.equal(x1, x2) and x2[0, 0, 0] == 0
    J = torch.func.jacrev(lambda r: tridiagonal_solve(diag, lower, upper, r))(rhs)
    torch.testing.assert_close(J, torch.linalg.inv(_dense(diag, lower, upper)), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_well_conditioned_systems_never_raise(dtype):
    """Random systems with 30 % exact zeros (A and the rhs), condition number below 1e3: every one
    solved, to the dense solve's accuracy. Before, 15 of 779 raised "too ill-conditioned"."""
    gen = torch.Generator().manual_seed(0)
    solved = 0
    for _ in range(250):
        n = int(torch.randint(2, 12, (), generator=gen))
        b, a, c, d = (torch.randn(k, dtype=F64, generator=gen) * (torch.rand(k, generator=gen) > 0.3)
                      for k in (n, n - 1, n - 1, n))
        A = _dense(b, a, c)
        if not torch.linalg.cond(A) < 1e3:
            continue
        x = tridiagonal_solve(*(t.to(dtype) for t in (b, a, c, d)))
        want = torch.linalg.solve(A, d)
        tol = 1e-11 if dtype == torch.float64 else 1e-3
        torch.testing.assert_close(x.double(), want, rtol=tol, atol=tol * float(want.abs().max()))
        solved += 1
    assert solved > 100
