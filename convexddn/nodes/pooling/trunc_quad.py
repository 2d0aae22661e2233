"""The exact global minimiser of truncated-quadratic pooling.

.. math:: y = \\operatorname*{argmin}_u \\sum_i \\min\\big((u - x_i)^2, \\alpha^2\\big) / 2

Each row is sorted; the objective is piecewise quadratic with breakpoints
:math:`x_i \\pm \\alpha`, and on each piece the inliers are a contiguous run of the sorted
row whose mean is that piece's candidate. :func:`trunc_quad_runs` ranks every
candidate from prefix sums centred on the row; rows whose sums are too large for that
(a spread far beyond alpha) are ranked again by :func:`trunc_quad_cells` from sums
local to cells of 4-8 alpha; :func:`trunc_quad_solve` drives both over row blocks.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ... import _workspace as workspace
from ..._checks import check_finite
from ..._sort import sort_values
from .kernels import block_ranges, row_scale, run
from .solvers import warn_rows

__all__ = ["trunc_quad_cells", "trunc_quad_runs", "trunc_quad_solve"]

# Bytes of x per block in the exact truncated-quadratic solver on a CPU (its float64
# prefix sums are a dozen row-sized temporaries). 256 KiB, measured in one process on
# the 2-core machine, float32: (4, 256, 1024) 59-64 ms against 78-100 with 64 KiB and
# 80-88 with 1 MiB; (4, 1024, 2048) 400-450 ms against 515-590 and 370-380. The sort
# and the run starts take blocks _TQ_SORT_BLOCKS times larger: torch's sort of a few
# rows costs twice as much per row as of many (2048 entries: 86 µs per row in blocks
# of 8 rows, 44 µs in blocks of 64).
_TQ_BLOCK_BYTES = 1 << 18
_TQ_SORT_BLOCKS = 8

# Rows whose centred sums of squares exceed 2^29 alpha^2 are redone with local sums
# (trunc_quad_cells): their candidates' rounding, about 8 eps times those sums,
# would then exceed 2^-20 alpha^2 (for a row of 2048, an RMS distance from the centre
# above ~500 alpha, e.g. outlier clusters far out). trunc_quad_cells flags its own rows
# by the same bound.
_TQ_RISK = 2.0**29
# The same bound for trunc_quad_cells' own sums (a name of its own: tests lower it alone).
_CELLS_RISK = _TQ_RISK


def trunc_quad_runs(s: Tensor, lft: Tensor, a: Tensor,
                    work: RunBuffers | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exact global minimiser of sum_i min((u - x_i)^2, alpha^2) / 2 for each sorted row s.

    The objective is piecewise quadratic; on each piece between consecutive breakpoints
    x_i +- alpha the inliers form a contiguous run of the sorted row, and the global
    minimiser is the mean of its own inlier run. Every piece starts where a point
    enters (the run ends at that point i and starts at l_i = #{k : s_k < s_i - 2 alpha},
    given as ``lft``) or leaves (the run starts after i and ends at
    r_i = #{k : s_k - 2 alpha <= s_i} = #{k : l_k <= i}, counted from ``lft`` in O(N)).
    For any run W, G_W = SSE_W / 2 + alpha^2 (N - |W|) / 2 bounds the objective at the
    mean of W from above, with equality for the optimal run, so the smallest G over the
    2N candidate runs is the global minimum and its mean the global minimiser: no
    clipping into pieces needed, and rounding in the run ends can only add valid runs.

    Rounding: the float64 prefix sums are taken of offsets from the row's middle order
    statistic (uncentred they would cancel catastrophically), and each G carries the
    rounding of every entry summed before its run, about eps·Σ (s - centre)²; the
    second output flags rows where that exceeds 2^-20 alpha² (``_TQ_RISK``), which the
    caller redoes with local sums (:func:`trunc_quad_cells`). (At outlier
    clusters near ±1e8 and alpha = 1 the centred G's rounding exceeds alpha²/2: the
    cluster's mean was returned.) The winning mean carries the rounding of its prefix
    sums too; the third output estimates it (:func:`_mean_rounding`), and the caller
    sums the run again (:func:`run_mean`) where it exceeds a few ulps. The fourth output is
    the remainder of the mean beyond its rounding to s's dtype (:func:`split_mean`).

    Scale-free: the offsets are divided by a power of two near the row's half-range, no
    smaller than float64's smallest normal number (squares of entries beyond 1e154
    would overflow; a subnormal unit's inverse is Inf), and alpha^2 is kept between
    twice the smallest normal number and 2e150 in those units (below, ties between
    runs are broken by their size, as the vanishing alpha^2 term would; above, the one
    run of every point wins, as it must).

    ``work``: buffers for the row-sized float64 and int64 temporaries (:class:`RunBuffers`,
    at least as many rows); new ones where None.
    """
    rows, n = s.shape
    acc = torch.float64
    centre, unit, inv, a2 = frame(s, a)
    f64, i64 = (work if work is not None else RunBuffers(rows, n, s.device, kept=False)).views(rows)
    # Entry runs [l_k, k] hold at least point k, even where s_k - 2 alpha rounds to s_k
    # (this also widens int32 positions to int64, for gather).
    lft = torch.minimum(lft, torch.arange(n, device=s.device), out=i64(0))
    # (s − centre) / unit in one pass: unit is a power of two, so s/unit and centre/unit
    # are exact and the one rounding is that of s − centre.
    d = torch.addcmul(-centre * inv, s, inv, out=f64(0))
    # Prefix sums with a leading zero: p[:, k] is the sum of the first k entries.
    p1, p2 = f64(1, n + 1), f64(2, n + 1)
    p1[:, 0] = 0.0
    p2[:, 0] = 0.0
    torch.cumsum(d, -1, out=p1[:, 1:])
    torch.cumsum(d.mul_(d), -1, out=p2[:, 1:])
    # Every candidate's G = (SSE_W + alpha^2 (N - |W|)) / 2 is compared as
    # 2G - alpha^2 N = SSE_W - alpha^2 |W| (the same order).
    # Run sizes straight into float64 (int64 minus float64: one pass, exact).
    idx = torch.arange(1, n + 1, dtype=acc, device=s.device)
    n_e = torch.sub(idx, lft, out=f64(3))
    s1_e = torch.gather(p1, -1, lft, out=f64(4))
    s1_e = torch.sub(p1[:, 1:], s1_e, out=s1_e)
    g_e = torch.gather(p2, -1, lft, out=f64(5))
    g_e = torch.sub(p2[:, 1:], g_e, out=g_e).addcdiv_(torch.mul(s1_e, s1_e, out=f64(0)), n_e, value=-1)
    g_e.addcmul_(a2, n_e, value=-1)
    best_e, i_e = g_e.min(-1, keepdim=True)
    # Exit runs [i + 1, r_i), possibly empty (r_i >= i + 1: every l_k <= k). An empty
    # one's sums are exact zeros, and divided by a size of 1 its 2G - alpha^2 N is 0,
    # above the entry run [0, 0]'s -alpha^2 (l_0 = 0; d_0^2 - d_0^2 / 1 is exactly 0):
    # it never wins, without a mask over the candidates (a masked_fill took 16 % of
    # this function's time).
    rgt = _run_ends(lft, n, i64(2, n + 1), i64(1))
    n_x = torch.sub(rgt, idx, out=f64(6))
    size_x = torch.clamp(n_x, min=1, out=f64(7))
    s1_x = torch.gather(p1, -1, rgt, out=f64(0)).sub_(p1[:, 1:])
    g_x = torch.gather(p2, -1, rgt, out=f64(8)).sub_(p2[:, 1:])
    g_x.addcdiv_(torch.mul(s1_x, s1_x, out=f64(5)), size_x, value=-1)
    g_x.addcmul_(a2, n_x, value=-1)
    best_x, i_x = g_x.min(-1, keepdim=True)
    exit_wins = best_x < best_e
    s1 = torch.where(exit_wins, s1_x.gather(-1, i_x), s1_e.gather(-1, i_e))
    size = torch.where(exit_wins, size_x.gather(-1, i_x), n_e.gather(-1, i_e))
    y, rem = split_mean(centre, s1 / size * unit, s.dtype)
    return y, (p2[:, -1:] > _TQ_RISK * a2).squeeze(-1), _mean_rounding(p2[:, -1:], n, size, unit), rem


def frame(s: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(centre, unit, inv, a2)`` ``(R, 1)`` float64 of sorted rows ``s`` ``(R, N)``: the middle
    order statistic, a power of two near the half-range (see :func:`trunc_quad_runs`), its
    inverse, and alpha^2 in those units, clamped."""
    acc, n = torch.float64, s.shape[1]
    centre = s[:, n // 2 : n // 2 + 1].to(acc)
    half = torch.maximum(s[:, -1:].to(acc) - centre, centre - s[:, :1].to(acc))
    # At least the smallest normal number: a subnormal unit's inverse is Inf (rows of
    # subnormal entries, 1e-310, returned NaN).
    unit = torch.exp2(torch.ceil(torch.log2(torch.where(half > 0, half, torch.ones_like(half))))
                      .clamp_(min=-1022))
    a2 = ((a.to(acc) / unit) ** 2).clamp(min=2 * torch.finfo(acc).tiny, max=2e150)
    return centre, unit, 1.0 / unit, a2


def split_mean(base: Tensor, off: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(y, rem)`` ``(R,)`` in ``dtype``: the winning run's mean ``m = base + off`` (float64,
    ``(R, 1)``; ``base`` an entry of the row, ``off`` the mean's offset from it) rounded,
    ``y = fl(m)``, and its remainder ``rem = m - y``, rounded only relative to itself.

    The backward needs the minimiser beyond y's rounding: where that rounding is coarse
    against alpha (|y| / alpha ~ 3e6 in float32, 1e15 in float64) the inliers of the exact
    mean (members within alpha sqrt(1 - 1/|W|) of it, others beyond alpha sqrt(1 + 1/|W|))
    are no longer those within alpha of y, and Newton steps from y (a nonconvex objective)
    reach whichever local minimum surrounds y. ``base + off`` is split by Knuth's TwoSum
    (exact in float64, whatever the two's sizes); its float64 sum less y is exact too
    (y is that sum's rounding, within a factor 2 of it)."""
    hi = base + off
    b = hi - base
    lo = (base - (hi - b)) + (off - b)
    y = hi.to(dtype)
    return y.squeeze(-1), ((hi - y.to(hi.dtype)) + lo).to(dtype).squeeze(-1)


def _mean_rounding(p2_last: Tensor, n: int, size: Tensor, unit: Tensor) -> Tensor:
    """An estimate of the rounding of a run's mean taken as a difference of prefix sums
    of offsets d (units ``unit``): the sums carry about eps times the sum of |d| before
    the run's end, at most sqrt(n sum d^2) (Cauchy-Schwarz), divided by the run's
    ``size``. ``(R, 1) -> (R,)``, float64, in the units of x."""
    return (torch.finfo(torch.float64).eps * unit * (p2_last * n).sqrt() / size.clamp(min=1)).squeeze(-1)


def run_mean(s: Tensor, y: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """The mean of each sorted row's entries within alpha of ``y``, summed as offsets from
    ``y`` in float64: rounding about eps (|y| + alpha), whatever the row's spread.

    ``y`` is the mean of a winning run W, rounded; its members lie within
    alpha sqrt(1 - 1/|W|) of the exact mean and every other entry beyond
    alpha sqrt(1 + 1/|W|) (otherwise moving that entry in or out of W would lower the
    objective), so a ``y`` off by much less than alpha / (2 |W|) finds W again.
    ``s (R, N)``, ``y (R,)``, ``a`` 0-d or ``(R, 1)`` ``-> (y, rem)`` (R,) in y's dtype
    (:func:`split_mean`)."""
    yd = y.to(torch.float64).unsqueeze(-1)
    z = s.to(torch.float64) - yd
    inside = z.abs() <= a.to(torch.float64)
    total = torch.where(inside, z, 0.0).sum(-1, keepdim=True)
    return split_mean(yd, total / inside.sum(-1, keepdim=True).clamp(min=1), y.dtype)


class RunBuffers:
    """The row-sized temporaries of :func:`trunc_quad_runs` for up to ``rows`` rows of
    ``n``: nine float64 and three int64 buffers of ``rows (n + 1)`` entries, on the CPU
    kept between calls (:mod:`convexddn._workspace`). Made per block, a dozen temporaries
    of 0.5 MiB each went back to the kernel and were faulted in again on every block,
    depending on what the process had freed before (trimmed heap): 10 ms of a 37 ms
    solve at (4, 256, 1024), and 36 ms after a change elsewhere freed other sizes."""

    def __init__(self, rows: int, n: int, device: torch.device, kept: bool = True) -> None:
        size = rows * (n + 1)
        self.rows, self.n = rows, n
        # (Not kept: plain tensors, as torch.compile traces them.)
        make = workspace.take if kept else (lambda k, dtype, dev: torch.empty(k, dtype=dtype, device=dev))
        self.f = [make(size, torch.float64, device) for _ in range(9)]
        self.i = [make(size, torch.int64, device) for _ in range(3)]

    def views(self, rows: int):
        """``(f64, i64)``: ``f64(k, cols=n)`` is float64 buffer k as ``(rows, cols)``, i64 likewise."""
        if rows > self.rows:
            raise ValueError(f"RunBuffers: {rows} rows asked for, made for {self.rows}")
        return ((lambda k, cols=self.n: self.f[k][: rows * cols].view(rows, cols)),
                (lambda k, cols=self.n: self.i[k][: rows * cols].view(rows, cols)))

    def release(self) -> None:
        workspace.give(*self.f, *self.i)
        self.f, self.i = [], []


def _loose(rounding: Tensor, a: Tensor, y: Tensor) -> Tensor:
    """The rows whose mean's estimated rounding exceeds 8 ulps of alpha + |y| (float64)."""
    return rounding > (8 * torch.finfo(torch.float64).eps) * (a.reshape(-1) + y.abs())


def trunc_quad_solve(x: Tensor, a: Tensor, use_compile: bool) -> tuple[Tensor, Tensor]:
    """The exact global minimiser of truncated-quadratic pooling (see :func:`trunc_quad_runs`):
    ``(y, rem)`` (R,), its rounding to x's dtype and the remainder beyond it (:func:`split_mean`)."""
    rows, n = x.shape
    y, rem = x.new_empty(rows), x.new_empty(rows)
    sub = rows
    # Long rows on a CPU: one at a time, ranked in column chunks (trunc_quad_long), sorted
    # alone (a row's flat sort needs no row tag: see convexddn._sort).
    from .trunc_quad_long import TQ_LONG, long_starts, trunc_quad_long
    long = x.device.type == "cpu" and not use_compile and n >= TQ_LONG
    if x.device.type == "cpu" and not use_compile:
        sub = max(1, _TQ_BLOCK_BYTES // (n * x.element_size()))
        step = 1 if long else sub * _TQ_SORT_BLOCKS
        ranges = [slice(i, min(i + step, rows)) for i in range(0, rows, step)]
    else:
        ranges = block_ranges(rows, n, x, use_compile)
    ends = x.new_empty(rows, 2)
    unsure = None  # (rows, made where cells ran: their warning names them)
    # Kept buffers on the CPU only: torch.compile traces its own, and CUDA's blocks are
    # large (their temporaries made per block, as before, do not outlive it).
    work = (RunBuffers(min(sub, ranges[0].stop - ranges[0].start), n, x.device)
            if x.device.type == "cpu" and not use_compile and ranges and not long else None)
    extra = () if work is None else (work,)
    for sl in ranges:
        xb = x[sl]
        ab = a if a.dim() == 0 else a[sl]
        s = sort_values(xb)  # contiguous: searchsorted copies strided rows
        ends[sl] = s[:, :: max(n - 1, 1)]  # NaN sorts to an end: min and max catch NaN/Inf
        scale = None
        if bool((ends[sl].abs() > torch.finfo(x.dtype).max / 16).any()):
            # Entries near the end of the float range: differences could overflow.
            scale = row_scale(ends[sl][:, :1], ends[sl][:, 1:])
            s, ab = s * scale, ab * scale
        # int32 positions: 25 % faster than int64 ones (1024 rows of 1024: 8.4 against
        # 11.3 ms); trunc_quad_runs widens them in its first op. Left side: closed
        # windows [s_i - 2 alpha, s_i] (extra runs are valid candidates too); where 2 alpha
        # is below half an ulp of s_i, s_i - 2 alpha rounds to s_i itself, and the right
        # side missed the run of s_i's duplicates ([1e8, 1e8, 0] gave 0).
        if long:
            lft = long_starts(s, ab)
            parts = [trunc_quad_long(s, lft, ab)]
        else:
            lft = torch.searchsorted(s, s - 2 * ab, out_int32=True)
            parts = [run(trunc_quad_runs, use_compile, s[i:i + sub], lft[i:i + sub],
                         ab if ab.dim() == 0 else ab[i:i + sub], *extra) for i in range(0, s.shape[0], sub)]
        yb = torch.cat([p[0] for p in parts])
        risky = torch.cat([p[1] for p in parts])
        rounding = torch.cat([p[2] for p in parts])
        remb = torch.cat([p[3] for p in parts])
        # Means whose prefix-sum rounding may exceed a few ulps of alpha + |y| (outliers far
        # out around a small run, in float64: 1.5e-11 off for 5 inliers among 876 points
        # spread over 1255 alpha) are summed again from the run's own entries. (Never in
        # float32: the float64 sums' rounding stays far below its ulps: no work, no read.)
        f64 = x.dtype == torch.float64
        loose = _loose(rounding, ab, yb) if f64 else None
        # (Both flags in one host read; the loose ones read again only where cells ran.)
        any_risky, any_loose = torch.stack([risky.any(), loose.any() if f64 else risky.new_zeros(())]).tolist()
        if any_risky:
            # Rows spread far beyond alpha: local sums (see trunc_quad_cells); eagerly, also
            # when compiling: a rare path is not worth a compile per shape.
            rr = torch.nonzero(risky).squeeze(1)
            yb[rr], unsure_r, rounding[rr], remb[rr] = trunc_quad_cells(
                s[rr], lft[rr], ab if ab.dim() == 0 else ab[rr])
            if unsure is None:
                unsure = torch.zeros(rows, dtype=torch.bool, device=x.device)
            unsure[sl.start + rr] = unsure_r
            if f64:
                loose = _loose(rounding, ab, yb)
                any_loose = bool(loose.any())
        if any_loose:
            lr = torch.nonzero(loose).squeeze(1)
            yb[lr], remb[lr] = run_mean(s[lr], yb[lr], ab if ab.dim() == 0 else ab[lr])
        y[sl] = yb if scale is None else yb / scale.squeeze(-1)
        rem[sl] = remb if scale is None else remb / scale.squeeze(-1)
    if work is not None:
        work.release()
    if not bool(torch.isfinite(ends).all()):
        check_finite("x", x)
    if unsure is not None and bool(unsure.any()):  # (one host read, where cells ran: was one per block)
        warn_rows("trunc_quad", "have sums of squares too large (over 2^29 alpha^2 even from "
              "local anchors: rows of some ten million entries within a few alpha of each "
              "other) for float64 to rank the candidate runs to 2^-20 alpha^2; the returned "
              "mean of a run may not be the global minimiser", unsure)
    return y, rem


def trunc_quad_cells(s: Tensor, lft: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`trunc_quad_runs` with sums that stay local whatever the row's length
    or spread, for the rows whose centred sums it flags. Returns ``(y, unsure, rounding,
    rem)`` (R,), the third the estimated rounding of y (see :func:`_mean_rounding`), the
    last y's remainder (:func:`split_mean`).

    Each entry's offset is taken from the first entry of its chunk, in units of a cell
    width C = 4 · 2^ceil(log2 alpha) (4 to 8 alpha, a power of two). A chunk ends where
    a point has no other point within 2 alpha below it (l_k = k: no run crosses there)
    and where floor(s / C), exact, changes. A candidate run spans at most 2 alpha (plus
    the rounding of s - 2 alpha), less than C, so it meets at most two chunks: the
    offsets of its first part [l, b), from the anchor a_l, move to its last point's
    anchor a_h by h = (a_l - a_h) / C (|h| < 2) through the identities S = P1 + n_1 h
    and Q = P2 + h (2 S_1 + n_1 h), P1 and P2 the run's prefix-sum differences and S_1
    its first part's sum: every term is of the size of the run's own sums.

    The offsets lie in [0, 1) (units of C, alpha² between 1/64 and 1/16 of them), so
    the prefix sums of their squares grow with the row's length only (at most N), not
    with its spread (anchored per segment only, a chain of 1e5 points 1.9 alpha apart
    had sums near 1e15 alpha², whose rounding picked another run). ``unsure`` flags
    rows where the rounding could still exceed 2^-20 alpha² (sums of squares above
    ``_CELLS_RISK`` = ``_TQ_RISK`` alpha², as in trunc_quad_runs: some 1e7 entries packed
    within a few alpha of each other), or where a run meets three cells (not expected).
    """
    rows, n = s.shape
    acc = torch.float64
    sd = s.to(acc)
    a64 = a.to(acc)
    cell = torch.exp2(torch.ceil(torch.log2(a64)).add_(2).clamp_(-1022, 1023))
    inv = 1.0 / cell  # exact: powers of two
    a2 = ((a64 * inv) ** 2).clamp(min=2 * torch.finfo(acc).tiny)
    pos = torch.arange(n, device=s.device)
    lft = torch.minimum(lft, pos)
    # Chunk starts: segment starts, and changes of cell; ``start``: each entry's.
    q = torch.floor(sd * inv)
    new = lft == pos
    new[:, 1:] |= q[:, 1:] != q[:, :-1]
    start = torch.where(new, pos, 0).cummax(-1).values
    anchor = sd.gather(-1, start)
    d = torch.sub(sd, anchor).mul_(inv)
    p1 = d.new_zeros(rows, n + 1)
    p2 = d.new_zeros(rows, n + 1)
    torch.cumsum(d, -1, out=p1[:, 1:])
    torch.cumsum(d.mul_(d), -1, out=p2[:, 1:])

    def best(lo, b, hi, p1_lo, p2_lo, p1_hi, p2_hi, a_lo, a_hi):
        """The least 2G - alpha² N over the runs [lo, hi) (parts [lo, b) and [b, hi)
        summed from the anchors a_lo and a_hi; the p's their ends' prefix sums), the
        mean of the first run reaching it (its anchor and its offset from it) and that
        run's size."""
        n1, size = (b - lo).to(acc), (hi - lo).to(acc)
        h = (a_lo - a_hi).mul_(inv)
        s1 = p1.gather(-1, b).sub_(p1_lo)
        s_all = (p1_hi - p1_lo).addcmul_(n1, h)
        g = (p2_hi - p2_lo).addcmul_(h, s1.mul_(2).addcmul_(n1, h))
        g.addcdiv_(s_all * s_all, size.clamp(min=1), value=-1).sub_(a2 * size)
        g.masked_fill_(size <= 0, math.inf)
        val, i = g.min(-1, keepdim=True)
        return val, (a_hi.gather(-1, i), s_all.gather(-1, i) / size.gather(-1, i) * cell), size.gather(-1, i)

    # Entry runs [l_k, k]: the second part starts at k's chunk start (or at l_k).
    nxt = (pos + 1).expand(rows, n)
    best_e, m_e, size_e = best(lft, torch.maximum(lft, start), nxt, p1.gather(-1, lft), p2.gather(-1, lft),
                       p1[:, 1:], p2[:, 1:], anchor.gather(-1, lft), anchor)
    far = (q - q.gather(-1, lft) > 1).any(-1)  # (every exit run lies in an entry run)
    # Exit runs [i + 1, r_i), possibly empty, as in trunc_quad_runs (r_i > i).
    rgt = _run_ends(lft, n)
    last = rgt - 1
    best_x, m_x, size_x = best(nxt, torch.maximum(nxt, start.gather(-1, last)), rgt, p1[:, 1:], p2[:, 1:],
                       p1.gather(-1, rgt), p2.gather(-1, rgt), torch.cat([anchor[:, 1:], anchor[:, -1:]], -1),
                       anchor.gather(-1, last))
    # Ties go to the entry run, as in trunc_quad_runs.
    exit_wins = best_x < best_e
    y, rem = split_mean(*(torch.where(exit_wins, u, v) for u, v in zip(m_x, m_e)), s.dtype)
    unsure = (p2[:, -1:] > _CELLS_RISK * a2).squeeze(-1) | far
    return y, unsure, _mean_rounding(p2[:, -1:], n, torch.where(exit_wins, size_x, size_e), cell), rem


def _run_ends(lft: Tensor, n: int, counts: Tensor | None = None, ones: Tensor | None = None) -> Tensor:
    """r_i = #{k : l_k <= i} (the end of the run leaving after point i), counted from
    the run starts ``lft`` (R, n) in O(N): a histogram of the starts, then its prefix sums.
    ``counts`` (R, n + 1) and ``ones`` (R, n), int64: buffers to use (new ones if None)."""
    counts = (torch.zeros(lft.shape[0], n + 1, dtype=torch.int64, device=lft.device) if counts is None
              else counts.zero_())
    ones = torch.ones_like(lft) if ones is None else ones.fill_(1)
    counts.scatter_add_(-1, lft, ones)
    return counts.cumsum_(-1)[:, :n]
