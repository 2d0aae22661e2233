"""A polished point inside a nearly flat face: the objective still falls along the face.

Where the limit system of a polished point (:mod:`.uniqueness`) is singular, the point may
move along a null direction :math:`v` of

.. math::

    P + C^T C, \\qquad C \\text{ the rows that hold (equalities, active bounds)},

without leaving any row that holds (``Cv = 0``) and without curvature (``Pv = 0``): the
objective is linear along ``v``, its slope the reduced gradient

.. math::

    v^T (Px + q) = v^T r_x, \\qquad r_x = Px + q + A^T z

(``Pv = 0``, ``C v = 0`` and the other multipliers are 0). A solution has that slope 0: the
face is a face of optima and the point any one of them (not unique: the backward's
warning). Above rounding, the point is no solution: the cost falls along ``v`` until a
row is met (a vertex) or forever (a ray). An LP with a small cost margin,
:math:`\\min p^T x + \\|x\\|_1` s.t. :math:`\\|x\\|_\\infty \\le 1` at :math:`p = (-1 - 10^{-11},
0.5)`, stopped at x = (0.07, 0) on the edge towards the vertex (1, 0): its residual
(2.5e-12) passed, its signs were right, and the error estimate (a Newton step with the
limit system regularised along ``v``: 7.8e-9, proportional to the margin) passed too.

:func:`flat_descent` finds such points; the active-set steps (:mod:`.active_set`) then take
them along ``v``. The slope is at rounding where ``|v^T r_x|`` is at most :data:`_FLAT`
rounding levels (:func:`~.polish.rounding_level`, 16 ulps) of the dual residual's scale,
``1 + max(‖q‖, ‖Px‖, ‖Aᵀz‖)`` — the sign tolerances' units (:func:`~.active_set.sign_tolerances`),
a smaller multiple: ``r_x`` itself is what the Newton polish leaves at 0.3-4 ulps of that
scale (the qp50, qp100, sparsemax and L1-ball benchmarks: at most 4), whereas a
multiplier's sign compounds the rows' conditioning. A margin of 1e-13 on the LP above is
~150 ulps of its scale; an exact tie, 0 to rounding.
"""
from __future__ import annotations

import torch

from .kkt import bmv, row_inf
from .polish import rounding_level
from .symmetric_cones import ConeLayout
from .uniqueness import limit_rows, rows_basis

__all__ = ["dual_scale", "flat_descent"]

# The reduced gradient along a null direction of the limit system is at rounding at most
# this many rounding levels (16 ulps each) of the dual residual's scale (module docstring).
_FLAT = 4


def dual_scale(q: torch.Tensor, Px: torch.Tensor, ATz: torch.Tensor) -> torch.Tensor:
    """``(B,)`` the dual residual's scale, ``1 + max(‖q‖∞, ‖Px‖∞, ‖Aᵀz‖∞)``: the units of the reduced
    gradient here and of the multipliers' signs (:func:`~.active_set.sign_tolerances`)."""
    return 1 + torch.stack([row_inf(q), row_inf(Px), row_inf(ATz)]).amax(0)


def flat_descent(d, layout: ConeLayout, x: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                 where: torch.Tensor, cols: torch.Tensor | None = None,
                 duals: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` the elements among ``where`` whose objective falls along a null direction of
    their limit system beyond rounding (the module docstring): not solutions, with one excuse.

    The excuse, ``cols`` the output variables (all where ``None``) and ``duals`` the output
    multipliers' rows (none where ``None`` or empty), as the error estimate's: an epigraph
    variable free above ``λ‖x‖₁`` with λ = 1e-12 beside a strictly convex ``x`` falls at slope λ
    (not rounding) until its rows ``t ≥ ±x`` hold, and the active-set steps could not always close
    that gap. Such a point stays (the backward warns of the multiplier it cannot resolve) where

    - no multiplier is an output (the vertex the descent ends at has other ones),
    - neither the steepest flat direction ``-v`` (``v`` = ``r_x``'s projection on ``N``) nor the
      cost's, ``-u`` (``u`` = ``(Px + q)``'s), moves the output variables beyond its rounding,
    - and the cost's descent is bounded: the inequality rows ``-u`` uses up,
      ``B = {i : a_iᵀ u < 0}`` (unit rows, beyond ``√ε ‖u‖``), leave no fall in the face: the
      steepest direction in :math:`N \\cap \\ker A_B` has its slope at rounding. Where none blocks
      (the exact ray (1, 1) of ``min c·x, x ≥ 0, x1 − x0 ≤ 1``) that is ``u`` itself: a ray is
      never excused, whatever the outputs; where the blockers stop only part of the fall (a ray
      beside the epigraph variable) the rest is one too. (``N ∩ ker A_B`` keeps the blockers'
      span, not Farkas's cone: with one blocker the two agree, with several it may excuse a ray
      that a mixed-sign combination of blockers hides; the steps then never run.) The cost's
      gradient, not ``r_x``: ``r_x`` also holds the unresolved multipliers of rows outside ``C``
      (an epigraph row's λ-sized ``z``), whose share in ``r_x`` may point out of every blocker.

    The null space :math:`N` of :math:`P + C^T C` is found unsquared, as
    :func:`~.uniqueness._unsquared` does: ``C``'s right singular vectors with singular values
    at most :math:`\\max(\\max(k, n)\\,\\epsilon, 1/`:data:`~.uniqueness.LIMIT_AMPLIFICATION`:math:`)`
    (unit rows), then, within them, the eigenvectors of :math:`V^T P V` with eigenvalues at
    rounding, :math:`n \\epsilon (1 + \\max |V^T P V|)` (equilibrated units: P's entries ~1).
    The slope is the length of :math:`r_x`'s projection on :math:`N`: the slope along the
    steepest direction in :math:`N`.

    Cost: only elements with :math:`\\|r_x\\|_2` above the tolerance can have such a slope
    (:math:`|v^T r_x| \\le \\|r_x\\|_2` for a unit ``v``); polished points have ``r_x`` at
    rounding and take one host read. The others take one SVD of their ``(k, n)`` rows and one
    symmetric eigendecomposition of ``(n, n)``.

    Shape:
        ``d`` equilibrated data (``P (B, n, n), q (B, n), A (B, m, n)``), ``x (B, n)``,
        ``s, z (B, m)`` its point, ``where (B,)`` -> ``(B,)`` bool.
    """
    Px, ATz = bmv(d.P, x), bmv(d.A.mT, z)
    rx = Px + d.q + ATz
    tol = _FLAT * rounding_level(x) * dual_scale(d.q, Px, ATz)  # (the largest reduced gradient at rounding)
    gate = where & (rx.norm(dim=1) > tol)
    idx = torch.nonzero(gate).squeeze(1)  # (one host read; the common case stops here)
    if not idx.numel():
        return gate
    part = d.select(idx)
    slope, v, basis = _null_slope(part, layout, *(v.index_select(0, idx) for v in (s, z, rx)))
    tol = tol.index_select(0, idx)
    falls = slope > tol
    if duals is not None and duals.numel():  # (the multipliers are outputs: no excuse)
        return gate.index_copy(0, idx, falls)
    # The cost's own fall in the face: g = Px + q along N (Pv = 0 there: linear). Not rx's,
    # which holds the unresolved multipliers of rows outside C (an epigraph row's λ-sized z).
    g = Px.index_select(0, idx) + part.q
    u = bmv(basis, bmv(basis.mT, g))
    reached = _moves(v, cols) | _moves(u, cols)
    unblocked = _unblocked_slope(part.A[:, layout.zero:layout.zero + layout.nonneg], u, basis) > tol
    return gate.index_copy(0, idx, falls & (reached | unblocked))


def _moves(v: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """``(B,)`` the direction ``v`` ``(B, n)`` moves the variables ``cols`` (all where ``None``)
    beyond its own rounding (``√ε ‖v‖∞``)."""
    out = v if cols is None else v.index_select(1, cols.to(v.device))
    return row_inf(out) > torch.finfo(v.dtype).eps ** 0.5 * row_inf(v)


def _unblocked_slope(A: torch.Tensor, v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``(B,)`` the fall along the face that the rows blocking ``-v`` leave: the length of
    ``v`` ``(B, n)`` (the cost's gradient projected on ``N``)'s projection on
    :math:`N \\cap \\ker A_B` (see :func:`flat_descent`).

    ``A`` ``(B, k, n)`` the inequality rows (``s = b - Ax ≥ 0``: ``-v`` uses row i up where
    ``a_iᵀ v < 0``), ``basis`` ``(B, n, n)`` orthonormal columns, those outside ``N`` zero, ``v`` in
    their span. In ``N``'s coordinates ``c = basisᵀ v`` the blockers are ``G = A_B basis``; the
    projection keeps ``c``'s part along ``G``'s right singular vectors with singular values at
    most ``√ε`` (unit rows: a blocker that far from ``N`` moves ``√ε`` per unit step, as the
    blocking threshold). One SVD of ``(k, n)``, on the few elements flat_descent gates."""
    k, n = A.shape[1:]
    if not k:
        return v.norm(dim=1)
    root = torch.finfo(v.dtype).eps ** 0.5
    unit = A / A.norm(dim=2, keepdim=True).clamp_min(torch.finfo(A.dtype).tiny)
    blocks = bmv(unit, v) < -root * v.norm(dim=1, keepdim=True)
    G = torch.where(blocks[:, :, None], unit, 0.0) @ basis
    sv, Wt, _ = rows_basis(G, n)  # (full: Wt (B, n, n); sv padded to n)
    c = bmv(Wt, bmv(basis.mT, v))
    return torch.where(sv <= root, c, 0.0).norm(dim=1)


def _null_slope(d, layout: ConeLayout, s: torch.Tensor, z: torch.Tensor,
                rx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``((B,), (B, n), (B, n, n))`` the 2-norm of ``rx`` ``(B, n)``'s projection on the null space
    :math:`N` of the limit matrix of ``d`` at ``(s, z)`` (see :func:`flat_descent`), that
    projection, and an orthonormal basis of :math:`N` (its columns, the others zero)."""
    P = d.P
    n = rx.shape[1]
    eps = torch.finfo(rx.dtype).eps
    _, Vt, free = rows_basis(limit_rows(d, layout, s, z), n)
    # P within the rows' null space; the directions the rows fix get a weight above every
    # eigenvalue of that block, so that they are never taken as null.
    S = Vt @ P @ Vt.mT
    S = 0.5 * (S + S.mT)
    both = free[:, :, None] & free[:, None, :]
    big = 1 + S.abs().amax((1, 2))
    S = torch.where(both, S, 0.0) + torch.diag_embed(torch.where(free, 0.0, big[:, None]))
    lam, Y = torch.linalg.eigh(S)
    # (eigh's rounding is that of the whole matrix, big included: P = 0 came out at ~eps big)
    null = lam <= n * eps * big[:, None]
    coef = torch.where(null, (Y.mT @ (Vt @ rx.unsqueeze(-1))).squeeze(-1), 0.0)
    basis = torch.where(null[:, None, :], Vt.mT @ Y, 0.0)
    return coef.norm(dim=1), bmv(basis, coef), basis
