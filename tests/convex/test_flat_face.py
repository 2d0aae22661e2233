"""A polished point inside a nearly flat face is no solution (convexddn.convex.flat_face).

The LPs, by hand (float64 data exact as written):

- ``min p @ x + ||x||_1 s.t. ||x||_inf <= 1`` at ``p = (-1 - e, 0.5)``: the cost falls by ``e``
  per unit along (1, 0) on the edge x0 in [0, 1], so the unique solution is the vertex (1, 0);
- ``min c @ x s.t. x >= 0, x1 - x0 <= 1`` at ``c = (1 - e, -1)``: the ray (1, 1) keeps every row
  exactly and costs ``c0 - 1 = -e`` exactly (Sterbenz): unbounded;
- ``p @ x + ||x||_1`` unconstrained: unbounded along (1, 0) for ``e > 0``.

At ``e = 0`` the first has an edge of optima and the second a ray of optima (not unique: the
backward's GradientWarning). Margins 1e-11 and 1e-12 came back as points inside the face,
"solved" without a warning (1e-9 and 1e-10 of the second from SCS / Clarabel with a generic one).
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import pytest
import torch

import convexddn as cddn
from convexddn.errors import GradientWarning, SolverWarning, UnboundedError

F64 = torch.float64
MARGINS = [1e-9, 1e-10, 1e-11, 1e-12]


def box_layer():
    x, p = cp.Variable(2), cp.Parameter(2)
    return cddn.ConvexLayer(cp.Problem(cp.Minimize(p @ x + cp.norm1(x)), [cp.norm(x, "inf") <= 1]), [p], [x])


def ray_layer():
    x, c = cp.Variable(2), cp.Parameter(2)
    return cddn.ConvexLayer(cp.Problem(cp.Minimize(c @ x), [x >= 0, x[1] - x[0] <= 1]), [c], [x])


def free_layer():
    x, p = cp.Variable(2), cp.Parameter(2)
    return cddn.ConvexLayer(cp.Problem(cp.Minimize(p @ x + cp.norm1(x))), [p], [x])


def quietly(layer, value):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return layer(value)


@pytest.mark.parametrize("e", MARGINS)
def test_small_margin_box_lp_ends_at_its_vertex(e):
    layer = box_layer()
    p = torch.tensor([-1 - e, 0.5], dtype=F64, requires_grad=True)
    y = quietly(layer, p)
    assert layer.last_solve.statuses == ["solved"]
    torch.testing.assert_close(y.detach(), torch.tensor([1.0, 0.0], dtype=F64), atol=1e-9, rtol=0)
    # dy/dp = 0: the vertex stays the solution for all nearby p (e > 0)
    g, = torch.autograd.grad(y[0], p)
    torch.testing.assert_close(g, torch.zeros_like(g), atol=1e-9, rtol=0)


@pytest.mark.parametrize("e", MARGINS)
def test_small_margin_exact_ray_is_unbounded(e):
    with pytest.raises(UnboundedError):
        ray_layer()(torch.tensor([1 - e, -1.0], dtype=F64))
    with pytest.raises(UnboundedError):
        free_layer()(torch.tensor([-1 - e, 0.5], dtype=F64))


@pytest.mark.parametrize("make, value", [(box_layer, [-1.0, 0.5]), (ray_layer, [1.0, -1.0])])
def test_exact_tie_stays_not_unique(make, value):
    """An exact tie (edge or ray of optima): a point of the face, solved, and the backward's
    GradientWarning that it is not unique; never turned into a vertex silently."""
    layer = make()
    p = torch.tensor(value, dtype=F64, requires_grad=True)
    y = layer(p)
    assert layer.last_solve.statuses == ["solved"] and layer.last_solve.solvers == ["batched"]
    yd = y.detach()
    if make is box_layer:  # (on the edge x0 in [0, 1], x1 = 0)
        assert -1e-9 <= float(yd[0]) <= 1 + 1e-9 and abs(float(yd[1])) <= 1e-9
    else:  # (on the ray of optima x1 = x0 + 1)
        assert float(yd[0]) >= -1e-9 and abs(float(yd[1] - yd[0] - 1)) <= 1e-9
    with pytest.warns(GradientWarning, match="not unique"):
        y.sum().backward()


def test_batch_mixing_flat_faces_and_ordinary_elements():
    """Small margins beside ordinary elements and an exact tie: each flat-face element at its
    vertex, the others bitwise what they get alone (and their closed forms)."""
    layer = box_layer()
    rows = [[-1 - 1e-11, 0.5], [-2.0, 0.5], [0.3, -0.2], [-1 - 1e-12, 0.5], [1.5, -1 - 1e-8], [-1.0, 0.5]]
    out = layer(torch.tensor(rows, dtype=F64))
    assert layer.last_solve.statuses == ["solved"] * len(rows)
    want = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    torch.testing.assert_close(out[:5], want, atol=1e-9, rtol=0)
    assert 0 <= float(out[5, 0]) <= 1 and abs(float(out[5, 1])) <= 1e-9  # (the tie: on its edge)
    for i in (1, 2, 4):
        assert torch.equal(layer(torch.tensor(rows[i], dtype=F64)), out[i])


def test_float32_input():
    """float32 parameters (solved in float64): the float32 margin 2^-23 and 2^-20 at the vertex."""
    layer = box_layer()
    e = torch.tensor([2.0 ** -23, 2.0 ** -20], dtype=torch.float32)
    p = torch.stack([-1 - e, torch.full_like(e, 0.5)], 1)
    y = quietly(layer, p)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.tensor([[1.0, 0.0]] * 2), atol=1e-6, rtol=0)
    with pytest.raises(UnboundedError):
        ray_layer()(torch.tensor([1 - 2.0 ** -23, -1.0], dtype=torch.float32))


@pytest.mark.parametrize("make, value", [(ray_layer, [1 - 1e-13, -1.0]), (box_layer, [-1 - 1e-13, 0.5])])
def test_margin_near_rounding_is_never_silent(make, value):
    """A margin of 1e-13 (~150 ulps of the scale): detected, but the active-set steps resolve it
    only sometimes. The ray LP (unbounded by hand) came back as Clarabel's finite point, "solved",
    without a warning; now an UnboundedError or the SolverWarning naming the flat face. The box LP
    (vertex (1, 0) by hand): that vertex, or a warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            y = make()(torch.tensor(value, dtype=F64))
        except UnboundedError:
            assert make is ray_layer
            return
    warned = [w for w in caught if issubclass(w.category, SolverWarning) and "face" in str(w.message)]
    if make is ray_layer:
        assert warned
    else:
        assert warned or torch.allclose(y, torch.tensor([1.0, 0.0], dtype=F64), atol=1e-9, rtol=0)


def ray_outputs(which):
    """The ray LP with the outputs ``which``: ``x``; only its rows' multipliers; or only ``y`` of
    ``+ ||y - p||^2`` beside it (strictly convex, untouched by the ray (1, 1) in ``x``)."""
    x, y, c, p = cp.Variable(2), cp.Variable(2), cp.Parameter(2), cp.Parameter(2)
    cons = [x >= 0, x[1] - x[0] <= 1]
    if which == "y":
        prob = cp.Problem(cp.Minimize(c @ x + cp.sum_squares(y - p)), cons)
        return cddn.ConvexLayer(prob, [c, p], [y]), [torch.tensor([0.3, -0.2], dtype=F64)]
    outs = [x] if which == "x" else [con.dual_variables[0] for con in cons]
    return cddn.ConvexLayer(cp.Problem(cp.Minimize(c @ x), cons), [c], outs), []


@pytest.mark.parametrize("which", ["x", "duals", "y"])
@pytest.mark.parametrize("e", MARGINS)
def test_unbounded_whatever_the_outputs(which, e):
    """Unbounded by hand (the ray (1, 1)): an UnboundedError, or the SolverWarning naming the
    flat face, whatever is asked for. Asking only for the multipliers, or for a variable the ray
    leaves still, came back "solved" without a warning: the flat direction moved no output, and
    that alone excused it."""
    layer, rest = ray_outputs(which)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            layer(torch.tensor([1 - e, -1.0], dtype=F64), *rest)
        except UnboundedError:
            return
    assert [w for w in caught if issubclass(w.category, SolverWarning) and "face" in str(w.message)], \
        f"solved silently: {layer.last_solve}"


@pytest.mark.parametrize("e", [1e-10, 1e-12])
def test_a_ray_beside_an_epigraph_variable_is_never_silent(e):
    """The ray (1, 1) in ``x`` beside ``1e-12 ||w||_1 + ||w - p||^2``, output ``w`` only: unbounded
    by hand. The steepest flat direction also lowers the epigraph variable, whose rows block it;
    that block excused the whole fall ("solved" silently), the ray's part included."""
    x, w, c, p, lam = cp.Variable(2), cp.Variable(3), cp.Parameter(2), cp.Parameter(3), cp.Parameter(nonneg=True)
    cost = c @ x + lam * cp.norm1(w) + cp.sum_squares(w - p)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cost), [x >= 0, x[1] - x[0] <= 1]), [c, p, lam], [w])
    values = [torch.tensor([1 - e, -1.0], dtype=F64), torch.tensor([1.0, -2.0, 0.5], dtype=F64),
              torch.tensor(1e-12, dtype=F64)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            layer(*values)
        except UnboundedError:
            return
    assert [w for w in caught if issubclass(w.category, SolverWarning) and "face" in str(w.message)], \
        f"solved silently: {layer.last_solve}"
