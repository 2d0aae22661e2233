"""Refining a certified point along its error estimate's Newton step (chord steps).

The error estimate (:mod:`.estimate`) is the size of one Newton step at the point, with the
KKT system factorised at its limit scaling :math:`W`. Where that step is above rounding level
the point is not yet where float64 can put it, and the step itself is the correction: with
:math:`K` the factorised matrix and :math:`r(v)` the Newton right-hand side at a point
:math:`v = (x, s, z)`,

.. math::

    v_{k+1} = v_k + K^{-1} r(v_k),

a chord iteration (the matrix stays the one at :math:`v_0`), which converges at the rate
:math:`\\|I - K^{-1} J(v_k)\\|`: :math:`O(\\delta)` while every complementary pair keeps its
side (the lift :math:`\\delta` of :data:`~.estimate._POLISHED_SHIFT` is all that changes
:math:`W` between points on the same sides). Each step costs a solve with the kept
factors and a residual: no factorisation, no host read per element.

The structured polish of LPs and QPs (:func:`~.polish.polish_nonnegative`) takes one Newton
step, which leaves a bound's slack at the step's own rounding times the data's
conditioning: a capped simplex projection at data scale 1e8 ended with ``y_5 = 2.1e-14``
of ‖y‖ on an active bound (95 rounding units, estimated 2.1e-14 off), which the caller's
measures read as a pair not complementary (:func:`~.measures.own_complementarity`: more
than its 64 units of rounding), and the element went uncertified, its point right to
1e-14. One chord step took the slack to rounding.
"""
from __future__ import annotations

import torch

from .estimate import limit_step, limit_system
from .polish import rounding_level
from .symmetric_cones import ConeLayout, soc_frame

__all__ = ["refined_estimate"]

# Chord steps at most: each gains a factor O(δ), so the first one lands at rounding level
# where the sides hold; a second is for a step that only halved the error.
_ROUNDS = 2


def _sides(layout: ConeLayout, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``(B, ·)`` the side each complementary pair of the cone parts ``s, z`` ``(B, mc)`` is
    decided on (:func:`~.certify.decided`: active, inactive; neither is open), the
    nonnegative rows' and the second-order cones' Jordan-frame pairs, side by side: the
    limit scaling's pattern, which a chord step must keep to stay on its system."""
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
    with each element whose estimate lies between rounding level and ``cap`` refined by
    chord steps (module docstring) while they shrink it.

    A step is kept where the next step's size is smaller (the iteration contracts: the
    point is nearer the solution, as the estimate measures it), no pair changed side (the
    factorisation, kept for the backward, linearises those sides), the step is not damped
    and the residual stays within its old value or rounding level (it cannot tell points
    at rounding apart: the bound's slack above moved it from 1.2e-16 to 1.2e-16). The
    estimate is then the next step's size, from the same factors. Elements above ``cap``
    are the caller's LU polish's; those at rounding (most) cost one comparison.

    Args:
        systems: ``scaling -> KKT system`` of ``d``, with ``.ops`` (as :func:`~.estimate.error_estimate`).
        polished: ``(B,)`` where the point was polished (the limit scaling lifts those).
        live: ``(B,)`` the elements that may move (not infeasibility certificates).
        residual_fn: ``(x, s, z) -> (B,)`` relative KKT residual.
        refine, cols, duals: as :func:`~.estimate.error_estimate`'s.

    Returns:
        ``(x, s, z, residual, kkt, error, damped)``.
    """
    x, s, z, residual = point
    z0 = layout.zero
    kkt, W = limit_system(systems, layout, s, z, polished)
    args = (systems.ops, kkt, W, d, layout)
    error, damped, step = limit_step(*args, x, s, z, polished, refine, cols, duals)
    unit = rounding_level(error)
    todo = live & ~damped & ~kkt.failed & (error > unit) & (error <= cap)  # (NaN, inf: not <= cap)
    if not bool(todo.any()):  # (one host read: the common case stops here)
        return x, s, z, residual, kkt, error, damped
    sides = _sides(layout, s[:, z0:], z[:, z0:])
    for _ in range(_ROUNDS):
        xn, sn, zn = (v + dv for v, dv in zip((x, s, z), step))
        rn = residual_fn(xn, sn, zn)
        en, damped_n, step_n = limit_step(*args, xn, sn, zn, polished, refine, cols, duals)
        take = (todo & (en < error) & ~damped_n & (rn <= residual.clamp_min(unit))
                & (_sides(layout, sn[:, z0:], zn[:, z0:]) == sides).all(1))
        pick = lambda new, old: torch.where(take.view((-1,) + (1,) * (old.dim() - 1)), new, old)  # noqa: E731
        x, s, z, residual, error = (pick(a, b) for a, b in zip((xn, sn, zn, rn, en), (x, s, z, residual, error)))
        step = tuple(pick(a, b) for a, b in zip(step_n, step))
        todo = take & (error > unit)
        if not bool(todo.any()):
            break
    return x, s, z, residual, kkt, error, damped
