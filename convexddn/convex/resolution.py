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
the residual cannot tell it from an exact zero: such a column, whose own cost data (q_j,
P's row) are nonzero but within :data:`DATA` rounding units, is unresolved without that
test (documented in docs/which-path.md).

A weak term may also act along a direction no column shows (a small ridge on an
underdetermined least squares): :func:`weakly_determined` bounds what the solution's
rounding floor along it does to the gradient.
"""
from __future__ import annotations

import torch

from .._generic import generic_vector
from .._warn import warn
from ..errors import GradientWarning
from .certify import decided
from .kkt import bmv, row_inf
from .status import element_list, name_elements
from .symmetric_cones import ConeLayout, soc_frame

__all__ = ["DATA", "FLOOR", "ROUNDING", "ROW_RTOL", "WEAK_GATE", "moved_columns", "moved_data", "unresolved_columns",
           "warn_unresolved", "warn_weak", "weak_tangent", "weakly_determined"]

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
    parts, open_rows = [z[:, :z0]], [z.new_zeros(z.shape[0], 0, dtype=torch.bool)]  # (cat needs one)
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
    # A column whose own cost data (q_j, P's row) are nonzero but within DATA rounding
    # units cannot be judged by its residual (it ends at rounding whatever its active
    # set): unresolved too. (A weight of 1e-13 on a Huber term: dL/dλ 0.18 for the
    # true -0.5, and no column above was flagged.)
    cost = torch.maximum(q.abs(), P.abs().amax(-1))
    weak = (cost > 0) & (cost <= DATA * unit)
    return paired & (((terms > DATA * unit) & (r > max(ROW_RTOL, 1e4 * eps) * terms) & (r > ROUNDING * unit)) | weak)


def moved_data(dP, dq, dA, db, n: int, m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cols (B|1, n), rows (B|1, m))`` masks of what a change ``(dP, dq, dA, db)`` of the program
    moves: the columns whose cost (``dq``, ``dP``'s row) or constraint column (``dA``) it moves, and
    the rows whose ``b`` or ``A`` row it moves. Each change may be None (not moved)."""
    cols = torch.zeros(1, n, dtype=torch.bool, device=device)
    rows = torch.zeros(1, m, dtype=torch.bool, device=device)
    if dq is not None:
        cols = cols | (dq != 0)
    if dP is not None:
        cols = cols | (dP != 0).any(-1)
    if dA is not None:
        cols = cols | (dA != 0).any(-2)
        rows = rows | (dA != 0).any(-1)
    if db is not None:
        rows = rows | (db != 0)
    return cols, rows


def moved_columns(dP, dq, dA, db, A) -> torch.Tensor:
    """``(B, n)`` mask of the columns whose data a change ``(dP, dq, dA, db)`` of the
    program moves: their cost (``dq``, ``dP``'s row), their constraint column (``dA``), or
    a constraint row through them (``db``, ``dA``'s row) -- where a derivative with respect
    to that change reads the column's solution or multipliers. Each change may be None
    (not moved); every tensor is ``(B, ...)`` or broadcasts to it."""
    cols, rows = moved_data(dP, dq, dA, db, A.shape[-1], A.shape[-2], A.device)
    return cols | ((A != 0) & rows.unsqueeze(-1)).any(-2)


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



# The cotangent's amplification (equilibrated units) below which the solution's rounding
# floor, carried through a gradient, cannot reach the promise's 1e-4 whatever cancels:
# checked only above it (the secant along P's direction costs a fill of the data).
WEAK_GATE = 1e3
# A row's rounding in units of ε times its own terms (_floor): the data's own rounding and a
# sum's (the ridge's tangent at λ = 1e-6 was 1.3e-4 off, bounded at 8e-5 by 1).
FLOOR = 4.0


def weakly_determined(sol, gx: torch.Tensor, gz: torch.Tensor, grads: tuple, tangent, live: torch.Tensor,
                      each=None) -> torch.Tensor | None:
    """``(B,)`` the elements of ``live`` whose gradient along the parameters' direction
    (``tangent`` = ``(dP, dq, dA, db, secant)`` of :func:`~.vjp.cone_vjp`), or along any
    one parameter's (``each``: ``idx -> [(dP, dq, dA, db) per parameter requiring grad]``
    for the elements ``idx``), may be off by more than :data:`ROW_RTOL` of itself, carried
    there by the solution's own rounding floor. (Along the combined direction alone, a
    large accurate dL/dG hid dL/dλ off by 25 times itself, its sign wrong.)

    A direction :math:`v` of weak curvature (``‖y‖²`` at a weight λ beside ``‖Gy - h‖²``
    with G of rank 1 < dim y) fixes the solution along itself only to
    :math:`\\delta \\approx |K^{-1} f|`, f the rows' rounding (:func:`_floor`): no
    solve does better, the data themselves are that close. The cotangent's solve
    :math:`u = K^{-T} g` is amplified along :math:`v` too, and the data gradient
    :math:`-u x^T` (P), :math:`-z u_x^T - u_z x^T` (A) is exact to δ per entry yet its
    contraction with a parameter's data direction may cancel: :math:`dL/d\\lambda = -2u^T x`
    is 0.25 from terms of ~1/λ. The error bound along the direction ``dD`` of the data
    (:func:`_carried`) is compared with the gradient there, :math:`\\langle g_D, dD\\rangle`
    (at least ε of the gradient along all parameters). Only where the amplification
    :math:`\\|u\\|/\\|g\\|` (equilibrated) passes :data:`WEAK_GATE` is the floor carried
    far enough to matter: below it nothing is checked."""
    B = gx.shape[0]
    flag = torch.zeros(B, dtype=torch.bool, device=gx.device)
    if tangent is None or sol.scaled is None:
        return None  # (nothing checked: no host read in warn_weak)
    gP, gq, gA, gb = grads
    idx = _amplified(sol, gx, gz, gq, gb, live)  # (gq = -u_x, gb = u_z, caller units)
    if not idx.numel():
        return None  # (nothing checked: no host read in warn_weak)
    pick = lambda v: v if v.shape[0] == 1 else v.index_select(0, idx)  # noqa: E731
    dP, dq, dA, db, secant = tangent
    # (the secant is formed for the elements idx alone: taken as it comes, not picked again,
    # which indexed its k rows by batch indices: an IndexError on ordinary ridge layers)
    dP, dq = secant(idx) if dP is None else (pick(dP), pick(dq))
    directions = [(dP, dq, pick(dA), pick(db))] + ([] if each is None else each(idx))
    fx, fz = _floor(sol, idx)
    ux, uz = gq.index_select(0, idx).abs(), gb.index_select(0, idx).abs()
    gP, gq, gA, gb = (g.index_select(0, idx) for g in (gP, gq, gA, gb))
    off, whole = torch.zeros_like(idx, dtype=torch.bool), None
    for dP, dq, dA, db in directions:
        along = ((gP * dP).sum((1, 2)) + (gq * dq).sum(1) + (gA * dA).sum((1, 2)) + (gb * db).sum(1)).abs()
        # (one parameter's derivative below the rounding of the whole one's, along all of them, is that
        # rounding: an inactive row's dL/dG, exactly 0, was called wrong by a bound of 1e-16 beside 1e9)
        whole = along if whole is None else whole
        floor = torch.maximum(along, torch.finfo(along.dtype).eps * whole)
        off = off | (_carried(fx, fz, ux, uz, dP, dA) > ROW_RTOL * floor)
    return flag.index_copy(0, idx, off)


def _amplified(sol, gx: torch.Tensor, gz: torch.Tensor, ux: torch.Tensor, uz: torch.Tensor,
               live: torch.Tensor) -> torch.Tensor:
    """``(k,)`` indices of the elements of ``live`` whose cotangent ``(gx, gz)`` ``(B, n), (B, m)``
    the derivative system amplifies beyond :data:`WEAK_GATE` into ``u = K^{-1} g`` (``±ux,
    uz``, caller units; the amplification equilibrated). Below the gate the floor, carried
    through, cannot reach the promise: a well-conditioned program's derivative of exactly 0
    comes back as ~1e-18, right."""
    d = sol.scaled
    rc = d.c.sqrt()[:, None]
    amp = (row_inf(ux.abs() / (rc * d.D), uz.abs() * rc / d.E)
           / row_inf(rc * d.D * gx, d.E * gz / rc).clamp_min(torch.finfo(gx.dtype).tiny))
    return torch.nonzero(live & (amp > WEAK_GATE)).squeeze(1)


def _carried(fx: torch.Tensor, fz: torch.Tensor, ux: torch.Tensor, uz: torch.Tensor, dP, dA) -> torch.Tensor:
    """``(k,)`` the bound :math:`E = |u_x|^T |dP| \\delta_x + |u_z|^T |dA| \\delta_x + |u_x|^T |dA|^T
    \\delta_z` on what the floor ``(δx, δz)`` (:func:`_floor`) does to a derivative along the data's
    direction ``dP``, ``dA`` (``(k, ...)``, or None: not moving) read through ``(|u_x|, |u_z|)`` (all
    caller units): ``dq`` and ``db`` do not multiply the solution."""
    bound = ux.new_zeros(ux.shape[0])
    if dP is not None:
        bound = bound + (bmv(dP.abs(), fx) * ux).sum(1)
    if dA is not None:
        dAa = dA.abs()
        bound = bound + (bmv(dAa, fx) * uz).sum(1) + (bmv(dAa.mT, fz) * ux).sum(1)
    return bound


def _floor(sol, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(δx, δz)`` of the elements ``idx`` in the caller's units: the error the solution may keep,
    componentwise, :math:`|\hat K^{-1} f|` (Skeel's bound) with :math:`f = |r| + \mathrm{FLOOR}\,
    \varepsilon\,(|\hat P||\hat x| + |\hat q| + |\hat A|^T|\hat z|,\ |\hat A||\hat x| + |\hat b|
    + |\hat s|)`: each row's residual :math:`r` at the solution and its rounding, in the equilibrated
    program (hats), through the KKT matrix :math:`\hat K` kept at the solution (its factorisation);
    ``f`` with its own signs and with a generic sign pattern, the larger answer of the two, so that
    cancellation hides nothing. A row whose terms are all small keeps its own precision: a diagonal P
    of condition 1e6 fixes each entry of x to ε of itself (gradients exact to 1e-15), where ε times
    the rows' largest term times ‖K⁻¹‖, the bound until 2026-12-07, put it at 1e6 ε and warned."""
    d = sol.scaled
    x, s, z = d.scale(sol.x, sol.s, sol.z)
    Pa, Aa = d.P.abs(), d.A.abs()
    unit = FLOOR * torch.finfo(x.dtype).eps
    rx = (bmv(d.P, x) + d.q + bmv(d.A.mT, z)).abs() + unit * (bmv(Pa, x.abs()) + d.q.abs() + bmv(Aa.mT, z.abs()))
    rz = (bmv(d.A, x) + s - d.b).abs() + unit * (bmv(Aa, x.abs()) + d.b.abs() + s.abs())
    signs = generic_vector(rx.shape[1] + rz.shape[1], x.dtype, x.device).sign()
    fx, fz = (torch.stack([r, r * sg], -1) for r, sg in ((rx, signs[:rx.shape[1]]), (rz, signs[rx.shape[1]:])))
    wx, wz, _ = sol.kkt.solve(fx, fz, 0)
    sig = d.sigma[:, None]
    dx, dz = sig * d.D * wx.abs().amax(-1), sig * d.E * wz.abs().amax(-1) / d.c[:, None]
    return dx.index_select(0, idx), dz.index_select(0, idx)


def weak_tangent(sol, dP, dA, dx: torch.Tensor, live: torch.Tensor,
                 cols: torch.Tensor | None = None) -> torch.Tensor | None:
    """``(B,)`` the elements of ``live`` whose tangent ``dx`` (:func:`~.vjp.cone_jvp`'s, the
    data moving by ``dP``, ``dA``, each None or ``(B, ...)``) may be off by more than
    :data:`ROW_RTOL` of its size, carried there by the solution's rounding floor: the
    reverse mode's test (:func:`weakly_determined`, its gate and bound) for a fixed generic
    cotangent :math:`g` on the requested columns ``cols`` (all if None), equilibrated (one
    more solve). :math:`g^T dx` is the gradient of :math:`g^T x` along the data's direction,
    off by at most :func:`_carried`'s :math:`E`, which is compared with :math:`|g|^T |dx|`:
    a functional of the tangent may cancel where the tangent is not small. (A bound of
    :math:`\\|K^{-1}\\|` times the floor's right-hand side, with no gate, warned on exact
    zeros inside a polytope, and on tangents exact to 1e-10 beside an inactive ball, whose
    multipliers took its power step's estimate to 1e9: 1.7 for the generic cotangent here.)"""
    flag = torch.zeros_like(live)
    d, kkt = sol.scaled, sol.kkt
    if d is None or kkt is None or (dP is None and dA is None):
        return None  # (nothing checked: no host read in warn_weak)
    B, n = dx.shape
    probe = generic_vector(n, dx.dtype, dx.device)
    if cols is not None:
        cols = cols.to(dx.device)
        probe = torch.zeros_like(probe).index_copy(0, cols, probe.index_select(0, cols))
    rc = d.c.sqrt()[:, None]
    ux, uz, _ = kkt.solve(probe.expand(B, n).unsqueeze(-1), torch.zeros_like(d.E).unsqueeze(-1), 0)
    g, ux, uz = probe / (rc * d.D), rc * d.D * ux.squeeze(-1), d.E * uz.squeeze(-1) / rc  # (caller units)
    idx = _amplified(sol, g, torch.zeros_like(uz), ux, uz, live)
    if not idx.numel():
        return None  # (nothing checked: no host read in warn_weak)
    pick = lambda v: None if v is None else v if v.shape[0] == 1 else v.index_select(0, idx)  # noqa: E731
    fx, fz = _floor(sol, idx)
    bound = _carried(fx, fz, *(v.index_select(0, idx).abs() for v in (ux, uz)), pick(dP), pick(dA))
    size = (g.index_select(0, idx).abs() * dx.index_select(0, idx).abs()).sum(1)
    return flag.index_copy(0, idx, bound > ROW_RTOL * size)


def warn_weak(mode: str, where, flagged: torch.Tensor | None) -> None:
    """The GradientWarning naming the elements ``flagged`` by :func:`weakly_determined` (or
    :func:`weak_tangent`; ``None``: none was checked)."""
    if flagged is None:
        return
    idx = torch.nonzero(flagged).squeeze(1).tolist()
    if idx:
        what = "gradient" if mode == "backward" else "tangent"
        warn(f"ConvexLayer {mode} (batched): the {what} of {len(idx)} batch element(s) "
             f"({name_elements(where, idx)}) may be wrong: their program curves only weakly along some direction "
             "(a weight far below its other terms on a variable that those leave free: a small ridge on an "
             "underdetermined least squares), which fixes the solution along it only to rounding divided by that "
             "curvature, and the derivative amplifies that error by the same factor again; rescale the program, "
             "or make the weak term larger (within ~1e6 of the others in float64)",
             GradientWarning, elements=element_list(where, idx))
