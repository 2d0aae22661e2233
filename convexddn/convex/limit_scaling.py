"""The scaling of the derivative's KKT system: complementarity linearised at its limit.

The implicit derivative (:mod:`.vjp`) and the error estimate (:mod:`.certify`) solve the
KKT system with :math:`ds = -H\\,dz` on the cone rows, :math:`H = W^2`, at the limit of a
strictly complementary solution. On a nonnegative row :math:`H = s/z`: 0 on an active row
(:math:`s = 0 < z`), ∞ on an inactive one. On a second-order cone, in the Jordan frame the
pair shares (:func:`~.certify.soc_frame`: :math:`s = a_1 c_1 + a_2 c_2`, :math:`z = b_1
c_1 + b_2 c_2`, :math:`c_{1,2} = (1, \\pm u)/2`), linearising :math:`s \\circ z = 0` gives

.. math::

    H c_k = \\frac{a_k}{b_k}\\, c_k, \\qquad H t = \\frac{s_0}{z_0}\\, t \\quad (t \\perp c_1,
    c_2),

with :math:`a_k / b_k \\to 0` or ∞ along the frame and the boundary's curvature weighted by
the multiplier, :math:`s_0 / z_0`, on the tangent directions. A point that is not on the
central path (polished, or lifted off :math:`\\partial K`) is not Nesterov–Todd's
:math:`W^2` there: that has the frame's :math:`a_k/b_k` but the tangent's
:math:`(\\det s / \\det z)^{1/2}`, and rescaled to the tangent's value it multiplied the
frame's limits by the ratio (a ball projection 1e-7 outside the ball: 0.024 where the
limit is 0, gradients 4e-2 off, no warning).

**The limits.** A pair whose smaller member is below ``DECIDED`` of the larger
(:func:`~.certify.decided`) is taken at its limit: the smaller member is set to ``δ``
*times the larger*, so that :math:`H = δ` or :math:`1/δ` whatever the multiplier's size. The
lift alone (``δ (1 + ‖s‖_∞)`` along :math:`e`, which a polished point needs to be
interior) made :math:`H = δ / b_2` on an active cone: 1e-5 for a multiplier of 1e-7,
gradients 1e-5..1e-2 off (and :math:`H^{-1} = δ / s` on an inactive row with a slack of
1e-5: 2e-7 off). The active nonnegative rows keep the absolute ``δ``: the solve's
refinement is exact at their limit (:attr:`~.kkt.KKTSystem.limit`). Undecided pairs keep their values, lifted: no
derivative exists there, and the backward says so (:func:`~.certify.undecided_reach`).

**The limit point.** :func:`limit_point` sets the decided pairs' smaller members to 0
themselves: where the interior point leaves a multiplier of 1e-13 beside a slack of 1.5e8
(an epigraph variable free between ``‖y‖`` and a bound of 3e8, at its analytic centre
``R/2``), the solution is exact but its duality gap in the caller's units is ``R z``,
2e-6, and the point failed the residual check; at the limit the gap is 0. A pair that is
not decided, at a kink (a bound met with a zero multiplier), is measured at its kink
too (:func:`kink_point`).

Shape:
    ``s, z`` the cone parts ``(B, mc)``; :meth:`LimitScaling.apply` and
    :meth:`~LimitScaling.apply_inv` take ``(B, mc)`` or ``(B, mc, k)``.
"""
from __future__ import annotations

import torch

from .symmetric_cones import ConeLayout, _t, soc_frame

__all__ = ["LimitRows", "LimitScaling", "inactive_zero", "kink_point", "limit_point", "retry_at_limit"]


class LimitScaling:
    """Symmetric :math:`W` with :math:`W^2 = H` of the module docstring.

    Args:
        layout: the cones.
        s, z: cone parts ``(B, mc)`` of the (polished) solution, which decide the pairs.
        s_in, z_in: the same lifted into the cone's interior where polished (the values
            of the pairs that are not decided).
        delta: the limit's ``δ`` (:data:`~.estimate._POLISHED_SHIFT` of the dtype).

    Attributes:
        active: ``(B, nonneg)`` the nonnegative rows decided active (exact H = 0 in the
            refinement, :attr:`~.kkt.KKTSystem.limit`).
        rows: :class:`LimitRows`, the parts of a cone vector along which the limit is
            exactly H = 0 or ∞ (the backward's refinement, :attr:`~.kkt.KKTSystem.limit`).
        z_nonneg: ``(B, nonneg)`` the multipliers the scaling used on those rows.
    """

    def __init__(self, layout: ConeLayout, s: torch.Tensor, z: torch.Tensor, s_in: torch.Tensor, z_in: torch.Tensor,
                 delta: float) -> None:
        from .certify import decided  # (certify builds this scaling)

        self.layout = layout
        k = layout.nonneg
        tiny = torch.finfo(s.dtype).tiny
        # The nonnegative rows: an active one keeps the absolute δ (its solve is exact at
        # the limit; δ·z squared its condition in the reduced form, and the refined gradient
        # went from 1e-15 to 1e-12 off).
        self.active, inactive = decided(s[:, :k], z[:, :k])
        sl = torch.where(self.active, delta, s_in[:, :k])
        zl = torch.where(inactive, delta * sl, z_in[:, :k]).clamp_min(tiny)
        self.z_nonneg = zl
        self.w = torch.sqrt(sl / zl)
        if layout.soc:
            *frame, u = soc_frame(layout, s[:, k:], z[:, k:])
            # (the lift moves s and z along e = c₁ + c₂: the same frame, u from the tails)
            a1, a2, b1, b2, _ = soc_frame(layout, s_in[:, k:], z_in[:, k:])
            pairs, heads, zero, inf = [], [], [], []
            for (a, b), (a_in, b_in) in zip(((frame[0], frame[2]), (frame[1], frame[3])), ((a1, b1), (a2, b2))):
                # A decided pair: its larger member as it is, the smaller δ times it, and 0
                # in s₀/z₀ (lifted, or δ times the other, a multiplier of 1e-7 moved s₀/z₀
                # by 2e-5 relative).
                act, inact = decided(a, b)
                zero.append(act)
                inf.append(inact)
                a_in = torch.where(act, delta * b, torch.where(inact, a, a_in))
                b_in = torch.where(inact, delta * a, torch.where(act, b, b_in))
                heads.append((torch.where(act, 0.0, a_in), torch.where(inact, 0.0, b_in)))
                pairs.append((a_in.clamp_min(tiny), b_in.clamp_min(tiny)))
            (a1, b1), (a2, b2) = pairs
            # s₀/z₀, between δ (a whole cone active: s = 0) and 1/δ (inactive: z = 0)
            ht = ((heads[0][0] + heads[1][0]) / (heads[0][1] + heads[1][1]).clamp_min(tiny)).clamp(delta, 1 / delta)
            # No frame (s₁ = z₁: u = 0, a cone of one row, or both on the axis): H = (s₀/z₀) I.
            framed = layout._seg(u * u) > 0
            self.r1 = torch.sqrt(torch.where(framed, a1 / b1, ht))
            self.r2 = torch.sqrt(torch.where(framed, a2 / b2, ht))
            self.rt, self.u = torch.sqrt(ht), u
            # (c₁, c₂, tangent): a cone decided along both pairs has its tangent's limit too
            zero.append(zero[0] & zero[1])
            inf.append(inf[0] & inf[1])
            self.rows = LimitRows(layout, self.active, inactive, torch.stack(zero, -1), torch.stack(inf, -1), u)
        else:
            self.rows = LimitRows(layout, self.active, inactive, None, None, None)

    def _soc(self, v: torch.Tensor, inverse: bool) -> torch.Tensor:
        """W v (or W⁻¹ v) on the soc part: with p = v₀ and q = uᵀv₁, v's frame coordinates
        are (p ± q)/2 along (1, ±u) and its tangent part is (0, v₁ − q u)."""
        lay = self.layout
        r1, r2, rt = (1.0 / self.r1, 1.0 / self.r2, 1.0 / self.rt) if inverse else (self.r1, self.r2, self.rt)
        u = _t(self.u, v)
        heads = lay.index(v.device).heads
        p, q = v[:, heads], lay._seg(v * u)
        plus, minus = _t(r1, v) * (p + q), _t(r2, v) * (p - q)
        out = lay._spread(_t(rt, v)) * (v - lay._spread(q) * u) + lay._spread((plus - minus) / 2) * u
        out[:, heads] = (plus + minus) / 2
        return out

    def _apply(self, v: torch.Tensor, inverse: bool) -> torch.Tensor:
        k = self.layout.nonneg
        w = _t(self.w, v)
        lin = v[:, :k] / w if inverse else v[:, :k] * w
        if not self.layout.soc:
            return lin
        soc = self._soc(v[:, k:], inverse)
        return torch.cat([lin, soc], 1) if k else soc

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """W v."""
        return self._apply(v, False)

    def apply_inv(self, v: torch.Tensor) -> torch.Tensor:
        """W⁻¹ v."""
        return self._apply(v, True)


class LimitRows:
    """The parts of a cone vector along which the limit scaling is exactly H = 0
    (decided active: nonnegative rows, frame directions ``c_k`` of a second-order cone,
    and its tangent where both pairs are) or H = ∞ (decided inactive, likewise).

    In the scaled KKT system (cone rows :math:`W^{-1}A_I x - \\hat z = t`, first block row
    :math:`Px + (W^{-1}A_I)^\\top \\hat z = r_x`) the exact limit drops :math:`\\hat z`
    from the cone rows along H = 0 (:meth:`kept`) and from the first block row along
    H = ∞ (:meth:`held`); :meth:`~.kkt.KKTSystem.solve` refines against that.

    Args:
        zero_nn, inf_nn: ``(B, nonneg)`` the nonnegative rows decided active, inactive.
        zero_soc, inf_soc: ``(B, nsoc, 3)`` the same along (c₁, c₂, tangent) of each
            second-order cone (None without them); ``u`` ``(B, msoc)`` the frames.
    """

    def __init__(self, layout: ConeLayout, zero_nn: torch.Tensor, inf_nn: torch.Tensor,
                 zero_soc: torch.Tensor | None, inf_soc: torch.Tensor | None, u: torch.Tensor | None) -> None:
        self.layout, self.zero_nn, self.inf_nn = layout, zero_nn, inf_nn
        self.zero_soc, self.inf_soc, self.u = zero_soc, inf_soc, u

    def select(self, idx: torch.Tensor) -> LimitRows:
        """The rows of the elements ``idx``."""
        pick = lambda v: None if v is None else v.index_select(0, idx)  # noqa: E731
        return LimitRows(self.layout, pick(self.zero_nn), pick(self.inf_nn), pick(self.zero_soc),
                         pick(self.inf_soc), pick(self.u))

    def patched(self, idx: torch.Tensor, part: LimitRows) -> LimitRows:
        """These rows with those of the elements ``idx`` taken from ``part`` (theirs alone)."""
        put = lambda v, w: None if v is None else v.index_copy(0, idx, w)  # noqa: E731
        return LimitRows(self.layout, put(self.zero_nn, part.zero_nn), put(self.inf_nn, part.inf_nn),
                         put(self.zero_soc, part.zero_soc), put(self.inf_soc, part.inf_soc), put(self.u, part.u))

    def kept(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` ``(B, mc[, k])`` without its parts along H = 0."""
        return self._drop(v, self.zero_nn, self.zero_soc)

    def held(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` ``(B, mc[, k])`` without its parts along H = ∞."""
        return self._drop(v, self.inf_nn, self.inf_soc)

    def _drop(self, v: torch.Tensor, nn: torch.Tensor, soc: torch.Tensor | None) -> torch.Tensor:
        lay, k = self.layout, self.layout.nonneg
        lin = v[:, :k] * _t((~nn).to(v.dtype), v)
        if soc is None:
            return lin
        # With p = v₀ and q = uᵀv₁: v = α₁(1, u) + α₂(1, −u) + (0, v₁ − q u), α₁,₂ = (p ± q)/2.
        vs = v[:, k:]
        u = _t(self.u, vs)
        heads = lay.index(v.device).heads
        p, q = vs[:, heads], lay._seg(vs * u)
        m = soc.to(v.dtype)
        a1, a2, mt = _t(m[..., 0], vs) * (p + q) / 2, _t(m[..., 1], vs) * (p - q) / 2, _t(m[..., 2], vs)
        out = vs - lay._spread(mt) * (vs - lay._spread(q) * u) - lay._spread(a1 - a2) * u
        out[:, heads] = p - a1 - a2
        return torch.cat([lin, out], 1) if k else out


def limit_point(layout: ConeLayout, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, z)`` with each decided pair at its limit: the smaller member 0.

    On a nonnegative row, ``s_i = 0`` where decided active, ``z_i = 0`` where inactive. On a
    second-order cone, in the pair's Jordan frame (:func:`~.certify.soc_frame`), each
    decided ``a_k`` (``b_k``) is set to 0 and a vector with a member set to 0 loses its
    tangent part (``s = a_1 c_1`` is on the boundary only along the frame); a cone whose
    two members are decided on one side is 0 there. Undecided pairs are left as they are.

    Shape:
        ``s, z`` cone parts ``(B, mc)`` -> the same.
    """
    from .certify import decided  # (certify decides the pairs)

    k = layout.nonneg
    active, inactive = decided(s[:, :k], z[:, :k])
    s_lin, z_lin = torch.where(active, 0.0, s[:, :k]), torch.where(inactive, 0.0, z[:, :k])
    if not layout.soc:
        return s_lin, z_lin
    ss, zs = s[:, k:], z[:, k:]
    a1, a2, b1, b2, u = soc_frame(layout, ss, zs)
    act1, inact1 = decided(a1, b1)
    act2, inact2 = decided(a2, b2)

    def framed(v, m1, m2, zero1, zero2):  # v with the members zero1/zero2 set to 0, rebuilt on the frame
        m1, m2 = torch.where(zero1, 0.0, m1), torch.where(zero2, 0.0, m2)
        rebuilt = layout._spread((m1 - m2) / 2) * u
        rebuilt[:, layout.index(v.device).heads] = (m1 + m2) / 2
        return torch.where(layout._spread(zero1 | zero2), rebuilt, v)

    s_soc, z_soc = framed(ss, a1, a2, act1, act2), framed(zs, b1, b2, inact1, inact2)
    return torch.cat([s_lin, s_soc], 1), torch.cat([z_lin, z_soc], 1)


def kink_point(layout: ConeLayout, A: torch.Tensor, b: torch.Tensor, x: torch.Tensor, s: torch.Tensor,
               z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, z)`` with each undecided nonnegative pair (:func:`~.certify.decided`: neither
    member below ``DECIDED`` of the other) taken at its kink: multiplier 0, slack
    :math:`\\max(b_i - (Ax)_i, 0)` (what the row leaves, the rounding of ``x`` included).

    A bound met with a zero multiplier (a ReLU's input at 0) ends the iterations with
    both members ~1e-12 of the element's scale, and no polish decides the pair; in the
    caller's units that row's and column's terms are all ~0, so their measures are
    absolute, and the exact solution failed them from a data scale of 1e4 on.

    Shape:
        ``A (B, m, n), b (B, m), x (B, n), s, z (B, m)`` (whole rows) -> ``s, z`` ``(B, m)``.
    """
    from .certify import decided  # (certify decides the pairs)

    z0, k = layout.zero, layout.nonneg
    active, inactive = decided(s[:, z0:z0 + k], z[:, z0:z0 + k])
    kink = ~(active | inactive)
    left = (b[:, z0:z0 + k] - torch.bmm(A[:, z0:z0 + k], x.unsqueeze(-1)).squeeze(-1)).clamp_min(0)
    s_k, z_k = torch.where(kink, left, s[:, z0:z0 + k]), torch.where(kink, 0.0, z[:, z0:z0 + k])
    return (torch.cat([s[:, :z0], s_k, s[:, z0 + k:]], 1), torch.cat([z[:, :z0], z_k, z[:, z0 + k:]], 1))


def retry_at_limit(d, layout: ConeLayout, data, xs, ss, zs, out, idx, residual_fn, tol: float, own_rows: bool = False):
    """Measure the elements ``idx`` again at the :func:`limit_point` of their solution
    ``(xs, ss, zs)`` (equilibrated units, program ``d``); each keeps the point with the
    smaller residual. Then once more with its undecided nonnegative pairs at their kink
    (:func:`kink_point`): where that is smaller still, the element keeps the limit
    point's ``s, z`` (whose undecided pairs the derivative's checks must see as they are)
    with the kink point's residual and feasibility bits: the residual certifies ``x``,
    which both points share.

    Args:
        data: the caller's ``(P, q, A, b)``.
        out: ``(xo, so, zo, residual, points)`` in the caller's units, as
            :func:`~.measures.caller_measures` left them (residual: the larger of both units').
        residual_fn: :func:`~.measures.point_residual` of ``d``.

    Returns:
        ``(ss, zs, so, zo, residual, points)`` of the whole batch.
    """
    from .measures import caller_measures

    z0 = layout.zero
    pick = lambda v: v.index_select(0, idx)  # noqa: E731
    x, s, z = pick(xs), pick(ss), pick(zs)
    sc, zc = limit_point(layout, s[:, z0:], z[:, z0:])
    s, z = torch.cat([s[:, :z0], sc], 1), torch.cat([z[:, :z0], zc], 1)
    part = d.select(idx)
    caller_data = tuple(pick(v) for v in data)

    def measure(s, z):
        _, so, zo = part.unscale(x, s, z)
        caller, points = caller_measures(*caller_data, layout, pick(out[0]), so, zo, tol, own_rows)
        return so, zo, torch.maximum(residual_fn(x, s, z, idx), caller), points

    so, zo, residual, points = measure(s, z)
    now = (pick(ss), pick(zs), pick(out[1]), pick(out[2]), pick(out[3]), pick(out[4]))
    take = residual < now[4]
    new = tuple(torch.where(take.view(-1, *(1,) * (v.dim() - 1)), v, o)
                for v, o in zip((s, z, so, zo, residual, points), now))
    if layout.nonneg:
        _, _, residual_k, points_k = measure(*kink_point(layout, part.A, part.b, x, s, z))
        kink = residual_k < new[4]
        # (the limit point's s, z with the kink point's measures)
        new = tuple(torch.where(kink.view(-1, *(1,) * (v.dim() - 1)), v, o)
                    for v, o in zip((s, z, so, zo, residual_k, points_k), new))
    return tuple(full.index_copy(0, idx, v) for full, v in zip((ss, zs, out[1], out[2], out[3], out[4]), new))


def inactive_zero(kkt, layout, uz: torch.Tensor) -> torch.Tensor:
    """``uz`` ``(B, m, 1)`` (a multiplier part: the derivative system's answer or right-hand
    side) with its nonnegative rows decided inactive (the limit's H = ∞) set to 0: their
    multiplier is 0 with a positive slack and stays 0, so in the exact limit system their
    answer is 0 and their right-hand side reaches nothing. The factorisation keeps those
    rows at H = 1/δ (see :meth:`~.kkt.KKTSystem.solve`), which left δ-sized values: the
    gradient of h of a bound with slack 0.23 came out -8.9e-12, not 0, and Adam, which
    divides by the gradient's own size, moved that h by 5.8e-4 in 20 steps though the loss
    does not depend on it."""
    lim = kkt.limit
    if lim is None or not layout.nonneg:
        return uz
    at, k = layout.zero, layout.nonneg
    keep = (~lim.inf_nn).to(uz.dtype).unsqueeze(-1)
    return torch.cat([uz[:, :at], uz[:, at:at + k] * keep, uz[:, at + k:]], 1)

