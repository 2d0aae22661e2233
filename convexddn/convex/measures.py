"""Relative KKT measures of the batched interior-point method, and its step lengths.

:func:`kkt_measures` measures a point of ``min ½xᵀPx + qᵀx s.t. Ax + s = b, s ∈ K``
(the final certification uses it in the equilibrated units and in the caller's);
:class:`Measures` gives the residuals, measures and infeasibility certificates of the
homogeneous embedding's iterates; :func:`max_step` the longest step that stays in K.
"""
from __future__ import annotations

import torch

from .equilibration import Scaled
from .kkt import DataOps, bmv, row_inf
from .symmetric_cones import ConeLayout, soc_frame

__all__ = ["DEGENERATE", "FLAT", "FEASIBLE_PRIMAL", "FEASIBLE_DUAL", "NOT_COMPLEMENTARY", "ROUNDING", "UNVERIFIABLE",
           "Measures", "caller_measures", "kkt_measures", "max_step", "own_complementarity", "point_residual"]


def kkt_measures(P, q, A, b, x, s, z) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Relative primal residual, dual residual and duality gap, per element.

    .. math::

        \frac{\|Ax + s - b\|_\infty}{1 + \max(\|b\|, \|Ax\|, \|s\|)},\quad
        \frac{\|Px + A^T z + q\|_\infty}{1 + \max(\|q\|, \|Px\|, \|A^T z\|)},\quad
        \frac{|x^T P x + q^T x + b^T z|}{1 + |x^T P x| + |q^T x| + |b^T z|}

    On equilibrated data (unit-size rows, columns and cost) the 1's are the data's own
    scale, which makes these measures invariant to rescaling the problem.
    :func:`caller_measures` measures the caller's units row by row instead.
    """
    Ax, Px, ATz = bmv(A, x), bmv(P, x), bmv(A.mT, z)
    pres = row_inf(Ax + s - b) / (1 + torch.maximum(torch.maximum(row_inf(b), row_inf(Ax)), row_inf(s)))
    dres = row_inf(Px + ATz + q) / (1 + torch.maximum(torch.maximum(row_inf(q), row_inf(Px)), row_inf(ATz)))
    return pres, dres, _gap(q, b, x, z, Px)


def _gap(q, b, x, z, Px, by_terms: bool = False) -> torch.Tensor:
    """``(B,)`` relative duality gap :math:`|x^TPx + q^Tx + b^Tz| / (1 + |x^TPx| + |q^Tx| + |b^Tz|)`,
    or with ``by_terms`` against :math:`\\sum_j |q_j x_j| + \\sum_i |b_i z_i|` in place of the two sums
    (:func:`caller_measures`: sums that cancel)."""
    qx_, bz_ = q * x, b * z
    xPx, qx, bz = (x * Px).sum(1), qx_.sum(1), bz_.sum(1)
    size = qx_.abs().sum(1) + bz_.abs().sum(1) if by_terms else qx.abs() + bz.abs()
    return (xPx + qx + bz).abs() / (1 + xPx.abs() + size)


# Bits of caller_measures' second output, and of the batched solve's ``points``: the
# point is primal / dual feasible, or (UNVERIFIABLE) no residual check can vouch for a
# point of the element's program (nearly dependent equality rows, see
# nullspace.unverifiable), or (DEGENERATE) the point was not certified only because it is a
# degenerate vertex whose error no estimate reaches (active_set.degenerate_vertex): the
# batched path's other attempts nearly always end at the same vertex (second_opinion), or
# (FLAT) the point's cost still fell along a face of its limit system beyond rounding and the
# active-set steps did not resolve it (flat_face.flat_descent: a margin near rounding).
FEASIBLE_PRIMAL, FEASIBLE_DUAL, UNVERIFIABLE, DEGENERATE, FLAT = 1, 2, 4, 8, 16


def caller_measures(P, q, A, b, layout: ConeLayout, x, s, z, tol: float,
                    own_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(residual, points)`` of a point in the caller's units, per element.

    The caller's rows are not equilibrated, so each row and each variable is measured
    against its own terms' magnitudes:

    .. math::

        \max_i \frac{|(Ax + s - b)_i|}{1 + \rho_i},\ \rho_i = \max(|b_i|, (|A||x|)_i, |s_i|);
        \quad \max_j \frac{|(Px + A^T z + q)_j|}{1 + \max(|q_j|, (|P||x|)_j, (|A|^T|z|)_j)}

    (the magnitudes of the terms, not of their sums, so rounding in a cancelling row
    passes), a slack's distance to K against its rows' :math:`\rho`, a multiplier's
    against :math:`1 + \|z\|_\infty`, the gap
    :math:`|x^TPx + q^Tx + b^Tz| / (1 + |x^TPx| + \sum_j |q_j x_j| + \sum_i |b_i z_i|)` (its
    terms too, where :func:`kkt_measures` takes the sums), and a pair whose
    members are both large beside their own scales (:func:`own_complementarity`). With one norm
    for all rows, an inactive bound of 3e5 beside rows of 1e-2 let a violation of 1.85e-3
    in another row pass as 6e-9 (an infeasible LP certified as solved), and a box row
    violated by 9.4e-4 passed beside a slack of 1e6.

    The "1 +" is an absolute unit, which a row whose terms are all ~0 (a bound met at 0)
    meets with the rounding of the whole solution: a box projection's ``y_0 = 0`` came
    out as 4e-8 at a data scale of 2e7 (1e-15 relative), and the exact point failed. So
    each residual first loses :data:`ROUNDING` rounding units of the solution's size
    along it, :math:`\|A_i\|_\infty \|x\|_\infty` on a row and
    :math:`\|P_j\|_\infty \|x\|_\infty + \|A_{:j}\|_\infty \|z\|_\infty` on a
    column (the solution's norms, not the slack's: an inactive bound's slack of 1e6 does
    not widen it), which is what a float solve of the element leaves there anyway.

    ``own_rows``: each residual against its own terms alone, without the "1 +" (the
    decided pass of :mod:`.pairs`: a ball of radius 1e-7 around a centre of size 4, its
    radius row 1e-11 off (1e-4 of its terms, 1e-11 of "1 +"), left dy/dx 5e-3 off).

    ``residual``: the largest of these (``inf`` where NaN). ``points``:
    :data:`FEASIBLE_PRIMAL` where ``(x, s)`` is primal feasible to ``tol`` (the primal
    residual and the slack's distance to K), plus :data:`FEASIBLE_DUAL` where ``(x, z)``
    is dual feasible to ``tol`` (``z`` in :math:`K^*`, zero-cone rows free). A solver's
    infeasibility (unboundedness) certificate that meets a primal (dual) feasible point
    is not believed: a ray that passes the relative tests on data mixing scales (a bound
    of 1e6 beside ones) was. These two tests take the program's own unit for the "1 +"
    where it is below 1 (:func:`_own_units`), as the per-element check does
    (:func:`.cone_checks.kkt_residual`): against an absolute 1, every point of an LP whose
    data are ~1e-7 was "feasible", and its verified certificate (infeasible by 10 % of
    every datum) was demoted to a ``SolverError``.
    """
    Ax, Px, ATz = bmv(A, x), bmv(P, x), bmv(A.mT, z)
    ax, Aa, Pa = x.abs(), A.abs(), P.abs()  # (each |·| once: this runs on every forward)
    # The gap against its terms' magnitudes, as the rows are (|q_j x_j|, |b_i z_i|, not the sums,
    # which cancel): a projection onto a second-order cone of a point 1e-6 of its size outside the
    # polar cone, data ~1e6, solution ~0.3: qᵀx sums terms of 3e5 to -1, so a point 6e-11 off
    # (the data fix it to 2e-10) read a gap of 1.4e-6 and was refused, then raised SolverError.
    gap = _gap(q, b, x, z, Px, by_terms=True)
    rho = torch.stack([b.abs(), bmv(Aa, ax), s.abs()]).amax(0)  # (B, m)
    sigma = torch.stack([q.abs(), bmv(Pa, ax), bmv(Aa.mT, z.abs())]).amax(0)  # (B, n)
    unit = ROUNDING * torch.finfo(x.dtype).eps
    x_inf, z_inf = row_inf(x)[:, None], row_inf(z)[:, None]
    a_rows = _inf_rows(Aa)  # (B, m) ‖A_i‖∞
    row_slack = unit * a_rows * x_inf  # (B, m)
    col_slack = unit * (_inf_rows(Pa) * x_inf + _inf_rows(Aa.mT) * z_inf)  # (B, n)
    one = 0.0 if own_rows else 1.0
    r_p = ((Ax + s - b).abs() - row_slack).clamp_min(0)
    r_d = ((Px + ATz + q).abs() - col_slack).clamp_min(0)
    pres = _worst(r_p / torch.where(one + rho > 0, one + rho, 1.0))
    dres = _worst(r_d / torch.where(one + sigma > 0, one + sigma, 1.0))
    z0 = layout.zero
    s_out = layout.violation(s[:, z0:], scale=rho[:, z0:])
    z_out = _cone_violation(layout, z)
    # The feasibility bits: these measures, and the same in the program's own units.
    u_p, u_d, u_z = _own_units(b, q, rho, sigma, a_rows)
    primal = ((pres <= tol) & (s_out <= tol) & (_worst(r_p / (u_p + rho)) <= tol)
              & (layout.violation(s[:, z0:], scale=(u_p + rho)[:, z0:], unit=0.0) <= tol))
    dual = ((dres <= tol) & (z_out <= tol) & (_worst(r_d / (u_d + sigma)) <= tol)
            & (layout.violation(z[:, z0:]) / (u_z[:, 0] + z_inf[:, 0]) <= tol))
    # (a multiplier's unit: the largest one, or tol of the dual equations' terms through its row)
    z_unit = torch.maximum(z_inf, tol * _worst(sigma)[:, None] / torch.where(a_rows > 0, a_rows, 1.0))
    # (a nonnegative row's slack against its rounding only; a cone's also against tol of x, see below)
    # (one pass: on the nonnegative rows the smaller s_small gives the larger value)
    cones = layout.zero + layout.nonneg
    s_small = torch.cat([row_slack[:, :cones], row_slack[:, cones:] * max(1.0, tol / unit)], 1)
    comp = own_complementarity(layout, s, z, rho, s_small, z_unit)
    residual = torch.stack([pres, dres, gap, s_out, z_out, comp]).amax(0)
    residual = torch.where(torch.isnan(residual), torch.inf, residual)
    return residual, primal.long() * FEASIBLE_PRIMAL + dual.long() * FEASIBLE_DUAL


def _own_units(b, q, rho, sigma, a_rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, 1)`` each: the floors of :func:`caller_measures`' feasibility bits, the
    program's own primal, dual and multiplier units where below 1: ``min(1, max ρ)``
    where ``b ≠ 0`` (else 1: the point's own terms may be noise there), ``min(1, max σ)``
    where ``q ≠ 0``, and the latter over ``max ‖A_i‖∞`` for ``z`` (at most 1), as
    :func:`.cone_checks.kkt_residual` floors the per-element check."""
    u_p = torch.where(row_inf(b) > 0, _worst(rho).clamp(max=1.0), 1.0)[:, None]
    u_d = torch.where(row_inf(q) > 0, _worst(sigma).clamp(max=1.0), 1.0)[:, None]
    a_max = _worst(a_rows)[:, None]
    u_z = torch.where(a_max > 0, u_d / a_max, 1.0).clamp(max=1.0)
    return u_p, u_d, u_z


def own_complementarity(layout: ConeLayout, s, z, rho, s_small, z_unit) -> torch.Tensor:
    r"""``(B,)`` the largest complementary pair whose members are both large beside their
    own scales (0 where every pair has one member below :data:`NOT_COMPLEMENTARY` of it):

    .. math::

        \max_i \min\Big(\frac{s_i}{\rho_i}, \frac{z_i}{\zeta_i}\Big), \qquad
        \zeta_i = \max\big(\|z\|_\infty, \mathrm{tol}\,\|\sigma\|_\infty / \|A_i\|_\infty\big)

    over the nonnegative rows (:math:`\rho_i` its row's terms) and each second-order
    cone's Jordan-frame pairs (:func:`~.symmetric_cones.soc_frame`: :math:`a_k` against
    the head row's :math:`\rho`, the cone's radius, its other rows' slack being the
    difference of their terms). A slack counts less ``s_small`` ``(B, m)``:
    :func:`caller_measures` passes tol of the solution's size along its row
    (:math:`\|A_i\|_\infty \|x\|_\infty`, as the measures' normwise promise goes; the
    largest over a cone's rows), and for the nonnegative rows also its rounding alone
    (:data:`ROUNDING` units of it): a bound y_i >= 0 met at y_i = 1.4e-6 beside a solution
    of 1e8 (1e-14 of it) is no row of its own, but tol of x hid the radius row of a ball
    r = 1e-7 around a centre of size 8 (slack 0.5 r beside the largest multiplier: the
    centre returned, a gradient of 0 for I, silently); a row's slack is as exact as the
    rounding of its terms. (A cone's frame values keep tol: entmax's cones near their
    tips, in their own units, are its derivative checks' to judge.) A
    multiplier's unit ``z_unit`` ``(B, m)`` is :math:`\zeta_i` (:math:`\sigma`: the dual
    equations' terms), so that one whose term there is below tol of them is small (the
    badly scaled QP's multiplier of 7e-5 on an inactive row, beside terms of 4e8).
    The gap of :func:`kkt_measures` weighs the products against the whole program,
    beside which a row whose terms are small passes unresolved: the bound
    ``r - t >= 0`` of a ball's epigraph, r = 1e-6 around an O(1) centre, ended with its
    slack at half its terms beside the largest multiplier (5e-5), neither side decided,
    at a gap of 2e-11: the barrier held y at the centre, 4e-7 off, its gradient 0 for I.
    (Pairs small beside the element but decided beside their own scales pass: an
    auxiliary cone of entmax at its tip, head 4e-9, multiplier 1e-8 of the largest.)"""
    z0, k = layout.zero, layout.nonneg
    pos = lambda v: torch.where(v > 0, v, 1.0)  # noqa: E731  (ρ = 0: s is 0 there; ζ = 0: z is)
    sl, z_unit = (s[:, z0:z0 + k].abs() - s_small[:, z0:z0 + k]).clamp_min(0), pos(z_unit)
    out = _worst(torch.minimum(sl / pos(rho[:, z0:z0 + k]), z[:, z0:z0 + k].clamp_min(0) / z_unit[:, z0:z0 + k]))
    if layout.soc:
        a1, a2, b1, b2, _ = soc_frame(layout, s[:, z0 + k:], z[:, z0 + k:])
        idx = layout.index(s.device)
        head = pos(rho[:, z0 + k:][:, idx.heads])
        ids = idx.soc_id.expand(s.shape[0], -1)
        small, zeta = (torch.zeros_like(head).scatter_reduce_(1, ids, v[:, z0 + k:], "amax")  # (its rows' largest)
                       for v in (s_small, z_unit))
        for a, b_ in ((a1, b1), (a2, b2)):
            out = torch.maximum(out, _worst(torch.minimum((a - small).clamp_min(0) / head, b_.clamp_min(0) / zeta)))
    return torch.where(out > NOT_COMPLEMENTARY, out, 0.0)


# A complementary pair both of whose members exceed this fraction of their own scales is
# no solution's (see _own_complementarity): where both are small beside the element (a
# weakly active bound, s_i = z_i = 1e-8 at the interior point's end) or one is small
# beside its own, the derivative's checks decide (certify.undecided); the ball above had
# 0.5, entmax's auxiliary cones at their tips 1e-8.
NOT_COMPLEMENTARY = 1e-2


# Rounding units of the solution's size along a row (column) that caller_measures
# forgives its residual there: a float solve's x is that close, relatively, at best
# (measured 5 to 11 units on a box projection at data scales 1e6 to 2e8).
ROUNDING = 64.0


def _inf_rows(M: torch.Tensor) -> torch.Tensor:
    """``(B, r)`` largest entry of each row of ``M (B, r, c)``, entries ``>= 0`` (0 when ``c = 0``)."""
    return M.amax(2) if M.shape[2] else M.new_zeros(M.shape[:2])


def _worst(v: torch.Tensor) -> torch.Tensor:
    """``(B,)`` largest entry of each row of ``v (B, k)`` (0 when ``k = 0``)."""
    return v.amax(1) if v.shape[1] else v.new_zeros(v.shape[0])


def _cone_violation(layout: ConeLayout, v: torch.Tensor) -> torch.Tensor:
    """(B,) distance of ``v``'s cone rows to K (= K*), relative to ``1 + ‖v‖∞``."""
    return layout.violation(v[:, layout.zero:]) / (1 + row_inf(v))


def point_residual(d: Scaled, layout: ConeLayout):
    """``(x, s, z[, idx]) -> (B,)``: the largest of :func:`kkt_measures` and the relative
    cone violations of ``s``, ``z`` at a point of the program ``d`` (of its elements
    ``idx`` if given); ``inf`` where it is NaN."""
    def residual(x, s, z, idx=None):
        pick = (lambda v: v) if idx is None else (lambda v: v.index_select(0, idx))  # noqa: E731
        pres, dres, gap = kkt_measures(pick(d.P), pick(d.q), pick(d.A), pick(d.b), x, s, z)
        cone = torch.maximum(_cone_violation(layout, s), _cone_violation(layout, z))
        r = torch.maximum(torch.maximum(pres, dres), torch.maximum(gap, cone))
        return torch.where(torch.isnan(r), torch.inf, r)
    return residual


def _row_infs(*vs: torch.Tensor) -> torch.Tensor:
    """``(k, B)``: :func:`~.kkt.row_inf` of each of ``k`` same-shaped ``(B, r)`` tensors,
    in three ops (stack, abs, amax) instead of two per tensor."""
    v = torch.stack(vs)
    return v.abs().amax(-1) if v.shape[-1] else v.new_zeros(v.shape[:2])


class Measures:
    """Residuals of the embedding at (x, s, z, τ, κ), the measures of x/τ, s/τ, z/τ
    (:func:`kkt_measures`, from the same products) and the infeasibility certificates."""

    def __init__(self, d: Scaled, ops: DataOps, norm_b, norm_q, x, s, z, tau, kappa, tol_inf) -> None:
        Px, ATz, Ax = ops.Pv(x), ops.ATv(z), ops.Av(x)
        t = tau[:, None]
        self.Px = Px
        self.rx = torch.addcmul(Px + ATz, d.q, t)
        Axs = Ax + s
        self.rz = torch.addcmul(Axs, d.b, t, value=-1.0)
        xPx, qx, bz = (x * Px).sum(1), (d.q * x).sum(1), (d.b * z).sum(1)
        self.rtau = qx + bz + kappa + xPx / tau
        # The norms in two stacked reductions (rows, columns): ~20 fewer small ops.
        n_rz, n_Ax, n_s, n_z, n_Axs = _row_infs(self.rz, Ax, s, z, Axs).unbind(0)
        n_rx, n_Px, n_ATz, n_x = _row_infs(self.rx, Px, ATz, x).unbind(0)
        pres = n_rz / (tau + torch.maximum(torch.maximum(tau * norm_b, n_Ax), n_s))
        dres = n_rx / (tau + torch.maximum(torch.maximum(tau * norm_q, n_Px), n_ATz))
        tt = tau * tau
        gap = (xPx + tau * (qx + bz)).abs() / (tt + xPx.abs() + tau * (qx.abs() + bz.abs()))
        self.merit = torch.maximum(torch.maximum(pres, dres), gap)
        self.pinf = (bz < -tol_inf * n_z) & (n_ATz < -tol_inf * bz)
        self.dinf = (qx < -tol_inf * n_x) & (n_Px < -tol_inf * qx) & (n_Axs < -tol_inf * qx)
        finite = torch.isfinite(self.merit) & torch.isfinite(kappa) & (tau > 0)
        self.merit = torch.where(finite, self.merit, torch.inf)
        self.finite = finite

    _FIELDS = ("Px", "rx", "rz", "rtau", "merit", "pinf", "dinf", "finite")

    def select(self, idx: torch.Tensor) -> "Measures":
        """The measures of the elements ``idx`` (what measuring them alone gives: each
        element's numbers are its own)."""
        out = Measures.__new__(Measures)
        for f in self._FIELDS:
            setattr(out, f, getattr(self, f).index_select(0, idx))
        return out


def max_step(layout: ConeLayout, sc, zc, tau, kappa, dsc, dzc, dtau, dkappa) -> torch.Tensor:
    """Largest step in (0, ∞] keeping s, z in K and τ, κ >= 0."""
    extra = [(zc[:, :layout.nonneg], dzc[:, :layout.nonneg]),
             (torch.stack([tau, kappa], 1), torch.stack([dtau, dkappa], 1))]
    alpha = layout.max_step(sc, dsc, tuple(extra))
    if layout.soc:
        alpha = torch.minimum(alpha, layout.soc_max_step(zc[:, layout.nonneg:], dzc[:, layout.nonneg:]))
    return alpha
