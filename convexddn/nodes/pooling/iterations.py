"""The iterations of the robust-pooling solvers and their stopping rule: the machinery
(blocks, sweeps, compaction, the gradient's noise model) and the convex penalties'
bracketed Newton, :func:`newton_rows`; the nonconvex ones' iteration is :mod:`.descent`.

Each iteration walks the rows still running in blocks (:mod:`.kernels`) to form the row
sums of the penalty's derivatives at the current points, then updates all of them at
once (the per-row bookkeeping is a few dozen tiny ops per iteration for every row, not
per block). Blocks whose rows all stopped are skipped; once at most half of the rows
run, they are gathered into a smaller problem (a large one block by block, see
:class:`Rows`). The first pass over a block also takes
its rows' minima and maxima (each row's bracket of its minimisers, and the NaN/Inf
check) and, unless given, their starts -- while the block is in cache.

Notation per row: ``g = sum_i phi'(u - x_i)`` (the objective's derivative), ``h =
sum_i phi''`` (its curvature), ``d1`` the terms of ``g``. Rounding makes the computed
``g`` uncertain by up to ``noise = eps (2.5 sqrt(n) ||d1||_2 + 4 h |u|)`` (:func:`gradient_noise`:
the sum's rounding, bounded by ``eps sum_i |d1_i| <= eps sqrt(n) ||d1||_2``; ``h |u|``
is the change of ``g`` over one ulp of ``u``). A gradient at or below its noise has no reliable sign: the iteration
stops there, and the row is *unresolved* when ``noise / h`` -- how far from the
minimiser such a gradient can be -- exceeds the tolerance, or the span over which ``h``
is known to hold (half of alpha near a data point: a curvature dominated by one point's
``phi''`` collapses a few alphas away; see ``_LOCAL_SPAN``).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..._step_graphs import StepGraphs, capture_wanted
from .chunks import block_sums
from .kernels import Scratch, block_ranges, col_ranges, far_rows
from .penalties import SPREAD_DIVISOR, Penalty
from .rounding import _LOCAL_SPAN, _NOISE, _SUM_NOISE
from .rows import Result, Rows

# Rounding of u itself, in eps·|u|, that the stop always allows (see stop_tolerance).
_OFFSET_ROUNDING = 64.0
# The predicted error (see _predicted_error) is trusted only after a step of at most
# _MODEL_SPAN * alpha (each term's third derivative varies on the scale alpha): after a
# step of 3.5 alpha a pseudo-Huber row's estimate of g'' was 1.4 where it was 30, after
# 0.32 alpha one a third of it. Fuzz (rows of 9 to 4096, five distributions, alpha 0.1
# to 10, float32 and float64): rows beyond 1.2 tol in 1 of 240 cases with alpha, none
# with alpha / 4, for 1-2 % more entries read.
_MODEL_SPAN = 0.25


# Keep every row in the loop where no graphs are captured too (the tests set it to run the
# captured path's logic on the CPU).
_WHOLE_ROWS = False


def step_graphs(rows: Rows, use_compile: bool, site: str) -> StepGraphs:
    """The iteration's graphs (:mod:`convexddn._step_graphs`): on CUDA, the sweep and the
    bookkeeping of an iteration are captured once and replayed, and the loop keeps every
    row (no compaction: a graph's shapes are fixed). Not for a lazy selection of rows
    (its gather buffer is allocated on first use) nor with ``compile``."""
    return StepGraphs(capture_wanted(rows.x) and rows.index is None and not use_compile, site)


def offset_rows(lo: Tensor, hi: Tensor) -> bool:
    """Whether some row's data lie on one side of the origin (one host sync): only there
    can |u| exceed the spread, and :func:`stop_tolerance` differ from ``tol (alpha + |u|)``."""
    return bool(((lo > 0) | (hi < 0)).any())


def gradient_noise(norm: Tensor, h: Tensor, au: Tensor, n: int, eps: float) -> Tensor:
    """The rounding noise of a row's gradient sum (R, 1): ``eps (2.5 sqrt(n) norm + 4 h |u|)``
    from a bound ``norm`` on the L2 norm of its ``n`` terms (a fresh tensor; see the module
    docstring and ``_SUM_NOISE``)."""
    # (eps taken into each factor first: h |u| alone may exceed the range, h up to n, |u| up to max / 16)
    return torch.addcmul(norm * (_SUM_NOISE * math.sqrt(n) * eps), h * (_NOISE * eps), au)


def stop_tolerance(tol_a: Tensor, tol: float, au: Tensor, spread: Tensor, eps: float, offset: bool) -> Tensor:
    """How close to its minimiser a row stops (R, 1): ``tol * alpha + max(tol * min(|u|,
    spread), min(tol, 64 eps) * |u|)`` (``tol_a = tol * alpha``; ``spread`` the row's
    max − min; ``offset``: :func:`offset_rows`, else ``tol * (alpha + |u|)`` directly).

    That is ``tol * (alpha + |u|)`` where the data straddle the origin. Where a common
    offset c puts |u| far above the spread, the offset (which moves the minimiser by
    exactly c) counts only by its rounding: ``tol * |u|`` let float64 rows at c = 1e6
    stop 7e-7 off (pseudo-Huber; Welsch 2e-7), where their rounding is 2e-10. (float32's
    default, 1e-6, is already within 8 eps: unchanged.)"""
    if not offset:
        return torch.add(tol_a, au, alpha=tol)
    near = torch.minimum(au, spread).mul_(tol)
    return torch.maximum(near, au * min(tol, _OFFSET_ROUNDING * eps)).add_(tol_a)


def _predicted_error(g: Tensor, h: Tensor, g_prev: Tensor, h_prev: Tensor, du: Tensor, adu: Tensor,
                     astep: Tensor) -> Tensor:
    """The error left after the Newton step ``astep = |g / h|`` (inf where the local model
    has no root), from Kantorovich's bound: with ``|g''| <= L`` around ``u`` and
    ``theta = L astep / h <= 1/2``, a root lies within ``astep (1 - s) / theta`` of ``u``
    (``s = sqrt(1 - 2 theta)``), and the Newton point within
    ``astep (1 - s) / (1 + s) = 2 theta astep / (1 + s)^2`` of it (``L astep^2 / 2h`` for a
    small theta: quadratic convergence). Where ``theta > 1/2`` the curvature may vanish
    before the root (Welsch, tol 1e-2: ``h`` 0.45 at ``u``, 0.08 one step on, -0.5 beyond;
    ``theta`` 0.89, the root 0.58 away where ``L astep^2 / 2h`` claimed 0.026): no bound.

    ``L`` is the larger of two estimates of ``|g''|`` from the last two points: the secant
    of ``h`` over ``du = u - u_prev`` (the mean of ``g''`` along the last step) and the
    second derivative at ``u`` of the cubic through ``g`` and ``h`` at both
    (``(2 (h_prev - c) + 4 (h - c)) / du``, ``c`` the secant of ``g``). Either alone
    misses some changes of ``g''`` along a long step: with the secant, pseudo-Huber rows
    in float32 stopped 8x beyond the tolerance after a step of alpha / 2 (secant 7,
    cubic 178, true ~180); with the cubic, a Welsch row 1.3x.
    (Grouped so that no factor underflows for data near the smallest floats.)"""
    c = (g - g_prev) / du
    cubic = (h_prev - c).mul_(2).add_(h - c, alpha=4).abs_()
    theta = torch.maximum(cubic, (h - h_prev).abs_()).div_(h).mul_(astep / adu)
    pred = (1 - 2 * theta).sqrt_().add_(1).square_().reciprocal_().mul_(theta).mul_(2 * astep)
    return pred.masked_fill_(~(theta <= 0.5), math.inf)  # (theta NaN: no estimate either)


def _sweep(pen: Penalty, rows: Rows, method: str, u: Tensor, live: list[bool], ranges: list[slice],
           out: list[Tensor], use_compile: bool, scratch: Scratch, clamp: list[bool],
           first: tuple | None = None) -> Tensor | None:
    """One pass: the row sums of ``method`` at ``u`` (``(R, 1)`` or ``(R, k, 1)``) for
    the rows of the live blocks, written into ``out``; returns the measured terms' norm
    (None where the penalty bounds it).

    ``first = (ends, fill, start)`` makes it the first pass: per block, its rows' min
    and max (two ``(r, 1)`` tensors) are appended to ``ends``, and ``fill[block] =
    start(x_block)`` unless ``start`` is None. ``clamp[b]``: clamp block b's residuals at
    the saturation.
    """
    k = u.shape[1] if u.dim() == 3 else None
    norm = None
    cols = col_ranges(rows.x.shape[1], rows.like, use_compile, k or 1)  # (long rows: in chunks, see .chunks)
    for b, sl in enumerate(ranges):
        if not live[b]:
            continue
        al = rows.alpha_arg(sl, 2 if k is None else 3)
        res, nb = block_sums(pen, method, rows, sl, u[sl], al, scratch, clamp[b], use_compile, cols, first)
        for o, t in zip(out, res):
            o[sl] = t
        if nb is not None:
            if norm is None:
                norm = torch.zeros_like(out[0])
            norm[sl] = nb
    return norm


def _live(row_active: Tensor, ranges: list[slice]) -> tuple[int, list[bool]]:
    """``(rows still active, whether each block has one)`` from ``(R,)`` flags: one host
    read for both (the loop's only one per iteration; each is a sync on CUDA)."""
    R = row_active.shape[0]
    size = ranges[0].stop - ranges[0].start
    pad = len(ranges) * size - R
    flat = torch.cat([row_active, row_active.new_zeros(pad)]) if pad else row_active
    counts = flat.view(len(ranges), size).sum(-1).tolist()
    return sum(counts), [c > 0 for c in counts]


def _first(pen: Penalty, rows: Rows, method: str, u: Tensor, ranges: list[slice], out: list[Tensor],
           use_compile: bool, scratch: Scratch, fill: Tensor | None, start: Callable | None):
    """The first pass: sums at the starts, each row's min and max (one host sync for
    the NaN/Inf check and the clamp decisions), and -- for the blocks with a row whose
    spread over alpha could overflow a square -- the sums again with residuals clamped
    at the penalty's saturation. Returns ``(norm, clamp flags, lo, hi)`` with the rows'
    brackets ``(R, 1)`` (every minimiser of a row lies between its min and max), or None
    when some entry is NaN or Inf.

    The brackets are each row's own: a block's min and max, shared by its rows, let one
    far row (entries at 1e300) widen its neighbours' brackets, whose bisection steps
    then went out to 5e299 and never came back within ``max_iter`` (a Huber row of
    randn * 1000 returned 1.6e270 beside it, -101.3 alone)."""
    ends: list = []
    clamp = [rows.clamp] * len(ranges)
    norm = _sweep(pen, rows, method, u, [True] * len(ranges), ranges, out, use_compile, scratch, clamp,
                  (ends, fill, start))
    lo = torch.cat([e[0] for e in ends]) if len(ends) > 1 else ends[0][0]
    hi = torch.cat([e[1] for e in ends]) if len(ends) > 1 else ends[0][1]
    finite = torch.isfinite(lo).all() & torch.isfinite(hi).all()
    decide = pen.saturation is not None and not rows.clamp
    if not decide:
        if not bool(finite):
            return None
        return norm, clamp, lo, hi
    # Each block's widest row, in float64 (a float32 spread of finite data may overflow),
    # read with the finite check.
    spread = hi.double() - lo.double()
    vals = torch.cat([finite.double().reshape(1)] + [spread[sl].amax().reshape(1) for sl in ranges]).tolist()
    if not vals[0]:
        return None
    lim = math.sqrt(torch.finfo(rows.like.dtype).max) / SPREAD_DIVISOR
    for b, sl in enumerate(ranges):
        al = rows.alpha_arg(sl, 2)
        a_min = al if isinstance(al, float) else float(al.min())
        clamp[b] = vals[1 + b] > a_min * lim
    if any(clamp):
        redo = _sweep(pen, rows, method, u, clamp, ranges, out, use_compile, scratch, clamp)
        if redo is not None:
            norm = redo if norm is None else torch.where(
                torch.tensor(clamp, device=lo.device).repeat_interleave(_sizes(ranges, lo.device)).reshape(
                    -1, *([1] * (norm.dim() - 1))), redo, norm)
    return norm, clamp, lo, hi


def _compact(rows: Rows, keep: Tensor, idx: Tensor | None, clamp: list[bool], ranges: list[slice],
             use_compile: bool, alpha: Tensor, state: tuple[Tensor, ...]):
    """Gather the rows ``keep`` (still running) into a smaller problem: ``(rows, their
    indices among the original rows, blocks, per-block clamp flags, live flags, alpha,
    the penalty's alpha argument, the per-row state tensors)``, alpha and the state
    (rows first) taken at ``keep``. A kept row whose block clamped its residuals keeps
    clamping them."""
    x = rows.like
    blk_clamp = torch.tensor(clamp, device=x.device).repeat_interleave(_sizes(ranges, x.device))
    idx = keep if idx is None else idx.index_select(0, keep)
    rows = rows.select(keep)
    rows.clamp = rows.clamp or bool(blk_clamp.index_select(0, keep).any())
    ranges = block_ranges(keep.numel(), x.shape[1], x, use_compile)
    alpha = alpha if alpha.dim() == 0 else alpha.index_select(0, keep)
    return (rows, idx, ranges, [rows.clamp] * len(ranges), [True] * len(ranges), alpha,
            alpha if rows.alpha_f is None else rows.alpha_f, tuple(t.index_select(0, keep) for t in state))


def _sizes(ranges: list[slice], device) -> Tensor:
    return torch.tensor([sl.stop - sl.start for sl in ranges], device=device)


def newton_rows(pen: Penalty, rows: Rows, u: Tensor | None, start: Callable | None, tol: float,
                max_iter: int, use_compile: bool) -> Result | None:
    """Bracketed Newton on ``g(u) = 0`` for a convex penalty, every row of ``rows.x``.

    The bracket ``[lo, hi]`` starts at the row's min and max (which contain its
    minimisers) and shrinks to the points where ``g`` had a reliable sign. The
    Newton point is taken when it falls inside and the step is at most half the one
    before the last (so that the bracket at least halves every two steps, as in
    Numerical Recipes' ``rtsafe``); otherwise the bracket is bisected. A row stops when
    its Newton step ``|g| / h`` (with ``|g|`` above the noise, and within the span where
    ``h`` holds) or its bracket is within
    ``tol * (alpha + |u|)``, taking that last Newton point when it lies inside the
    bracket; a smooth penalty's row also stops once the error predicted after its
    Newton step (``|g''| / 2h`` times the step squared, ``g''`` by the secant of ``h``)
    is. A piecewise-linear ``g`` (Huber) never stops on its step: its row stops where
    ``|g|`` is within the noise (below alpha, else the row is unresolved) or on its
    bracket.

    ``u`` (R,) are the starts, or None: ``start(x_block)`` ``(r, 1)`` in the first pass.
    Returns None when some entry of x is NaN or Inf.
    """
    x = rows.like  # (the solve's dtype: x's, or float64 for float32 rows solved again)
    R, n = rows.count, x.shape[1]
    eps = torch.finfo(x.dtype).eps
    ranges = block_ranges(R, n, x, use_compile)
    scratch = Scratch.make(3, (ranges[0].stop - ranges[0].start) * col_ranges(n, x, use_compile)[0].stop, x)
    u = x.new_empty(R, 1) if u is None else u.reshape(R, 1).clone()
    fill = u if start is not None else None
    G, H = x.new_empty(R, 1), x.new_empty(R, 1)
    first = _first(pen, rows, "newton_sums", u, ranges, [G, H], use_compile, scratch, fill, start)
    if first is None:
        return None
    norm, clamp, lo, hi = first
    far = far_rows(lo, hi)  # (stopped at once as special: solved again scaled, see .solvers._solve)
    live = [True] * len(ranges)
    out = Result(u.squeeze(-1).clone(), None, torch.zeros(R, dtype=torch.bool, device=x.device),
                 torch.zeros(R, dtype=torch.bool, device=x.device), torch.zeros(R, dtype=torch.bool, device=x.device))
    idx = None  # rows of the (compacted) problem, as indices of the original rows
    a = rows.alpha if rows.alpha.dim() == 0 else rows.alpha.reshape(-1, 1)
    af = a if rows.alpha_f is None else rows.alpha_f
    tol_a, span = tol * a, _LOCAL_SPAN * a
    # Where every tolerance tol (alpha + |u|) is within the span (|u| is bounded by the
    # rows' min and max), the span tests are implied by the tolerance tests: skipped (one
    # host sync; they cost 5 % of a pseudo-Huber solve at (4, 256, 1024)).
    check_span = bool((torch.maximum(lo.abs(), hi.abs()).mul_(tol).add_(tol_a) > span).any())
    spread = hi - lo
    offset = offset_rows(lo, hi)
    dx1 = dx2 = spread
    g_prev = h_prev = u_prev = None
    active = ~far
    # The flags of the (compacted) problem's rows, written into ``out`` with the points
    # (which stay put once a row stops) only when the problem is compacted or ends.
    unres, conv_f = (torch.zeros(R, 1, dtype=torch.bool, device=x.device) for _ in range(2))
    spec = far.clone()
    graphs = step_graphs(rows, use_compile, "robust pooling, Newton")
    whole = graphs.capture or _WHOLE_ROWS
    def update(u, lo, hi, dx1, dx2, g_prev, h_prev, u_prev, active, unres, conv_f, spec, g, h, norm):
        """One iteration's bookkeeping from the sums ``g, h`` at ``u``: the next state."""
        bad = ~(torch.isfinite(g) & torch.isfinite(h))  # finite data, overflowing sums
        au = u.abs()
        noise = gradient_noise(pen.dphi_norm(h, None, n, af, spread) if norm is None else norm, h, au, n, eps)
        tol_s = stop_tolerance(tol_a, tol, au, spread, eps, offset)
        step = g / h
        astep = step.abs()
        reliable = g.abs() > noise
        # (A piecewise-linear g: no stop on the step, see Penalty.piecewise_linear; a
        # Huber row started at a data point with alpha 1e-12 stopped 1 away from its
        # minimiser on a step of 3 alpha, the slope of one inlier.)
        conv = torch.zeros_like(reliable) if pen.piecewise_linear else reliable & (astep <= tol_s)
        if check_span:
            trust = pen.newton_span(h, af)
            trust = span if trust is None else trust
            conv &= astep <= trust
        conv |= hi - lo <= tol_s
        lo0, hi0 = lo, hi
        lo = torch.where(reliable & (g < 0), u, lo)
        hi = torch.where(reliable & (g > 0), u, hi)
        newton = u - step
        inside = (newton > lo) & (newton < hi) & reliable
        if pen.smooth and h_prev is not None:
            # Quadratic convergence: the next error is about (|g''| / 2h) step^2.
            # The step itself is uncertain by noise / h.
            du = u - u_prev
            adu = du.abs()
            pred = _predicted_error(g, h, g_prev, h_prev, du, adu, astep)
            near = adu <= _MODEL_SPAN * a
            conv |= inside & near & (astep <= 0.5 * dx1) & (pred.addcdiv_(noise, h) <= tol_s)
        stop = conv | ~reliable | bad
        take = inside & (astep <= 0.5 * dx2)
        # (a stop keeps u, within the bracket it had: one of zero width ends on it even
        # from a start outside it)
        nxt = torch.where(stop, torch.where(inside, newton, torch.clamp(u, lo0, hi0)),
                          torch.where(take, newton, torch.lerp(lo, hi, 0.5)))
        nxt = torch.where(active, nxt, u)
        done = stop & active
        both = done & bad
        spec = spec | both
        conv_f = conv_f | (done ^ both)  # done & ~bad
        # Flat: the noise floor itself is wider than the tolerance, or wider than the
        # span where h bounds the distance to the root (a zero curvature is a flat
        # minimum, not a flaw, unless the penalty is strictly convex). A row that stops
        # neither converged nor overflowing stopped on an unreliable gradient.
        flag = noise > tol_s * h
        if check_span:
            flag |= noise > trust * h
        if not pen.strict:
            flag &= h > 0
        if pen.piecewise_linear:
            # On a flat piece g is a nonzero multiple of alpha unless the piece is the
            # minimum (Huber: alpha (#below - #above)): a noise of alpha or more cannot
            # tell the two apart, whatever h (a float32 row of 256 ones and 257 twos, alpha
            # 1e-6, stopped at 1 + 8 ulp where g was within a noise of 1.2e-4; its
            # minimiser is at 2 - 1e-6).
            flag |= noise >= a
        unres = unres | (flag & done & ~(conv | bad))
        active = active & ~done
        # (the rows still running at max_iter return their last iterate)
        return nxt, lo, hi, (nxt - u).abs_(), dx1, g.clone(), h.clone(), u, active, unres, conv_f, spec

    def body(*state):  # a sweep of every row and the update (captured on CUDA)
        G, H = x.new_empty(R, 1), x.new_empty(R, 1)
        norm = _sweep(pen, rows, "newton_sums", state[0], live, ranges, [G, H], use_compile, scratch, clamp)
        state = update(*state, G, H, norm)
        return (*state, state[8].sum())

    state = (u, lo, hi, dx1, dx2, g_prev, h_prev, u_prev, active, unres, conv_f, spec)
    for it in range(max_iter):
        if it == 0 or not whole:
            if it > 0:
                norm = _sweep(pen, rows, "newton_sums", state[0], live, ranges, [G, H], use_compile, scratch, clamp)
            state = update(*state, G, H, norm)
            n_active, live = _live(state[8].squeeze(-1), ranges)
        else:
            state, (count,) = graphs.run(None, body, state)
            n_active = int(count)  # (the one host read per iteration)
        if n_active == 0 or it == max_iter - 1:
            break
        if not whole and 2 * n_active <= state[8].shape[0]:
            # Gather the rows still running into a smaller problem (spread rides along).
            _store((out.u, out.unresolved, out.converged, out.special), idx, (state[0], *state[9:]))
            keep = state[8].squeeze(-1).nonzero().squeeze(-1)
            rows, idx, ranges, clamp, live, a, af, (*state, spread) = _compact(
                rows, keep, idx, clamp, ranges, use_compile, a, (*state, spread))
            state = tuple(state)
            tol_a, span = tol * a, _LOCAL_SPAN * a
            G, H = x.new_empty(n_active, 1), x.new_empty(n_active, 1)
    _store((out.u, out.unresolved, out.converged, out.special), idx, (state[0], *state[9:]))  # u and the flags
    scratch.release()
    return out


def _store(dsts, idx: Tensor | None, srcs) -> None:
    """Write the (compacted) problem's rows ``srcs`` into the outputs ``dsts`` at ``idx``
    (all rows when None), dropping a trailing size-1 dimension the outputs lack."""
    at = slice(None) if idx is None else idx
    for dst, src in zip(dsts, srcs):
        dst[at] = src.reshape(src.shape[0], *dst.shape[1:])
