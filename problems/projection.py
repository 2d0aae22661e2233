"""Euclidean projections: Lp balls, the probability simplex, the Birkhoff polytope."""
from __future__ import annotations

import math

from convexddn._checks import check_size, normalize_p
from convexddn._lazy import cvxpy as cp
from convexddn.convex.registry import real_option, register


@register("lp_ball", "Euclidean projection onto the Lp ball: argmin_u ½‖u − x‖² s.t. ‖u‖_p ≤ radius")
def lp_ball(n: int, p: float = 2, radius: float = 1.0):
    """.. math:: y(x) = \\operatorname*{argmin}_{\\|u\\|_p \\le r} \\tfrac12 \\|u - x\\|_2^2

    Parameters: ``x`` of shape ``(n,)``. Variable: ``y`` of shape ``(n,)``.
    """
    n = check_size("n", n, minimum=1)
    p = normalize_p(p)
    radius = real_option("radius", radius, above=0)
    x = cp.Parameter(n, name="x")
    y = cp.Variable(n, name="y")

    def problem():  # deferred: the native node (LpProjection) does not need it
        constraint = cp.norm(y, "inf" if math.isinf(p) else int(p)) <= radius
        return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [constraint])
    return problem, [x], [y]


@register("simplex", "Euclidean projection onto the probability simplex (sparsemax)")
def simplex(n: int):
    """.. math:: y(x) = \\operatorname*{argmin}_{u \\ge 0,\\ 1^T u = 1} \\tfrac12 \\|u - x\\|_2^2

    Parameters: ``x`` of shape ``(n,)``. Variable: ``y`` of shape ``(n,)``.
    References: Martins & Astudillo, "From softmax to sparsemax", ICML 2016.
    """
    n = check_size("n", n, minimum=1)
    x = cp.Parameter(n, name="x")
    y = cp.Variable(n, name="y")
    # Deferred: the native node (SimplexProjection / sparsemax) does not need it.
    return (lambda: cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [y >= 0, cp.sum(y) == 1])), [x], [y]


@register("birkhoff", "Euclidean projection onto the doubly-stochastic matrices (Birkhoff polytope)")
def birkhoff(n: int):
    """.. math:: Y(X) = \\operatorname*{argmin}_{U \\ge 0,\\ U1 = 1,\\ U^T1 = 1} \\tfrac12 \\|U - X\\|_F^2

    The convex relaxation of permutation matrices used for permutation learning.
    Parameters: ``X`` of shape ``(n, n)``. Variable: ``Y`` of shape ``(n, n)``.
    """
    n = check_size("n", n, minimum=1)
    X = cp.Parameter((n, n), name="X")
    Y = cp.Variable((n, n), name="Y")
    ones = [Y >= 0, cp.sum(Y, axis=1) == 1, cp.sum(Y, axis=0) == 1]
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Y - X)), ones)
    return problem, [X], [Y]
