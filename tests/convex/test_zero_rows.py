"""Constraint rows that a parameter makes zero (:mod:`convexddn.convex.zero_rows`).

The projection :math:`y = \\arg\\min \\|y - x\\|^2` s.t. :math:`Ey = f` (or :math:`\\le`) with
:math:`E = [a; 0]`, :math:`a = (1, 1, 1)`, :math:`f = (1, 0)`, :math:`x = (1, 2, 3)`: the row
``0 = 0`` (``0 <= 0``) holds for every :math:`y`, and :math:`y = x - a(a^\\top x - 1)/3 =
(-2/3, 1/3, 4/3)`, :math:`\\partial y_0 / \\partial x = e_0 - a/3`. Moving :math:`E_1` to
:math:`\\epsilon e_0` adds :math:`y_0 = 0`: the solution jumps (checked with Clarabel below),
so no derivative in :math:`E_1` exists; with :math:`f_1 = 1` the inequality row ``0 <= 1`` is
inactive and stays so: its derivative is 0.
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from convexddn.convex import ConvexLayer
from convexddn.convex.equilibration import equilibrate
from convexddn.convex.symmetric_cones import ConeLayout
from convexddn.convex.zero_rows import ZERO_ROW, zero_rows
from convexddn.errors import GradientWarning

F64 = torch.float64
X = [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
# element 0: a regular second row (y1 = 0); element 1: a zero one
E = [[[1.0, 1, 1], [0, 1, 0]], [[1.0, 1, 1], [0, 0, 0]]]
ZERO_MESSAGE = "constraint row that is zero in this element"


def _problem(form: str, sense: str):
    x, y, Ep, f = cp.Parameter(3), cp.Variable(3), cp.Parameter((2, 3)), cp.Parameter(2)
    row = Ep @ y == f if sense == "eq" else Ep @ y <= f
    if form == "lp":  # (x as the cost; bounds make the LP bounded)
        return cp.Problem(cp.Minimize(x @ y), [row, y >= -1, y <= 1]), [x, Ep, f], [y]
    extra = [cp.norm(y, 2) <= 100] if form == "socp" else []  # (inactive)
    return cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [row] + extra), [x, Ep, f], [y]


def _backward(layer, f, requires=(True, True)):
    tx = torch.tensor(X, dtype=F64, requires_grad=True)
    tE = torch.tensor(E, dtype=F64, requires_grad=requires[0])
    tf = torch.tensor(f, dtype=F64, requires_grad=requires[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(tx, tE, tf)[:, 0].sum().backward()
    return tx.grad, tE.grad, tf.grad, [w.message for w in caught if issubclass(w.category, GradientWarning)]


def _projection_grad_x():
    """∂y_0/∂x of both elements (closed form: the projection onto the rows' affine set)."""
    out = []
    for Ei in E:
        C = np.array([r for r in Ei if np.any(r)])
        out.append((np.eye(3) - C.T @ np.linalg.solve(C @ C.T, C))[0])
    return torch.tensor(np.array(out))


def test_a_moved_zero_row_makes_the_solution_jump():
    """The premise, by Clarabel: E_1 = ±1e-6 e_0 moves y_0 from -2/3 to 0."""
    y = cp.Variable(3)
    for eps in (1e-6, -1e-6):
        row = np.array([[1.0, 1, 1], [eps, 0, 0]])
        cp.Problem(cp.Minimize(cp.sum_squares(y - np.array(X[0]))), [row @ y == [1.0, 0]]).solve(solver=cp.CLARABEL)
        assert abs(y.value[0]) < 1e-6
    cp.Problem(cp.Minimize(cp.sum_squares(y - np.array(X[0]))), [np.array(E[1]) @ y == [1.0, 0]]).solve(
        solver=cp.CLARABEL)
    assert abs(y.value[0] + 2 / 3) < 1e-6


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
@pytest.mark.parametrize("form, sense", [("qp", "eq"), ("qp", "le"), ("lp", "eq"), ("socp", "le")])
def test_a_zero_row_the_parameters_move_is_warned(form, sense, solver):
    """The batched backward gave a gradient in E_1 silently for the QP and LP forms (0 and
    (-0.157, 0.078, 0.078)), and named no reason for the SOCP form; the per-element path named
    none either. Now both name element 1 alone and why; ∂y_0/∂x stays the closed form's."""
    layer = ConvexLayer(*_problem(form, sense), solver=solver)
    gx, _, _, caught = _backward(layer, [[1.0, 0.0], [1.0, 0.0]])
    assert layer.last_solve.solvers == (["batched"] * 2 if solver == "auto" else ["Clarabel"] * 2)
    zero = [w for w in caught if ZERO_MESSAGE in str(w)]
    assert len(zero) == 1 and zero[0].elements == [(1,)]
    assert all(w.elements == [(1,)] for w in caught)
    if form != "lp":
        torch.testing.assert_close(gx, _projection_grad_x(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
def test_an_inactive_zero_row_has_a_zero_derivative(solver):
    """0 <= 1: inactive whatever E_1 does nearby; no warning, ∂/∂E_1 = ∂/∂f_1 = 0."""
    layer = ConvexLayer(*_problem("qp", "le"), solver=solver)
    gx, gE, gf, caught = _backward(layer, [[1.0, 1.0], [1.0, 1.0]])
    assert not caught
    assert gE[1, 1].abs().max() < 1e-9 and gf[1, 1].abs() < 1e-9
    torch.testing.assert_close(gx[1], _projection_grad_x()[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("requires", [(False, False), (False, True)])
def test_a_zero_row_warned_only_where_a_parameter_requiring_grad_moves_it(requires):
    """E and f without a gradient: the zero row does not move, ∂y/∂x exists (batched path;
    the per-element path tests every parameter). f with one: moving f_1 alone makes 0 = f_1
    infeasible, no derivative in f_1."""
    layer = ConvexLayer(*_problem("qp", "eq"))
    gx, _, _, caught = _backward(layer, [[1.0, 0.0], [1.0, 0.0]], requires)
    assert [w.elements for w in caught if ZERO_MESSAGE in str(w)] == ([[(1,)]] if requires[1] else [])
    assert len(caught) == requires[1]
    torch.testing.assert_close(gx, _projection_grad_x(), rtol=0, atol=1e-6)


def test_forward_mode_names_a_moved_zero_row():
    """A tangent moving E_1 of element 1 is warned about with the reason; one moving x alone is not."""
    layer = ConvexLayer(*_problem("qp", "eq"))
    values = [torch.tensor(X, dtype=F64), torch.tensor(E, dtype=F64), torch.tensor([[1.0, 0], [1.0, 0]], dtype=F64)]
    moved = torch.zeros_like(values[1])
    moved[:, 1, 0] = 1.0
    for tE, expected in ((moved, [(1,)]), (torch.zeros_like(moved), None)):
        with warnings.catch_warnings(record=True) as caught, fwAD.dual_level():
            warnings.simplefilter("always")
            layer(fwAD.make_dual(values[0], torch.ones_like(values[0])), fwAD.make_dual(values[1], tE), values[2])
        got = [w.message for w in caught if issubclass(w.category, GradientWarning)]
        assert [w.elements for w in got if ZERO_MESSAGE in str(w)] == ([expected] if expected else [])
        assert len(got) == (1 if expected else 0)


def test_forward_mode_keeps_the_derivatives_that_exist_beside_a_moved_zero_row():
    """A tangent moving every entry of E (element 1's zero row included) and x: the part moving
    the zero row has no derivative and is dropped, the rest kept, as the backward keeps the
    gradient in x and E_0 (its gradient in E_1 is 0): ⟨J v, u⟩ = ⟨v, Jᵀ u⟩. The element's whole
    tangent was set to zero, x's part (the closed form's) included (tester S)."""
    layer = ConvexLayer(*_problem("qp", "eq"))
    values = [torch.tensor(X, dtype=F64), torch.tensor(E, dtype=F64), torch.tensor([[1.0, 0], [1.0, 0]], dtype=F64)]
    g = torch.Generator().manual_seed(0)
    vx, vE, u = (torch.randn(v.shape, dtype=F64, generator=g) for v in (values[0], values[1], values[0]))
    with warnings.catch_warnings(record=True) as caught, fwAD.dual_level():
        warnings.simplefilter("always")
        out = layer(fwAD.make_dual(values[0], vx), fwAD.make_dual(values[1], vE), values[2])
        t = fwAD.unpack_dual(out).tangent
    zero = [w.message for w in caught if ZERO_MESSAGE in str(w.message)]
    assert len(zero) == 1 and zero[0].elements == [(1,)] and "rest kept" in str(zero[0])
    tx, tE = (v.clone().requires_grad_() for v in values[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientWarning)
        gx, gE = torch.autograd.grad(layer(tx, tE, values[2]), [tx, tE], u)
    assert gE[1, 1].abs().max() == 0
    torch.testing.assert_close((t * u).sum(-1), (gx * vx).sum(-1) + (gE * vE).sum((-2, -1)), rtol=1e-8, atol=1e-10)
    # element 1 without E_1's tangent: the same tangent (the derivatives that exist)
    vE0 = vE.clone()
    vE0[1, 1] = 0
    with warnings.catch_warnings(), fwAD.dual_level():
        warnings.simplefilter("ignore", GradientWarning)
        t0 = fwAD.unpack_dual(layer(fwAD.make_dual(values[0], vx), fwAD.make_dual(values[1], vE0), values[2])).tangent
    torch.testing.assert_close(t[1], t0[1], rtol=1e-10, atol=1e-12)


def test_zero_rows_is_relative_to_the_element_and_undoes_the_equilibration():
    """Rows of 1e-17 and 1e-10 of the others (Ruiz scales both up): the first is zero, the
    second a constraint; a zero row holds where its b is zero relative to the constraints' terms."""
    layout = ConeLayout(2, 3)
    A = torch.tensor([[[1.0, 2.0], [1e-17, 0.0], [1.0, -1.0], [1e-10, 0.0], [0.0, 0.0]]], dtype=F64)
    b = torch.tensor([[1.0, 0.0, 2.0, 0.0, 3.0]], dtype=F64)
    d = equilibrate(torch.eye(2, dtype=F64)[None], torch.ones(1, 2, dtype=F64), A, b, layout)
    assert d.A[0, 1].abs().max() > 1e3 * ZERO_ROW  # (equilibrated, it is not small)
    zero, holds = zero_rows(d, layout, torch.ones(1, 2, dtype=F64))
    assert zero.tolist() == [[False, True, False, False, True]]
    assert holds.tolist() == [[False, True, False, False, False]]  # (row 4: 0 <= 3, inactive)
