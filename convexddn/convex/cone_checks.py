"""Checks of a point and of a certificate of a cone program, for the per-element path.

A cone program in the form cvxpylayers' DIFFCP canonicalisation produces,

.. math::

    \\min_x c^T x \\quad \\text{s.t.}\\quad A x + s = b,\\; s \\in K,

is solved exactly when its KKT conditions hold: :func:`kkt_residual` measures how far a
point ``(x, y, s)`` is from that, row by row against the magnitudes of each row's terms;
:func:`verify_certificate` whether a solver's infeasibility or unboundedness ray holds.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from diffcp import cones as cone_lib

__all__ = ["block_max", "cone_blocks", "kkt_residual", "project", "residual_parts", "row_maxima", "verify_certificate"]


def _soc(v: np.ndarray) -> np.ndarray:
    """The exact projection onto one second-order cone {(t, u): ‖u‖ <= t}."""
    t, u = v[0], v[1:]
    nu = float(np.linalg.norm(u))
    if nu <= t:
        return v
    if nu <= -t:
        return np.zeros_like(v)
    a = 0.5 * (t + nu)
    return np.concatenate([[a], (a / nu) * u])


def _block_rows(kind: str, size) -> list[int]:
    """Rows of each cone of a parsed diffcp cone entry (``size``: an int, or a list for q
    and s); the zero and nonnegative entries are one block."""
    if kind == cone_lib.SOC:
        return [int(q) for q in size if q]
    if kind == cone_lib.PSD:
        return [k * (k + 1) // 2 for k in size if k]
    if kind in (cone_lib.EXP, cone_lib.EXP_DUAL):
        return [3] * int(size)
    return [int(size)] if int(size) else []


def cone_blocks(cones: list):
    """``(kind, start, rows)`` of each cone of diffcp's parsed ``(kind, size)`` list, in row
    order; the zero and nonnegative entries are one block each."""
    at = 0
    for kind, size in cones:
        for q in _block_rows(kind, size):
            yield kind, at, q
            at += q


def project(x: np.ndarray, cones: list, dual: bool = False, memo=None) -> np.ndarray:
    """diffcp's projection onto K (or K*), exact on the second-order cones, for the checks
    (:func:`kkt_residual`, :func:`verify_certificate`): diffcp's returns a point unchanged
    when ``‖u‖`` is within ``1e-8`` of ``t`` (``np.isclose``: 1e-5 relative), so a slack
    outside a cone by 1e-5 relative read as inside and passed a KKT check at 1e-6 (the
    cones are self-dual: ``dual`` does not matter there); and exact on the exponential
    cones (:mod:`.exp_cone`), where diffcp's is ~1e-8 accurate (``memo``: an
    :class:`.exp_cone.Memo` that keeps them)."""
    from .exp_cone import project_cones  # (it builds on this module: cone_blocks)

    out = project_cones(x, cones, dual, memo)
    for kind, at, q in cone_blocks(cones):
        if kind == cone_lib.SOC:
            out[at:at + q] = _soc(x[at:at + q])
    return out


def row_maxima(A: sp.csc_matrix) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, columns)``: the largest ``|A|`` entry of each row and column (0 where empty),
    from the stored entries (scipy's ``abs(A).max(axis)`` cost 0.3 ms a program)."""
    A = A if sp.isspmatrix_csc(A) else sp.csc_matrix(A)
    absd = np.abs(A.data)
    rows = np.zeros(A.shape[0])
    np.maximum.at(rows, A.indices, absd)
    cols = np.zeros(A.shape[1])
    nonempty = np.diff(A.indptr) > 0
    if absd.size:
        cols[nonempty] = np.maximum.reduceat(absd, A.indptr[:-1][nonempty])
    return rows, cols


def block_max(v: np.ndarray, cones: list) -> np.ndarray:
    """``v`` (one value per row) with each second-order, PSD and exponential cone block's
    values replaced by their largest (the zero and nonnegative rows as they are)."""
    out = v.copy()
    for kind, at, q in cone_blocks(cones):
        if kind not in (cone_lib.ZERO, cone_lib.POS):
            out[at:at + q] = out[at:at + q].max()
    return out


def residual_parts(A: sp.csc_matrix) -> tuple:
    """``(Aᵀ, |A|, |A|ᵀ, row maxima, column maxima)`` of ``|A|``, what :func:`kkt_residual` builds
    from ``A``: a program's polish measures each Newton step with the same ``A`` (rebuilding
    them was ~10 % of that)."""
    absA = abs(A)
    return (A.T, absA, absA.T, *row_maxima(A))


_ROOT_EPS = float(np.sqrt(np.finfo(np.float64).eps))


def _scalar_rows(cones: list) -> int:
    """How many leading rows are zero-cone and nonnegative rows (one row a block)."""
    return sum(q for kind, at, q in cone_blocks(cones) if kind in (cone_lib.ZERO, cone_lib.POS))


def _floors(scale: np.ndarray, unit: float) -> np.ndarray:
    """Each row's (column's) floor for :func:`kkt_residual`: its own data scale ``scale``
    (``max(‖A_i‖∞, |b_i|)``, its cone block's largest), capped at the program's ``unit``;
    ``unit`` where the scale is 0 (a zero row)."""
    return np.where(scale > 0, np.minimum(scale, unit), unit)


def kkt_residual(A: sp.csc_matrix, b: np.ndarray, c: np.ndarray, cones: list,
                 x: np.ndarray, y: np.ndarray, s: np.ndarray, memo=None, parts: tuple | None = None,
                 own_scale: bool = False) -> float:
    """Largest relative violation of primal/dual feasibility, cone membership and gap.

    Feasibility is measured row by row (column by column) against the magnitudes of the
    row's own terms, ``u + (|A||x| + |s| + |b|)_i`` (``u + (|A|ᵀ|y| + |c|)_j``; the floor
    ``u`` is 1, or the program's own primal (dual) scale where ``b`` (``c``) is nonzero and
    that scale is below 1), after
    discounting the rounding those terms carry (``64 eps`` of them); a slack's distance
    to K against its rows' scale, a multiplier's against its cone block's own size
    (:func:`_dual_cone_violation`). One norm for all
    rows let an inactive bound of 6.7e7 hide violations of 6e-3 in rows of 1e-2 (an
    infeasible LP returned as solved). (A far-off point whose residual grows with its
    own size is relatively accurate by these measures: only the gap can tell it.)
    The gap is relative to the smaller of the two objective values, as Clarabel
    measures it. ``memo``: an :class:`.exp_cone.Memo` for the exponential cones' projections;
    ``parts``: :func:`residual_parts` of ``A``, for a caller that measures one program many times.
    ``own_scale``: the zero and nonnegative rows' floors at most their own ``b``'s and the point's
    scale (the acceptance test; the polish's merit keeps the floors above, which its steps are tuned to).
    """
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(np.isfinite(s))):
        return float("inf")
    AT, absA, absAT, row_max, col_max = residual_parts(A) if parts is None else parts
    Ax = A @ x
    ATy = AT @ y
    cx, by = float(c @ x), float(b @ y)

    def worst(v: np.ndarray) -> float:
        return float(np.max(v)) if v.size else 0.0

    eps = np.finfo(np.float64).eps
    terms_p = absA @ np.abs(x) + np.abs(s) + np.abs(b)  # each row's terms' magnitudes
    terms_d = absAT @ np.abs(y) + np.abs(c)
    # The feasibility floors ("1 +") in the program's own unit where b (c) is nonzero and its
    # unit below 1: data all ~1e-6 are measured as the same program scaled to 1 (floors of
    # 1 passed a point violating rows of 1e-6 by 1e-6, and duals of 1e-7 off by 1e-7: an
    # infeasible and an unbounded LP returned as solved). Zero b (c) keeps 1: the point's
    # own terms may be noise there.
    nb, nc = worst(np.abs(b)), worst(np.abs(c))
    unit_p = min(1.0, max(nb, worst(terms_p))) if nb > 0 else 1.0
    unit_d = min(1.0, max(nc, worst(terms_d))) if nc > 0 else 1.0
    # ... and each row's (column's) floor at most its own data scale, as equilibrating it to
    # unit size would make it: beside the unit rows of a squared objective's cone, rows of
    # 1e-8 (a polyhedron G y <= h, G and h ~1e-8) met a floor of 1, and a point off by 1.5e-5
    # (each row violated by 1e-5 of its own size) passed at 5.8e-12, "Solved".
    floor_p = _floors(block_max(np.maximum(row_max, np.abs(b)), cones), unit_p)
    floor_d = _floors(np.maximum(col_max, np.abs(c)), unit_d)
    # ... and, for the zero and nonnegative rows, at most max(|b_i|, ‖A_i‖∞ ‖x‖∞) (the coefficient
    # times the point's scale, not times 1), down to sqrt(eps) of the unit: CVXPY's epigraph of a
    # squared objective puts constants 1 in b whatever the data's scale, and a coefficient of 1 is
    # no scale for a row whose b and x are 1e-6. Box rows there met a floor of 1: with data ~1e-6
    # an infeasible QP's point violating them by 5e-6 of their size passed at 5e-12, silently.
    k = _scalar_rows(cones) if own_scale else 0
    if k:
        own = np.maximum(np.abs(b[:k]), row_max[:k] * worst(np.abs(x)))
        floor_p[:k] = np.minimum(floor_p[:k], np.maximum(own, _ROOT_EPS * unit_p))
    primal = worst(np.maximum(np.abs(Ax + s - b) - 64 * eps * terms_p, 0.0) / (floor_p + terms_p))
    dual = worst(np.maximum(np.abs(ATy + c) - 64 * eps * terms_d, 0.0) / (floor_d + terms_d))
    gap = max(abs(cx + by) - 64 * eps * (abs(cx) + abs(by)), 0.0) / (1.0 + min(abs(cx), abs(by)))
    s_cone = _blockwise_violation(s, project(s, cones, dual=False, memo=memo), cones, terms_p, unit=floor_p)
    return max(primal, dual, gap, s_cone, _dual_cone_violation(y, project(y, cones, dual=True, memo=memo), cones))


def _dual_cone_violation(y: np.ndarray, proj: np.ndarray, cones: list) -> float:
    """A multiplier's distance to K*, each cone block's against the block's own largest ``|y|``,
    after discounting the rounding of the whole multiplier (``64 eps ‖y‖∞``).

    The polish's triple takes ``y`` through diffcp's projection, which returns a point
    unchanged within ``1e-8`` (absolute) of a second-order cone's boundary: what ``y`` keeps
    outside K* there is the slack that ``s = y − v`` loses (``Π(v) − v``), so this distance is
    that block's error. Against ``1 + ‖y‖∞`` it was an absolute error: projecting onto
    {‖x‖ <= t} a point 1e-5 (relative) outside the polar cone with data of 1e-6 gave a
    solution of 4e-16 for 6.5e-12 (off by 6.5e-6 of the data) at residual 8.7e-12, passed and
    not even in doubt, while the same element at data of 1 failed the check (3.8e-6) and was
    re-solved by the batched form. Against the block's own size the decision does not change
    with the data's scale, down to the multiplier's rounding.
    """
    dist = np.maximum(np.abs(y - proj) - 64 * np.finfo(np.float64).eps * np.max(np.abs(y), initial=0.0), 0.0)
    # (unit 1e-300: a block of y all 0 has no excess either, and 0/0 is not taken)
    return _blockwise_violation(dist, np.zeros_like(dist), cones, np.abs(y), unit=1e-300)


def data_scale_residual(A: sp.csc_matrix, b: np.ndarray, c: np.ndarray, x: np.ndarray, y: np.ndarray,
                        s: np.ndarray) -> float:
    """Largest violation of primal and dual feasibility in the data's own scale:
    ``|Ax + s − b|_i / (1 + |b_i|)`` and ``|Aᵀy + c|_j / (1 + |c_j|)``.

    :func:`kkt_residual` measures each row against its terms, the point's included, which
    a far-off point passes by its own size. Where a solver claimed infeasibility (or
    unboundedness) that its certificate did not verify, a point polished from its last
    iterate is trusted only if it passes here too: an infeasible QP with rows of 1e4
    gave a point of 2e14 whose rows were violated by 1.4e6, relative residual 1.2e-9.
    """
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(np.isfinite(s))):
        return float("inf")
    primal = np.abs(A @ x + s - b) / (1.0 + np.abs(b))
    dual = np.abs(A.T @ y + c) / (1.0 + np.abs(c))
    return float(max(np.max(primal, initial=0.0), np.max(dual, initial=0.0)))


def _blockwise_violation(v: np.ndarray, proj: np.ndarray, cones: list, scale: np.ndarray,
                         unit: float | np.ndarray = 1.0) -> float:
    """Largest ``‖v_b − proj_b‖∞ / (max unit_b + max scale_b)`` over the cone blocks ``b`` of ``v``
    (one row each for the zero and nonnegative cones), ``scale`` one value per row, ``unit`` one
    for all or one per row."""
    dist, out = np.abs(v - proj), 0.0
    unit = np.broadcast_to(np.asarray(unit, dtype=np.float64), dist.shape)
    for kind, at, q in cone_blocks(cones):
        d, sc, u = dist[at:at + q], scale[at:at + q], unit[at:at + q]
        if kind in (cone_lib.ZERO, cone_lib.POS):  # one block per row
            out = max(out, float(np.max(d / (u + sc))))
        else:
            out = max(out, float(np.max(d)) / (float(np.max(u)) + float(np.max(sc))))
    return out


def _drop_noise(d: np.ndarray, rows: np.ndarray, cones: list, tol: float) -> np.ndarray:
    """The dual ray ``d`` without the noise of rows it does not use: entries whose
    ``|d_i| ‖A_i‖∞`` (``rows``: each row's ``‖A_i‖∞``, a row without A left as it is) is below
    ``tol`` of the largest, as :func:`~.rays._drop_noise` on the batched path.

    Zero, nonnegative, exponential and PSD rows and second-order-cone tails become 0 (the
    caller checks K* after: an exponential row may leave it by that noise). A second-order
    cone's head ``t`` at noise level becomes ``‖u'‖``, its cleaned tail's norm (the least head
    in K*), where that would be at noise level in the head's row too: both values lie within
    the noise. Zeroed, a head above a tail left K*; kept, the rounding (1e-12) of an epigraph
    variable's ray, alone in its column, failed that column (an infeasible program with a
    cone ended in SolverError on every solver).
    """
    weight = np.abs(d) * rows
    floor = tol * weight.max(initial=0.0)
    noise = (rows > 0) & (weight <= floor)
    heads = [at for kind, at, q in cone_blocks(cones) if kind == cone_lib.SOC]
    drop = noise.copy()
    drop[heads] = False
    out = np.where(drop, 0.0, d)
    for kind, at, q in cone_blocks(cones):
        if kind == cone_lib.SOC and noise[at]:
            n1 = float(np.linalg.norm(out[at + 1:at + q]))
            if n1 * rows[at] <= floor:
                out[at] = n1
    return out


def verify_certificate(A: sp.csc_matrix, b: np.ndarray, c: np.ndarray, cones: list,
                       x: np.ndarray, y: np.ndarray, claim: str, tol: float = 1e-6) -> bool:
    """Whether the solver's certificate of ``claim`` ("infeasible" or "unbounded") holds.

    - infeasible: a dual ray ``y ∈ K*`` with ``Aᵀy = 0`` and ``bᵀy < 0``;
    - unbounded: a primal ray ``x`` with ``-Ax ∈ K`` and ``cᵀx < 0``.

    Each condition is checked relative to the data and the ray's own size (the ray is
    scale-free), so a status that a badly scaled problem provoked is not believed
    unless its certificate verifies. The sign test of ``bᵀy`` (``cᵀx``) is relative to
    its own largest term: measured against ``‖b‖∞``, an inactive bound of 1e4 beside
    rows of 1e-2 (which the ray does not use) rejected a valid certificate. ``Aᵀy`` is
    measured column by column against its terms ``|A|ᵀ|y|``, after dropping the noise of
    rows the ray does not use (entries whose ``|y_i| ‖A_i‖∞`` is below ``tol`` of the largest,
    a second-order cone's head lowered to its tail's norm, :func:`_drop_noise`; K* is checked
    after): against the largest ``|A|`` entry,
    ``y = e_0`` passed for ``1e-13 x_0 >= 1``, a feasible LP. A primal ray's distance to
    K is measured per cone block against its rows' largest ``|A|`` entry: against the
    largest in A, the ray (1, 0) of ``1e-14 x_0 <= 1`` (a bounded LP, violated by 1e-14
    per unit step) passed as unbounded.
    """
    def inf(v: np.ndarray) -> float:
        return float(np.max(np.abs(v))) if v.size else 0.0

    absA = abs(A)
    rows = np.asarray(absA.max(axis=1).todense()).ravel() if A.nnz else np.zeros(A.shape[0])  # each row's max
    if claim == "infeasible":
        ny = inf(y)
        if not np.all(np.isfinite(y)) or ny == 0:
            return False
        d = y / ny
        # The ray's noise on rows it does not use dropped (entries whose |d_i| ‖A_i‖∞ is below
        # tol of the largest, see _drop_noise: an exponential-cone row at the edge of K*,
        # w = 1e-8, left 1e-8 in the one column it met, and an infeasible program ended in
        # SolverError on every solver); then d in K* and each column of Aᵀd against its own
        # terms |A|ᵀ|d|.
        clean = _drop_noise(d, rows, cones, tol)
        # Either ray certifies where it passes: the cleaned one, or the ray as it came (whose
        # small entries balanced other rows: an LP with g y <= -1, -g y <= -1 and data of 1
        # lost 1e-7 entries to the cleaning, its columns then off by 3e-6, and the valid
        # certificate was called unverified, "the data may be badly scaled").
        return any(inf(r - project(r, cones, dual=True)) <= tol
                   and bool(np.all(np.abs(A.T @ r) <= tol * (absA.T @ np.abs(r))))
                   and float(b @ r) < -tol * max(inf(b * r), 1e-300) for r in (clean, d))
    if claim == "unbounded":
        nx = inf(x)
        if not np.all(np.isfinite(x)) or nx == 0:
            return False
        d = x / nx
        s = -(A @ d)
        in_cone = _blockwise_violation(s, project(s, cones, dual=False), cones, rows, unit=1e-300) <= tol
        return in_cone and float(c @ d) < -tol * max(inf(c * d), 1e-300)
    return False
