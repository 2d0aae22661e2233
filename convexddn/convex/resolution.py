"""Columns of a batched cone solution that the solve did not resolve: terms far below the
program's scale, such as a regulariser's tiny weight.

The solve accepts a point by relative KKT measures normed over the whole element
(:func:`~.measures.kkt_measures`, :func:`~.measures.caller_measures`: ``1 +`` the largest
term in each denominator). A column :math:`j` of the dual equation
:math:`Px + A^T z + q = 0` whose terms are all far below the largest (a weight
:math:`\\lambda = 10^{-10}` beside a data term of 1: :math:`\\min_y \\|y - x\\|^2 +
\\lambda \\sum_i \\mathrm{huber}(y_i)`) passes these measures whatever its own residual:
its epigraph variables and their multipliers (of order :math:`\\lambda`) are not
determined, nor which of their bounds are active. Derivatives with respect to data in
such a column were O(1) wrong without a warning (dL/dλ 0.13 for the true -0.5), and so
were those through a column sharing such a bound (a constant weight of 1e-9 on ‖y‖₁: dy/dx
1 for the true 0 inside the soft threshold's dead zone, which the solve cannot resolve).

A column is *unresolved* where it touches a cone row (a complementary pair whose side
it may decide) and its residual is both above :data:`ROW_RTOL` of its own largest term
and above rounding (:data:`ROUNDING` ε of the element's largest column, in equilibrated
units). Resolved columns end at 1e-16 of their terms; the unresolved ones measured
0.1-0.6. A weight below ~1e-13 of the program's scale leaves its column at rounding, where
the test cannot tell it from an exact zero: the limit of what one solve in float64 can
resolve (documented in docs/which-path.md).
"""
from __future__ import annotations

import torch

from .._warn import warn
from ..errors import GradientWarning
from .certify import decided, soc_frame
from .kkt import bmv
from .status import element_list, name_elements
from .symmetric_cones import ConeLayout

__all__ = ["DATA", "ROUNDING", "ROW_RTOL", "moved_columns", "unresolved_columns", "warn_unresolved"]

# A column's residual relative to its own largest term above which it is unresolved (a
# derivative through it carries that relative error at least; the gradient promise is
# 1e-4), and in rounding units of the element's largest column below which a residual is
# rounding (a column with terms of 1e-13 beside ones, exact, ends with a residual of 1e-16).
ROW_RTOL = 1e-4
ROUNDING = 64.0
# ... and, in the same units, the size a column's terms must exceed: at a kink (a bound
# met with a zero multiplier) they are left at the polish's floor of 64 rounding levels,
# where the residual is of the same size.
DATA = 1e3


def unresolved_columns(P, q, A, layout: ConeLayout, x, s, z) -> torch.Tensor:
    """``(B, n)`` mask of the columns of ``min ½xᵀPx + qᵀx s.t. Ax + s = b, s ∈ K`` left
    unresolved at ``(x, s, z)`` (see the module docstring): in the limit the derivative
    takes (the pairs decided inactive at z = 0, :func:`~.certify.decided`),
    the column's equation misses by more than :data:`ROW_RTOL` of its terms and than
    rounding, where its terms are above rounding (:data:`DATA`). The data are
    the equilibrated ones: the rounding unit is ε times the element's largest column
    there, at least ε (equilibrated data are of unit size; an all-zero solution's terms
    of 1e-38 are not a scale), and column scalings leave each column's own ratios
    unchanged."""
    z0, k = layout.zero, layout.nonneg
    # Decided-inactive multipliers (the interior point's μ/s) are 0 in the limit: on the
    # nonnegative rows, and on each second-order cone both of whose Jordan-frame pairs are
    # (a cone multiplier of 2λt on λ‖y‖²'s epigraph, taken as 0: dL/dλ came back 0).
    # Columns an undecided pair touches are left out: no limit exists there (a kink,
    # which the backward's own test names; the polish leaves it at s = z = its floor).
    parts, open_rows = [z[:, :z0]], [torch.zeros_like(z[:, z0:], dtype=torch.bool)[:, :0]]
    if k:
        active, inactive = decided(s[:, z0:z0 + k], z[:, z0:z0 + k])
        parts.append(torch.where(inactive, 0.0, z[:, z0:z0 + k]))
        open_rows.append(~(active | inactive))
    if layout.soc:
        a1, a2, b1, b2, _ = soc_frame(layout, s[:, z0 + k:], z[:, z0 + k:])
        (on1, off1), (on2, off2) = decided(a1, b1), decided(a2, b2)
        parts.append(z[:, z0 + k:] * (1 - layout._spread((off1 & off2).to(z.dtype))))
        open_rows.append(layout._spread(~(on1 | off1) | ~(on2 | off2)))
    z = torch.cat(parts, 1)
    rows = A[:, z0:, :] != 0  # (B, cone rows, n)
    paired = rows.any(1) & ~(rows & torch.cat(open_rows, 1).unsqueeze(-1)).any(1)
    terms = torch.maximum(torch.maximum(q.abs(), bmv(P.abs(), x.abs())), bmv(A.abs().mT, z.abs()))
    r = (bmv(P, x) + bmv(A.mT, z) + q).abs()
    eps = torch.finfo(x.dtype).eps
    unit = eps * terms.amax(1, keepdim=True).clamp_min(1.0)  # (the equilibrated data's own size is 1)
    return paired & (terms > DATA * unit) & (r > max(ROW_RTOL, 1e4 * eps) * terms) & (r > ROUNDING * unit)


def moved_columns(dP, dq, dA, db, A) -> torch.Tensor:
    """``(B, n)`` mask of the columns whose data a change ``(dP, dq, dA, db)`` of the
    program moves: their cost (``dq``, ``dP``'s row), their constraint column (``dA``), or
    a constraint row through them (``db``, ``dA``'s row) -- where a derivative with respect
    to that change reads the column's solution or multipliers. Each change may be None
    (not moved); every tensor is ``(B, ...)`` or broadcasts to it."""
    B, m, n = A.shape
    moved = torch.zeros(B, n, dtype=torch.bool, device=A.device)
    rows = torch.zeros(B, m, dtype=torch.bool, device=A.device)  # constraint rows that move
    if dq is not None:
        moved = moved | (dq != 0)
    if dP is not None:
        moved = moved | (dP != 0).any(-1)
    if dA is not None:
        moved = moved | (dA != 0).any(-2)
        rows = rows | (dA != 0).any(-1)
    if db is not None:
        rows = rows | (db != 0)
    return moved | ((A != 0) & rows.unsqueeze(-1)).any(-2)


def warn_unresolved(mode: str, sol, layout: ConeLayout, where, live: torch.Tensor, moved) -> None:
    """The GradientWarning naming the elements of ``live`` ``(B,)`` with an unresolved
    column (``sol.unresolved``, :func:`unresolved_columns`), or one sharing a cone row with
    it, that ``moved`` moves: a
    ``(B, n)`` mask or ``idx -> (len(idx), n)`` mask for those elements
    (:func:`moved_columns`). One host sync where no column is unresolved."""
    if sol.unresolved is None:
        return
    cols = sol.unresolved & live[:, None]
    idx = torch.nonzero(cols.any(1)).squeeze(1)
    if not idx.numel():
        return
    # The columns that share a cone row with an unresolved one are reached too: that row's
    # bound decides them (an L1 weight of 1e-9 whose dead zone the solve cannot resolve:
    # dy/dx 1 for the true 0, silently).
    cols = cols.index_select(0, idx)
    rows = sol.scaled.A.index_select(0, idx)[:, layout.zero:, :] != 0  # (k, cone rows, n)
    shared = (rows & (rows & cols.unsqueeze(1)).any(-1, keepdim=True)).any(1)
    hit = (cols | shared) & (moved(idx) if callable(moved) else moved.index_select(0, idx))
    idx = idx[hit.any(1)].tolist()
    if idx:
        what = "gradient" if mode == "backward" else "tangent"
        warn(f"ConvexLayer {mode} (batched): the solution of {len(idx)} batch element(s) "
             f"({name_elements(where, idx)}) leaves parts of the program unresolved: terms of its objective and "
             "multipliers far below its largest ones (a weight of 1e-10 beside terms of 1) pass the solve's "
             "relative tolerance at any value, so the variables they weigh and which of their bounds are active "
             f"are not determined, and the {what} with respect to the parameters that move those terms, or "
             "the variables those bounds constrain, may be wrong; rescale the program so that its terms lie "
             "within ~1e8 of one another",
             GradientWarning, elements=element_list(where, idx))

