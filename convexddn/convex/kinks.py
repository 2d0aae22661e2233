"""Where strict complementarity fails in a cone program's solution, for the per-element path.

:class:`~.cone.ResidualMap` differentiates the projection :math:`\\Pi_{K^*}` at
:math:`v = y - s` (:math:`y = \\Pi_{K^*}(v)`, :math:`s = y - v`). That projection is smooth
where each cone block's pair :math:`(s, y)` is strictly complementary, and has a kink
(one-sided derivatives that differ) where it is not:

- nonnegative row: :math:`s_i = y_i = 0`, i.e. :math:`v_i = 0`;
- second-order and PSD cones (symmetric: :math:`s` and :math:`y` share a Jordan frame,
  :math:`v = \\sum_k \\lambda_k c_k` with :math:`y`'s spectral values
  :math:`\\lambda_k^+` and :math:`s`'s :math:`\\lambda_k^-`): some :math:`\\lambda_k = 0`,
  i.e. :math:`\\operatorname{rank} S + \\operatorname{rank} Y < n` — :math:`s = 0` with
  :math:`y \\in \\partial K`, :math:`y = 0` with :math:`s \\in \\partial K`, both 0, or a PSD
  pair whose eigenvalues are both 0 along a common direction;
- exponential cone (:math:`K \\ne K^*`, no spectral frame): :math:`v` on the border of two
  of the projection's pieces (:mod:`.exp_cone`: inside, polar, the quadrant
  :math:`r, s \\le 0` on either side of :math:`t = 0`, the boundary ray): :math:`s = 0` with
  :math:`y \\in \\partial K^*`, :math:`y = 0` with :math:`s \\in \\partial K`, both 0, or
  :math:`s, y` on faces whose dimensions add up to less than 3.

Each test has the tolerance of the nonnegative rows' (``_UNDECIDED`` of the solution's
size): a spectral value within it of 0, or pieces that differ a step that far along
:math:`\\pm e` (a direction inside :math:`K` and :math:`K^*`, which crosses every border
of the pieces), is a kink. :func:`kink_sides` moves :math:`v` to either side of every
kink at once; the adjoint tells from the two whether the side matters.
"""
from __future__ import annotations

import numpy as np
from diffcp import cones as cone_lib

from .cone_checks import cone_blocks
from .exp_cone import projection_piece

__all__ = ["kink_sides"]

# A spectral value of v (a nonnegative row's v_i = y_i − s_i included) below this, relative
# to the solution's size, has both y's and s's at 0: strict complementarity fails there.
_UNDECIDED = 1e-9

# A direction inside both the exponential cone and its dual (y e^{x/y} = e^{-1} <= z = 1;
# −u e^{v/u} = e^{-1} <= e w = e): a step along it crosses every border of the pieces.
_EXP_INSIDE = np.array([-1.0, 1.0, 1.0]) / np.sqrt(3.0)


# How far (in tolerances) from 0 a coordinate of an exponential block's y or s must be
# for the block to be left out of the piece test (see kink_sides).
_EXP_NEAR = 1e3


def _spectral(kind: str, v: np.ndarray):
    """``(λ, rebuild)``: the spectral values of a second-order or PSD block ``v`` (diffcp's
    layout: ``(t, u)``; the scaled lower triangle) and the map from new values back to
    the block in the same frame."""
    if kind == cone_lib.SOC:
        t, u = v[0], v[1:]
        nu = float(np.linalg.norm(u))
        d = u / nu if nu > 0 else np.eye(1, u.size).ravel()  # (any unit vector at the axis)
        lam = np.array([t + nu, t - nu]) if u.size else np.array([t, t])

        def rebuild(new: np.ndarray) -> np.ndarray:
            return np.concatenate([[0.5 * (new[0] + new[1])], 0.5 * (new[0] - new[1]) * d])
        return lam, rebuild
    k = cone_lib.psd_dim(v.size)
    lam, Q = np.linalg.eigh(cone_lib.unvec_symm(v, k))
    return lam, lambda new: cone_lib.vec_symm((Q * new) @ Q.T)


def kink_sides(cones: list, y: np.ndarray, s: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray] | None:
    """``v = y − s`` moved to the side ``+`` (y's) and the side ``−`` (s's) of every kink of
    :math:`\\Pi_{K^*}` it sits at, or None where every cone block is strictly complementary.

    ``cones``: diffcp's parsed ``(kind, size)`` list; ``y, s`` ``(m,)`` a solution's
    multiplier and slack; ``step``: where the sides are put, ``±step`` for a spectral
    value at 0 (nonnegative, second-order and PSD blocks: the other values kept, so the
    projection's derivative is exactly each side's limit). An exponential block is moved
    by ``±τ e`` (``τ`` the test's tolerance), the step that showed its pieces differ.
    Returns two ``(m,)`` arrays.
    """
    v = y - s
    tol = _UNDECIDED * (1.0 + max(np.abs(y).max(initial=0.0), np.abs(s).max(initial=0.0)))
    plus, minus, exp_rows, exp_sign, found = v.copy(), v.copy(), [], [], False
    for kind, at, q in cone_blocks(cones):
        block = slice(at, at + q)
        if kind == cone_lib.POS:
            open_ = np.abs(v[block]) <= tol
            plus[block], minus[block] = np.where(open_, step, v[block]), np.where(open_, -step, v[block])
            found |= bool(open_.any())
        elif kind in (cone_lib.SOC, cone_lib.PSD):
            lam, rebuild = _spectral(kind, v[block])
            open_ = np.abs(lam) <= tol
            if open_.any():
                plus[block], minus[block] = rebuild(np.where(open_, step, lam)), rebuild(np.where(open_, -step, lam))
                found = True
        elif kind in (cone_lib.EXP, cone_lib.EXP_DUAL):
            # Π_{K*}(v) = v + Π_K(−v) for the cone (K* = K_exp*), Π_{K_exp}(v) for its dual
            exp_rows.append(at + np.arange(3))
            exp_sign.append(-1.0 if kind == cone_lib.EXP else 1.0)
    if exp_rows:  # (all blocks at once: a logistic regression has one per data point)
        rows, sign = np.stack(exp_rows), np.array(exp_sign)[:, None]
        # Only blocks with a coordinate of y or s near 0: every border of the pieces lies
        # there (y = 0, s = 0, the faces {s = 0} of K and {r = 0} of K*, the quadrant's
        # y_s = 0), and a step of tol moves y and s by tol at most (a projection is
        # 1-Lipschitz). The pieces of the others cost 12 % of a logistic regression's backward.
        near = np.minimum(np.abs(y[rows]), np.abs(s[rows])).min(1) <= _EXP_NEAR * tol
        rows, sign = rows[near], sign[near]
        up, down = v[rows] + tol * _EXP_INSIDE, v[rows] - tol * _EXP_INSIDE
        open_ = projection_piece(sign * up) != projection_piece(sign * down)
        plus[rows[open_]], minus[rows[open_]] = up[open_], down[open_]
        found |= bool(open_.any())
    return (plus, minus) if found else None
