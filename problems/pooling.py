"""Convex robust pooling (Gould et al., TPAMI 2021, Table 1), as CVXPY problems.

.. math:: y(x) = \\operatorname*{argmin}_u \\sum_{i=1}^n \\phi(u - x_i; \\alpha)

The objective is each penalty's own CVXPY form (:meth:`Penalty.cvxpy`, one source for
its maths). The nonconvex penalties (Welsch, truncated quadratic) have none; the native
node :class:`convexddn.RobustPool` solves them.
"""
from __future__ import annotations

from convexddn._checks import check_size
from convexddn._lazy import cvxpy as cp
from convexddn.convex.registry import real_option, register
from convexddn.errors import NonconvexError, OptionError


@register("robust_pool", "convex robust pooling: argmin_u Σᵢ φ(u − xᵢ; α) for quadratic, pseudo_huber, huber")
def robust_pool(n: int, penalty: str = "quadratic", alpha: float = 1.0):
    """Robust pooling of ``n`` values with a convex penalty.

    Parameters: ``x`` of shape ``(n,)``. Variable: ``y``, a scalar.
    """
    # The penalties live with the native node (torch): imported here, not when the
    # catalog is listed.
    from convexddn.nodes.pooling.penalties import CONVEX_PENALTIES, PENALTIES, Penalty, canonical_penalty

    penalty = canonical_penalty(penalty)  # the DDN reference's spellings ("pseudo-huber")
    NONCONVEX_PENALTIES = tuple(p for p in PENALTIES if p not in CONVEX_PENALTIES)
    n = check_size("n", n, minimum=1)
    if penalty in NONCONVEX_PENALTIES:
        raise NonconvexError(
            f"penalty {penalty!r} is nonconvex and has no CVXPY form; use the native node "
            f"convexddn.RobustPool(penalty={penalty!r}) (or convexddn.functional.robust_pool), "
            f"which finds {'its global minimiser' if penalty == 'trunc_quad' else 'a local minimiser (not certified global)'}")
    if penalty not in CONVEX_PENALTIES:
        raise OptionError(
            f"penalty must be one of {list(CONVEX_PENALTIES)} here "
            f"({list(NONCONVEX_PENALTIES)} via convexddn.RobustPool), got {penalty!r}")
    alpha = real_option("alpha", alpha, above=0)
    x = cp.Parameter(n, name="x")
    y = cp.Variable(name="y")
    # Deferred: the native node (RobustPool) does not need it.
    return (lambda: cp.Problem(cp.Minimize(Penalty.resolve(penalty).cvxpy(y - x, alpha)))), [x], [y]
