"""Refining a certified point by its error estimate's Newton step.

The error estimate (:mod:`.estimate`) is the size of one Newton step at the point, with the
KKT system factorised at its limit scaling :math:`W` (the backward's system). Where that
step is above rounding level the point is not yet where float64 can put it, and the step
itself is the correction: Newton's step on the limit system, on the same working set,

.. math::

    v' = v + K^{-1} r(v), \\qquad v = (x, s, z),

which lands at rounding level from an estimate below ``POLISH_ERROR`` (quadratic
convergence: qp50's 16 elements of 64 above rounding after the polish, up to 5e4 units, were
all within 3.4 units by the next step's size). It is computed anyway; taking it costs a
residual.

The structured polish of LPs and QPs (:func:`~.polish_structured.polish_nonnegative`) takes one Newton
step, which leaves a bound's slack at the step's own rounding times the data's
conditioning: a capped simplex projection at data scale 1e8 ended with ``y_5 = 2.1e-14``
of ‖y‖ on an active bound (95 rounding units, estimated 2.1e-14 off), which the caller's
measures read as a pair not complementary (:func:`~.measures.own_complementarity`: more
than its 64 units of rounding), and the element went uncertified, its point right to
1e-14. The step took the slack to rounding (and a simplex projection the polish left 1e-10
off, certified, to 2e-16).

Not checked by a second estimate at the new point: factorising again there (the elements
that moved only) cost 0.75 to 1.5 ms a batch of 64 (sparsemax16, qp50; the estimate stage
took 0.5 and 2.2), for an answer the step's size already bounds (below).
"""
from __future__ import annotations

import torch

from .estimate import limit_step, limit_system
from .polish import rounding_level
from .symmetric_cones import ConeLayout, soc_frame

__all__ = ["refined_estimate"]


def _sides(layout: ConeLayout, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``(B, ·)`` the side each complementary pair of the cone parts ``s, z`` ``(B, mc)`` is
    decided on (:func:`~.certify.decided`: active, inactive; neither: open), the nonnegative
    rows' and the second-order cones' Jordan-frame pairs, side by side: the pattern of the
    limit scaling, which the factorised system (kept for the backward) linearises."""
    from .certify import decided  # (certify decides the pairs; it imports this module)

    k = layout.nonneg
    parts = list(decided(s[:, :k], z[:, :k])) if k else []
    if layout.soc:
        a1, a2, b1, b2, _ = soc_frame(layout, s[:, k:], z[:, k:])
        parts += [*decided(a1, b1), *decided(a2, b2)]
    return torch.cat(parts, 1) if parts else s.new_zeros(s.shape[0], 0, dtype=torch.bool)


def refined_estimate(systems, d, layout: ConeLayout, point: tuple, polished: torch.Tensor, live: torch.Tensor,
                     residual_fn, refine: int, cols, duals, cap: float) -> tuple:
    """The error estimate of ``point`` = ``(x, s, z, residual)`` (equilibrated data ``d``),
    each element whose estimate lies between rounding level and ``cap`` moved by the
    estimate's Newton step (module docstring).

    The step is kept where the residual stays within its old value or rounding level (which
    cannot tell points at rounding apart: the bound's slack above left it at 1.2e-16) and no
    pair changes side (the system, kept for the backward, linearises those sides). The
    estimate stays the old point's, the step's own size: the new point lies that far from
    the old one, which lies about that far from the solution (an overstatement of its error
    where the step converged, never an understatement of what the old point promised).
    Elements above ``cap`` are the caller's LU polish's; those at rounding (most) cost one
    comparison.

    Args:
        systems: ``scaling -> KKT system`` of ``d``, with ``.ops`` (as :func:`~.estimate.error_estimate`'s).
        polished: ``(B,)`` where the point was polished (the limit scaling lifts those).
        live: ``(B,)`` the elements that may move (not infeasibility certificates).
        residual_fn: ``(x, s, z) -> (B,)`` relative KKT residual.
        refine, cols, duals: as :func:`~.estimate.error_estimate`'s.

    Returns:
        ``(x, s, z, residual, kkt, error, damped)``.
    """
    x, s, z, residual = point
    kkt, W = limit_system(systems, layout, s, z, polished)
    error, damped, step = limit_step(systems.ops, kkt, W, d, layout, x, s, z, polished, refine, cols, duals)
    unit = rounding_level(error)
    todo = live & ~damped & ~kkt.failed & (error > unit) & (error <= cap)  # (NaN, inf: not <= cap)
    if not bool(todo.any()):  # (one host read: the common case stops here)
        return x, s, z, residual, kkt, error, damped
    z0 = layout.zero
    new = tuple(v + dv for v, dv in zip((x, s, z), step()))
    rn = residual_fn(*new)
    same = (_sides(layout, new[1][:, z0:], new[2][:, z0:]) == _sides(layout, s[:, z0:], z[:, z0:])).all(1)
    take = todo & same & (rn <= residual.clamp_min(unit))
    pick = lambda a, b: torch.where(take.view((-1,) + (1,) * (b.dim() - 1)), a, b)  # noqa: E731
    x, s, z, residual = (pick(a, b) for a, b in zip((*new, rn), (x, s, z, residual)))
    return x, s, z, residual, kkt, error, damped
