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

A row at its kink that the system took at its inactive limit has no multiplier part to
weigh (0 by construction): there the other side, the row held active, is solved for and
compared with ``u`` on what is read (:func:`_other_side`; one dense solve of those elements).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .certify import at_kink, decided, undecided_reach
from .dense_kkt import dense_limit_solve
from .interior_point import ConeSolution
from .kkt import row_inf
from .resolution import moved_data
from .vjp_gates import backward_accept

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
                  read: Callable | None, rhs: torch.Tensor, r: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(B,) the elements ``ok`` with an undecided complementary pair whose open directions
    the derivative ``(ux, uz)`` (equilibrated units, ``(B, n), (B, m)``) reaches
    (:func:`~.certify.undecided_reach` above :data:`SIDE_RTOL` of a size), or with a row at
    its kink (:func:`~.certify.at_kink`) that the system took at its inactive limit and whose
    other side's derivative differs from it on what is read (:func:`_other_side`): only there do
    the two one-sided derivatives differ. The size is that of the entries the result reads,
    ``read(idx)`` (masks, :func:`read_by`, :func:`read_cols`), at least ``rhs`` ``(B,)`` (the
    cotangent's or tangent's size, equilibrated) and at most the whole derivative's, which is
    the size where ``read`` is None. ``r``: the system's right-hand side ``(B, n), (B, m)``,
    its inactive rows' part not dropped."""
    flagged = ok & sol.undecided
    if not bool(flagged.any()):  # (a host sync; the warning takes one anyway)
        return flagged
    idx = torch.nonzero(flagged).squeeze(1)
    pick = lambda v: v.index_select(0, idx)  # noqa: E731
    part = sol.scaled.select(idx)
    x, s, z = part.scale(pick(sol.x), pick(sol.s), pick(sol.z))
    z0, k = layout.zero, layout.nonneg
    u_x, u_z = pick(ux), pick(uz)
    kinks = at_kink(part, layout, x, s, z)
    reach = undecided_reach(layout, s[:, z0:], z[:, z0:], u_z[:, z0:], kinks)
    size = torch.maximum(row_inf(u_x), row_inf(u_z))
    masks = None if read is None else read(idx)
    if masks is not None:
        # (not below the cotangent's own size: where the gradient reads only rounding, a
        # difference of 1e-11 between the sides is no kink; entmax at p_i = 0, α = 2.5)
        seen = torch.maximum(_read_size(u_x, masks[0]), _read_size(u_z, masks[1]))
        size = torch.minimum(size, torch.maximum(seen, pick(rhs)))
    reached = reach > SIDE_RTOL * size
    # A kink's row taken at its inactive limit (H = ∞) has w_i = 0 by construction, so the
    # reach reads 0 there whatever the other side does: that side is solved (rare: only these
    # elements pay for it). (s, z) = (1.9e-15, 6e-27) of a weakly active bound of a QP at n = 100.
    inactive = decided(s[:, z0:z0 + k], z[:, z0:z0 + k])[1]
    other = kinks & inactive & ~reached[:, None]
    if k and bool(other.any()):
        apart = _other_side(sol, layout, idx, other, inactive, (u_x, u_z), tuple(map(pick, r)), masks)
        reached = reached | ~(apart <= SIDE_RTOL * size)  # (NaN, ∞: not solved, not shown to agree)
    return flagged.index_copy(0, idx, reached)


def _other_side(sol: ConeSolution, layout, idx: torch.Tensor, hold: torch.Tensor, inactive: torch.Tensor, u: tuple,
                r: tuple, masks: tuple | None) -> torch.Tensor:
    """``(k,)`` how far the derivative with the rows ``hold`` ``(k, nonneg)`` at their active
    limit (H = 0; :func:`~.dense_kkt.dense_limit_solve`, on the elements with such a row) is
    from ``u = (u_x, u_z)`` ``(k, n), (k, m)``, the one at their inactive limit (H = ∞), on the
    entries ``masks`` reads (all where None): the largest difference, ∞ where that side's
    system is not solved (0 on the other elements). ``inactive`` ``(k, nonneg)``: the rows
    decided inactive (:func:`~.certify.decided`), ``hold`` among them. ``r``: the right-hand
    side ``(k, n), (k, m)`` of the elements ``idx`` (equilibrated), with the held rows' part,
    which the active side reads.

    Only what is read is compared: both sides' systems may be singular along a variable nobody
    reads, and differ there alone (an ∞-norm ball's epigraph row ``y_i − c_i ≤ t`` at its kink
    below the radius: held active it fixes ``u_t``, which no output reads; the row equation's gap
    there was 1 with the sides equal on ``y``). On the row itself the inactive side's
    multiplier is 0, the active side's what the data's ``b_i`` would read (its one-sided gradient)."""
    z0, k = layout.zero, layout.nonneg
    u_x, u_z = u
    sub = torch.nonzero(hold.any(1)).squeeze(1)
    held = hold.index_select(0, sub)
    rx, rz = (v.index_select(0, sub) for v in r)
    ox, oz, res = dense_limit_solve(sol, layout, idx.index_select(0, sub), rx.unsqueeze(-1), rz.unsqueeze(-1), held)
    # (the rows decided inactive and not held: multiplier 0 in the exact limit, as inactive_zero)
    drop = inactive.index_select(0, sub) & ~held
    oz = oz.squeeze(-1)
    oz = torch.cat([oz[:, :z0], torch.where(drop, 0.0, oz[:, z0:z0 + k]), oz[:, z0 + k:]], 1)
    dx = u_x.index_copy(0, sub, ox.squeeze(-1)) - u_x
    dz = u_z.index_copy(0, sub, oz) - u_z
    apart = torch.maximum(_read_size(dx, None if masks is None else masks[0]),
                          _read_size(dz, None if masks is None else masks[1]))
    solved = torch.ones_like(apart, dtype=torch.bool).index_copy(0, sub, res <= backward_accept(rx))
    return torch.where(solved, apart, torch.inf)
