"""The active-set solver of 1-D total-variation denoising (:mod:`.total_variation`, whose
docstring gives the method), batched over rows: the segments of equal values, their
means, and the iterations on the dual's edge signs.
"""
from __future__ import annotations

import torch

from ..errors import SolverError
from .degeneracy import named_batch, unravel

__all__ = ["_SAFE", "_TINY", "_counts", "_edge_terms", "_segment_ids", "_segment_mean", "_solve"]

# The active-set parameter c: 1/4 = 1/λ_max(DDᵀ) (other values cycle, see .total_variation).
_C = 0.25
# Above this bound on the iterates (segment sums, cumsum of y − x) the row is rescaled.
_SAFE = 2.0**1000
# Below this bound on max(|x|, λ) (and above 0) the row is scaled up: its rounding bounds
# (eps times its magnitudes) would underflow.
_TINY = 2.0**-900



def _segment_ids(sigma: torch.Tensor) -> torch.Tensor:
    """Segment index of each of the n entries, from the n−1 jump signs (B, n−1)."""
    # Counted in floating point (exact below 2**53): an int64 cumsum is several times
    # slower on CPU.
    jump = sigma.new_zeros(sigma.shape[0], sigma.shape[1] + 1)
    jump[:, 1:] = sigma.abs()
    return jump.cumsum_(1).long()


def _segment_mean(v: torch.Tensor, seg: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Replace every entry of v (B, n) by the mean of its segment."""
    sums = torch.zeros_like(v).scatter_add_(1, seg, v)
    return (sums / count).gather(1, seg)


def _counts(seg: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Segment lengths (1 where a segment id is unused, to keep the division finite).
    return torch.zeros_like(like).scatter_add_(1, seg, torch.ones_like(like)).clamp_(min=1.0)


def _edge_terms(sigma: torch.Tensor) -> torch.Tensor:
    """t with t_i = σ_i − σ_{i−1} (σ_0 = σ_n = 0): y is the segment mean of x + λ t."""
    t = sigma.new_zeros(sigma.shape[0], sigma.shape[1] + 1)
    t[:, :-1] = sigma
    t[:, 1:] -= sigma
    return t


def _put(out: torch.Tensor, idx: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """``out`` with the working set's ``rows`` written at ``idx`` (all of it when None)."""
    return rows if idx is None else out.index_copy(0, idx, rows)


def _solve(
    x: torch.Tensor, lam: torch.Tensor, max_iter: int,
    scale: torch.Tensor | None, zero_lam: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, σ, tie) for x (B, n), λ (B, 1) ≥ 0; tie flags rows at a tie.

    With ``scale`` (B, 1) powers of two: solves for (x·s, λ·s), y / s (exact: homogeneous).
    ``zero_lam``: whether some λ is 0 (known from the caller's host read).

    Rounding is bounded segment by segment: a row's offset (x + 1e12) or one huge entry
    (a spike of 1e12 among entries of 1) set one bound, 4n·eps·max|x|, for every edge,
    which accepted a wrong active set on the small entries (3e-3 off on entries of 0.1,
    silently). So x is centred on its row's median (y(x + c) = y(x) + c; exact for the
    entries within a factor of 2 of it), the dual z on a free edge is summed from its
    segment's first entry (λσ at the jump before it, plus the sum of y − x since: the
    rounding of earlier segments cancels), and each edge's bound is its segments' own,
    4·eps·(Σ|x| + len·λ) over the segment."""
    n = x.shape[1]
    x0, lam0 = x, lam
    if scale is not None:
        x, lam = x * scale, lam * scale
    sigma = x.new_zeros(x.shape[0], max(n - 1, 0))
    tie = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if x.shape[0] == 0 or n == 1:  # nothing to solve (and no step would ever report done)
        return x0.clone(), sigma, tie
    # (dx from x itself, before centring: distinct neighbours that the centring rounds
    # to one value made one segment at λ = 0, and dy/dλ one-sided there, silently)
    dx = x[:, 1:] - x[:, :-1]
    center = x.median(1, keepdim=True).values
    x = x - center
    size = x.abs()
    eps = torch.finfo(x.dtype).eps
    # dx against 4λ, not dx/4 against λ: dx/4 can underflow to 0 and hide a jump at λ = 0.
    sigma = (dx > lam / _C).to(x.dtype) - (dx < -lam / _C).to(x.dtype)
    # The outputs, all B rows; the loop runs on the working set: the rows still running
    # (``idx`` their indices among the B, None while it is all of them), with its own stores
    # yw, sw, tw of the rows that finished since the last compaction.
    y, sig_out = torch.empty_like(x), torch.empty_like(sigma)
    yw, sw, tw = y, sig_out, tie
    idx = None
    todo = torch.ones_like(tie)
    for _ in range(max_iter):
        seg = _segment_ids(sigma)
        count = _counts(seg, x)
        yk = _segment_mean(x + lam * _edge_terms(sigma), seg, count)
        mu = yk[:, 1:] - yk[:, :-1]
        held = sigma.abs()  # 1 on the jumps (the active edges), 0 on free edges
        # Per segment: base = C_{s−1} − λσ_{s−1} at its first entry s (C the cumsum of
        # y − x; 0 for the first segment), so that z_i = C_i − base on its free edges.
        # (Products with σ and |σ| select, at a fifth of torch.where's cost here.)
        csum = torch.cumsum(yk - x, 1)
        first = torch.zeros_like(x)
        first[:, 1:] = (csum[:, :-1] - lam * sigma).mul_(held)
        base = torch.zeros_like(x).scatter_add_(1, seg, first).gather(1, seg)
        z = (csum - base)[:, :-1].mul_(1.0 - held).add_(lam * sigma)
        bound = (torch.zeros_like(x).scatter_add_(1, seg, size) + lam * count).mul_(4 * eps).gather(1, seg)
        tol = torch.maximum(bound[:, :-1], bound[:, 1:])  # an edge: its one or two segments'
        # Optimality: free edges inside the box, jumps in the direction of their sign (each
        # test holds trivially on the other kind: σμ = 0 on free edges, |z| = λ on jumps).
        ok = ((sigma * mu >= -tol) & (z.abs() <= lam + tol)).all(1)
        done = todo & ok
        todo = todo & ~ok
        # One host read per step (a boolean-mask index would be another sync on CUDA):
        # how many rows finish now, how many are left?
        n_done, n_left = torch.stack([done.sum(), todo.sum()]).tolist()
        if n_done:
            near = torch.where(held > 0, mu.abs() <= tol, z.abs() >= lam - tol) & (lam > 0)
            yw = torch.where(done.unsqueeze(1), yk, yw)
            sw = torch.where(done.unsqueeze(1), sigma, sw)
            tw = torch.where(done, near.any(1), tw)
        if not n_left:
            y, sig_out, tie = (_put(o, idx, w) for o, w in ((y, yw), (sig_out, sw), (tie, tw)))
            y = y + center
            if scale is not None:
                y = y / scale
            # λ = 0 gives y = x exactly; the segment means of equal neighbours can round.
            return (torch.where(lam0 == 0, x0, y) if zero_lam else y), sig_out, tie
        v = z + _C * mu
        new = (v > lam).to(x.dtype) - (v < -lam).to(x.dtype)
        sigma = torch.where(todo.unsqueeze(1), new, sigma)
        if 2 * n_left <= todo.shape[0]:
            # Half the working set or more has finished: store it and go on with the rest
            # alone (rows are independent, so each row's steps are the same ops on the same
            # values: bit for bit its result alone). Finished rows cost every step: one
            # smooth row (218 steps) beside 255 noisy ones (1 step) made the batch 40x slower.
            # Halving at least, it happens at most log2(B) times; nonzero_static, of a size
            # known from the read above, is no second host read.
            y, sig_out, tie = (_put(o, idx, w) for o, w in ((y, yw), (sig_out, sw), (tie, tw)))
            keep = todo.nonzero_static(size=n_left).squeeze(1)
            idx = keep if idx is None else idx.index_select(0, keep)
            x, lam, size, sigma, todo = (t.index_select(0, keep) for t in (x, lam, size, sigma, todo))
            yw, sw, tw = torch.empty_like(x), torch.empty_like(sigma), torch.zeros_like(todo)
    rows = todo.nonzero().flatten()
    rows = (rows if idx is None else idx.index_select(0, rows)).tolist()
    # (as index tuples into the caller's batch shape where the caller bound it: naming_batch)
    shape = named_batch(x0.shape[0])
    indices = [(i,) if shape is None else unravel(i, shape) for i in rows]
    raise SolverError(
        f"tv_denoise: the active-set method did not converge in max_iter={max_iter} "
        f"steps for {len(rows)} signal(s) (batch indices {indices[:10]}); raise max_iter",
        indices=indices,
        statuses=["max_iter"] * len(rows),
    )
