"""Infeasibility and unboundedness certificates, verified in the caller's units.

The interior point finds its rays on the equilibrated data (:mod:`.interior_point`); a
ray is believed only if it certifies the program as the caller gave it, each test
relative to the data and to the ray's own size.
"""
from __future__ import annotations

import torch

from .kkt import bmv, row_inf
from .symmetric_cones import ConeLayout

__all__ = ["exact_unbounded_ray", "verified_rays"]


def verified_rays(P, q, A, b, layout: ConeLayout, x, z, tol: float = 1e-6):
    """Whether ``z`` certifies infeasibility and ``x`` unboundedness, in the units given.

    For ``min ½xᵀPx + qᵀx s.t. Ax + s = b, s ∈ K``, per element:

    - infeasible: :math:`y = z/\\|z\\|_\\infty \\in K^*` (zero-cone rows free),
      each column :math:`|(A^T y)_j| \\le` ``tol`` :math:`(|A|^T|y|)_j` once the noise of
      rows the ray does not use is dropped (entries whose :math:`|y_i|\\,\\|A_i\\|_\\infty` is
      below ``tol`` of the largest, a second-order cone's head lowered to its tail's norm,
      :func:`_drop_noise`; against
      :math:`\\max|A|`, :math:`y = e_0` passed for the feasible :math:`10^{-13} x_0 \\ge 1`), and
      :math:`b^T y < -` ``tol`` :math:`\\|b \\circ y\\|_\\infty` (its own largest term: an
      inactive bound of 1e4 that the ray does not use rejected a valid one against
      :math:`\\|b\\|_\\infty`);
    - unbounded: :math:`d = x/\\|x\\|_\\infty` with :math:`-Ad \\in K` (each row, cone
      block, within ``tol`` of its own largest :math:`|A|` entry: against the largest in
      A, the ray (1, 0) of :math:`10^{-14} x_0 \\le 1`, a bounded LP, passed),
      :math:`\\|Pd\\|_\\infty` within ``tol`` of P's largest entry and
      :math:`q^T d < -` ``tol`` :math:`\\|q \\circ d\\|_\\infty`.

    Each test is relative to the data and to the ray's own size, as the per-element
    path's (:func:`~.cone_checks.verify_certificate`): a ray found on the equilibrated data is
    believed in the caller's units only if it passes there too.

    Shape:
        ``P (B, n, n), q (B, n), A (B, m, n), b (B, m), x (B, n), z (B, m)`` ->
        ``(infeasible, unbounded)``, ``(B,)`` bool each.
    """
    z0 = layout.zero
    p_max = row_inf(P)
    ny, nx = row_inf(z), row_inf(x)
    y = z / torch.where(ny > 0, ny, 1.0)[:, None]
    d = x / torch.where(nx > 0, nx, 1.0)[:, None]
    in_dual = layout.violation(y[:, z0:]) <= tol
    absA = A.abs()
    rows = absA.amax(2) if A.shape[2] else A.new_zeros(A.shape[:2])  # (B, m): each row's largest |entry|
    # Noise on rows the ray does not use dropped, y kept in K* (see _drop_noise).
    if A.shape[1]:
        y = _drop_noise(y, rows, tol, layout)
    infeasible = ((ny > 0) & torch.isfinite(ny) & in_dual & _within(bmv(A.mT, y), tol * bmv(absA.mT, y.abs()))
                  & ((b * y).sum(1) < -tol * row_inf(b * y)))
    s = -bmv(A, d)
    tiny = torch.finfo(A.dtype).tiny
    unbounded = ((nx > 0) & torch.isfinite(nx) & _within(s[:, :z0], tol * rows[:, :z0])
                 & (layout.violation(s[:, z0:], scale=rows[:, z0:], unit=tiny) <= tol)
                 & (row_inf(bmv(P, d)) <= tol * p_max)
                 & ((q * d).sum(1) < -tol * row_inf(q * d)))
    return infeasible, unbounded


def exact_unbounded_ray(P, q, A, layout: ConeLayout, x, tol: float) -> torch.Tensor:
    """(B,) whether ``x`` is a ray of unboundedness exact to ``tol`` (a rounding level), in the
    units given: :math:`d = x/\\|x\\|_\\infty` with each row of :math:`-Ad` in its cone, each entry of
    :math:`Pd` zero and :math:`q^T d` negative, all within ``tol`` of their own terms
    (:math:`|A||d|`, :math:`|P||d|`, :math:`|q|^T|d|`). A ray found by an active-set step
    (:func:`~.active_set.correct`) along an LP's edge whose cost decreases by 1e-9 per unit
    passes where :func:`verified_rays`' ``tol`` of 1e-6 refuses it. Exact to rounding, not
    beyond: a program bounded only by rows that close within ``tol`` of their terms along
    ``d`` reads as unbounded (min -x s.t. x - y <= 1, -(1 - 1e-13) x + y <= 0: d = (1, 1)
    passes, the solution ~1e13), as the docs say of astronomically large solutions."""
    z0 = layout.zero
    nx = row_inf(x)
    d = x / torch.where(nx > 0, nx, 1.0)[:, None]
    # (each row's terms, and its largest entry: d's unit is 1, and an entry of d at 1e-29, the
    # rounding of a zero, met a term of 2e-29 alone in its row)
    term = lambda M: bmv(M.abs(), d.abs()) + (M.abs().amax(2) if M.shape[2] else 0.0)  # noqa: E731
    Ad = bmv(A, d)
    cone = torch.cat([-Ad[:, :z0].abs(), -Ad[:, z0:]], 1) if z0 else -Ad
    in_cone = (cone >= -tol * term(A)).all(1) if not layout.soc else torch.zeros_like(nx, dtype=torch.bool)
    flat = (bmv(P, d).abs() <= tol * term(P)).all(1)
    qd = (q * d).sum(1)
    return (nx > 0) & torch.isfinite(nx) & in_cone & flat & (qd < -tol * ((q * d).abs().sum(1) + row_inf(q)))


def _drop_noise(y: torch.Tensor, rows: torch.Tensor, tol: float, layout: ConeLayout) -> torch.Tensor:
    """The dual ray ``y`` without its noise: entries whose weight :math:`|y_i|\\,\\|A_i\\|_\\infty`
    (``rows``: each row's :math:`\\|A_i\\|_\\infty`) is at most ``tol`` of the largest, kept in
    K* by the cone's geometry.

    Zero and nonnegative rows and second-order-cone tails become 0 (a shorter tail keeps
    :math:`t \\ge \\|u\\|`; a tail of 1e-12 beside a cone failed its column). A head :math:`t`
    at noise level becomes :math:`\\|u'\\|`, its cleaned tail's norm and the least head in
    K*, where that would be at noise level in the head's row too: both values lie within the
    noise, so the columns the head meets move by noise only. (Zeroed, a head above a tail
    left K*; kept, the rounding (1e-10) of an epigraph variable's ray, alone in its column,
    failed that column, and an infeasible program with a cone ended in SolverError.) A head
    whose tail is above its noise is kept: K* then decides.

    Shape:
        ``y (B, m), rows (B, m)`` -> ``(B, m)``.
    """
    weight = y.abs() * rows
    floor = tol * weight.amax(1, keepdim=True)
    # (a row without A left as it is, as cone_checks._drop_noise does: zeroed, the ray's
    # only row of 0 x <= -1 went and a valid certificate was refused on this path alone)
    noise = (weight <= floor) & (rows > 0)
    if not layout.soc:
        return torch.where(noise, 0.0, y)
    idx, c0 = layout.index(y.device), layout.zero + layout.nonneg
    heads = c0 + idx.heads
    # (a mask, not a scalar put through an index: that is a host copy)
    y = torch.where(noise & torch.cat([noise.new_ones(c0), idx.tail > 0]), 0.0, y)
    us = y[:, c0:]
    n1 = torch.sqrt(layout._seg(us * us * idx.tail))  # (B, nsoc): each cleaned tail's norm
    lower = noise[:, heads] & (n1 * rows[:, heads] <= floor)
    y[:, heads] = torch.where(lower, n1, y[:, heads])
    return y


def _within(v: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``(B,)``: every ``|v_i| <= bound_i`` (true where ``v`` has no columns)."""
    return (v.abs() <= bound).all(1)
