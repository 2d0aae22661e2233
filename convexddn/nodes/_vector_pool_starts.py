r"""The start search of robust vector pooling's nonconvex penalties (Welsch, truncated quadratic).

Rows are pooled sets ``x (R, N, C)``. Every row carries :math:`S = 2 + 4\min(\text{starts}, N)` candidate
points at once, so its steps form :math:`(r, S, N)` temporaries: distances from the candidates to the
points, their IRLS weights and penalties. Everything the search needs of them is a sum over the points
(the weights' sums :math:`\sum_i w_{si}` and products :math:`\sum_i w_{si} x_i`, the objectives
:math:`\sum_i \phi(z_{si})`, the ball means' counts and sums), so the temporaries are taken a *tile* at a
time (:func:`tiles`): blocks of whole rows where a row's :math:`S \cdot N` fits the pooling kernels'
budget (:func:`~.pooling.kernels.block_rows`: 2 MiB on a CPU), and otherwise one row at a time in chunks
of the points, each chunk's sums added to the row's. Until 2026-12-08 one set wider than the budget was a
block alone and its temporaries grew with :math:`S \cdot N`: about 250 times the input (Welsch on one
float32 set of 1e6 3-vectors: 2.7 GB; 9e6 ran out of memory). A row that fits is one chunk, taken with the
same ops as before (bit for bit); a chunked row's sums differ from the one-pass ones by their rounding.
Chunked rows have no centred copy of the set (as large as the input): each chunk's is formed where it is
used, and the truncated quadratic's swap rounds keep each chunk's points nearest the inlier boundary.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._vector_pool_solvers import kappa
from .pooling.kernels import block_ranges, block_rows
from .pooling.penalties import Penalty, TruncatedQuadratic

# The multi-start phase only has to rank the basins, so it stops at a loose tolerance
# or after a few dozen IRLS steps (IRLS converges linearly, at a rate of ~0.8 per step
# for Welsch with a handful of inliers); the winner is then polished to ``tol``.
_START_TOL = 1e-3
_START_MAX_ITER = 30
# Each data-point start is the mean of the points within r·alpha of it, for these r:
# the inlier set of a minimiser spans up to 2·alpha, so no single radius finds it
# reliably (on 60 random 9-point sets in 2-D, radius alpha alone missed the global
# truncated-quadratic minimum 10 times; these four radii, never).
_BALL_RADII = (0.5, 1.0, 1.5, 2.0)
# Swap rounds of the multi-start search (each stops early when nothing improves).
_SWAP_ROUNDS = 8
# The start phase's Gram-form squared distances err by about eps·M² (M: a set's largest
# distance from its mean); it ranks the basins right while that stays below this
# fraction of alpha². Sets spreading further run that phase in float64, and sets beyond
# float64's reach with direct differences (float32, 6 points near +1e4 and 4 near -1e4,
# alpha 1: the 4-point cluster was returned, objective 6.48 against 4.29).
_GRAM_ROUNDING = 1e-3

Tiles = list[tuple[slice, list[slice]]]


def tiles(rows: int, n: int, per_point: int, x: torch.Tensor) -> Tiles:
    """``[(row block, [point chunks])]`` covering ``rows × n`` points whose temporaries hold
    ``per_point`` elements of x's dtype each: blocks of whole rows (one chunk, ``slice(None)``) where a
    row fits the block budget, else single rows in chunks of as many points as fit it."""
    fit = block_rows(per_point, x, False)  # points per budget
    if n <= fit:
        return [(sl, [slice(None)]) for sl in block_ranges(rows, per_point * n, x, False)]
    chunks = equal_chunks(n, fit)
    return [(slice(r, r + 1), chunks) for r in range(rows)]


def equal_chunks(n: int, size: int) -> list[slice]:
    """Slices covering ``range(n)`` in chunks of equal size, at most ``size`` (not full ones and a remainder)."""
    size = -(-n // -(-n // size))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def summed(part: Callable[[slice], tuple[torch.Tensor, ...]], chunks: list[slice]) -> tuple[torch.Tensor, ...]:
    """The sums over the point ``chunks`` of ``part(chunk)`` (tensors of the same shapes); one chunk's own."""
    acc = None
    for ch in chunks:
        got = part(ch)
        acc = got if acc is None else tuple(s + t for s, t in zip(acc, got))
    assert acc is not None
    return acc


def _start(pen: Penalty, x: torch.Tensor, a: torch.Tensor, starts: int, max_iter: int) -> torch.Tensor:
    """:func:`_multi_start` with distances accurate to ~``_GRAM_ROUNDING``·alpha in every row:
    in x's dtype by Gram products where they are, else in float64 by Gram products, else
    in float64 by direct differences ((r, S, n, C) temporaries for those rows only). One host read."""
    R, N, C = x.shape
    aa = (a.reshape(-1) if a.dim() > 0 else a).double()
    centre = _centre(x)
    reach = x.new_empty(R, dtype=torch.float64)  # max_i ‖x_i − centre‖², in float64 a tile at a time
    for sl, chunks in tiles(R, N, 2 * C, x):  # (float64 copies)
        m = None
        for ch in chunks:
            xc = (x[sl][:, ch] - centre[sl]).double()
            got = (xc * xc).sum(-1).amax(-1)
            m = got if m is None else torch.maximum(m, got)
        reach[sl] = m
    reach = reach / (aa * aa)  # M² / alpha², (R,)
    own = torch.finfo(x.dtype).eps * reach <= _GRAM_ROUNDING
    wide = torch.finfo(torch.float64).eps * reach <= _GRAM_ROUNDING
    tier = torch.where(own, 0, torch.where(wide & (x.dtype != torch.float64), 1, 2))
    counts = torch.bincount(tier, minlength=3).tolist()
    if counts[0] == x.shape[0]:
        return _multi_start(pen, x, a, starts, max_iter, centre=centre)
    u = torch.empty_like(x[:, 0])
    for t, n_t in enumerate(counts):
        if not n_t:
            continue
        idx = torch.nonzero(tier == t).squeeze(1)
        xs, at = x.index_select(0, idx), (a.index_select(0, idx) if a.dim() > 0 else a)
        if t:
            xs, at = xs.double(), at.double()
        u[idx] = _multi_start(pen, xs, at, starts, max_iter, direct=t == 2).to(x.dtype)
    return u


def _centre(x: torch.Tensor) -> torch.Tensor:
    """The coordinate-wise lower median of each set ``(R, 1, C)``, the origin of the start
    search: centred on the mean, a cluster beside one far outlier rounded to a point (the
    mean's ulp at an outlier of 1e17 exceeds alpha), and the truncated quadratic returned
    a point with no inliers, Welsch one 40 alphas off the cluster, silently. The median
    lies among the bulk of the points."""
    return x.median(-2, keepdim=True).values


def _multi_start(pen: Penalty, x: torch.Tensor, a: torch.Tensor, starts: int, max_iter: int,
                 direct: bool = False, centre: torch.Tensor | None = None) -> torch.Tensor:
    """Global search for a nonconvex penalty; returns a start for the polish (R, C).

    1. IRLS from the mean, the coordinate median and, around each of ``starts`` data
       points, the means of its neighbours within r·alpha (r in _BALL_RADII), all at
       once; keep the end point with the lowest objective.
    2. Swap rounds (truncated quadratic): toggle one of the ``starts`` points nearest the inlier boundary
       (distance closest to alpha) in or out of the inlier set of the best point, run
       IRLS from the mean of each toggled set, and move while the objective drops.

    Distances come from Gram products, ||u||² − 2uᵀx + ||x||² on data centred per row,
    so S = 2 + 4 ``starts`` starts cost (r, S, n) temporaries, not (r, S, n, C) (``direct``:
    from differences, for sets too wide for the Gram form; see :func:`_start`); the result
    is polished exactly. They are taken a tile at a time (:func:`tiles`), each step of every
    tile before the one host read that decides whether to go on: the same iterations as all
    rows at once, but the memory of one tile. All at once, (64, 3, 2048) float64 sets (3 MB)
    took 730 MB and 15.7 s with Welsch. ``centre``: :func:`_centre` of x, if known. Sets in
    chunks of their points have no centred copy (the size of the input): each chunk's is formed
    where it is used.
    """
    R, N, C = x.shape
    centre = _centre(x) if centre is None else centre
    k = min(starts, N)
    grid = tiles(R, N, (2 + 4 * k) * (C if direct else 1), x)
    whole = all(chunks == [slice(None)] for _, chunks in grid)  # (else: single rows in chunks)
    if whole:
        xc = x - centre
        x2 = (xc * xc).sum(-1).unsqueeze(-2)  # (R, 1, N)
        big = torch.maximum(xc.amax((-2, -1)), xc.amin((-2, -1)).neg())  # max |xc|, without an |xc| copy
        mean = xc.mean(-2, keepdim=True)
    else:  # (max_i (x_i − c) = max_i x_i − c: rounding is monotonic)
        big = torch.maximum((x.amax(-2, keepdim=True) - centre).amax((-2, -1)),
                            (centre - x.amin(-2, keepdim=True)).amax((-2, -1)))
        mean = x.mean(-2, keepdim=True) - centre
    aa = a.unsqueeze(-1) if a.dim() > 0 else a  # (R, 1, 1) against (r, S, n)
    # (a itself, (R, 1) or 0-d: aa.squeeze(-1) of a 0-d alpha under vmap, torch.func.jacfwd
    # w.r.t. an unbatched set's alpha, raised "Dimension is out of range".)
    limit = _START_TOL * (a + big.unsqueeze(-1))  # (R, 1)
    rows = torch.arange(R, device=x.device)

    def xc_at(sl, ch):  # the centred points ch (a slice or indices) of the rows sl, (r, n, C)
        return xc[sl][:, ch] if whole else x[sl][:, ch] - centre[sl]

    def a_at(sl):  # alpha of the rows sl, against (r, S, n)
        return aa if aa.dim() == 0 else aa[sl]

    def dist(U, sl, ch):  # (r, S, C) of the rows sl -> (r, S, n) to their points ch
        xs = xc_at(sl, ch)
        if direct:
            return torch.linalg.vector_norm(U.unsqueeze(-2) - xs.unsqueeze(-3), dim=-1)
        z2 = (U * U).sum(-1, keepdim=True) - 2 * (U @ xs.mT) + (x2[sl][..., ch] if whole
                                                                 else (xs * xs).sum(-1).unsqueeze(-2))
        return z2.clamp_(min=0).sqrt_()

    def irls(U):  # (R, S, C) -> end points and their objectives (R, S)
        for _ in range(min(max_iter, _START_MAX_ITER)):
            new = torch.empty_like(U)
            for sl, chunks in grid:
                def weights(ch, sl=sl):  # Σ_i w_si and Σ_i w_si x_i over the points ch
                    w = kappa(pen, dist(U[sl], sl, ch), a_at(sl))
                    return w.sum(-1, keepdim=True), w @ xc_at(sl, ch)
                sw, wx = summed(weights, chunks)
                new[sl] = torch.where(sw > 0, wx / torch.where(sw > 0, sw, torch.ones_like(sw)), U[sl])
            step = (new - U).abs().amax(-1)
            U = new
            if not bool((step > limit).any()):  # one host sync per IRLS step
                break
        f = U.new_empty(U.shape[:-1])
        for sl, chunks in grid:
            f[sl] = summed(lambda ch, sl=sl: (pen.phi(dist(U[sl], sl, ch), a_at(sl)).sum(-1),), chunks)[0]
        return U, f

    def means(masks, sl, chunks):  # 0/1 (r, S, n) masks of the rows sl, per chunk -> their means (r, S, C), counts
        def sums(ch):
            got = masks(ch)
            xs = xc_at(sl, ch)
            return tuple(m @ xs for m in got) + tuple(m.sum(-1, keepdim=True) for m in got)
        out = summed(sums, chunks)
        half = len(out) // 2
        return [t / c.clamp(min=1) for t, c in zip(out[:half], out[half:])], out[half:]

    found = [mean, torch.zeros_like(mean)]
    if k > 0:
        idx = torch.linspace(0, N - 1, k, device=x.device).round().long().unique()
        balls = x.new_empty(R, len(_BALL_RADII) * idx.numel(), C)
        for sl, chunks in grid:
            pts = xc_at(sl, idx)
            def balls_in(ch, sl=sl, pts=pts):  # the chosen points' balls, (r, k, n) per radius
                near = dist(pts, sl, ch)
                return [(near <= r * a_at(sl)).to(x.dtype) for r in _BALL_RADII]
            balls[sl] = torch.cat(means(balls_in, sl, chunks)[0], -2)
        found.append(balls)
    U, f = irls(torch.cat(found, -2))
    f, best = f.min(-1)
    u = U[rows, best]
    eps = torch.finfo(x.dtype).eps
    # Swaps act on hard inlier sets: exact for the truncated quadratic, whose minimiser
    # is the mean of its inliers; Welsch has no hard inlier set and skips them.
    for _ in range(_SWAP_ROUNDS if k > 0 and isinstance(pen, TruncatedQuadratic) else 0):
        if whole:
            z = dist(u.unsqueeze(-2), slice(None), slice(None))  # (R, 1, N)
            inlier = z <= aa  # (bool: a quarter of x's dtype, taken as 0/1 a chunk at a time)
            edge = z.sub_(aa).abs_().squeeze(-2).topk(k, -1, largest=False).indices  # (R, k); (z in place: done)
        else:  # (single rows a chunk at a time: the k nearest the boundary among each chunk's k nearest)
            inlier = torch.empty(R, 1, N, dtype=torch.bool, device=x.device)
            edge = torch.empty(R, k, dtype=torch.long, device=x.device)
            for sl, chunks in grid:
                best = []
                for ch in chunks:
                    z = dist(u[sl].unsqueeze(-2), sl, ch)
                    inlier[sl, :, ch] = z <= a_at(sl)
                    got = z.sub_(a_at(sl)).abs_().squeeze(-2).topk(min(k, z.shape[-1]), -1, largest=False)
                    best.append((got.values, got.indices + ch.start))
                vals, at = torch.cat([b[0] for b in best], -1), torch.cat([b[1] for b in best], -1)
                edge[sl] = at.gather(-1, vals.topk(k, -1, largest=False).indices)
        starts_t, filled = x.new_empty(R, k, C), torch.empty(R, k, dtype=torch.bool, device=x.device)
        for sl, chunks in grid:
            def toggled(ch, sl=sl):  # (r, k, n): the inlier set with edge point j toggled, in row j
                t = inlier[sl][..., ch].to(x.dtype).expand(-1, k, -1).clone()
                at = edge[sl].unsqueeze(-1) - (ch.start or 0)  # (r, k, 1), in the chunk where 0 <= at < n
                inside = (at >= 0) & (at < t.shape[-1])
                at = at.clamp(0, t.shape[-1] - 1)
                flip = t.gather(-1, at)
                return [t.scatter_(-1, at, torch.where(inside, 1.0 - flip, flip))]
            (starts_t[sl],), (count,) = means(toggled, sl, chunks)
            filled[sl] = count.squeeze(-1) > 0
        V, g = irls(starts_t)
        g = torch.where(filled, g, torch.full_like(g, math.inf))
        g, pick = g.min(-1)
        better = g < f - 8 * N * eps * f.abs()
        if not bool(better.any()):  # one host sync per toggling round
            break
        u = torch.where(better.unsqueeze(-1), V[rows, pick], u)
        f = torch.where(better, g, f)
    return u + centre.squeeze(-2)
