"""Convex robust pooling (Gould et al., TPAMI 2021, Table 1), as CVXPY problems.

.. math:: y(x) = \\operatorname*{argmin}_u \\sum_{i=1}^n \\phi(u - x_i; \\alpha)

The nonconvex penalties (Welsch, truncated quadratic) have no CVXPY form; the native
node :class:`convexddn.RobustPool` solves them.
"""
from __future__ import annotations

import cvxpy as cp
import numpy as np

from convexddn._checks import check_positive
from convexddn.errors import NonconvexError, OptionError
from convexddn.pooling import CONVEX_PENALTIES, PENALTIES
from convexddn.registry import int_option, register

NONCONVEX_PENALTIES = tuple(p for p in PENALTIES if p not in CONVEX_PENALTIES)


def penalty_objective(z: cp.Expression, penalty: str, alpha: float) -> cp.Expression:
    """Σᵢ φ(zᵢ; α) for a convex penalty, in the conventions of Table 1.

    quadratic ½z²; pseudo-Huber α²(√(1 + (z/α)²) − 1); Huber ½z² for |z| ≤ α and
    α(|z| − ½α) beyond (cvxpy's ``huber(z, α)`` is twice that).
    """
    if penalty == "quadratic":
        return 0.5 * cp.sum_squares(z)
    if penalty == "pseudo_huber":
        n = z.shape[0]
        stacked = cp.vstack([np.full(n, alpha), z])  # columns (α, zᵢ)
        return alpha * cp.sum(cp.norm(stacked, 2, axis=0)) - n * alpha ** 2
    if penalty == "huber":
        return 0.5 * cp.sum(cp.huber(z, alpha))
    raise OptionError(f"penalty must be one of {list(CONVEX_PENALTIES)}, got {penalty!r}")


@register("robust_pool", "convex robust pooling: argmin_u Σᵢ φ(u − xᵢ; α) for quadratic, pseudo_huber, huber")
def robust_pool(n: int, penalty: str = "quadratic", alpha: float = 1.0):
    """Robust pooling of ``n`` values with a convex penalty.

    Parameters: ``x`` of shape ``(n,)``. Variable: ``y``, a scalar.
    """
    n = int_option("n", n)
    if penalty in NONCONVEX_PENALTIES:
        raise NonconvexError(
            f"penalty {penalty!r} is nonconvex and has no CVXPY form; use the native node "
            f"convexddn.RobustPool(penalty={penalty!r}) (or convexddn.functional.robust_pool), "
            f"which finds its global minimiser")
    if penalty not in CONVEX_PENALTIES:
        raise OptionError(
            f"penalty must be one of {list(CONVEX_PENALTIES)} here "
            f"({list(NONCONVEX_PENALTIES)} via convexddn.RobustPool), got {penalty!r}")
    check_positive("alpha", alpha)
    x = cp.Parameter(n, name="x")
    y = cp.Variable(name="y")
    problem = cp.Problem(cp.Minimize(penalty_objective(y - x, penalty, float(alpha))))
    return problem, [x], [y]
