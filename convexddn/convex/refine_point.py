"""Refining a certified point along its error estimate's Newton step.

The error estimate (:mod:`.estimate`) is the size of one Newton step at the point, with the
KKT system factorised at its limit scaling :math:`W`. Where that step is above rounding level
the point is not yet where float64 can put it, and the step itself is the correction,

.. math::

    v_{k+1} = v_k + K(v_k)^{-1} r(v_k), \\qquad v = (x, s, z),

whose next step, with the system factorised again at :math:`v_{k+1}` (the error estimate
there, and the backward's system), says whether it went nearer: Newton's iteration on the
limit system, quadratic where every complementary pair keeps its side. Only the elements
whose estimate lies above rounding move, and only they are factorised again (most
elements of a batch end the polish at rounding: they cost one comparison).

The structured polish of LPs and QPs (:func:`~.polish.polish_nonnegative`) takes one Newton
step, which leaves a bound's slack at the step's own rounding times the data's
conditioning: a capped simplex projection at data scale 1e8 ended with ``y_5 = 2.1e-14``
of ‖y‖ on an active bound (95 rounding units, estimated 2.1e-14 off), which the caller's
measures read as a pair not complementary (:func:`~.measures.own_complementarity`: more
than its 64 units of rounding), and the element went uncertified, its point right to
1e-14. One more step took the slack to rounding (and a simplex projection the polish left
1e-10 off, certified, to 2e-16).
"""
from __future__ import annotations

import torch

from .estimate import limit_step, limit_system
from .kkt import PatchedKKT
from .polish import rounding_level
from .symmetric_cones import ConeLayout

__all__ = ["refined_estimate"]

# Newton steps at most: the first lands at rounding level from an estimate below
# POLISH_ERROR (measured: qp50's 16 elements of 64 above rounding, up to 5e4 units, to at
# most 3.4); a second is for one that only gained a few digits.
_ROUNDS = 2


def refined_estimate(systems, d, layout: ConeLayout, point: tuple, polished: torch.Tensor, live: torch.Tensor,
                     residual_fn, refine: int, cols, duals, cap: float) -> tuple:
    """The error estimate of ``point`` = ``(x, s, z, residual)`` (equilibrated data ``d``),
    with each element whose estimate lies between rounding level and ``cap`` moved by its
    Newton step while that shrinks the next one (module docstring).

    A step is kept where the next step, on the system factorised at the new point, is
    smaller (the point is nearer the solution, as the estimate measures it), not damped, and
    the residual stays within its old value or rounding level (which cannot tell points at
    rounding apart: the bound's slack above left it at 1.2e-16). The estimate is then that
    next step's size, and the system the new one (patched in, for the backward). Elements
    above ``cap`` are the caller's LU polish's.

    Args:
        systems: ``scaling -> KKT system`` of ``d``, with ``.ops`` and ``.select`` (as
            :func:`~.estimate.error_estimate`'s).
        polished: ``(B,)`` where the point was polished (the limit scaling lifts those).
        live: ``(B,)`` the elements that may move (not infeasibility certificates).
        residual_fn: ``(x, s, z, idx) -> (k,)`` relative KKT residual of the elements ``idx``.
        refine, cols, duals: as :func:`~.estimate.error_estimate`'s.

    Returns:
        ``(x, s, z, residual, kkt, error, damped)``.
    """
    x, s, z, residual = point
    kkt, W = limit_system(systems, layout, s, z, polished)
    error, damped, step = limit_step(systems.ops, kkt, W, d, layout, x, s, z, polished, refine, cols, duals)
    unit = rounding_level(error)
    todo = live & ~damped & ~kkt.failed & (error > unit) & (error <= cap)  # (NaN, inf: not <= cap)
    for _ in range(_ROUNDS):
        idx = torch.nonzero(todo).squeeze(1)  # (one host read: the common case, none, stops here)
        if not idx.numel():
            break
        pick = lambda v: v.index_select(0, idx)  # noqa: E731
        new = tuple(pick(v) + pick(dv) for v, dv in zip((x, s, z), step))
        rn = residual_fn(*new, idx)
        part, en, damped_n, step_n = _estimate(systems, d, layout, idx, new, pick(polished), refine, cols, duals)
        take = (en < pick(error)) & ~damped_n & ~part.failed & (rn <= pick(residual).clamp_min(unit))
        if not bool(take.all()):  # (then the system at the points taken only: the others keep theirs)
            keep = torch.nonzero(take).squeeze(1)
            idx, rn, new = idx.index_select(0, keep), rn.index_select(0, keep), tuple(v.index_select(0, keep)
                                                                                        for v in new)
            if not idx.numel():
                break
            part, en, _, step_n = _estimate(systems, d, layout, idx, new, polished.index_select(0, idx), refine,
                                            cols, duals)
        x, s, z, residual, error = (v.index_copy(0, idx, w) for v, w in zip((x, s, z, residual, error),
                                                                              (*new, rn, en)))
        step = tuple(v.index_copy(0, idx, w) for v, w in zip(step, step_n))
        kkt = PatchedKKT(kkt, idx, part)
        todo = torch.zeros_like(todo).index_fill(0, idx[en > unit], True)
    return x, s, z, residual, kkt, error, damped


def _estimate(systems, d, layout: ConeLayout, idx: torch.Tensor, point: tuple, polished: torch.Tensor, refine: int,
              cols, duals) -> tuple:
    """``(kkt, error, damped, step)`` of the elements ``idx`` at their ``point`` = ``(x, s, z)``:
    their system factorised at its limit scaling there and its Newton step (:mod:`.estimate`)."""
    sub = d.select(idx)
    systems = systems.select(idx, sub)
    kkt, W = limit_system(systems, layout, point[1], point[2], polished)
    return (kkt, *limit_step(systems.ops, kkt, W, sub, layout, *point, polished, refine, cols, duals))
