"""The five robust penalties of Gould et al. Table 1, with their hand-fused row sums.

Each class gives :math:`\\phi`, its derivatives and IRLS weight (the formulas), its
CVXPY form where convex, and overrides of :meth:`.Penalty.newton_sums`,
:meth:`.Penalty.descent_sums` and :meth:`.Penalty.hessian_weights` that evaluate the
same formulas as a few in-place passes over preallocated buffers; a test checks each
override against the base class's derivation from the formulas.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks",
    IEEE TPAMI 2021 (Table 1: robust penalties and their gradients).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .penalties import SPREAD_DIVISOR, Penalty, _flush, _rows, exp_log_base

__all__ = ["Huber", "PseudoHuber", "Quadratic", "TruncatedQuadratic", "Welsch"]

# (z/alpha)² ≤ max/SPREAD_DIVISOR² (see SPREAD_DIVISOR), so z² = (z/alpha)²·alpha² stays
# finite for alpha < SPREAD_DIVISOR.
_ONE_PASS_BELOW = SPREAD_DIVISOR


@functools.lru_cache(maxsize=64)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    # addcmul's first operand must be a tensor; making a 0-d one costs ~15 us per call,
    # which at a few block passes per solve is several per cent of a small solve.
    return torch.tensor(value, dtype=dtype, device=device)


def _scaled_square(z: Tensor, alpha: float | Tensor, out: Tensor, value: float, add: float) -> Tensor:
    """``out = add + value * (z / alpha)**2`` in one or two passes.

    One pass (``z * z`` times ``value / alpha²``) only for alpha below _ONE_PASS_BELOW:
    the callers keep ``(z / alpha)²`` finite (rows whose spread over alpha could
    overflow a square are clamped or rescaled), which bounds ``z²`` too only while alpha
    is small; and a large alpha's ``value / alpha²`` underflows (alpha 1e200 in float64,
    1e30 in float32: every residual looked like 0 and the result was the mean)."""
    base = _constant(float(add), z.dtype, z.device)
    if isinstance(alpha, float) and alpha < _ONE_PASS_BELOW and abs(value) / alpha < torch.finfo(z.dtype).max * alpha:
        return torch.addcmul(base, z, z, value=value / (alpha * alpha), out=out)
    torch.div(z, alpha, out=out)
    return torch.addcmul(base, out, out, value=value, out=out)


class Quadratic(Penalty):
    """:math:`\\phi(z) = \\tfrac12 z^2`; the minimiser is the mean, ``alpha`` plays no role."""

    name = "quadratic"
    convex = True
    strict = True
    smooth = True

    def phi(self, z, alpha):
        return 0.5 * z * z

    def dphi(self, z, alpha):
        return z

    def d2phi(self, z, alpha):
        return torch.ones_like(z)

    def d2phi_dalpha(self, z, alpha):
        return torch.zeros_like(z)

    def irls_weight(self, z, alpha):
        return torch.ones_like(z)

    def cvxpy(self, z, alpha):
        import cvxpy as cp

        return 0.5 * cp.sum_squares(z)

    def solve(self, x, alpha, tol, max_iter, use_compile):
        from .solvers import mean_solve

        # (contiguous: torch sums a strided row in another order, and the mean of the same
        # values then depended on their layout by an ulp or two; a copy only for a strided x)
        return mean_solve(x.contiguous())


_SQRT_HALF = math.sqrt(0.5)


def _signed_cube_sums(z: Tensor, s: Tensor, alpha: float | Tensor, bufs: list[Tensor] | None = None) -> Tensor:
    """Row sums ``(R, 1)`` of :math:`(r s)^3`, :math:`r = z/\\alpha`, :math:`s = (1 +
    r^2)^{-1/2}` (or ``s`` times a positive factor per row below 1): pseudo-Huber's
    :math:`\\partial^2_{z\\alpha}\\phi`. ``z`` (residuals, ``(R, N)``) is overwritten;
    ``bufs``: four scratch tensors like ``z`` (made here if None).

    A residual far beyond alpha (:math:`u = s^2 < 1/2`) has a term near ±1, and such terms
    often cancel to a row sum of ~1e-9: rounded to ±1 each loses its :math:`-\\tfrac32 u`
    (float32 :math:`dy/d\\alpha` was 11 % to 7× off, and -3.6e-3 on a symmetric row whose
    exact value is 0). Those terms are summed as the exact count of their signs plus the
    small parts :math:`\\operatorname{sign}(r)(t^3 - 1)`, :math:`t = |r s|`, formed without
    cancellation as :math:`-u (2 - u + t) / (1 + t)` (:math:`t^2 = 1 - u`: a few ulps, as
    ``expm1(1.5 log1p(-u))`` was); the others directly as :math:`(r s)^3`, which is exact to
    its own rounding (as a difference from ±1 it carried eps absolute: 2 % median error at
    residuals 1e-2 alpha). Where a residual overflowed, ``r s`` is NaN (inf · 0): a far term,
    with :math:`t = 1`. Masks multiply, in the caller's buffers: on the CPU a ``torch.where``
    over a block costs 15× a product, and with two of them, two transcendental passes and
    their fresh pages alpha's gradient cost 7× the rest of pseudo-Huber's backward
    ((4, 256, 1024) float32: 24 ms against 3.4).
    """
    sign, far, t, u = bufs if bufs is not None else [torch.empty_like(z) for _ in range(4)]
    torch.sign(z, out=sign)
    rs = z.mul_(s).div_(alpha)
    torch.lt(s, _SQRT_HALF, out=far)  # u < 1/2 (1.0 / 0.0)
    sign.mul_(far)
    torch.abs(rs, out=t).nan_to_num_(nan=1.0)
    torch.mul(s, s, out=u)
    near = rs.addcmul_(rs, far, value=-1.0).pow_(3).nan_to_num_(nan=0.0)
    small = torch.sub(t, u, out=far).add_(2.0).div_(t.add_(1.0)).mul_(u).mul_(sign)
    return _rows(sign) + _rows(near.sub_(small))


class PseudoHuber(Penalty):
    """:math:`\\phi(z) = \\alpha^2 (\\sqrt{1 + (z/\\alpha)^2} - 1)`: smooth and convex."""

    name = "pseudo_huber"
    convex = True
    strict = True
    smooth = True
    saturation = 2.0 ** 28  # 1 - 1/(2 r^2) rounds to 1 even in float64

    def phi(self, z, alpha):
        r = z / alpha
        return alpha * alpha * (torch.sqrt(1 + r * r) - 1)

    def dphi(self, z, alpha):
        r = z / alpha
        return z * torch.rsqrt(1 + r * r)

    def d2phi(self, z, alpha):
        r = z / alpha
        return torch.rsqrt(1 + r * r) ** 3

    def d2phi_dalpha(self, z, alpha):
        r = z / alpha
        return (r * torch.rsqrt(1 + r * r)) ** 3

    def weights(self, z, alpha):
        # Scale by (1 + r_min^2)^{3/2}, r_min the residual nearest zero in the row, so the
        # largest weight is 1 however far every point lies from y.
        r = z / alpha
        q = 1 + r * r
        q_min = q.amin(-1, keepdim=True)
        ratio = torch.sqrt(q_min / q)
        w = ratio ** 3
        return w, (r * ratio) ** 3

    def weight_sums(self, z, alpha, need_alpha):
        w, _ = self.weights(z, alpha)
        swa = None
        if need_alpha:  # (r s)^3, times the weights' q_min^{3/2}
            r = z / alpha
            q = 1 + r * r
            swa = _signed_cube_sums(z.clone(), q.rsqrt(), alpha) * q.amin(-1, keepdim=True).pow(1.5)
        return w, w.sum(-1, keepdim=True), swa

    def irls_weight(self, z, alpha):
        r = z / alpha
        return torch.rsqrt(1 + r * r)

    def cvxpy(self, z, alpha):
        # alpha^2 (sqrt(1 + (z/alpha)^2) - 1) = alpha ||(alpha, z_i)||_2 - alpha^2, an SOC.
        import cvxpy as cp
        import numpy as np

        n = z.shape[0]
        stacked = cp.vstack([np.full(n, alpha), z])  # columns (alpha, z_i)
        # The constant only shifts the objective: left out where it overflows (alpha ** 2
        # raised OverflowError from alpha ~ 1.3e154; the minimiser does not depend on it).
        constant = n * alpha * alpha
        return alpha * cp.sum(cp.norm(stacked, 2, axis=0)) - (constant if math.isfinite(constant) else 0.0)

    def dphi_norm(self, h, w, n, alpha, spread):
        # phi'^2 = alpha^2 (1 - 1/q), q = 1 + r^2 >= 1, and sum 1/q >= sum q^-3/2 = h;
        # also |phi'(z)| <= |z| <= spread.
        return torch.minimum(alpha * (n - h).clamp_(min=0).sqrt_(), spread * math.sqrt(n))

    def newton_span(self, h, alpha):
        # phi''(z) = (1 + r^2)^(-3/2) <= h for every term, so every |z| >= reach = alpha
        # sqrt(h^(-2/3) - 1): within reach / 4 each term's phi'' (~ |z|^-3 out there)
        # changes by a factor 0.5-2.4. Near a point (h >= 1), alpha / 2 (72 % kept).
        reach = torch.where(h < 1, (h.pow(-2.0 / 3.0) - 1).clamp_(min=0).sqrt_() * alpha, 0.0)
        return torch.maximum(reach.mul_(0.25), torch.as_tensor(0.5 * alpha, dtype=h.dtype, device=h.device))

    def weight_scale(self, z, alpha):
        # A term is kappa (I - nn') + phi'' nn', kappa = phi'/z, phi'' = kappa a^2/(a^2 + z^2):
        # a shift e of y changes it by e z/(a^2 + z^2) max(1, 3a^2/(a^2 + z^2)) of kappa, within e / max(a, z).
        return torch.maximum(z, torch.as_tensor(alpha, dtype=z.dtype, device=z.device))

    def newton_sums(self, z, alpha, work):
        # s = 1 / sqrt(1 + r^2): phi' = z s, phi'' = s^3. (``pow_(-0.5)``, not
        # ``rsqrt_``: the same values to the bit, float32 and float64, in half the time
        # on a CPU -- torch 2.13, AVX-512, 512 Ki float32 entries: 34 us against 65,
        # float64 98 against 190; sqrt alone takes 94, reciprocal 21.)
        s = _scaled_square(z, alpha, work[0], 1.0, 1.0).pow_(-0.5)
        d1 = z.mul_(s)
        g = _rows(d1)
        h = _rows(s.pow_(3))
        return g, h, d1

    def hessian_weights(self, z, alpha, work, need_alpha):
        s = _scaled_square(z, alpha, work[0], 1.0, 1.0).pow_(-0.5)  # (rsqrt, faster: see newton_sums)
        wa = None
        if need_alpha:  # d2phi/dalpha = (r s)^3, in the four further buffers the backward hands
            wa = _signed_cube_sums(z, s, alpha, work[1:5] if len(work) >= 5 else None)
        return s.pow_(3), wa, None


class Huber(Penalty):
    """:math:`\\phi(z) = \\tfrac12 z^2` for :math:`|z| \\le \\alpha`, else
    :math:`\\alpha (|z| - \\tfrac12 \\alpha)`: convex, with a kink in :math:`\\phi''` at
    :math:`|z| = \\alpha` (the inlier side is used there)."""

    name = "huber"
    convex = True
    piecewise_linear = True

    def phi(self, z, alpha):
        a = z.abs()
        return torch.where(a <= alpha, 0.5 * z * z, alpha * (a - 0.5 * alpha))

    def dphi(self, z, alpha):
        return torch.maximum(torch.minimum(z, alpha), -alpha)

    def d2phi(self, z, alpha):
        return (z.abs() <= alpha).to(z.dtype)

    def d2phi_dalpha(self, z, alpha):
        return torch.where(z.abs() <= alpha, torch.zeros_like(z), torch.sign(z))

    def irls_weight(self, z, alpha):
        return alpha / torch.maximum(z.abs(), alpha)

    def dphi_norm(self, h, w, n, alpha, spread):
        return torch.clamp(spread, max=alpha) * math.sqrt(n)  # |phi'(z)| <= min(alpha, |z|)

    def newton_span(self, h, alpha):
        # g is piecewise linear with integer slopes (h = the inliers): it changes by at
        # least alpha before its slope drops to 0, where g = alpha (#below - #above) is 0
        # (a flat minimum) or at least alpha away from 0. So a gradient within its noise
        # (< alpha) is within noise / h of a root or in a flat minimum: no span limit.
        # (A Newton step is another matter: exact only up to the next kink, which may be
        # any distance below alpha away; see Penalty.piecewise_linear.)
        return torch.full_like(h, math.inf)

    def weight_scale(self, z, alpha):
        # An outlier's weight alpha / z varies on the scale z (phi'' = 0), and from 2 alpha
        # out the kink at alpha is over z / 2 away; nearer, alpha (a point may sit on it).
        a = torch.as_tensor(alpha, dtype=z.dtype, device=z.device)
        return torch.where(z >= 2 * a, z, a)

    @staticmethod
    def _clamp(z: Tensor, alpha: float | Tensor, out: Tensor) -> Tensor:
        if isinstance(alpha, float):
            return torch.clamp(z, -alpha, alpha, out=out)
        # clamp with tensor bounds is ~10x slower than minimum/maximum on CPUs.
        return torch.maximum(torch.minimum(z, alpha, out=out), -alpha, out=out)

    def newton_sums(self, z, alpha, work):
        d1 = self._clamp(z, alpha, work[0])  # phi' = clamp(z, -alpha, alpha)
        g = _rows(d1)
        h = _rows(torch.eq(z, d1, out=z))  # phi'' = 1 exactly where the clamp is inactive
        return g, h, d1

    def hessian_weights(self, z, alpha, work, need_alpha):
        c = self._clamp(z, alpha, work[0])
        w = torch.eq(z, c, out=work[1])
        wa = None
        if need_alpha:
            # d2phi/dalpha = sign(z) off the inliers: its sum is (sum clamp - sum_inliers clamp) /
            # alpha, with clamp = z on the inliers (z itself may be ±inf: a residual of entries
            # near the float range's end overflows, and inf * 0 would be NaN).
            sc = _rows(c)
            wa = (sc - _rows(torch.mul(c, w, out=z))) / alpha
        return w, wa, None

    def cvxpy(self, z, alpha):
        import cvxpy as cp

        return 0.5 * cp.sum(cp.huber(z, alpha))  # cvxpy's huber is twice Table 1's


class Welsch(Penalty):
    """:math:`\\phi(z) = 1 - \\exp(-z^2 / (2\\alpha^2))`: smooth, bounded and nonconvex."""

    name = "welsch"
    convex = False
    smooth = True
    saturation = 64.0  # exp(-64^2 / 2) is 0 even in float64

    def phi(self, z, alpha):
        r = z / alpha
        return -torch.expm1(-0.5 * r * r)

    def dphi(self, z, alpha):
        r = z / alpha
        return r / alpha * torch.exp(-0.5 * r * r)

    def d2phi(self, z, alpha):
        r = z / alpha
        e = torch.exp(-0.5 * r * r)
        return torch.where(e > 0, (1 - r * r) * e, 0.0) / (alpha * alpha)

    def d2phi_dalpha(self, z, alpha):
        # (Both 0 where the exponential is: r² and r³ overflow first, a point 1e103 alphas
        # away in float64 or 1e13 in float32 made inf * 0 = NaN in robust_vector_pool's
        # backward.)
        r = z / alpha
        e = torch.exp(-0.5 * r * r)
        return torch.where(e > 0, r * (r * r - 2) * e, 0.0) / (alpha * alpha)

    def weights(self, z, alpha):
        # exp(-r^2/2) underflows to 0 for every point once |y - x_i| > ~13 alpha (float32):
        # shift the exponent by the row's smallest r^2, and drop the common 1/alpha^2.
        r = z / alpha
        r2 = r * r
        e = torch.exp(_flush(-0.5 * (r2 - r2.amin(-1, keepdim=True))))
        return torch.where(e > 0, (1 - r2) * e, 0.0), torch.where(e > 0, r * (r2 - 2) * e, 0.0)

    def irls_weight(self, z, alpha):
        r = z / alpha
        return torch.exp(-0.5 * r * r) / (alpha * alpha)

    def dphi_norm(self, h, w, n, alpha, spread):
        # d1 = z e = alpha r e (phi' times alpha^2), e <= 1: sum d1^2 <= alpha^2 sum r^2 e
        # = alpha^2 (W - h); also |z e| <= |z| <= spread.
        return torch.minimum(alpha * (w - h).clamp_(min=0).sqrt_(), spread * math.sqrt(n))

    @staticmethod
    def _exp(z: Tensor, alpha: float | Tensor, work: list[Tensor]) -> tuple[Tensor, Tensor, float]:
        """``(t, e, c)``: the exponent ``t = -r^2 / (2c)`` in work[0] to the base
        ``exp(c)`` (see :func:`.penalties.exp_log_base`) and ``e = exp(-r^2 / 2)`` in
        work[1], flushed to 0 below the floor; ``c t = -r^2 / 2``."""
        c = exp_log_base(z.device.type)
        t = _flush(_scaled_square(z, alpha, work[0], -0.5 / c, 0.0), c)
        return t, (torch.exp2 if c != 1.0 else torch.exp)(t, out=work[1]), c

    def descent_sums(self, z, alpha, work):
        # All sums times alpha^2: phi' = z e, phi'' = (1 - r^2) e = (1 + 2ct) e, W = e.
        t, e, c = self._exp(z, alpha, work)
        w = _rows(e)
        h = w + (2 * c) * _rows(t.mul_(e))
        d1 = z.mul_(e)
        return -w, _rows(d1), h, w, d1

    def hessian_weights(self, z, alpha, work, need_alpha):
        # Times alpha^2: w = (1 - r^2) e = (1 + 2ct) e, and d2phi/dalpha = -2 r (1 + ct) e.
        t, e, c = self._exp(z, alpha, work)
        wa = None
        if need_alpha:
            wa = -2 * _rows(torch.addcmul(e, t, e, value=c).mul_(z)) / alpha
        w = torch.addcmul(e, t, e, value=2.0 * c, out=work[0])
        # sum |w| <= sum (1 + r^2) e = 2 sum e - sum w: the size the singularity test needs.
        return w, wa, 2 * _rows(e) - _rows(w)

    def solve(self, x, alpha, tol, max_iter, use_compile):
        from .solvers import nonconvex_solve

        return nonconvex_solve(self, x, alpha, tol, max_iter, use_compile)


class TruncatedQuadratic(Penalty):
    """:math:`\\phi(z) = \\tfrac12 z^2` for :math:`|z| \\le \\alpha`, else
    :math:`\\tfrac12 \\alpha^2`: nonconvex and non-smooth at :math:`|z| = \\alpha`."""

    name = "trunc_quad"
    convex = False

    def phi(self, z, alpha):
        return 0.5 * torch.minimum(z * z, alpha * alpha)

    def dphi(self, z, alpha):
        return torch.where(z.abs() <= alpha, z, torch.zeros_like(z))

    def d2phi(self, z, alpha):
        return (z.abs() <= alpha).to(z.dtype)

    def d2phi_dalpha(self, z, alpha):
        return torch.zeros_like(z)

    def hessian_weights(self, z, alpha, work, need_alpha):
        w = torch.le(z.abs_(), alpha, out=work[0])
        return w, (torch.zeros_like(w[..., :1]) if need_alpha else None), None

    def solve(self, x, alpha, tol, max_iter, use_compile):
        return self.solve_split(x, alpha, tol, max_iter, use_compile)[0]

    def solve_split(self, x, alpha, tol, max_iter, use_compile):
        from .trunc_quad import trunc_quad_solve  # (the exact mean of a run: y and its remainder)
        return trunc_quad_solve(x, alpha, use_compile)
