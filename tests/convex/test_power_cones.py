"""Power cones (cp.PowCone3D/PowConeND, power/pnorm/geo_mean with approx=False) through both paths.

They were refused at construction ("the problem needs power cones"). The layer now states
each cone whose exponent is an exact rational in second-order cones; references are
cvxpy + Clarabel solving the ORIGINAL power-cone problem at tight tolerance, and float64
central differences of those solves for the gradients.
"""
from __future__ import annotations

import warnings
from fractions import Fraction

import cvxpy as cp
import numpy as np
import pytest
import scipy.optimize
import torch

import convexddn as cddn
from convexddn.errors import ProblemError


def _p3d(alpha):
    def build():
        a, b = cp.Parameter(3, name="a"), cp.Parameter(3, name="b")
        x, t = cp.Variable(3), cp.Variable(3)
        # t^α b^(1-α) >= |x|: the cone's x and y a variable and a (positive) parameter; at the
        # optimum t = |x|^(1/α) b^(1-1/α), whose stationarity in x is the reference's equation.
        prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a) + cp.sum(t)), [cp.PowCone3D(t, b, x, alpha)])
        r = 1 / np.asarray(alpha)

        def kkt(u, a, b):
            return 2 * (u - a) + r * np.sign(u) * np.abs(u) ** (r - 1) * b ** (1 - r)
        return prob, [a, b], x, [np.array([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]]),
                                 np.array([[1.0, 0.7, 1.3], [0.8, 1.2, 2.0]])], kkt, None
    return build


def _power():
    a, x = cp.Parameter(3, name="a"), cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a) + cp.sum(cp.power(cp.abs(x), 1.5, approx=False))))

    def kkt(u, a):
        return 2 * (u - a) + 1.5 * np.sign(u) * np.abs(u) ** 0.5
    return prob, [a], x, [np.array([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]])], kkt, None


def _pnorm():
    a, x = cp.Parameter(3, name="a"), cp.Variable(3)
    ball = cp.pnorm(x, 3, approx=False) <= 1
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [ball])

    def kkt(u, a):  # u = (x, λ) for ||x||_3^3 <= 1, active (the a lie outside the ball)
        x, lam = u[:3], u[3]
        return np.append(2 * (x - a) + 3 * lam * x * np.abs(x), np.sum(np.abs(x) ** 3) - 1)
    return prob, [a], x, [np.array([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]])], kkt, lambda: [1.0]


def _geo_mean():
    a, w = cp.Parameter(3, name="a"), cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(w - a) - 2 * cp.geo_mean(w, [1, 2, 3], approx=False)))
    alpha = np.array([1, 2, 3]) / 6

    def kkt(u, a):
        return 2 * (u - a) - 2 * np.prod(u ** alpha) * alpha / u
    return prob, [a], w, [np.array([[0.5, 0.2, 2.0], [1.5, 1.3, 0.7]])], kkt, None


def _pow_nd():
    A, W, z = cp.Parameter((3, 2), name="A"), cp.Variable((3, 2)), cp.Variable(2)
    alpha = np.array([[0.2, 0.5], [0.3, 0.25], [0.5, 0.25]])  # one weight vector per cone (column)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(W - A) + cp.sum_squares(z) - 3 * cp.sum(z)),
                      [cp.PowConeND(W, z, alpha, axis=0)])

    def kkt(u, A):  # z = g(W) = prod W^alpha per column (active: g < 1.5, checked)
        U = u.reshape(3, 2)
        g = np.prod(U ** alpha, axis=0)
        assert (g < 1.5).all()
        return (2 * (U - A) + (2 * g - 3) * g * alpha / U).ravel()
    values = np.array([[[1.0, 0.5], [2.0, 1.5], [0.7, 1.0]], [[0.3, 2.0], [1.0, 0.4], [1.5, 0.9]]])
    return prob, [A], W, [values], kkt, None


CASES = {"PowCone3D(0.5)": _p3d(0.5), "PowCone3D(0.4)": _p3d(0.4), "PowCone3D(2/3)": _p3d(2 / 3),
         "PowCone3D(alpha vector)": _p3d(np.array([0.5, 0.4, 0.75])), "power(abs, 1.5)": _power,
         "pnorm(3)": _pnorm, "geo_mean(1,2,3)": _geo_mean, "PowConeND": _pow_nd}


def _clarabel(prob, params, var, values):
    """The original (power-cone) problem's solution by Clarabel at tight tolerance (1e-12; its power
    cones still leave ~1e-7 here, ~1e-6 at 1e-10 without the refinement settings)."""
    for p, v in zip(params, values):
        p.value = v
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (its "inaccurate" status at these tolerances)
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, tol_ktratio=1e-12,
                   max_iter=500, iterative_refinement_reltol=1e-16, iterative_refinement_abstol=1e-16,
                   iterative_refinement_max_iter=50)
    assert prob.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)
    return np.array(var.value, dtype=np.float64)


def _reference(case, values):
    """Clarabel's solution of the original problem, refined to ~1e-14 as the root of the
    problem's reduced stationarity equations (``kkt``, written out by hand above)."""
    prob, params, var, _, kkt, extra = CASES[case]()
    x0 = _clarabel(prob, params, var, values)
    u0 = np.append(x0.ravel(), extra() if extra else [])
    root = scipy.optimize.root(kkt, u0, args=tuple(values), tol=1e-15)  # (success or "xtol too small")
    assert np.abs(kkt(root.x, *values)).max() < 1e-12
    x = root.x[:x0.size].reshape(x0.shape)
    np.testing.assert_allclose(x0, x, atol=1e-5, rtol=0)  # (the root is Clarabel's point, refined)
    return x


def _fd_grad(case, values, weight, h=1e-6):
    """Central differences of <weight, x*(θ)> w.r.t. each parameter (one element)."""
    grads = []
    for k, v in enumerate(values):
        g = np.zeros_like(v)
        for idx in np.ndindex(*v.shape):
            side = []
            for s in (h, -h):
                moved = [u.copy() for u in values]
                moved[k][idx] += s
                side.append(float((weight * _reference(case, moved)).sum()))
            g[idx] = (side[0] - side[1]) / (2 * h)
        grads.append(g)
    return grads


@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batched"])
@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
@pytest.mark.parametrize("case", list(CASES))
def test_power_cone_problem_matches_clarabel_and_finite_differences(case, solver, batched):
    prob, params, var, values, _, _ = CASES[case]()
    n = 2 if batched else 1
    layer = cddn.ConvexLayer(prob, params, [var], solver=solver)
    tensors = [torch.tensor(v[:n] if batched else v[0], requires_grad=True) for v in values]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no SolverWarning, GradientWarning... on these problems)
        out = layer(*tensors)
        weight = torch.linspace(0.5, 1.5, out[0].numel() if batched else out.numel(), dtype=torch.float64)
        weight = weight.reshape(var.shape)
        (out * weight).sum().backward()
    assert all(b == ("batched" if solver == "auto" else "per_element") for b in layer.last_solve.backend)
    for i in range(n):
        element = [v[i] for v in values]
        got = out[i] if batched else out
        np.testing.assert_allclose(got.detach().numpy(), _reference(case, element), atol=1e-8, rtol=0)
        fd = _fd_grad(case, element, weight.numpy())
        for t, g in zip(tensors, fd):
            np.testing.assert_allclose((t.grad[i] if batched else t.grad).numpy(), g, atol=1e-7, rtol=0)


def test_cvxpylayer_takes_power_cones():
    """The migration case: the compatibility class takes a power cone too (against Clarabel)."""
    prob, params, var, values, _, _ = CASES["PowCone3D(0.4)"]()
    out, = cddn.CvxpyLayer(prob, params, [var])(*[torch.tensor(v[0]) for v in values])
    np.testing.assert_allclose(out.numpy(), _reference("PowCone3D(0.4)", [v[0] for v in values]), atol=1e-8, rtol=0)


def test_rewrite_keeps_the_problem_dpp_and_its_variables():
    from convexddn.convex.power_cones import power_cone_free  # (here: the module is new)

    for case, build in CASES.items():
        prob, params, var = build()[:3]
        new = power_cone_free(prob, [var])
        assert new is not prob and new.is_dpp(), case
        assert {p.id for p in new.parameters()} == {p.id for p in params}
        assert var.id in {v.id for v in new.variables()}
        dims = new.get_problem_data(cp.CLARABEL)[0]["dims"]
        assert not dims.p3d and not dims.pnd, case
    a, x = cp.Parameter(2), cp.Variable(2)
    plain = cp.Problem(cp.Minimize(cp.sum_squares(x - a) + cp.pnorm(x, 3)))  # (approx=True: no power cone)
    assert power_cone_free(plain, [x]) is plain


def test_exact_rationals():
    from convexddn.convex.power_cones import MAX_DENOMINATOR, exact_rational

    assert exact_rational(0.4) == exact_rational(2 / 5) == Fraction(2, 5)
    assert exact_rational(2 / 3) == Fraction(2, 3)
    assert exact_rational(1 / 1.5) == Fraction(2, 3)
    assert exact_rational(1 / (MAX_DENOMINATOR + 1)) is None  # (denominator above the bound)
    assert exact_rational(0.123456789) is None and exact_rational(float("nan")) is None


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
def test_inexact_exponents_stay_refused_naming_them(solver):
    a, x, t = cp.Parameter(3), cp.Variable(3), cp.Variable(3)
    cone = cp.Problem(cp.Minimize(cp.sum_squares(x - a) + cp.sum(t)), [cp.PowCone3D(t, np.ones(3), x, 0.123456789)])
    with pytest.raises(ProblemError, match=r"PowCone3D constraint with exponent 0\.123456789.*not exact"):
        cddn.ConvexLayer(cone, [a], [x], solver=solver)
    atom = cp.Problem(cp.Minimize(cp.sum_squares(x - a) + cp.sum(cp.power(cp.abs(x), 1.123456789, approx=False))))
    with pytest.raises(ProblemError, match=r"power with approx=False\) with exponent 1\.123456789"):
        cddn.ConvexLayer(atom, [a], [x], solver=solver)
    geo = cp.Problem(cp.Minimize(cp.sum_squares(x - a) - cp.geo_mean(x, [1.0, 0.123456789, 1.0], approx=False)))
    with pytest.raises(ProblemError, match=r"geo_mean with approx=False\) with exponent 0\.4709"):
        cddn.ConvexLayer(geo, [a], [x], solver=solver)
    # A parametric exponent (CVXPY does not count it among the problem's parameters): its value would be frozen.
    frozen = cp.Problem(cone.objective, [cp.PowCone3D(t, np.ones(3), x, cp.Parameter(value=0.4))])
    with pytest.raises(ProblemError, match="constraint 0 .* has a parametric exponent"):
        cddn.ConvexLayer(frozen, [a], [x], solver=solver)


def test_dual_of_a_power_cone_is_refused_and_of_a_rewritten_inequality_kept():
    a, x, t = cp.Parameter(3), cp.Variable(3), cp.Variable(3)
    cone = cp.PowCone3D(t[0], 1.0, x[0], 0.4)  # (one cone: a constraint of several is refused before)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a) + cp.sum(t)), [t >= 0, cone])
    with pytest.raises(ProblemError, match="dual variable of constraint 1 .*a power cone"):
        cddn.ConvexLayer(prob, [a], [x, cone.dual_variables[0]])
    ball = cp.pnorm(x, 3, approx=False) <= 1
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [ball])
    av = np.array([0.5, -1.0, 2.0])
    _, dual = cddn.ConvexLayer(prob, [a], [x, ball.dual_variables[0]])(torch.tensor(av))
    _clarabel(prob, [a], x, [av])
    np.testing.assert_allclose(dual.numpy(), ball.dual_value, atol=1e-6, rtol=0)


def test_gp_problems_are_left_alone():
    """DGP has no power cones: an inexact exponent there is a monomial, not a refusal."""
    c, x = cp.Parameter(pos=True), cp.Variable(pos=True)
    prob = cp.Problem(cp.Minimize(c * cp.power(x, -0.123456789, approx=False) + x))
    layer = cddn.ConvexLayer(prob, [c], [x], gp=True)
    cv, p = 2.0, 0.123456789
    closed = (cv * p) ** (1 / (1 + p))  # d/dx (c x^-p + x) = 0
    torch.testing.assert_close(layer(torch.tensor(cv, dtype=torch.float64)),
                               torch.tensor(closed, dtype=torch.float64), atol=1e-7, rtol=0)


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
def test_exponents_whose_reciprocal_needs_a_larger_denominator_are_rewritten(solver):
    """p = 1025/1024 and -1/1024 are exact rationals within the bound, but CVXPY's forms write
    1/p = 1024/1025 and p/(p - 1) = 1/1025: rounded at max_denom 1024, refused before.
    Closed forms: min sum x^p - a x (p > 1) has p x^(p-1) = a; min sum x^p + a x (p < 0) has p x^(p-1) = -a."""
    a, x = cp.Parameter(2), cp.Variable(2)
    target = np.array([2.0, 3.0])
    for p, sign, box in ((1025 / 1024, -1.0, [x >= 0, x <= 5]), (-1 / 1024, 1.0, [x >= 0.5, x <= 5])):
        prob = cp.Problem(cp.Minimize(cp.sum(cp.power(x, p, approx=False)) + sign * (a @ x)), box)
        value = -sign * p * target ** (p - 1)  # a with the stationary point at target (inside the box)
        layer = cddn.ConvexLayer(prob, [a], [x], solver=solver)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = layer(torch.tensor(value, dtype=torch.float64))
        np.testing.assert_allclose(out.detach().numpy(), target, rtol=1e-6)
