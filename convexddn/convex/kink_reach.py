"""Whether a derivative reaches an undecided complementary pair: there its two one-sided
derivatives differ, and the backward warns that none exists.

The test (:func:`kinks_reached`) weighs the derivative system's solution ``u`` along the
directions an undecided pair leaves open (:func:`~.certify.undecided_reach`) against the
part of ``u`` that the gradient reads (:func:`read_by`): with ``u = (u_x, u_z)``, the
data's gradients are ``g_q = −u_x``, ``g_b = u_z``, ``g_A = −(z u_xᵀ + u_z xᵀ)`` and
``g_P = −½(u_x xᵀ + x u_xᵀ)``, so only the columns and rows whose data the parameters
move enter them. An auxiliary variable that no parameter touches may carry a component
orders of magnitude larger, without effect on the gradient, and hid the kink beside it:
``sqrt(y) >= p``, ``min ‖y − q‖²`` at ``p₀ = 1e-4``, ``q₀ = 0`` (CVXPY's hypograph
variable ``t ≥ p``, ``t² ≤ y``: ``y₀ = p₀²``, ``t₀`` known to √rounding only, 18 % off)
gave ``u_t = 2.4e3`` beside ``u_y = 0.66``, a reach of 0.16 below the threshold 0.24, and
``dL/dq₀ = 0.63`` where it is 0, silently.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .certify import at_kink, undecided_reach
from .interior_point import ConeSolution
from .kkt import row_inf
from .resolution import moved_data

__all__ = ["SIDE_RTOL", "kinks_reached", "read_by", "read_cols"]

# Largest component of a derivative's dual part along the directions an undecided pair
# leaves open, relative to the part of the derivative the gradient reads, below which
# the two sides agree (the gradients' promised accuracy is 1e-4). Measured, relative to
# the whole derivative: 1e-8 to 4e-5 on entmax through CVXPY's cone forms (α = 1.1 to 2.5,
# gradients 7e-8 from the exact ones); 0.15 and 0.5 at real kinks (a bound active with a
# zero multiplier; a group soft-threshold at ‖v‖ = λ).
SIDE_RTOL = 1e-4


def read_by(tangent: tuple, n: int, m: int) -> Callable:
    """``idx ->`` ``(cols, rows)`` masks of the entries of ``u_x`` ``(·, n)`` and ``u_z`` ``(·, m)``
    that the gradient reads in the elements ``idx``: what the parameters requiring grad move
    (:func:`~.resolution.moved_data`). ``tangent``: ``(dP, dq, dA, db, secant)`` along a generic
    direction of those parameters (``dP``, ``dq`` None where eliminated variables make them
    nonlinear: ``secant(idx)`` gives them)."""
    dP, dq, dA, db, secant = tangent

    def read(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        P_moves, q_moves = (dP, dq) if dq is not None else secant(idx)
        return moved_data(P_moves, q_moves, dA, db, n, m, idx.device)
    return read


def read_cols(cols: torch.Tensor | None, n: int, m: int) -> Callable | None:
    """The forward mode's :func:`read_by`: ``idx ->`` masks of the requested outputs' columns
    ``cols`` of ``x`` (indices; None: every entry) and no row of ``z``."""
    if cols is None:
        return None

    def read(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.zeros(1, n, dtype=torch.bool, device=idx.device)
        return mask.index_fill(1, cols.to(idx.device), True), torch.zeros(1, m, dtype=torch.bool, device=idx.device)
    return read


def _read_size(u: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return row_inf(u if mask is None else torch.where(mask, u, 0.0))


def kinks_reached(sol: ConeSolution, layout, ok: torch.Tensor, ux: torch.Tensor, uz: torch.Tensor,
                  read: Callable | None, rhs: torch.Tensor) -> torch.Tensor:
    """(B,) the elements ``ok`` with an undecided complementary pair whose open directions
    the derivative ``(ux, uz)`` (equilibrated units, ``(B, n), (B, m)``) reaches
    (:func:`~.certify.undecided_reach` above :data:`SIDE_RTOL` of a size): only there do the
    two one-sided derivatives differ. The size is that of the entries the result reads,
    ``read(idx)`` (masks, :func:`read_by`, :func:`read_cols`), at least ``rhs`` ``(B,)`` (the
    cotangent's or tangent's size, equilibrated) and at most the whole derivative's, which is
    the size where ``read`` is None."""
    flagged = ok & sol.undecided
    if not bool(flagged.any()):  # (a host sync; the warning takes one anyway)
        return flagged
    idx = torch.nonzero(flagged).squeeze(1)
    pick = lambda v: v.index_select(0, idx)  # noqa: E731
    part = sol.scaled.select(idx)
    x, s, z = part.scale(pick(sol.x), pick(sol.s), pick(sol.z))
    z0 = layout.zero
    u_x, u_z = pick(ux), pick(uz)
    reach = undecided_reach(layout, s[:, z0:], z[:, z0:], u_z[:, z0:], at_kink(part, layout, x, s, z))
    size = torch.maximum(row_inf(u_x), row_inf(u_z))
    masks = None if read is None else read(idx)
    if masks is not None:
        # (not below the cotangent's own size: where the gradient reads only rounding, a
        # difference of 1e-11 between the sides is no kink; entmax at p_i = 0, α = 2.5)
        seen = torch.maximum(_read_size(u_x, masks[0]), _read_size(u_z, masks[1]))
        size = torch.minimum(size, torch.maximum(seen, pick(rhs)))
    return flagged.index_copy(0, idx, reach > SIDE_RTOL * size)
