"""Forward solvers of robust pooling: ``x (R, N)``, ``alpha`` (``(R, 1)`` or 0-d) ``-> (R,)``.

Starts: rows of at most 129 entries start from their lower median; rows up to 512 long
from the lower median of 129 entries at generic positions; longer rows from the repeated
median of three of 81 evenly strided entries (Tukey's ninther, two levels deeper),
taken while their block is in cache. A nonconvex penalty starts from the mean
and that median; for rows longer than 512, from the mean and the repeated median of a
sample of 128 entries at generic positions, both first refined on that sample and, where they reach
the same point there, only one continues on the whole row.

Blocks whose spread over alpha could overflow a square have their residuals clamped
where the penalty saturates; rows whose sums still overflow (entries near the end of
the float range) are solved apart, scaled by a power of two (exact). Rows that a
float32 solve cannot resolve (see :mod:`.iterations`) are solved again in float64;
rows that float64 cannot resolve, or that hit ``max_iter``, are reported with a
:class:`~convexddn.errors.SolverWarning`.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ..._checks import check_finite
from ..._pow2 import pow2_floor
from ..._warn import warn
from ...errors import SolverWarning
from ..degeneracy import shown_indices
from .bisection import bisect_rows
from .descent import descent_rows, safe_step
from .iterations import newton_rows
from .kernels import (
    Scratch,
    block_ranges,
    row_scale,
    row_sums,
)
from .penalties import Penalty
from .rows import Rows

# Rows up to _SAMPLE_MIN_N long start from the lower median of at most _MEDIAN_SAMPLE
# entries at generic positions; longer ones from the repeated median of three of 3**_REMEDIAN_LEVELS.
_MEDIAN_SAMPLE = 129
_SAMPLE_MIN_N = 512
_REMEDIAN_LEVELS = 4
# The nonconvex starts of long rows are refined on about _NC_SAMPLE sampled entries by
# _SAMPLE_STEPS safeguarded Newton steps; refined starts closer than _MERGE * alpha are one.
_NC_SAMPLE = 128
_SAMPLE_STEPS, _MERGE = 4, 1e-3


def mean_solve(x: Tensor) -> Tensor:
    """The mean of each row, without overflow: rows whose sum overflows are divided by the
    power of two just below their largest magnitude first (exact)."""
    y = x.mean(-1)
    bad = ~torch.isfinite(y)
    if bool(bad.any()):
        check_finite("x", x)
        idx = bad.nonzero().squeeze(-1)
        xb = x[idx]
        scale = pow2_floor(xb.abs().amax(-1, keepdim=True))
        y[idx] = (xb / scale).mean(-1) * scale.squeeze(-1)
    return y


def _strided_sample(x: Tensor, count: int) -> Tensor:
    """``count`` entries of each row at generic positions (all of a short row).

    Not evenly strided: a periodic pattern in a row (a stripe in every k-th column of an
    image pooled over its pixels) lined up with the stride and filled the sample, and
    Welsch returned the stripe (30.0 where the other 88 % of the pixels lie near 0;
    shuffled, 0.0). The positions are the golden-ratio sequence's, ⌊frac(jφ)·n⌋, which
    no period aligns with, sorted (deterministic: the same row, the same sample)."""
    n = x.shape[-1]
    if n <= count:
        return x
    return x.index_select(-1, _positions(n, count, x.device))


@functools.lru_cache(maxsize=64)
def _positions(n: int, count: int, device: torch.device) -> Tensor:
    # The most recently used few (a dict kept one tensor per row length for good: point
    # clouds of a new size in every batch grew it without bound).
    j = torch.arange(1, count + 1, dtype=torch.float64, device="cpu")
    return torch.unique((j * 0.6180339887498949 % 1.0 * n).long().clamp_(0, n - 1)).to(device)


def _median_start(x: Tensor) -> Tensor:
    """A robust start per row ``(R, 1)``: the lower median of at most 129 evenly strided
    entries for rows up to 512 long (exact up to 129); beyond, the repeated median of
    three of 81 evenly strided entries.

    torch's median costs about 0.8 µs per row whatever the row's length (15 % of a
    pseudo-Huber solve at (24, 1024, 2048)); the repeated median is 16 elementwise
    ops on the whole block. It is a robust estimate, not the median: a value survives
    a level only if two of its three do, so a fraction p of outliers becomes
    3p² − 2p³ per level for independent entries (10 % → 2.8 %, 0.23 %, 0.0016 % after
    one, two, three levels). Each triple takes entries a third
    of the sample apart, so that a run of adjacent outliers is split up. (On rows of
    256 it cost Welsch more iterations than the median saves: shorter rows keep it.)
    """
    if x.shape[-1] <= _SAMPLE_MIN_N:
        # (contiguous: torch 2.13's CPU median over a stride-0 dim, an expanded input,
        # returned uninitialised memory, 4e-314 for rows of 1.5)
        return _strided_sample(x, _MEDIAN_SAMPLE).contiguous().median(-1, keepdim=True).values
    return _remedian(x)


def _remedian(x: Tensor) -> Tensor:
    """The repeated median of three of ``3**_REMEDIAN_LEVELS`` evenly strided entries
    per row ``(R, 1)`` (rows at least that long)."""
    k = 3 ** _REMEDIAN_LEVELS
    v = x[:, _remedian_columns(x.shape[-1])]
    while k > 1:
        k //= 3
        a, b, c = v[:, :k], v[:, k:2 * k], v[:, 2 * k:]
        v = torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))
    return v


def _remedian_columns(n: int) -> slice:
    """The columns :func:`_remedian` reads of rows of ``n`` (those columns alone read as all)."""
    k = 3 ** _REMEDIAN_LEVELS
    return slice(0, k * (n // k), n // k)


def _median_on_chunks(read: Callable[[slice], Tensor], n: int, cols: list[slice]) -> Tensor:
    """:func:`_median_start` of rows of ``n`` read only as ``read(columns) (r, c)`` (see
    :func:`.chunks.block_sums`): beyond 512 entries the 81 columns :func:`_remedian` takes."""
    if n > _SAMPLE_MIN_N:
        return _remedian(read(_remedian_columns(n)))
    return _median_start(read(slice(None)))


_median_start.count, _median_start.on_chunks = 1, _median_on_chunks
_start = _median_start


def _two_starts(x: Tensor) -> Tensor:
    """The mean and the median start of a block of rows ``(r, N) -> (r, 2)``. The block
    is made contiguous first (a copy of one cache-sized block, only where x is a strided
    view): torch sums a strided row in another order, and Welsch's local search from a
    mean a few ulp off ended up to 148 ulp apart in float32 for the same values."""
    x = x.contiguous()
    return torch.cat([x.mean(-1, keepdim=True), _median_start(x)], -1)


def _two_on_chunks(read: Callable[[slice], Tensor], n: int, cols: list[slice]) -> Tensor:
    """:func:`_two_starts` of rows of ``n`` read chunk by chunk (``read(c) (r, c)``, ``c`` in
    ``cols``, each read into the buffer the next reuses): a float32 row solved again in float64
    was converted whole for it, a float64 copy of 2x its input. The mean is ``sum_c s_c / n``,
    the chunks' sums (each as torch sums a contiguous row: any layout, the same start) added in
    float64, rounded once: the whole row's mean to that rounding."""
    total = None
    for c in cols:
        s = read(c).contiguous().sum(-1, keepdim=True, dtype=torch.float64)  # (float32: no overflow)
        total = s if total is None else total.add_(s)
    med = _median_on_chunks(read, n, cols)
    return torch.cat([total.div_(n).to(med.dtype), med], -1)


_two_starts.count, _two_starts.on_chunks = 2, _two_on_chunks


def _sample_starts(xs: Tensor) -> Tensor:
    """The mean and the repeated median of a row sample (:data:`_NC_SAMPLE` entries),
    to be refined on it. torch's median of 1024 rows of 128 costs 1 ms, the repeated
    median 0.1 ms: Welsch at (4, 256, 1024) and on four other data sets (bench, 10 %
    scattered outliers, a 30 % clump, Student t) 4-14 % faster, the same results; on
    multimodal rows (α 0.3 and 1; two, three clusters, uniform) the two starts end in
    different local minima on 3-55 % of the rows, the repeated median's lower in 405
    of them, higher in 288."""
    return torch.cat([_finite_mean(xs), _remedian(xs)], -1)


def _finite_mean(x: Tensor) -> Tensor:
    """The mean of each row ``(R, 1)``, also where its sum overflows (``sum_i x_i / n``
    there: every term finite, the sum at most the largest). Both are formed: for samples
    and rare rows, not for a pass over the whole input."""
    m = x.mean(-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, (x / x.shape[-1]).sum(-1, keepdim=True))


def warn_rows(name: str, message: str, mask: Tensor) -> None:
    """The SolverWarning for the rows ``mask (R,)`` of a pooling with penalty ``name`` (named in the
    caller's batch shape within the forward's :func:`~..degeneracy.naming_batch`)."""
    warn(f"robust_pool(penalty={name!r}): {shown_indices(mask)} {message}", SolverWarning)


# --------------------------------------------------------------------------- drivers


def convex_solve(pen: Penalty, x: Tensor, a: Tensor, tol: float, max_iter: int, use_compile: bool) -> Tensor:
    """Bracketed Newton for a convex penalty (see :func:`.iterations.newton_rows`)."""
    return _finish(pen, x, a, tol, max_iter, use_compile, None)


def nonconvex_solve(pen: Penalty, x: Tensor, a: Tensor, tol: float, max_iter: int, use_compile: bool) -> Tensor:
    """Descent-safeguarded Newton for a nonconvex penalty (see
    :func:`.iterations.descent_rows`) from two starts, the mean and the lower median;
    the start reaching the lower objective wins: a local minimum, not certified global."""
    starts = None
    if x.shape[-1] > _SAMPLE_MIN_N:
        xs = _strided_sample(x, _NC_SAMPLE).contiguous()
        # (_finite_mean: a row of 1000 entries at the float max started from an infinite mean
        # and stopped at max_iter; such rows are solved again scaled, from these starts scaled)
        s0 = _sample_starts(xs)
        u = _refine_on_sample(pen, xs, a, s0, use_compile)
        # Rows whose sample overflowed (or holds NaN/Inf: the solve below raises) keep
        # the raw starts.
        starts = torch.where(torch.isfinite(u), u, s0)
    return _finish(pen, x, a, tol, max_iter, use_compile, starts)


def _refine_on_sample(pen: Penalty, xs: Tensor, a: Tensor, s0: Tensor, use_compile: bool) -> Tensor:
    """``s0 (R, k)`` after :data:`_SAMPLE_STEPS` safeguarded Newton steps on the sample
    ``xs (R, m)``: ``u <- u - g / max(h, kappa W)``, the descent iteration's safe step
    (:func:`.iterations.safe_step`: it decreases the objective; plain Newton near a
    minimum), without its convergence tests, trust region or bookkeeping.

    Those cost more than the sums on a sample this small: Welsch at (4, 256, 1024)
    float32 spent 4-6 ms of 8-11 in a full descent solve of the sample (five iterations
    of ~130 small ops); with four steps 1.19x faster there, and on six data sets at α 0.3,
    1 and 3 (two and three clusters, uniform, Student t, a 30 % clump) the two ways end
    in different local minima on 168 of 9216 rows: lower objective in 92, higher in 76.
    """
    R, m = xs.shape
    k = s0.shape[-1]
    rows = _rows(xs, a)  # alpha as a float once, not a host sync per block and step
    ranges = block_ranges(R, k * m, xs, use_compile)
    scratch = Scratch.make(3, (ranges[0].stop - ranges[0].start) * k * m, xs)
    u = s0.unsqueeze(-1).clone()
    for _ in range(_SAMPLE_STEPS):
        for sl in ranges:
            al = rows.alpha_arg(sl, 3)
            _, g, h, w, _ = row_sums(pen, "descent_sums", u[sl], xs[sl].unsqueeze(1), al, scratch, False,
                                     use_compile)
            u[sl] += safe_step(g, h, w)
    scratch.release()
    return u.squeeze(-1)


def _rows(x: Tensor, a: Tensor, clamp: bool = False) -> Rows:
    return Rows(x, a, float(a) if a.dim() == 0 else None, clamp)


def _finish(pen: Penalty, x: Tensor, a: Tensor, tol: float, max_iter: int, use_compile: bool,
            starts: Tensor | None) -> Tensor:
    """Solve; solve float32 rows that cannot be resolved, or whose sums overflow, again in
    float64; warn for rows unresolved in float64, overflowing there too, or stopped by
    ``max_iter`` (or with a start stopped by it)."""
    y, *flags = _solve(pen, _rows(x, a), tol, max_iter, use_compile, starts, x)
    unresolved, converged, special, cut = flags

    def counts(*extra: Tensor) -> list[int]:  # (the flags' counts and ``extra``'s in one host read)
        return torch.stack([special.sum(), unresolved.sum(), (~converged & ~special).sum(), (cut & converged).sum(),
                            *extra]).tolist()

    if x.dtype == torch.float64:
        n_spec, n_res, n_unc, n_cut = counts()
    else:
        again = unresolved | special | cut
        n_spec, n_res, n_unc, n_cut, n_again = counts(again.sum())
        if n_again:
            # (A user's penalty without a saturation can overflow on a far outlier in float32,
            # (z / alpha)^2 at 1e20, where float64 has room: the row's answer was the mean. A
            # start "stopped by max_iter" in float32 may be stuck, not descending: where alpha
            # is about an ulp of the data every step rounds back to u.)
            idx = again.nonzero().squeeze(-1)
            s64 = None if starts is None else starts[idx].double()
            # (converted block by block: no float64 copy of a long row, see Rows)
            y64, *flags64 = _solve(pen, _rows(x, a).select(idx, torch.float64), tol, max_iter, use_compile, s64, x)
            y[idx] = y64.to(y.dtype)
            for f, f64 in zip(flags, flags64):
                f[idx] = f64
            n_spec, n_res, n_unc, n_cut = counts()
    if n_res and pen.convex:
        # The gradient's sign is exact far above its noise: bisected to one ulp (bisect_rows), where
        # Newton's test stopped at its start (alpha 1e-20 on N(0, 1) data: 0.058 from the median).
        idx = unresolved.nonzero().squeeze(-1)
        a64 = (a if a.dim() == 0 else a.reshape(-1)[idx]).double()
        y_b, left = bisect_rows(pen, x[idx].double(), a64)
        y[idx] = y_b.to(y.dtype)
        unresolved[idx] = left
        n_res = int(left.sum())
    if n_spec:
        warn_rows(pen.name, "have sums of the penalty's derivatives that overflow even with scaled "
              "residuals (in float64; its formula exceeds the float range there); returning the "
              "last finite iterate", special)
    if n_res:
        warn_rows(pen.name, f"cannot be resolved to tol={tol:g} in float64: the objective is so flat "
              "there that the rounding noise of its gradient exceeds tol times its curvature, or "
              "the span over which that curvature holds (alpha / 2 near a data point); returning "
              "the point where the gradient is at its noise level", unresolved)
    if n_unc:
        warn_rows(pen.name, f"did not reach tol={tol:g} within max_iter={max_iter}; returning the last "
              "iterate", ~converged & ~special)
    if n_cut:
        warn_rows(pen.name, f"had a start stopped by max_iter={max_iter} on its way down: the other start's "
              "local minimum is returned, and the stopped one might have reached a lower objective",
              cut & converged)
    return y


def _solve(pen: Penalty, rows: Rows, tol: float, max_iter: int, use_compile: bool,
           starts: Tensor | None, full: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, unresolved, converged, special, cut)`` for every row; rows whose sums overflowed
    (entries near the end of the float range) are solved again apart, scaled by a power
    of two and with residuals clamped where the penalty saturates; ``special`` marks
    those whose sums overflowed even so; ``cut`` those with a start (of two) that
    ``max_iter`` stopped (the flags are the returned start's)."""
    if pen.convex:
        res = newton_rows(pen, rows, starts, _start if starts is None else None, tol, max_iter, use_compile)
        picked = None if res is None else (res.u, res.unresolved, res.converged, res.special,
                                           torch.zeros_like(res.special))
    else:
        picked = _nonconvex(pen, rows, tol, max_iter, use_compile, starts)
    if picked is None:
        check_finite("x", full)
        raise AssertionError("unreachable: a non-finite row min or max with finite x")
    y, *flags = picked
    special = flags[2]
    if bool(special.any()) and not rows.clamp:
        idx = special.nonzero().squeeze(-1)
        xs = rows.take(idx)
        s = row_scale(xs.amin(-1, keepdim=True), xs.amax(-1, keepdim=True))
        a_s = (rows.alpha if rows.alpha.dim() == 0 else rows.alpha.reshape(-1, 1)[idx]) * s
        xs = xs * s
        if starts is not None:
            st = starts[idx] * (s if starts.dim() == 2 else s.squeeze(-1))
        else:
            # (the starts in the scaled units, from whole rows: a mean start of many entries near
            # the range's end overflowed, inf, and its descent ended at max_iter)
            st = None if pen.convex else torch.cat([_finite_mean(xs), _median_start(xs)], -1)
        ys, *flags_s = _solve(pen, Rows(xs, a_s, None, True), tol, max_iter, use_compile, st, full)
        y[idx] = ys / s.squeeze(-1)
        for f, fs in zip(flags, flags_s):
            f[idx] = fs
    return (y, *flags)


def _nonconvex(pen, rows: Rows, tol, max_iter, use_compile, starts):
    """Both starts of every row, or -- where most rows' refined starts reached the same
    point (they are one) -- one start per row, the second start of the others solved
    in the same iteration as rows of their own appended to the problem (a separate
    solve of those few rows cost Welsch at (4, 256, 1024) a fifth of its forward in
    per-iteration overhead)."""
    apart = None
    if starts is not None:
        a = rows.alpha if rows.alpha.dim() == 0 else rows.alpha.reshape(-1)
        gap = (starts[:, 0] - starts[:, 1]).abs() > _MERGE * a
        if 4 * int(gap.sum()) <= starts.shape[0]:
            apart = gap.nonzero().squeeze(-1)
            starts = torch.cat([starts[:, 0], starts.index_select(0, apart)[:, 1]]).unsqueeze(-1)
            apart = apart if apart.numel() else None
    R = rows.count
    res = descent_rows(pen, rows if apart is None else rows.extended(apart), starts,
                       _two_starts if starts is None else None, tol, max_iter, use_compile)
    if res is None:
        return None
    fields = [res.u, res.f, res.unresolved, res.converged, res.special]
    if apart is not None:
        # Each row's own start in column 0 and, for the rows apart, their second in column 1.
        both = [torch.cat([t[:R], t[:R]], -1) for t in fields]
        for t, o in zip(both, fields):
            t[apart, 1] = o[R:, 0]
        fields = both
    # The start with the lower objective (at its last accepted point) wins; only its
    # flags count (a mean start far from every point stalls on a flat stretch) -- but a
    # start cut off by max_iter (neither stopped nor overflowing) may have been heading
    # below the winner: ``cut`` (the median start's higher minimum was returned without a
    # warning where max_iter = 2..4 stopped the mean start's way down).
    pick = fields[1].argmin(-1, keepdim=True)
    u, unresolved, converged, special = (t.gather(-1, pick).squeeze(-1) for i, t in enumerate(fields) if i != 1)
    return u, unresolved, converged, special, (~(fields[3] | fields[4])).any(-1)
