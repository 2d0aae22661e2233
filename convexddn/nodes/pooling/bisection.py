"""The convex solvers' fallback: bisection of a row's gradient on the float grid itself
(:func:`bisect_rows`), for rows whose Newton iteration stopped at its noise level."""
from __future__ import annotations

import torch
from torch import Tensor

from .kernels import row_scale
from .penalties import Penalty


# Residuals over alpha beyond which a saturating penalty's are clamped in the bisection (see _bisect).
_FAR = 2.0 ** 500


def _keys(v: Tensor) -> Tensor:
    """float64 ``v`` as int64 keys in the same order (-0.0 and 0.0 both 0): each step of a
    bisection on them halves the floats left between its ends, one ulp within 64 steps."""
    k = v.view(torch.int64)
    return torch.where(k < 0, -(k & 0x7FFFFFFFFFFFFFFF), k)


def _values(k: Tensor) -> Tensor:
    return torch.where(k < 0, (-k) | -0x8000000000000000, k).view(torch.float64)


def bisect_rows(pen: Penalty, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """``(y, noisy)`` ``(R,)``: the minimiser of a convex penalty's objective on each row of
    ``x`` ``(R, N)`` (float64) as the float where the gradient :math:`g(u) = \\sum_i \\phi'(u - x_i)`,
    non-decreasing, changes sign, to one ulp; ``noisy`` where :math:`|g|` at that point is within
    its rounding (:math:`N \\varepsilon \\sum_i |\\phi'|`) of 0 on both sides, the flat stretch
    Newton's test stops in, or where the gradient is within its rounding of 0 over a stretch wider
    than an ulp (then the stretch's middle is returned). 3 × 64 steps on :func:`_keys`, each one pass
    over the rows, without a host read.

    Rows with entries near the end of the float range are bisected in the units of
    :func:`.kernels.row_scale` (exact), where no residual overflows: unscaled, ``u - x_i`` was
    inf, pseudo-Huber's ``phi'`` NaN there, and a row spread over more than the range
    returned its minimum."""
    lo_x, hi_x = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s = row_scale(lo_x, hi_x)  # (R, 1), mostly 1
    x, a = x * s, (a.reshape(-1, 1) if a.dim() else a) * s
    y, noisy = _bisect(pen, x, a, _keys(lo_x * s), _keys(hi_x * s))
    return y / s.squeeze(-1), noisy


def _bisect(pen: Penalty, x: Tensor, al: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`bisect_rows` of rows ``x`` ``(R, N)`` whose entries lie within 1/16 of the float range,
    ``al`` 0-d or ``(R, 1)``, between the keys ``lo`` and ``hi`` ``(R, 1)`` of their min and max."""
    def z(v: Tensor) -> Tensor:
        # Residuals of a saturating penalty clamped at 2^500 alpha, far beyond its saturation (phi' is
        # constant there to working precision) and short of where its formula overflows: pseudo-Huber's
        # (z / alpha)^2 from |z| ~ 1e154 alpha read phi' = 0 at every far point, and a row spread over
        # 1e160 alpha was bisected to its minimum. (Not at the saturation itself, as the iterations
        # clamp: a row whose points all lie beyond it, +-1e10 with alpha 1, keeps the formula's own
        # rounding, which is symmetric there: the midpoint 0, where a clamped, flat g gave an end.)
        r = v - x
        if pen.saturation is not None:
            torch.clamp(r, -_FAR * al, _FAR * al, out=r)
        return r

    # g(lo) <= 0 <= g(hi)
    grad = lambda k: pen.dphi(z(_values(k)), al).sum(-1, keepdim=True)  # noqa: E731
    first, last = lo, hi
    lo, hi = _split(lambda k: grad(k) < 0, lo, hi)
    g_lo, g_hi = grad(lo), grad(hi)
    # The zero lies in (lo, hi], adjacent floats: the nearer one from a Newton step off an end with
    # curvature (g jumps within alpha of a data point: a median's entry at hi, g(lo) = -alpha, g(hi) =
    # 256 alpha, is the minimiser), else the end with the smaller |g|.
    v_lo, v_hi = _values(lo), _values(hi)
    h_lo, h_hi = (pen.d2phi(z(v), al).sum(-1, keepdim=True) for v in (v_lo, v_hi))
    near = torch.where(g_hi <= -g_lo, v_hi, v_lo)
    step = torch.where(h_hi > 0, v_hi - g_hi / h_hi, torch.where(h_lo > 0, v_lo - g_lo / h_lo, near))
    y = torch.minimum(torch.maximum(torch.nan_to_num(step, nan=0.0), v_lo), v_hi)
    y = torch.where(torch.isfinite(step), y, near).squeeze(-1)
    # (a sum's rounding: at most N eps times the sum of its terms' magnitudes)
    noise = x.shape[-1] * torch.finfo(torch.float64).eps * pen.dphi(z(_values(hi)), al).abs().sum(-1, keepdim=True)
    # Where g is within its noise of 0 over a stretch (two far points at alpha ~1e-300 of their gap: every
    # phi' is +-alpha to working precision, and g is 0 from one to the other), the crossing found is one
    # end of it (the row's minimum was returned, silently): the stretch's ends are bisected too, and its
    # middle returned (the minimiser where the row is symmetric), unresolved (warned) if wider than an ulp.
    noisy = ((g_hi <= noise) & (-g_lo <= noise)).squeeze(-1)
    flat = ((g_hi.abs() <= noise) | (g_lo.abs() <= noise)).squeeze(-1)  # (a stretch may begin at either end)
    # (for every row: no host read, as above; the rows bisected are few)
    left = _split(lambda k: grad(k) < -noise, first, hi)[1]  # the first key with g >= -noise
    right = _split(lambda k: grad(k) <= noise, lo, last)[0]  # the last key with g <= noise
    wide = flat & (right > left + 1).squeeze(-1)  # (not right - left: keys of opposite signs overflow)
    mid = (0.5 * _values(left) + 0.5 * _values(right)).squeeze(-1)
    return torch.where(wide, mid, y), noisy | wide


def _split(below, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Adjacent keys ``(lo, hi)`` with ``below(lo)`` and not ``below(hi)``, for a predicate that is
    true then false along the keys (given ``below(lo)``, not ``below(hi)`` at the start): 64 halvings."""
    for _ in range(64):
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # (no overflow: the keys span up to 2^64)
        b = below(mid)
        lo, hi = torch.where(b, mid, lo), torch.where(b, hi, mid)
    return lo, hi

