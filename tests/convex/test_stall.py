"""The backward's check that its refined KKT solve reached the exact system (:mod:`convexddn.convex.stall`).

Expected gradients: the closed form of the projection onto an affine set,
:math:`\\partial \\mathbf 1^\\top y / \\partial f = \\mathbf 1^\\top E^\\top (E E^\\top)^{-1}`,
evaluated in 40-digit arithmetic (mpmath).
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import mpmath
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.errors import GradientWarning


def _nearly_parallel(d: float):
    """min ‖y − c‖² s.t. E y = f, y ≥ −5 (inactive), rows 0 and 1 of E parallel to ``d``."""
    n, p = 5, 3
    E, f, c, y = cp.Parameter((p, n)), cp.Parameter(p), cp.Parameter(n), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - c)), [E @ y == f, y >= -5])
    rng = np.random.default_rng(1)
    Et, r, ft, c0 = rng.standard_normal((p, n)), rng.standard_normal(n), 0.3 * rng.standard_normal(p), \
        rng.standard_normal(n)
    Et[1], ft[1] = Et[0] + d * r, ft[0] + d * 0.5
    with mpmath.workdps(40):
        Em = mpmath.matrix(Et.tolist())
        exact = np.array([float(v) for v in (Em.T * mpmath.inverse(Em * Em.T)).T * mpmath.matrix([1] * n)])
    return cddn.ConvexLayer(prob, parameters=[E, f, c], variables=[y]), Et, ft, c0, exact


def _grad_f(layer, Et, ft, c0):
    f = torch.tensor(ft, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(torch.tensor(Et), f, torch.tensor(c0)).sum().backward()
    return f.grad.numpy(), [w for w in caught if issubclass(w.category, GradientWarning)]


@pytest.mark.parametrize("d", [1e-5, 1e-6])
def test_nearly_parallel_equality_rows_get_the_exact_gradient(d):
    """Rows 1e-6 apart: the Schur complement's smallest eigenvalue (~d²) is below the
    factorisation's δ, refinement gains 1.7e-4 a step at a residual of 2e-7, and the
    backward returned (657, −657, −0.73) for (9.75e5, −9.75e5, −0.28) without a warning.
    The stall is detected and the dense solve gives the closed form."""
    layer, Et, ft, c0, exact = _nearly_parallel(d)
    got, warned = _grad_f(layer, Et, ft, c0)
    assert layer.last_solve.solvers == ["batched"]
    assert not warned
    assert np.abs(got - exact).max() <= 1e-5 * np.abs(exact).max(), (got, exact)


@pytest.mark.parametrize("d", [1e-7, 1e-8])
def test_nearly_parallel_equality_rows_beyond_resolution_are_warned(d):
    """Rows 1e-7 and 1e-8 apart (gradients 1e7, 1e8; the derivative system singular to
    working precision at 1e-8): the gradient is either the closed form or warned about
    (it was 66 and 3.4, silently)."""
    layer, Et, ft, c0, exact = _nearly_parallel(d)
    got, warned = _grad_f(layer, Et, ft, c0)
    assert warned or np.abs(got - exact).max() <= 1e-4 * np.abs(exact).max(), (got, exact)


class _Unscaled:
    scaling = None


def _corrections(*sizes: float) -> tuple:
    """A correction ``(x, z_E, ẑ)`` for each size (a batch of one; the size in x, the rest smaller)."""
    return tuple((torch.tensor([[[s], [s / 4]]], dtype=torch.float64), torch.zeros(1, 0, 1, dtype=torch.float64),
                  torch.tensor([[[-s / 2]]], dtype=torch.float64)) for s in sizes)


@pytest.mark.parametrize("before,last,expected", [
    (1e-3, 1e-4, 1e-4 * 0.1 / 0.9),  # contracting by 0.1: the error left is a ninth of the last step
    (2e-6, 1e-6, 1e-6),  # by one half: as large as the last step
    (1e-9, 3e-9, 99 * 3e-9),  # not contracting: the rate taken as 0.99
])
def test_refinement_error_is_the_geometric_tail_of_the_last_two_corrections(before, last, expected):
    """(c_k ρ/(1 − ρ) with ρ = ‖c_k‖/‖c_{k−1}‖, relative to the answer's size, 2 here)."""
    from convexddn.convex.stall import refinement_error
    prev, step = _corrections(before, last)
    got = refinement_error(_Unscaled(), prev, step, torch.tensor([2.0], dtype=torch.float64))
    assert got.item() == pytest.approx(expected / 2, rel=1e-12)


def test_refinement_error_without_a_step_is_zero():
    from convexddn.convex.stall import refinement_error
    (prev,) = _corrections(1.0)
    assert refinement_error(_Unscaled(), prev, None, torch.tensor([1.0, 3.0], dtype=torch.float64)).tolist() == [0, 0]


def test_a_derivative_refined_to_its_residual_but_not_its_error_is_replaced_by_a_certified_one():
    """One element of the bench's constrained MPC (``mpc30``, seed 0, element 6): its derivative
    solve met its residual target with an answer 2.7e-7 off (the refinement's corrections still
    contracting, by ~0.2 a step), and its gradient was 4e-7 off central differences, silently,
    until 2026-12-07. Reference: Richardson-extrapolated central differences of ⟨g, y⟩ along a
    fixed random direction, taken at two step sizes that must agree with each other first. On one
    thread: the answer's last bits, and so how far that refinement stopped, follow the BLAS threads
    (on two the old answer happened to land 9e-9 off)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_mpc_element()
    finally:
        torch.set_num_threads(threads)


def _check_mpc_element() -> None:
    from convexddn.bench.cases.convex import CONVEX_PROBLEMS

    gen = torch.Generator().manual_seed(0)
    prob, params, variables, data = CONVEX_PROBLEMS["mpc30"][1](16, gen)
    g = torch.randn((16,) + tuple(variables[0].shape), dtype=torch.float64, generator=gen)[6:7]
    layer = cddn.ConvexLayer(prob, params, variables)
    point = [d[6:7].detach().clone() for d in data]
    args = [v.clone().requires_grad_(True) for v in point]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = torch.autograd.grad((layer(*args) * g).sum(), args)
    assert not [w for w in caught if issubclass(w.category, GradientWarning)]
    rng = torch.Generator().manual_seed(1)
    for _ in range(3):  # (the third direction: differences consistent to 6e-11 there)
        v = [torch.randn(p.shape, dtype=torch.float64, generator=rng) for p in point]

    def f(t: float) -> float:
        with torch.no_grad():
            return float((layer(*[p + t * w for p, w in zip(point, v)]) * g).sum())

    def richardson(h: float) -> float:
        c = [(f(k) - f(-k)) / (2 * k) for k in (h, h / 2)]
        return (4 * c[1] - c[0]) / 3

    fd, fd_half = richardson(1e-4), richardson(5e-5)
    assert abs(fd - fd_half) <= 1e-9 * abs(fd), "the differences disagree: the test lost its reference"
    got = sum(float((a * w).sum()) for a, w in zip(grads, v))
    assert abs(got - fd) <= 1e-8 * abs(fd), (got, fd)
