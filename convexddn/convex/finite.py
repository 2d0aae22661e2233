"""Non-finite constants in a problem: infinite bounds dropped, anything else refused.

An inequality with a constant side holding :math:`\\pm\\infty` says "no bound" there,

.. math::

    g_i(\\theta, u) \\le b_i \\quad\\text{with}\\quad b_i = +\\infty
    \\qquad\\Longleftrightarrow\\qquad \\text{no constraint on row } i,

as CVXPY's own ``Variable(bounds=...)`` reads infinite entries (it writes only the
finite ones, ``u[mask] <= ub[mask]``; Clarabel's presolve drops the rows of infinite
``b`` that ``y <= ub`` leaves in the cone program). Both backends canonicalise the
problem themselves (cvxpylayers' SCS form per element, Clarabel's with the quadratic
term kept for the batched one), and neither solver takes an infinite ``b``: every call
failed with a SolverError (KKT residual NaN) after both solvers ran on each element.
:func:`finite_problem` therefore rewrites the problem once, at construction: each such
constraint keeps its finite rows only, the same way, before either canonicalisation.

What has no such reading is refused at construction with a ``ProblemError`` naming the
constraint: NaN anywhere, an infinite constant in the objective, in an equality or a
cone constraint, inside a side that holds variables or parameters (``y - ub <= 0``), or
on the side that cannot hold (``y <= -inf``: infeasible for every parameter value).
Parameters are data of each call: their tensors are refused when not finite
(:func:`~.validation.check_values`).
"""
from __future__ import annotations

from typing import Any, Sequence

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
from cvxpy.constraints.nonpos import Inequality

from ..errors import ProblemError

__all__ = ["finite_problem"]


def _values(expr: Any) -> np.ndarray:
    value = expr.value
    return np.asarray(value.toarray() if sp.issparse(value) else value, dtype=np.float64)


def _nonfinite(part: Any) -> tuple[bool, bool]:
    """(any NaN, any non-finite entry) among the constants of an objective or constraint."""
    nan = inf = False
    for const in part.constants():
        value = const.value.data if sp.issparse(const.value) else np.asarray(const.value)  # (complex too)
        nan = nan or bool(np.isnan(value).any())
        inf = inf or not bool(np.isfinite(value).all())
    return nan, inf


def _pure_constant(expr: cp.Expression) -> bool:
    return not expr.variables() and not expr.parameters()


def _finite_rows(label: str, con: Inequality) -> list[cp.Constraint]:
    """The constraints left of ``lhs <= rhs`` when the rows with a bound of "no bound"
    (``rhs_i = +inf`` or ``lhs_i = -inf``) go: [] when every row goes, else one
    constraint over the remaining entries (broadcast to the constraint's shape)."""
    lhs, rhs = con.args
    advice = ("infinite entries are read as 'no bound' only in a constant side of an inequality "
              "(y <= ub, lb <= A @ y, sum(y) <= ub); write the bound that way, or leave the constraint out")
    side = next((s for s in (rhs, lhs) if _pure_constant(s) and _nonfinite(s)[1]), None)
    other = lhs if side is rhs else rhs
    if side is None or _nonfinite(other)[1]:
        raise ProblemError(f"{label} `{con}` holds an infinite constant where it cannot be a bound: {advice}")
    bound = np.broadcast_to(_values(side), con.shape)
    # "No bound": +inf above (rhs), -inf below (lhs); the other sign can never hold.
    free, never = (bound == np.inf, bound == -np.inf) if side is rhs else (bound == -np.inf, bound == np.inf)
    if never.any():
        where = [tuple(int(i) for i in idx) for idx in np.argwhere(never)[:5]]
        raise ProblemError(
            f"{label} `{con}` can never hold: its constant {'right' if side is rhs else 'left'} side is "
            f"{'-inf' if side is rhs else '+inf'} at {int(never.sum())} of its entries (first {where}), so the problem "
            "is infeasible for every parameter value; use +inf (no upper bound) or -inf (no lower bound) on the "
            "side where it means no bound, or drop those entries")
    keep = ~free
    if not np.isfinite(bound[keep]).all():  # (arithmetic on infinities: inf - inf is NaN)
        raise ProblemError(f"{label} `{con}` has a constant side that evaluates to NaN: {advice}")
    if not keep.any():
        return []
    if other.shape != con.shape:  # (cp.broadcast_to would switch CVXPY to its SCIPY backend, with a warning)
        other = other + np.zeros(con.shape)
    other, kept = (other[keep], bound[keep]) if con.shape else (other, bound)
    return [other <= kept] if side is rhs else [kept <= other]


def finite_problem(problem: cp.Problem, variables: Sequence[cp.Variable] = ()) -> cp.Problem:
    """``problem`` with the rows of infinite bounds dropped (itself if it has none).

    Args:
        problem: a validated ``cvxpy.Problem``.
        variables: the variables the layer returns (dual variables of constraints
            included): a dual of a constraint rewritten here cannot be returned.

    Raises:
        ProblemError: a NaN constant; an infinite constant in the objective, or where
            it is no bound (see the module docstring); the dual of a constraint with
            infinite bounds asked for.
    """
    nan, inf = _nonfinite(problem.objective)
    if nan or inf:
        raise ProblemError(
            f"the objective `{problem.objective}` holds a {'NaN' if nan else 'non-finite'} constant: its value "
            "would be undefined or infinite for every point; pass finite constants (as cp.Parameter, data "
            "that varies)")
    asked = {v.id: i for i, v in enumerate(variables)}
    constraints, changed = [], False
    for i, con in enumerate(problem.constraints):
        nan, inf = _nonfinite(con)
        label = f"constraint {i}"
        if nan:
            raise ProblemError(f"{label} `{con}` holds a NaN constant: it has no meaning as a bound or "
                               "coefficient; replace it (+inf or -inf on a constant side means no bound)")
        if not inf:
            constraints.append(con)
            continue
        if not isinstance(con, Inequality):
            raise ProblemError(
                f"{label} `{con}` ({type(con).__name__}) holds an infinite constant: only an inequality with a "
                "constant side may (its infinite entries meaning no bound, y <= ub); write the bound that way "
                "or leave the constraint out")
        for dual in con.dual_variables:
            if dual.id in asked:
                raise ProblemError(
                    f"variables[{asked[dual.id]}] is the dual variable of {label} `{con}`, whose infinite bounds "
                    "the layer drops (those rows are no constraint): their multipliers are zero; write the "
                    "constraint over its finite entries only (y[mask] <= ub[mask]) and ask for that one's dual")
        constraints += _finite_rows(label, con)
        changed = True
    return cp.Problem(problem.objective, constraints) if changed else problem
