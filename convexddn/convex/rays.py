"""Infeasibility and unboundedness certificates, verified in the caller's units.

The interior point finds its rays on the equilibrated data (:mod:`.interior_point`); a
ray is believed only if it certifies the program as the caller gave it, each test
relative to the data and to the ray's own size.
"""
from __future__ import annotations

import torch

from .kkt import bmv, row_inf
from .symmetric_cones import ConeLayout

__all__ = ["verified_rays"]


def verified_rays(P, q, A, b, layout: ConeLayout, x, z, tol: float = 1e-6):
    """Whether ``z`` certifies infeasibility and ``x`` unboundedness, in the units given.

    For ``min ½xᵀPx + qᵀx s.t. Ax + s = b, s ∈ K``, per element:

    - infeasible: :math:`y = z/\\|z\\|_\\infty \\in K^*` (zero-cone rows free),
      each column :math:`|(A^T y)_j| \\le` ``tol`` :math:`(|A|^T|y|)_j` once the noise of
      rows the ray does not use is dropped (entries, except second-order-cone heads, whose
      :math:`|y_i|\\,\\|A_i\\|_\\infty` is below ``tol`` of the largest; against
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
    # Noise on rows the ray does not use: entries whose zero keeps y in K* (not the heads
    # of second-order cones: a tail of 1e-12 beside them failed its column).
    droppable = torch.ones(A.shape[1], dtype=torch.bool, device=A.device)
    if layout.soc:
        droppable[z0 + layout.nonneg + layout.index(A.device).heads] = False
    weight = y.abs() * rows
    if weight.shape[1]:
        y = torch.where(droppable & (weight <= tol * weight.amax(1, keepdim=True)), 0.0, y)
    infeasible = ((ny > 0) & torch.isfinite(ny) & in_dual & _within(bmv(A.mT, y), tol * bmv(absA.mT, y.abs()))
                  & ((b * y).sum(1) < -tol * row_inf(b * y)))
    s = -bmv(A, d)
    tiny = torch.finfo(A.dtype).tiny
    unbounded = ((nx > 0) & torch.isfinite(nx) & _within(s[:, :z0], tol * rows[:, :z0])
                 & (layout.violation(s[:, z0:], scale=rows[:, z0:], unit=tiny) <= tol)
                 & (row_inf(bmv(P, d)) <= tol * p_max)
                 & ((q * d).sum(1) < -tol * row_inf(q * d)))
    return infeasible, unbounded


def _within(v: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``(B,)``: every ``|v_i| <= bound_i`` (true where ``v`` has no columns)."""
    return (v.abs() <= bound).all(1)
