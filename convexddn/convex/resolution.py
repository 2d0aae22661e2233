"""Columns of a batched cone solution that the solve did not resolve: terms far below the
program's scale, such as a regulariser's tiny weight.

The solve accepts a point by relative KKT measures normed over the whole element
(:func:`~.measures.kkt_measures`, :func:`~.measures.caller_measures`: ``1 +`` the largest
term in each denominator). A column :math:`j` of the dual equation
:math:`Px + A^T z + q = 0` whose terms are all far below the largest (a weight
:math:`\\lambda = 10^{-10}` beside a data term of 1: :math:`\\min_y \\|y - x\\|^2 +
\\lambda \\sum_i \\mathrm{huber}(y_i)`) passes these measures whatever its own residual:
its epigraph variables and their multipliers (of order :math:`\\lambda`) are not
determined, nor which of their bounds are active. The rest of the solution is exact, and
so are derivatives through it (dL/dx there: exact to 1e-11); derivatives with respect to
data in such a column were O(1) wrong without a warning (dL/dλ 0.13 for the true -0.5).

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
# ... and, in the same units, the size a column's own data (cost, curvature) must exceed:
# a column whose only terms are multipliers (a bound at a kink, an all-zero solution's
# inactive rows, left at the interior point's μ/s) has nothing that forces a bound active.
DATA = 1e3


def unresolved_columns(P, q, A, layout: ConeLayout, x, s, z) -> torch.Tensor:
    """``(B, n)`` mask of the columns of ``min ½xᵀPx + qᵀx s.t. Ax + s = b, s ∈ K`` left
    unresolved at ``(x, s, z)`` (see the module docstring): in the limit the derivative
    takes (the pairs decided inactive at z = 0, :func:`~.certify.decided`),
    the column's equation misses by more than :data:`ROW_RTOL` of its terms and than
    rounding, where data of its own (cost, curvature) are above rounding. The data are
    the equilibrated ones: the rounding unit is ε times the element's largest column
    there, at least ε (equilibrated data are of unit size; an all-zero solution's terms
    of 1e-38 are not a scale), and column scalings leave each column's own ratios
    unchanged."""
    z0, k = layout.zero, layout.nonneg
    # Decided-inactive multipliers (the interior point's μ/s) are 0 in the limit: on the
    # nonnegative rows, and on each second-order cone both of whose Jordan-frame pairs are
    # (a cone multiplier of 2λt on λ‖y‖²'s epigraph, taken as 0: dL/dλ came back 0).
    parts = [z[:, :z0]]
    if k:
        parts.append(torch.where(decided(s[:, z0:z0 + k], z[:, z0:z0 + k])[1], 0.0, z[:, z0:z0 + k]))
    if layout.soc:
        a1, a2, b1, b2, _ = soc_frame(layout, s[:, z0 + k:], z[:, z0 + k:])
        off = (decided(a1, b1)[1] & decided(a2, b2)[1]).to(z.dtype)  # (B, nsoc)
        parts.append(z[:, z0 + k:] * (1 - layout._spread(off)))
    z = torch.cat(parts, 1)
    own = torch.maximum(q.abs(), bmv(P.abs(), x.abs()))
    terms = torch.maximum(own, bmv(A.abs().mT, z.abs()))
    r = (bmv(P, x) + bmv(A.mT, z) + q).abs()
    eps = torch.finfo(x.dtype).eps
    unit = eps * terms.amax(1, keepdim=True).clamp_min(1.0)  # (the equilibrated data's own size is 1)
    paired = (A[:, z0:, :] != 0).any(1)
    return paired & (own > DATA * unit) & (r > max(ROW_RTOL, 1e4 * eps) * terms) & (r > ROUNDING * unit)


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
    column (:func:`unresolved_columns`) that ``moved`` moves: a ``(B, n)`` mask or
    ``idx -> (len(idx), n)`` mask for those elements (:func:`moved_columns`). One host
    sync where no column is unresolved."""
    d = sol.scaled
    sig = d.sigma[:, None]
    x, z = sol.x / (sig * d.D), sol.z * d.c[:, None] / (sig * d.E)  # in the equilibrated units (as s)
    s = sol.s * d.E / sig
    cols = unresolved_columns(d.P, d.q, d.A, layout, x, s, z) & live[:, None]
    idx = torch.nonzero(cols.any(1)).squeeze(1)
    if not idx.numel():
        return
    hit = cols.index_select(0, idx) & (moved(idx) if callable(moved) else moved.index_select(0, idx))
    idx = idx[hit.any(1)].tolist()
    if idx:
        what = "gradient" if mode == "backward" else "tangent"
        warn(f"ConvexLayer {mode} (batched): the solution of {len(idx)} batch element(s) "
             f"({name_elements(where, idx)}) leaves parts of the program unresolved: terms of its "
             "objective and multipliers far below its largest ones (a weight of 1e-10 beside terms of 1) "
             "pass the solve's relative tolerance at any value, so its auxiliary variables there and "
             f"which of their bounds are active are not determined, and the {what} with respect to the "
             "parameters that move those terms may be wrong (through the rest of the solution it is exact); "
             "rescale the program so that its terms lie within ~1e8 of one another",
             GradientWarning, elements=element_list(where, idx))
