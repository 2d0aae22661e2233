"""Power cones with rational exponents, rewritten exactly into second-order cones.

A 3-D power cone with exponent :math:`\\alpha \\in (0, 1)`,

.. math::

    K_\\alpha = \\{(x, y, z) : x^\\alpha y^{1-\\alpha} \\ge |z|,\\; x, y \\ge 0\\},

is, for a rational :math:`\\alpha = p/q`, the hypograph of a weighted geometric mean with
weights :math:`(p/q, (q-p)/q)`, which a tree of 3-D second-order cones
:math:`\\{(a, b, t) : t^2 \\le ab,\\; a, b \\ge 0\\}` states *exactly* (CVXPY's
``gm_constrs``, the form its ``approx=True`` atoms take; a weight whose denominator is not
a power of two appends the root itself as a leaf, which then must be nonnegative: the
root is an epigraph variable :math:`s \\ge |z|`). The n-D cone
:math:`\\prod_i W_i^{\\alpha_i} \\ge |z|` (:math:`\\sum_i \\alpha_i = 1`) is the same with n
leaves. Neither solver path takes power cones (the batched interior point has zero,
nonnegative and second-order cones; diffcp's cone list has none), so
:func:`power_cone_free` rewrites, once at construction and before either canonicalises:

- ``cp.PowCone3D`` / ``cp.PowConeND`` constraints into those second-order cones;
- the atoms that CVXPY's reduction turns into power cones, ``power``, ``pnorm`` and
  ``geo_mean`` built with ``approx=False``, into their ``approx=True`` forms with the same
  arguments and parameters (so the problem stays DPP), their exponents given as the exact
  rationals.

*Exact* means: each exponent (or weight) :math:`a` is a rational :math:`p/q` with
:math:`q \\le` :data:`MAX_DENOMINATOR` whose float is :math:`a` to within two units in its
last place (the float's own rounding: ``0.4 = 2/5``, ``2/3``, ``1/1.5``, normalised weights).
Any other exponent (``0.123456789``) keeps its power cone, and the problem is refused
with a :class:`~convexddn.errors.ProblemError` naming it: a rational approximation would
solve a different problem, silently.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Sequence

import cvxpy as cp
import numpy as np
from cvxpy.atoms.elementwise.power import Power, PowerApprox
from cvxpy.atoms.geo_mean import GeoMean, GeoMeanApprox
from cvxpy.atoms.pnorm import Pnorm, PnormApprox
from cvxpy.constraints.power import PowCone3D, PowConeND
from cvxpy.utilities.power_tools import dyad_completion, gm_constrs

from ..errors import ProblemError

__all__ = ["MAX_DENOMINATOR", "exact_rational", "power_cone_free"]

#: Largest denominator of an exponent rewritten into second-order cones (2**10, CVXPY's
#: default ``max_denom``): the tree has O(log q) cones per entry.
MAX_DENOMINATOR = 1024

_ADVICE = (f"only exponents that are rationals p/q with q <= {MAX_DENOMINATOR} (0.4, 2/3, 1.5, ...) are rewritten "
           "exactly into second-order cones, and neither solver path takes power cones; give the exponent as such a "
           "rational, or write the atom with approx=True to accept CVXPY's rational approximation")


def exact_rational(value: float) -> Fraction | None:
    """The rational :math:`p/q` (:math:`q \\le` :data:`MAX_DENOMINATOR`) whose float is
    ``value`` to within two units in the last place, or None if there is none."""
    value = float(value)
    if not math.isfinite(value):
        return None
    frac = Fraction(value).limit_denominator(MAX_DENOMINATOR)
    return frac if abs(float(frac) - value) <= 2 * math.ulp(value) else None


def _refuse(what: str, value: Any) -> ProblemError:
    return ProblemError(f"the problem needs a power cone for {what} with exponent {value!r}, which is not exact as a "
                        f"rational: {_ADVICE}")


def _weights(alphas: Sequence[float], what: str) -> tuple[Fraction, ...]:
    """Exact rationals of the weights ``alphas`` (summing to exactly 1), or a ProblemError."""
    fracs = []
    for a in alphas:
        frac = exact_rational(a)
        if frac is None:
            raise _refuse(what, float(a))
        fracs.append(frac)
    if sum(fracs) != 1:
        raise ProblemError(f"the weights {[float(a) for a in alphas]} of {what} are the rationals "
                           f"{[str(f) for f in fracs]}, which do not sum to exactly 1: {_ADVICE}")
    return tuple(fracs)


def _geo_socs(z: cp.Expression, leaves: list[cp.Expression], w: tuple[Fraction, ...]) -> list[cp.Constraint]:
    """Second-order cones stating :math:`|z| \\le \\prod_i \\text{leaves}_i^{w_i}` entrywise (leaves >= 0)."""
    if len(dyad_completion(w)) == len(w):
        # Dyadic weights: z appears only at the tree's root, as 2z in ||(a - b, 2z)|| <= a + b.
        return gm_constrs(z, list(leaves), w)
    # Otherwise the root is also a leaf of the tree (so nonnegative): bound |z| by it.
    s = cp.Variable(z.shape)
    return [z <= s, -z <= s] + gm_constrs(s, list(leaves), w)


def _pow3d_socs(con: PowCone3D) -> list[cp.Constraint]:
    """``PowCone3D(x, y, z, α)``: one cone tree per distinct α among its entries."""
    x, y, z = (cp.vec(a, order="F") for a in con.args[:3])
    alpha = np.asarray(con.alpha.value, dtype=np.float64).flatten(order="F")
    alpha = np.broadcast_to(alpha, (x.size,))
    out: list[cp.Constraint] = []
    for value in np.unique(alpha):
        p = exact_rational(value)
        if p is None:
            raise _refuse("a cp.PowCone3D constraint", float(value))
        idx = np.flatnonzero(alpha == value)
        pick = (lambda e: e) if idx.size == x.size else (lambda e: e[idx])
        out += _geo_socs(pick(z), [pick(x), pick(y)], (p, 1 - p))
    return out


def _powND_socs(con: PowConeND) -> list[cp.Constraint]:
    """``PowConeND(W, z, α, axis)``: one cone tree per distinct weight vector among its cones."""
    W, z = con.W, cp.vec(con.z, order="F")
    alpha = np.asarray(con.alpha.value, dtype=np.float64)
    if W.ndim == 1:
        W, alpha = cp.reshape(W, (W.size, 1), order="F"), alpha.reshape(-1, 1)
    elif con.axis == 1:  # (cones along rows: the transpose has them along columns)
        W, alpha = W.T, alpha.T
    columns = np.broadcast_to(alpha, W.shape).T
    out: list[cp.Constraint] = []
    for weights in np.unique(columns, axis=0):
        w = _weights(weights, "a cp.PowConeND constraint")
        idx = np.flatnonzero((columns == weights).all(axis=1))
        cols = slice(None) if idx.size == W.shape[1] else idx
        leaves = [W[i, cols] for i in range(W.shape[0]) if w[i] > 0]
        out += _geo_socs(z if idx.size == W.shape[1] else z[idx], leaves, tuple(v for v in w if v > 0))
    return out


def _soc_atom(expr: Any, args: list) -> Any:
    """The ``approx=True`` form of an exact ``power``/``pnorm``/``geo_mean`` atom (same
    arguments), its exponent the exact rational; a ProblemError where there is none."""
    if isinstance(expr, Power):
        if expr.p_used is None:
            raise ProblemError(f"`{expr}` has a parametric exponent, which needs power cones with a parametric "
                               "exponent: neither solver path takes them; give the exponent as a constant")
        p = exact_rational(expr.p_used)
        new = None if p is None else PowerApprox(args[0], p, _denominator_bound(p))
        if new is None or new.p_used != p:
            raise _refuse(f"`{expr}` (power with approx=False)", expr.p_used)
        return new
    if isinstance(expr, Pnorm):
        p = exact_rational(expr.original_p)
        new = None if p is None else PnormApprox(args[0], p, expr.axis, expr.keepdims, _denominator_bound(p))
        if new is None or new.p != p:
            raise _refuse(f"`{expr}` (pnorm with approx=False)", expr.original_p)
        return new
    w = _weights(expr.w, f"`{expr}` (geo_mean with approx=False)")
    full = np.zeros(expr._keep.size, dtype=object)
    full[expr._keep] = w
    new = GeoMeanApprox(args[0], list(full), MAX_DENOMINATOR, expr.axis, expr.keepdims)
    if tuple(new.w) != w:  # (fracify keeps exact rational weights: a guard, not an expected path)
        raise _refuse(f"`{expr}` (geo_mean with approx=False)", list(expr.w))
    return new


def _denominator_bound(p: Fraction) -> int:
    """The ``max_denom`` that keeps ``p`` exact in CVXPY's ``power``/``pnorm`` forms: beyond
    p itself they write 1/p (p > 1) or p/(p − 1) (p < 0), whose denominators reach
    |numerator| + denominator (1025/1024 -> 1024/1025 was rounded, and refused)."""
    return max(MAX_DENOMINATOR, abs(p.numerator) + p.denominator)


def _exact_atom(expr: Any) -> bool:
    return type(expr) in (Power, Pnorm, GeoMean)  # (their Approx subclasses are second-order cones already)


def _rebuild(expr: Any, memo: dict[int, Any]) -> Any:
    """``expr`` with every exact power atom in its tree replaced (itself where none is)."""
    if id(expr) in memo:
        return memo[id(expr)]
    args = [_rebuild(a, memo) for a in expr.args]
    changed = any(new is not old for new, old in zip(args, expr.args))
    if _exact_atom(expr):
        out = _soc_atom(expr, args)
    else:
        out = expr.copy(args) if changed else expr
    memo[id(expr)] = out
    return out


def power_cone_free(problem: cp.Problem, variables: Sequence[cp.Variable] = ()) -> cp.Problem:
    """``problem`` with its power cones stated in second-order cones (itself if it has none).

    Args:
        problem: a validated DPP ``cvxpy.Problem``.
        variables: the variables the layer returns (dual variables of constraints included).

    Returns:
        The same problem over the same variables and parameters (plus auxiliary variables of
        the cone trees), still DPP: ``PowCone3D``/``PowConeND`` constraints replaced by their
        second-order cones, ``power``/``pnorm``/``geo_mean`` with ``approx=False`` by their
        ``approx=True`` forms at the exact exponent.

    Raises:
        ProblemError: an exponent that is no exact rational (see the module docstring), a
            parametric ``power`` exponent, or the dual variable of a power cone constraint asked
            for (its multipliers belong to cones the rewritten problem does not have).
    """
    memo: dict[int, Any] = {}
    objective = _rebuild(problem.objective.args[0], memo)
    asked = {v.id: i for i, v in enumerate(variables)}
    constraints, changed = [], objective is not problem.objective.args[0]
    for i, con in enumerate(problem.constraints):
        if isinstance(con, (PowCone3D, PowConeND)):
            if con.alpha.parameters():  # (its value now would be frozen into the cone trees)
                raise ProblemError(f"constraint {i} `{con}` has a parametric exponent, which needs power cones with "
                                   "a parametric exponent: neither solver path takes them; give it as a constant")
            for dual in con.dual_variables:
                if dual.id in asked:
                    raise ProblemError(
                        f"variables[{asked[dual.id]}] is the dual variable of constraint {i} `{con}`, a power cone "
                        "that the layer states in second-order cones (whose multipliers are not the power cone's): "
                        "its dual cannot be returned")
            constraints += _pow3d_socs(con) if isinstance(con, PowCone3D) else _powND_socs(con)
            changed = True
            continue
        args = [_rebuild(a, memo) for a in con.args]
        if all(new is old for new, old in zip(args, con.args)):
            constraints.append(con)
            continue
        new = con.copy(args)
        # The same constraint over an equal expression: the user's dual variables stay its own.
        new.dual_variables = con.dual_variables
        constraints.append(new)
        changed = True
    if not changed:
        return problem
    return cp.Problem(type(problem.objective)(objective), constraints)
