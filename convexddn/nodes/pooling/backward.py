"""The closed-form backward of robust pooling (Gould et al. Table 1) by row blocks:
:func:`pool_backward`, with its careful float64 path for rare rows (weights that
underflow or overflow, entries near the end of the float range) and the refinement of
rows whose y is coarse against alpha (:mod:`.rounding`).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .chunks import chunked_weights
from .kernels import PART, Scratch, block_ranges, clamp_saturated, col_ranges, row_scale, sub_into
from .penalties import SPREAD_DIVISOR, Penalty
from .rounding import _NOISE, _SUM_NOISE, any_coarse, coarse_rows, refine_residuals

__all__ = ["pool_backward"]

# Rows whose Hessian sum is below this share of its terms' absolute sum (weights of both
# signs that cancel) are checked against y's own uncertainty (:func:`_unresolved`). With
# more of it left, h cannot move by half over that uncertainty: each weight varies on the
# scale alpha (by about its size over alpha per unit of y), and y is known to float64's
# noise, or to its grid, at most 2^-13 alpha (:data:`.rounding._GRADIENT_GRID`; coarser
# rows are refined). Welsch's degenerate minima sit at 4e-11 of it (its size bounds
# sum (1 + r^2) e), at 4e-6 for a user's Welsch whose size is sum |w|.
_CANCELLED = 2.0 ** -8


def pool_backward(penalty: Penalty, x: Tensor, y: Tensor, a: Tensor, gy: Tensor, need_x: bool,
                  need_alpha: bool, use_compile: bool, far: bool | None = None, rem: Tensor | None = None) -> tuple:
    """The vjp of Table 1 by row blocks: ``grad_x_i = gy * w_i / sum_j w_j`` and
    ``grad_alpha = -gy * sum_j wa_j / sum_j w_j``, ``w = phi''(y - x)``, ``wa =
    d2phi/dz dalpha``. Each block is read once and its gradient written once into the
    output. Returns ``(grad_x (R, N), grad_alpha (R,), ok (R,), ok.all() as a bool,
    the rows whose alpha gradient was lost, those that stayed coarse)``, the last two
    ``(R,)`` masks or None where there are none (for the warnings that name them); rows whose Hessian
    sum is zero, singular or negative, or a cancellation that y's own uncertainty moves by half
    (:func:`_unresolved`: a degenerate minimum), get a zero gradient and ``ok = False``. Rows whose
    y is coarse against alpha (:func:`.rounding.coarse_rows`: data far from 0 in units of
    alpha) take their weights at the residuals to the minimiser, in their block (in
    float64 where the careful path takes them): ``y - x_i + rem`` where the solver gave
    y's remainder ``rem (R,)`` (:meth:`.Penalty.solve_split`: the minimiser it returned,
    exactly), else refined from y (:func:`.rounding.refine_residuals`); those where that
    fails are flagged (weights where the steps stopped). A NaN or Inf
    in ``gy`` (a fault upstream) is no verdict on the Hessian: it propagates to that row's
    gradients (and a shared alpha's), as torch does.

    ``x`` and ``a`` (0-d or ``(R, 1)``), ``y`` and ``gy`` ``(R,)``; ``far``: whether some
    row is coarse, if known (:func:`.rounding.any_coarse`, else read here)."""
    rows, n = x.shape
    gx = torch.empty_like(x) if need_x else None
    finfo = torch.finfo(x.dtype)
    alpha_f = float(a) if a.dim() == 0 else None
    # (a tensor alpha's least and largest in one host read)
    a_lo, a_hi = (alpha_f, alpha_f) if alpha_f is not None else torch.stack(torch.aminmax(a)).tolist()
    # Squares of residuals over alpha beyond this overflow (only alpha's gradient of a
    # saturating penalty cares: its weights there are 0 either way).
    wide = math.sqrt(finfo.max) / SPREAD_DIVISOR * (alpha_f if alpha_f else a_lo)
    ranges = block_ranges(rows, n, x, use_compile)
    # (z and two work buffers; alpha's weights take four more: see builtin._signed_cube_sums)
    cols = col_ranges(n, x, use_compile)  # (one chunk, all of a row, unless the row is longer than a block)
    scratch = Scratch.make(6 if need_alpha else 3, (ranges[0].stop - ranges[0].start) * cols[0].stop, x)
    # Per row: the weights' sum and absolute sum, the scale gy / sum, alpha's weights' sum.
    # The two are kept in float64: the weights' sum adds partial sums of PART terms in
    # float64 (:func:`_row_sum`), so its rounding is at most PART eps of x's dtype plus
    # n eps64 of the absolute sum, where a float32 sum's worst case n eps32 reached 1 at
    # n = 2^23 and made every long row look singular (:func:`_nonsingular`).
    sw, size = x.new_empty(rows, 1, dtype=torch.float64), x.new_empty(rows, 1, dtype=torch.float64)
    scale = x.new_empty(rows, 1)
    # Rows with a residual y - x_i beyond the float range (data spread over more than it):
    # their weights there came out 0 from an infinite residual, for points a few alphas
    # away (Welsch at alpha = max/2: a gradient of 0 for the true -0.196, silently). Only
    # an alpha within 1e12 of the range's end gives such a point a weight that counts
    # (a penalty whose weight falls like (alpha/z)^2 or faster: 1e-24 of a point near y),
    # so only then is each row's residual sum formed to find them (+3-7 % of the backward).
    zsum = x.new_empty(rows, 1) if a_hi * 1e12 >= finfo.max else None
    swa = x.new_zeros(rows, 1) if need_alpha else None
    gcol = gy.reshape(rows, 1)
    # Rows whose y is coarse against alpha (the gradient's rule of .rounding): their
    # residuals are refined in their block (none of them in the common case).
    a_arg = a if alpha_f is None else alpha_f
    far = bool(any_coarse(y, a_arg, finfo.eps)) if far is None else far
    coarse = coarse_rows(y, a_arg, finfo.eps) if far else None
    lost = None if coarse is None else torch.zeros_like(coarse)
    for sl in ranges:
        r = sl.stop - sl.start
        if r == 0:
            continue
        j = None if coarse is None else coarse[sl].nonzero().squeeze(-1)
        if len(cols) > 1 and (j is None or not j.numel() or rem is not None):
            # A long row, in column chunks (.chunks): its weights go into the gradient's
            # buffer, scaled once their sum is known. (Rows refined from y take the whole row.)
            al = alpha_f if alpha_f is not None else a[sl]
            sw[sl], wa, wsize = chunked_weights(
                penalty, x[sl], y[sl].unsqueeze(-1), al, scratch, cols, need_alpha, gx[sl] if need_x else None,
                None if zsum is None else zsum[sl].zero_(),
                lambda z: _adjust(penalty, z, al, need_alpha, wide, j, None if rem is None else rem[sl]))
            w = None  # (the weights are in gx already)
        else:
            z, *work = scratch.get(r, n)
            sub_into(z, y[sl].unsqueeze(-1), x[sl])
            if zsum is not None:
                # (a row sum, not isinf(z).any(): no block-sized temporary, whose fresh pages
                # cost 6x the backward; a finite row whose sum overflows goes the careful way too)
                torch.sum(z, -1, keepdim=True, out=zsum[sl])
            al = alpha_f if alpha_f is not None else a[sl]
            # (with rem: the solver's own minimiser; y - x_i is exact for the points near y, within
            # a factor 2 of it, and rem, at most y's rounding, moves them by its own size)
            _adjust(penalty, z, al, need_alpha, wide, None if rem is None else j, None if rem is None else rem[sl])
            if j is not None and j.numel() and rem is None:
                a_j = al if alpha_f is not None else al[j]
                z_j = z[j]
                clamp_saturated(penalty, z_j, a_j)  # (the fused sums need finite squares)
                z_j, ok_j = refine_residuals(penalty, z_j, a_j)
                z[j], lost[sl.start + j] = z_j, ~ok_j
            w, wa, wsize = penalty.hessian_weights(z, al, work, need_alpha)
            sw[sl] = _row_sum(w)
        signed = wsize is not None
        if signed:
            size[sl] = wsize  # (an upper bound, as accurate as the penalty forms it: a scale)
        if need_alpha:
            swa[sl] = wa
        torch.div(gcol[sl], sw[sl], out=scale[sl])
        if need_x:
            if w is None:
                gx[sl].mul_(scale[sl])
            else:
                torch.mul(w, scale[sl], out=gx[sl])
    scratch.release()
    if not signed:
        size = sw
    # Rows whose weights all underflowed (every point far from y) or overflowed (entries
    # near the float range's end), or whose gy / sum_j w_j overflowed although gy is finite
    # (weights near underflow: float32 pseudo-Huber points 1e10 alpha from y weigh 1e-30),
    # get the careful, rescaled weights in float64. A Hessian sum at or below its own
    # rounding noise is singular (or negative: not a minimum), where the exact gradient does
    # not exist and the row gets zero: a test of the Hessian alone, never of gy (a NaN or
    # Inf there is a fault upstream, which propagates as torch propagates it). All are
    # rare, as is a non-finite alpha weight sum: one host sync tells that none occurs.
    low = (size < finfo.tiny / finfo.eps) | ~torch.isfinite(size) | (~torch.isfinite(scale) & torch.isfinite(gcol))
    low = (low if zsum is None else low | ~torch.isfinite(zsum)).squeeze(-1)
    ok = _nonsingular(sw, size, n, min(n, PART) * finfo.eps if x.dtype != torch.float64 else finfo.eps)
    flat = _cancelled(sw, size, ok)
    flags = [(low | ~ok).any(), flat.any()] + ([~torch.isfinite(swa).all()] if need_alpha else [])
    rare, some_flat, *alpha_rare = torch.stack(flags).tolist()
    if rare:
        if bool(low.any()):
            idx = low.nonzero().squeeze(-1)
            w_r, sw_r, wa_r, size_r, lost_r = _careful_weights64(penalty, x, y, a, idx, need_alpha,
                                                                 None if coarse is None else coarse[idx], rem)
            if lost_r is not None:
                lost[idx] = lost_r
            # (float64 throughout: the gradient is the ratio w_i / sum_j w_j times gy, and
            # the test is taken before a cast that could flush a tiny sum to zero)
            g_r = gcol[idx].to(sw_r.dtype) / sw_r
            sw[idx], size[idx], scale[idx] = sw_r, size_r, g_r.to(x.dtype)
            if need_alpha:
                swa[idx] = wa_r.to(x.dtype)
            if need_x:
                gx[idx] = (w_r * g_r).to(x.dtype)
            ok = ok.index_copy(0, idx, _nonsingular(sw_r, size_r, n, torch.finfo(sw_r.dtype).eps))
            flat = _cancelled(sw, size, ok)
            some_flat = bool(flat.any())
    if some_flat:
        # Rows whose curvature sum is a cancellation of weights of both signs: it must stay
        # resolved over y's own uncertainty, else the row takes the singular path below.
        idx = flat.nonzero().squeeze(-1)
        ok = ok.index_copy(0, idx, ~_unresolved(penalty, x, y, a, idx, None if coarse is None else coarse[idx], rem))
    all_ok = not (rare or some_flat) or bool(ok.all())
    if not all_ok:
        bad = (~ok).nonzero().squeeze(-1)
        if need_x:
            gx.index_fill_(0, bad, 0.0)
        scale = torch.where(ok.unsqueeze(-1), scale, torch.zeros_like(scale))
    ga, alpha_lost = None, None
    if need_alpha:
        # Rows set to zero above stay zero (their swa may be NaN, and NaN * 0 is NaN).
        ga = torch.where(ok, (-(swa * scale)).squeeze(-1), 0.0)
        if alpha_rare[0] or rare:  # (the careful weights above may have overflowed too)
            ga, alpha_lost = _finite_alpha_grad(penalty, x, y, a, gcol, ga, coarse, rem)
    # (one host read where some row was coarse, as the count it replaced took)
    return gx, ga, ok, all_ok, alpha_lost, lost if lost is not None and bool(lost.any()) else None


def _adjust(penalty: Penalty, z: Tensor, al, need_alpha: bool, wide: float, j: Tensor | None,
            rem: Tensor | None) -> None:
    """A chunk's residuals ``z`` as :func:`pool_backward` takes a block's: clamped where alpha's
    gradient needs finite squares, and the coarse rows ``j`` moved by y's remainder ``rem``."""
    if need_alpha and penalty.saturation is not None and max(float(z.amax()), -float(z.amin())) > wide:
        clamp_saturated(penalty, z, al)
    if j is not None and j.numel():
        z[j] = z[j] + rem[j].unsqueeze(-1)


def _careful_weights64(penalty: Penalty, x: Tensor, y: Tensor, a: Tensor, idx: Tensor, need_alpha: bool,
                       coarse: Tensor | None, rem: Tensor | None):
    """:func:`_careful_weights` of the rows ``idx`` in float64 (rare rows): a user's penalty
    without a saturation overflows on a far outlier in float32 ((z / alpha)^2 at 1e20)
    whatever the row's scale; ``coarse`` (of those rows) have their residuals taken to the
    minimiser (by y's remainder ``rem``, of all rows, where known)."""
    x_r, y_r, a_r, rem_r = _rows64(x, y, a, idx, rem)
    return _careful_weights(penalty, x_r, y_r, a_r, need_alpha, coarse, rem_r)


def _rows64(x: Tensor, y: Tensor, a: Tensor, idx: Tensor, rem: Tensor | None) -> tuple:
    """The rows ``idx`` of ``x``, ``y``, ``a`` (per row, or 0-d) and y's remainder ``rem``
    (or None) in float64."""
    f64 = torch.float64
    return (x[idx].to(f64), y[idx].to(f64), (a if a.dim() == 0 else a[idx]).to(f64),
            None if rem is None else rem[idx].to(f64))


def _finite_alpha_grad(penalty, x: Tensor, y: Tensor, a: Tensor, gcol: Tensor, ga: Tensor,
                       coarse: Tensor | None, rem: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``ga`` with its non-finite entries formed again in float64 by the careful,
    rescaled weights (a penalty's ``d2phi_dalpha`` overflowing in a low precision: a
    user's formula at ``z / alpha ~ 1e15`` in float32); entries still not finite are
    set to zero. Entries whose incoming gradient is not finite are left as they are (a
    fault upstream, propagated). Returns the gradient and the rows set to zero, an ``(R,)``
    mask or None where there are none (rare: its host syncs run only where the caller's
    one read saw something amiss)."""
    bad = ~torch.isfinite(ga) & torch.isfinite(gcol).squeeze(-1)
    if not bool(bad.any()):
        return ga, None
    idx = bad.nonzero().squeeze(-1)
    _, sw, wa, _, _ = _careful_weights64(penalty, x, y, a, idx, True, None if coarse is None else coarse[idx], rem)
    again = (-(gcol[idx].to(sw.dtype) * wa / sw)).squeeze(-1).to(ga.dtype)
    lost = ~torch.isfinite(again)
    ga = ga.index_copy(0, idx, torch.where(lost, 0.0, again))
    return ga, bad.index_copy(0, idx, lost) if bool(lost.any()) else None


def _row_sum(w: Tensor) -> Tensor:
    """``(R, 1)`` float64 row sums of ``w (R, n)``: partial sums of :data:`PART` terms in
    w's dtype, added in float64. (As fast as a float32 sum; ``sum(dtype=float64)`` on
    float32 took 14x its time on CPU, +50 % on the backward.)"""
    if w.dtype == torch.float64:
        return w.sum(-1, keepdim=True)
    rows, n = w.shape
    m = n - n % PART
    total = w[:, :m].view(rows, m // PART, PART).sum(-1).sum(-1, keepdim=True, dtype=torch.float64)
    return total + w[:, m:].sum(-1, keepdim=True, dtype=torch.float64) if m < n else total


def _nonsingular(sw: Tensor, size: Tensor, n: int, term_eps: float) -> Tensor:
    """(R,) rows whose Hessian sum ``sw`` is above the rounding noise of its ``n`` terms
    (``size`` bounds their absolute sum): a property of the Hessian alone, whatever the
    incoming gradient. The noise is the terms' own rounding and their partial sums',
    ``term_eps`` of ``size`` (:func:`_row_sum`: ``min(n, PART)`` eps of their dtype), plus
    the float64 sum's, at most ``n eps64`` of ``size`` (2e-9 at n = 2^23, where float32's
    ``n eps32`` reached 1 and rejected every row of weights >= 0, whose ``sw`` is ``size``)."""
    eps = torch.finfo(sw.dtype).eps
    return (sw > (term_eps + n * eps) * size).squeeze(-1)


def _cancelled(sw: Tensor, size: Tensor, ok: Tensor) -> Tensor:
    """(R,) rows still ``ok`` whose Hessian sum ``sw`` is below :data:`_CANCELLED` of the
    absolute sum ``size`` of its terms: weights of both signs that cancel (never where
    all are >= 0, whose ``size`` is ``sw`` itself), to be checked by :func:`_unresolved`."""
    return ok & (sw <= _CANCELLED * size).squeeze(-1)


def _unresolved(penalty: Penalty, x: Tensor, y: Tensor, a: Tensor, idx: Tensor, coarse: Tensor | None,
                rem: Tensor | None) -> Tensor:
    """``(r,)``: which of the rows ``idx`` have a curvature sum ``h = sum_i phi''(y - x_i)``
    that is not resolved above y's own uncertainty, in float64 on the careful residuals
    (:func:`_careful_residuals`): where ``h <= 0``, or where ``h`` at ``y -+ delta`` differs
    from ``h`` at y by more than half of it. ``delta`` is twice the solvers' noise model
    of y over ``h`` (:func:`.iterations.gradient_noise`: the rounding of the gradient sum,
    here in float64, where a float32 row the solver could not resolve is solved again, and
    the grid of y in its own dtype, none for coarse rows, whose residuals are the
    minimiser's), the distance within which the minimiser is known. A resolved curvature
    barely moves over it; at a degenerate minimiser (``h = 0`` there: two clusters of
    Welsch points 2 alpha apart) the solver stops anywhere within its noise, where ``h``
    is as small as that distance allows and no better known: its ratio w_i / h is no
    derivative (it was +-5.65e4 for x = (0, 0, 1, 1), alpha 0.5 in float64, where y
    landed 4.4e-6 off the minimiser 0.5, and exactly 0 for x = (0, 1), y = 0.5)."""
    x_r, y_r, a_r, rem_r = _rows64(x, y, a, idx, rem)
    z, a_s, s, _ = _careful_residuals(penalty, x_r, y_r, a_r, coarse, rem_r)

    def curvature(t: Tensor) -> tuple[Tensor, Tensor]:  # the solvers' h and phi' terms at residuals t
        work = [torch.empty_like(t) for _ in range(3)]
        if penalty.convex:
            _, h, d1 = penalty.newton_sums(t, a_s, work)
        else:
            _, _, h, _, d1 = penalty.descent_sums(t, a_s, work)
        return h, d1

    h, d1 = curvature(z.clone())
    n = z.shape[-1]
    grid = (_NOISE * torch.finfo(y.dtype).eps) * (y_r.unsqueeze(-1) * s).abs()
    if coarse is not None:
        grid = torch.where(coarse.unsqueeze(-1), 0.0, grid)
    noise = (_SUM_NOISE * math.sqrt(n) * torch.finfo(z.dtype).eps) * torch.linalg.vector_norm(d1, dim=-1, keepdim=True)
    return unresolved_over(lambda shift: curvature(z + shift)[0], h, noise, grid).squeeze(-1)


def unresolved_over(curvature: Callable[[Tensor], Tensor], h: Tensor, noise: Tensor, grid: Tensor) -> Tensor:
    """Where a curvature ``h`` at y is not resolved above y's own uncertainty: ``h <= 0``,
    or ``curvature(shift)``, the curvature at ``y + shift`` (``shift`` shaped like ``h``),
    differs from ``h`` by more than half of it at ``shift = -+ delta``, ``delta = 2 (noise
    / h + grid)``: twice the solvers' noise of the gradient over ``h`` plus y's grid, the
    distance within which the minimiser is known. The verdict of :func:`_unresolved` and of
    robust vector pooling's backward on its Hessian's smallest eigenvalue
    (:mod:`convexddn.nodes._vector_pool_hessian`)."""
    delta = 2 * (noise / h + grid)
    resolved = h > 0
    for side in (-delta, delta):
        resolved &= (curvature(torch.where(resolved, side, 0.0)) - h).abs() <= 0.5 * h
    return ~resolved


def _careful_residuals(penalty: Penalty, x: Tensor, y: Tensor, a: Tensor, coarse: Tensor | None,
                       rem: Tensor | None = None):
    """The residuals ``y - x`` of rows with huge entries or spread, scaled by a power of
    two per row (exact) and clamped at the penalty's saturation; the ``coarse`` rows'
    taken to the minimiser (``+ rem``, y's remainder, where given; else refined,
    :func:`.rounding.refine_residuals`). Returns ``(z, alpha scaled, the scale (r, 1),
    coarse rows where the refinement failed or None)``."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s = row_scale(torch.minimum(lo, y.unsqueeze(-1)), torch.maximum(hi, y.unsqueeze(-1)))
    a_s = a * s
    # Scaled before the subtraction: y - x overflows where both lie near the range's ends.
    z = y.unsqueeze(-1) * s - x * s
    clamp_saturated(penalty, z, a_s)
    lost = None if coarse is None else torch.zeros_like(coarse)
    if coarse is not None and bool(coarse.any()):
        j = coarse.nonzero().squeeze(-1)
        if rem is not None:  # (as in pool_backward; scaled as z)
            z[j] = z[j] + rem[j].unsqueeze(-1) * s[j]
        else:
            z_j, ok_j = refine_residuals(penalty, z[j], a_s[j])  # (a_s: (r, 1), as s)
            z[j], lost[j] = z_j, ~ok_j
    return z, a_s, s, lost


def _careful_weights(penalty: Penalty, x: Tensor, y: Tensor, a: Tensor, need_alpha: bool,
                     coarse: Tensor | None, rem: Tensor | None = None):
    """The backward's weights of rows with huge entries or spread, at their careful
    residuals (:func:`_careful_residuals`), rescaled: both ratios of Table 1 are
    scale-free. Returns ``(w, sum w, sum w_alpha, sum |w|, coarse rows where the
    refinement failed or None)``."""
    z, a_s, _, lost = _careful_residuals(penalty, x, y, a, coarse, rem)
    w, sw, swa = penalty.weight_sums(z, a_s, need_alpha)
    return w, sw, swa, w.abs().sum(-1, keepdim=True), lost
