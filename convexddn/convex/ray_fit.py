"""A solver's dual ray made exact on the rows it needs, for :func:`.reach.exact_ray`.

A dual ray ``y ∈ K*`` with ``Aᵀy = 0`` and ``bᵀy < 0`` proves that ``Ax + s = b, s ∈ K`` has no
solution, whatever ``c``: at any ``x``, ``bᵀy = ŝᵀy − rᵀy ≥ −rᵀy`` leaves a residual. A solver's
ray holds ``Aᵀy = 0`` only to its tolerance, and the error it leaves in a column bounds how far
the proof reaches (:mod:`.dissent`). Where the ray is inside K* with a margin on the blocks it
needs, it can be made exact: its part ``y_S`` on its support ``S`` projected onto the null space
of ``A_Sᵀ`` (a least squares, the step the size of the solver's error) stays in K*, and the result
is a certificate exact to rounding. A block at the edge of K* is pushed out by such a step: it is
dropped (set to 0) and the rest fitted again; if the block was needed, what is left does not
verify, and the caller keeps the ray as it came.

The edge blocks a ray leans on without needing them are typically the objective's: CVXPY writes
``sum_squares(X − S)`` as an epigraph ``(1 + t, 1 − t, 2(X − S))`` in a second-order cone and
``sum(exp(z))`` as ``(z_i, 1, t_i)`` in exponential cones, rows that any ``x`` satisfies once
``t`` is large, so they cannot take part in a proof of infeasibility — yet Clarabel's rays put
1.5e-2 on the first at its edge (``(a, a, 0)``, missing ``t``'s column by 9e-13) and 1.7e-13 on
``t_i`` in the second, and that column alone set a "reach" of 3e11-5e12 at which no solver
confirmed the certificate: an O(1) SDP (``|X01| <= trace(X)/2 <= 1`` against ``X01 >= 1.3``) and
``z >= 1, log_sum_exp(z) <= 0`` raised ``SolverError`` "the solvers disagree" with a curved
objective and ``InfeasibleError`` with a linear one. Fitted, their rays are exact on the
constraints' rows (the PSD block, eigenvalues >= 0.014; the log-sum-exp cones, inside K*_exp).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from diffcp import cones as cone_lib

from .cone_checks import cone_blocks, project

__all__ = ["column_misses", "fitted", "polyhedral"]

_EPS = np.finfo(np.float64).eps

# The most entries (rows × columns) of the dense least squares that makes a ray exact.
_DENSE_RAY = 4_000_000
# The most rounds of dropping edge blocks and fitting again (past it: no exact ray, as before).
_MAX_DROPS = 8


def column_misses(A: sp.csc_matrix, y: np.ndarray, absA: sp.csc_matrix | None = None) -> np.ndarray:
    """``Aᵀy`` with the columns that are 0 to the rounding of their terms (within 64 eps
    ``|A|ᵀ|y|``) set to 0: where a ray is exact (:func:`fitted`'s test) and where it stops
    reaching (:func:`.reach.reach_point`) are decided by this one test, so a ray ``fitted``
    returns as exact is one ``reach_point`` finds exact. ``absA``: ``|A|`` if formed already."""
    g = A.T @ y
    return np.where(np.abs(g) <= 64 * _EPS * ((abs(A) if absA is None else absA).T @ np.abs(y)), 0.0, g)


def _null_step(Ar: sp.csr_matrix, y: np.ndarray, keep: np.ndarray) -> np.ndarray | None:
    """``y`` on its support ``S = keep ∩ {y ≠ 0}`` projected onto the null space of ``A_Sᵀ``,
    ``y_S − A_S (A_Sᵀ A_S)⁺ A_Sᵀ y_S`` (a least squares), 0 off ``S``; ``None`` where ``S`` is
    empty or ``A_S`` too large to take densely. ``Ar``: ``A`` in CSR (rows taken)."""
    support = np.flatnonzero(keep & (y != 0))
    if not support.size or support.size * Ar.shape[1] > _DENSE_RAY:
        return None
    AS = Ar[support].toarray()
    step, *_ = np.linalg.lstsq(AS.T, AS.T @ y[support], rcond=None)
    out = np.zeros_like(y)
    out[support] = y[support] - step
    return out


def polyhedral(A: sp.csc_matrix, cones: list, y: np.ndarray) -> np.ndarray | None:
    """The part of the dual ray ``y`` on the zero and nonnegative rows, made exact on its support
    (:func:`_null_step`; a solver's ray carries its tolerance there, 1 − 1e-9 for the 1 a
    conflicting pair of rows needs), or ``None`` where that leaves the nonnegative cone or the
    least squares is too large."""
    keep = np.zeros(y.size, dtype=bool)
    nonneg = np.zeros(y.size, dtype=bool)
    for kind, at, q in cone_blocks(cones):
        if kind in (cone_lib.ZERO, cone_lib.POS):
            keep[at:at + q] = True
            nonneg[at:at + q] = kind == cone_lib.POS
    out = _null_step(A.tocsr(), y, keep)
    if out is None or np.any(out[nonneg] < 0):
        return None
    return out


def fitted(A: sp.csc_matrix, cones: list, y: np.ndarray) -> np.ndarray | None:
    """The dual ray ``y`` (in K*, its noise dropped) made exact on all its rows, curved blocks
    included, or ``None``.

    Repeatedly: ``ỹ`` = :func:`_null_step` on the rows kept (at first all), ``ȳ = Π_{K*}(ỹ)``; where
    a column of ``Aᵀȳ`` still misses 0 by more than the rounding of its terms (64 eps ``|A|ᵀ|ȳ|``,
    as :func:`.reach.reach_point` tests), the projection moved a block at the edge of K* that
    meets it (the step pushed it out, or it sat at the edge: ``(u, v, 0)``, ``u < 0``, is not in
    K*_exp, whose nearest point ``w = −u e^{v/u − 1}`` leaves that in ``t_i``'s column, 6e-22
    against terms of 6e-22): each such block (a nonnegative row: its own block) is dropped; with
    no column missing, or nothing to drop, ``ȳ`` is returned. The caller still checks it
    (``Aᵀȳ = 0`` to rounding, ``bᵀȳ < 0``): dropping a block the proof needs, or fitting the ray of
    a feasible program, leaves no certificate (an exact ray with ``bᵀȳ < 0`` has none to leave)."""
    keep = np.ones(y.size, dtype=bool)
    absA, Ar = abs(A), A.tocsr()
    blocks = []  # (the rows of each block that may be dropped: a zero row is never moved)
    for kind, at, q in cone_blocks(cones):
        if kind == cone_lib.POS:
            blocks += [slice(i, i + 1) for i in range(at, at + q)]
        elif kind != cone_lib.ZERO:
            blocks.append(slice(at, at + q))
    # (each pass drops at least one block; a few suffice for the objective's epigraph blocks, and a
    # dense least squares per pass on a large LP's every nonnegative row could take minutes)
    for _ in range(min(len(blocks), _MAX_DROPS) + 1):
        out = _null_step(Ar, y, keep)
        if out is None:
            return None
        proj = project(out, cones, dual=True)
        missing = column_misses(A, proj, absA) != 0
        if not missing.any():
            return proj
        meets = np.asarray(abs(Ar[:, np.flatnonzero(missing)]).sum(axis=1)).ravel() > 0  # rows in those columns
        moved = (proj != out) & meets & keep
        drop = [r for r in blocks if moved[r].any()]
        if not drop:
            return proj
        for r in drop:
            keep[r] = False
    return proj
