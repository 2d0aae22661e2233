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

Each test has a tolerance per row (:func:`pair_tolerances`: the point's accuracy in the
row's own scale, the slack's or the multiplier's, at least its estimated forward error there,
:mod:`.point_error`, where some pair is near enough a kink for that to matter):
a spectral value within it of 0 is a kink; an exponential block's pieces that differ a step of ``_UNDECIDED`` of the
solution's size along :math:`\\pm e` (a direction inside :math:`K` and :math:`K^*`, which
crosses every border of the pieces) are. :func:`kink_sides` moves :math:`v` to either side
of every kink at once; the adjoint tells from the two whether the side matters.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
from diffcp import cones as cone_lib

from .cone_checks import block_max, cone_blocks, row_maxima
from .exp_cone import projection_piece

__all__ = ["KINK_ERRORS", "kink_sides", "pair_scales", "pair_tolerances"]

# A spectral value of v (a nonnegative row's v_i = y_i − s_i included) below this, relative
# to the solution's size, has both y's and s's at 0: strict complementarity fails there.
_UNDECIDED = 1e-9
# ... a point polished to a KKT residual r below it is that accurate (relative to each row's
# scale), down to this floor: at 1e-9 of the solution's size, clamp(x, 0, 1) at x = (1e-9, 0.5)
# (its slack 1e-9 exact to rounding) was called a kink, "not unique or not differentiable". (Not
# lower: a second-order cone projected to its tip keeps a spectral value of 1e-11 at a size of 3.)
_UNDECIDED_FLOOR = 1e-10
# ... and the floor of a nonnegative row or a cone block away from its tip (see _accuracy).
_RESOLVED_FLOOR = 1e-13
# How many times a row's estimated forward error (.point_error) its slack or multiplier may be and still
# read as 0 (pair_tolerances), up to _WIDEST of the row's scale: the estimate is one Newton step and a
# rounding sample, and either may fall short in one row.
KINK_ERRORS = 16
_WIDEST = 1e-6
# A row's (cone block's) own scale of x counts where it is at least this fraction of the
# solution's (see pair_tolerances).
_OWN_SCALE = 1e-8

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


def pair_tolerances(A, b: np.ndarray, c: np.ndarray, x: np.ndarray, y: np.ndarray, s: np.ndarray,
                    residual: float, cones: list, error: Callable[[], np.ndarray | None] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(for s, for y)``: each row's tolerance for :func:`kink_sides`, the point's relative
    accuracy (``residual``, its KKT residual, within [1e-13, 1e-9]; [1e-10, 1e-9] on a cone at
    its tip, :func:`_accuracy`) times the row's own scale (:func:`pair_scales`), and at least
    :data:`KINK_ERRORS` times the point's estimated forward error in each row of ``v = y − s``, up to
    :data:`_WIDEST` of the row's scale. ``error`` gives that estimate ``(m,)`` (or None: none;
    :func:`~.point_error.point_error`), and is called only where some pair lies within :data:`_WIDEST`
    of its scales of a kink: elsewhere no error can make one, and its solves are saved. (The residual
    hides the conditioning: at rounding, a weakly active row of a QP at n = 100 had its slack at
    9.1e-12, 8 times the residual's tolerance, its estimated error 9.1e-12.)"""
    scale_s, scale_y = pair_scales(A, b, c, x, y, s, cones)
    accuracy = min(_UNDECIDED, max(_UNDECIDED_FLOOR, residual)) if np.isfinite(residual) else _UNDECIDED
    tol_s, tol_y = _accuracy(cones, y, s, scale_s, scale_y, residual, accuracy)
    near = error is not None and kink_sides(cones, y, s, 1.0, (_WIDEST * scale_s, _WIDEST * scale_y)) is not None
    err = error() if near else None
    if err is not None:
        tol_s = np.maximum(tol_s, np.minimum(KINK_ERRORS * err, _WIDEST * scale_s))
        tol_y = np.maximum(tol_y, np.minimum(KINK_ERRORS * err, _WIDEST * scale_y))
    return tol_s, tol_y


def pair_scales(A, b: np.ndarray, c: np.ndarray, x: np.ndarray, y: np.ndarray, s: np.ndarray,
                cones: list) -> tuple[np.ndarray, np.ndarray]:
    """``(for s, for y)`` ``(m,)``: each row's own scale,
    ``‖A_i‖∞ ξ_i + |b_i|`` for the slack (``ξ_i`` x's scale in the row's columns and ``|b_i| / ‖A_i‖∞``,
    or the solution's where that is ~0), ``‖|A|ᵀ|y| + |c|‖∞ / ‖A_i‖∞`` (over the row's columns) for
    the multiplier (what it weighs in the dual rows). Both scale with the row (a row times d: its slack times
    d, its multiplier over d): with one tolerance for all rows, 1e-9 of the solution's size,
    rows scaled by 1e-8 were kinks wherever their slack was below 0.1 of their size (148 of
    2526 elements warned "not unique", gradients exact). A zero row keeps the solution's size."""
    A = A if sp.isspmatrix_csc(A) else sp.csc_matrix(A)
    rows = row_maxima(A)[0]
    cols = np.repeat(np.arange(A.shape[1]), np.diff(A.indptr))  # (each stored entry's column: A is CSC)
    # |A|ᵀ|y| + |c|: the dual rows' terms, column by column
    dual = np.bincount(cols, np.abs(A.data) * np.abs(y[A.indices]), minlength=A.shape[1]) + np.abs(c)
    size = 1.0 + max(np.abs(y).max(initial=0.0), np.abs(s).max(initial=0.0))  # (kink_sides' default)
    safe = np.where(rows > 0, rows, 1.0)
    # Scales along each row (block), from its own columns: x's (and b_i / ‖A_i‖∞), the dual rows'
    # terms; the whole program's where the row's own is below _OWN_SCALE of it (a cone projected
    # to its tip keeps noise of 1e-11 in its columns, and a kink there), else its own (a ball of
    # radius 1e-6 beside an objective of unit data: its slack 1e-12 inside, its multiplier 1e-12
    # outside are 1e-6 of the ball's own scales, not kinks).
    implied = np.where(rows > 0, np.abs(b) / safe, 0.0)
    x_scale = _own_scale(A, cols, np.abs(x)[cols], implied, cones)
    d_scale = _own_scale(A, cols, dual[cols], np.zeros(A.shape[0]), cones)
    return (np.where((rows > 0) & (x_scale > 0), rows * x_scale + np.abs(b), size),
            np.where((rows > 0) & (d_scale > 0), d_scale / safe, size))


def _accuracy(cones: list, y: np.ndarray, s: np.ndarray, tol_s: np.ndarray, tol_y: np.ndarray, residual: float,
              accuracy: float) -> tuple[np.ndarray, np.ndarray]:
    """``(tol_s, tol_y)`` times each row's accuracy: ``accuracy`` (floored at
    ``_UNDECIDED_FLOOR``) on a second-order or PSD block whose slack is at its tip (its
    spectral values all within it) and on exponential blocks; the residual, floored at
    ``_RESOLVED_FLOOR``, on the others. That floor is for tips, whose spectral values keep
    the solve's noise (1e-11 at a size of 3); a nonnegative row or a cone away from its tip
    is as exact as the residual says: a ball ‖y − c‖ <= 1e-6 with x outside by 1e-12 has a
    multiplier whose spectral value, 2e-12, is exact to rounding, and was a kink at 1e-10
    ("not unique or not differentiable", its gradient exact)."""
    fine = min(_UNDECIDED, max(_RESOLVED_FLOOR, residual)) if np.isfinite(residual) else _UNDECIDED
    acc = np.full(y.size, fine)
    for kind, at, q in cone_blocks(cones):
        block = slice(at, at + q)
        if kind in (cone_lib.SOC, cone_lib.PSD):
            if np.abs(_spectral(kind, s[block])[0]).max() <= accuracy * tol_s[block].max():
                acc[block] = accuracy
        elif kind in (cone_lib.EXP, cone_lib.EXP_DUAL):
            acc[block] = accuracy
    return acc * tol_s, acc * tol_y


def _own_scale(A, cols: np.ndarray, per_entry: np.ndarray, floor: np.ndarray, cones: list) -> np.ndarray:
    """Each row's largest ``per_entry`` value over its stored entries (and ``floor``), its cone
    block's largest; the largest of all where a row's is below ``_OWN_SCALE`` of that."""
    own = floor.copy()
    np.maximum.at(own, A.indices, per_entry)
    own = block_max(own, cones)
    whole = float(np.max(own, initial=0.0))
    return np.where(own >= _OWN_SCALE * whole, own, whole)


def kink_sides(cones: list, y: np.ndarray, s: np.ndarray, step: float,
               tols: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """``v = y − s`` moved to the side ``+`` (y's) and the side ``−`` (s's) of every kink of
    :math:`\\Pi_{K^*}` it sits at, or None where every cone block is strictly complementary.

    ``cones``: diffcp's parsed ``(kind, size)`` list; ``y, s`` ``(m,)`` a solution's
    multiplier and slack; ``step``: where the sides are put, ``±step`` for a spectral
    value at 0 (nonnegative, second-order and PSD blocks: the other values kept, so the
    projection's derivative is exactly each side's limit). An exponential block is moved
    by ``±τ e`` (``τ`` the test's tolerance), the step that showed its pieces differ.
    ``tols``: :func:`pair_tolerances` (a spectral value of y's within the second, of s's
    within the first, is 0); by default ``_UNDECIDED`` of the solution's size for all.
    Returns two ``(m,)`` arrays.
    """
    v = y - s
    tol = _UNDECIDED * (1.0 + max(np.abs(y).max(initial=0.0), np.abs(s).max(initial=0.0)))
    tol_s, tol_y = (np.full(v.size, tol), np.full(v.size, tol)) if tols is None else tols
    plus, minus, exp_rows, exp_sign, found = v.copy(), v.copy(), [], [], False
    for kind, at, q in cone_blocks(cones):
        block = slice(at, at + q)
        if kind == cone_lib.POS:
            open_ = np.where(v[block] >= 0, v[block] <= tol_y[block], -v[block] <= tol_s[block])
            plus[block], minus[block] = np.where(open_, step, v[block]), np.where(open_, -step, v[block])
            found |= bool(open_.any())
        elif kind in (cone_lib.SOC, cone_lib.PSD):
            lam, rebuild = _spectral(kind, v[block])
            open_ = np.where(lam >= 0, lam <= tol_y[block].max(), -lam <= tol_s[block].max())
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
