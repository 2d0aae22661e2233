"""Euclidean projections: Lp balls, the probability simplex, the Birkhoff polytope."""
from __future__ import annotations

import math

import cvxpy as cp

from convexddn._checks import check_positive
from convexddn.errors import OptionError
from convexddn.registry import int_option, register

P_VALUES = (1, 2, math.inf)


def parse_p(p: object) -> float:
    """Accept 1, 2, inf (float or the string "inf"); raise OptionError otherwise."""
    if isinstance(p, str) and p.lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(p, (int, float)) and not isinstance(p, bool) and p in P_VALUES:
        return float(p)
    raise OptionError(f"p must be one of 1, 2, inf, got {p!r}")


@register("lp_ball", "Euclidean projection onto the Lp ball: argmin_u ½‖u − x‖² s.t. ‖u‖_p ≤ radius")
def lp_ball(n: int, p: float = 2, radius: float = 1.0):
    """.. math:: y(x) = \\operatorname*{argmin}_{\\|u\\|_p \\le r} \\tfrac12 \\|u - x\\|_2^2

    Parameters: ``x`` of shape ``(n,)``. Variable: ``y`` of shape ``(n,)``.
    """
    n = int_option("n", n)
    p = parse_p(p)
    check_positive("radius", radius)
    x = cp.Parameter(n, name="x")
    y = cp.Variable(n, name="y")
    constraint = cp.norm(y, "inf" if math.isinf(p) else int(p)) <= float(radius)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [constraint])
    return problem, [x], [y]


@register("simplex", "Euclidean projection onto the probability simplex (sparsemax)")
def simplex(n: int):
    """.. math:: y(x) = \\operatorname*{argmin}_{u \\ge 0,\\ 1^T u = 1} \\tfrac12 \\|u - x\\|_2^2

    Parameters: ``x`` of shape ``(n,)``. Variable: ``y`` of shape ``(n,)``.
    References: Martins & Astudillo, "From softmax to sparsemax", ICML 2016.
    """
    n = int_option("n", n)
    x = cp.Parameter(n, name="x")
    y = cp.Variable(n, name="y")
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [y >= 0, cp.sum(y) == 1])
    return problem, [x], [y]


@register("birkhoff", "Euclidean projection onto the doubly-stochastic matrices (Birkhoff polytope)")
def birkhoff(n: int):
    """.. math:: Y(X) = \\operatorname*{argmin}_{U \\ge 0,\\ U1 = 1,\\ U^T1 = 1} \\tfrac12 \\|U - X\\|_F^2

    The convex relaxation of permutation matrices used for permutation learning.
    Parameters: ``X`` of shape ``(n, n)``. Variable: ``Y`` of shape ``(n, n)``.
    """
    n = int_option("n", n)
    X = cp.Parameter((n, n), name="X")
    Y = cp.Variable((n, n), name="Y")
    ones = [Y >= 0, cp.sum(Y, axis=1) == 1, cp.sum(Y, axis=0) == 1]
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Y - X)), ones)
    return problem, [X], [Y]
