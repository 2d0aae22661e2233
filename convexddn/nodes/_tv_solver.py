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



def _segment_ids(sigma: torch.Tensor, work: _Work | None = None) -> torch.Tensor:
    """Segment index of each of the n entries, from the n−1 jump signs (B, n−1); in
    ``work``'s buffers (``work.seg``) where given. (Without buffers, and in these helpers
    below: out-of-place ops only, which torch.func's vmap batches in the derivatives; its
    batching rules refuse ``out=`` forms.)"""
    # Counted in floating point (exact below 2**53): an int64 cumsum is several times
    # slower on CPU.
    if work is None:
        jump = sigma.new_zeros(sigma.shape[0], sigma.shape[1] + 1)
        jump[:, 1:] = sigma.abs()
        return jump.cumsum_(1).long()
    jump = work.a
    jump[:, :1] = 0.0
    torch.abs(sigma, out=jump[:, 1:])
    return work.seg.copy_(jump.cumsum_(1))


def _segment_mean(v: torch.Tensor, seg: torch.Tensor, count: torch.Tensor,
                  bufs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Replace every entry of v (B, n) by the mean of its segment; with ``bufs`` = (sums, out),
    two (B, n) buffers, written there (out returned)."""
    if bufs is None:
        return (torch.zeros_like(v).scatter_add_(1, seg, v) / count).gather(1, seg)
    sums, out = bufs
    return torch.gather(sums.zero_().scatter_add_(1, seg, v).div_(count), 1, seg, out=out)


def _counts(seg: torch.Tensor, like: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Segment lengths (1 where a segment id is unused, to keep the division finite); ``like``
    (B, n) is overwritten with ones where ``out`` (a buffer for the result) is given."""
    if out is None:
        return torch.zeros_like(like).scatter_add_(1, seg, torch.ones_like(like)).clamp_(min=1.0)
    return out.zero_().scatter_add_(1, seg, like.fill_(1.0)).clamp_(min=1.0)


def _edge_terms(sigma: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """t (B, n) with t_i = σ_i − σ_{i−1} (σ_0 = σ_n = 0): y is the segment mean of x + λ t;
    written into ``out`` where given."""
    t = sigma.new_zeros(sigma.shape[0], sigma.shape[1] + 1) if out is None else out
    t[:, -1:] = 0.0  # (out's last entry; the rest is written below)
    t[:, :-1] = sigma
    t[:, 1:] -= sigma
    return t


class _Work:
    """The active-set loop's work buffers for a working set of B rows of n entries: made once
    per working set and rewritten in place by every step (:func:`_step`).

    Made anew by every op, the step's row-sized temporaries (about 38 a step) were, above glibc's mmap
    threshold, mapped, faulted in a page at a time and unmapped again on every step: at
    n = 4·10⁶ (float64, one row) an allocating add took 58 ms where the same add in place
    took 3.5 ms, the solve 13.6 s for 9 steps (1.9 s with glibc told to keep its memory),
    and the peak was 47 times the input. Here: seven float64 rows, one int64 row of segment
    ids and two boolean rows (the caller's x, the centred x and σ besides)."""

    def __init__(self, x: torch.Tensor) -> None:
        b, n = x.shape
        new = (lambda m: torch.empty(b, m, dtype=x.dtype, device=x.device))
        self.seg = torch.empty(b, n, dtype=torch.long, device=x.device)
        self.count, self.sums, self.yk, self.a, self.b = (new(n) for _ in range(5))
        self.mu, self.h = new(n - 1), new(n - 1)
        self.p, self.q = self.sums[:, :-1], self.b[:, :-1]  # (scratch edge rows, free at those times)
        self.ok = torch.empty(b, n - 1, dtype=torch.bool, device=x.device)
        self.ok2 = torch.empty_like(self.ok)


def _step(x: torch.Tensor, lam: torch.Tensor, sigma: torch.Tensor, eps: float, w: _Work) -> torch.Tensor:
    """One active-set step for the jump signs σ (B, n−1) of x (B, n, centred), in ``w``: the
    segment solution ``w.yk``, μ = Δy in ``w.mu``, the dual z (returned, a view of ``w.a``),
    each edge's rounding bound in ``w.h`` and its optimality in ``w.ok`` (both tests passed).

    Every product and sum is the one the allocating form computed, on the same operands
    (IEEE + and × commute exactly): the iterates, hence y, σ and the step count, are bit
    for bit the same."""
    seg = _segment_ids(sigma, w)
    count = _counts(seg, w.a, w.count)
    # y: the segment means of x + λt (module docstring)
    v = _edge_terms(sigma, w.a).mul_(lam).add_(x)
    yk = _segment_mean(v, seg, count, (w.sums, w.yk))
    mu = torch.sub(yk[:, 1:], yk[:, :-1], out=w.mu)
    held = torch.abs(sigma, out=w.h)  # 1 on the jumps (the active edges), 0 on free edges
    # Per segment: base = C_{s−1} − λσ_{s−1} at its first entry s (C the cumsum of
    # y − x; 0 for the first segment), so that z_i = C_i − base on its free edges.
    # (Products with σ and |σ| select, at a fifth of torch.where's cost here.)
    csum = torch.sub(yk, x, out=w.a).cumsum_(1)
    first = w.sums
    first[:, :1] = 0.0
    torch.sub(csum[:, :-1], torch.mul(sigma, lam, out=first[:, 1:]), out=first[:, 1:]).mul_(held)
    base = torch.gather(w.b.zero_().scatter_add_(1, seg, first), 1, seg, out=w.sums)
    z = csum.sub_(base)[:, :-1].mul_(held.neg_().add_(1.0)).add_(torch.mul(sigma, lam, out=w.p))
    # Each edge's bound: its one or two segments' 4·eps·(Σ|x| + len·λ).
    sums = w.sums.zero_().scatter_add_(1, seg, torch.abs(x, out=w.b))
    sums.add_(torch.mul(count, lam, out=w.b)).mul_(4 * eps)
    bound = torch.gather(sums, 1, seg, out=w.b)
    tol = torch.maximum(bound[:, :-1], bound[:, 1:], out=w.h)
    # Optimality: free edges inside the box, jumps in the direction of their sign (each
    # test holds trivially on the other kind: σμ = 0 on free edges, |z| = λ on jumps).
    torch.ge(torch.mul(sigma, mu, out=w.p), torch.neg(tol, out=w.q), out=w.ok)
    w.ok &= torch.le(torch.abs(z, out=w.p), torch.add(tol, lam, out=w.q), out=w.ok2)
    return z


def _near(lam: torch.Tensor, sigma: torch.Tensor, z: torch.Tensor, w: _Work) -> torch.Tensor:
    """Rows at a tie (B,): a jump of size 0 or a free edge with |z| = λ, to the bound ``w.h``
    of :func:`_step` (whose results it reads, before the next step)."""
    tol = w.h
    jump_tie = torch.le(torch.abs(w.mu, out=w.p), tol, out=w.ok)
    free_tie = torch.ge(torch.abs(z, out=w.p), torch.sub(lam, tol, out=w.q), out=w.ok2)
    return torch.where(sigma != 0, jump_tie, free_tie).logical_and_(lam > 0).any(1)


def _next_signs(lam: torch.Tensor, z: torch.Tensor, w: _Work) -> torch.Tensor:
    """The next active set's signs (B, n−1), into ``w.h``: sign(v) where |v| > λ, v = z + cμ."""
    v = w.mu.mul_(_C).add_(z)
    new = w.h.copy_(torch.gt(v, lam, out=w.ok))
    return new.sub_(w.q.copy_(torch.lt(v, -lam, out=w.ok2)))


def _put(out: torch.Tensor, idx: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """``out`` with the working set's ``rows`` written at ``idx`` (all of it when None)."""
    return rows if idx is None else out.index_copy(0, idx, rows)


def _start(
    x: torch.Tensor, lam: torch.Tensor, scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x centred, λ, the centre (B, 1), the first σ (B, n−1)) for x (B, n), λ (B, 1), scaled
    by ``scale`` where given (its temporaries, row-sized, go before the loop's buffers come)."""
    if scale is not None:
        x, lam = x * scale, lam * scale
    # (dx from x itself, before centring: distinct neighbours that the centring rounds
    # to one value made one segment at λ = 0, and dy/dλ one-sided there, silently)
    dx = x[:, 1:] - x[:, :-1]
    center = x.median(1, keepdim=True).values
    # dx against 4λ, not dx/4 against λ: dx/4 can underflow to 0 and hide a jump at λ = 0.
    sigma = (dx > lam / _C).to(x.dtype) - (dx < -lam / _C).to(x.dtype)
    return x - center, lam, center, sigma


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
    x0, lam0 = x, lam
    sigma = x.new_zeros(x.shape[0], max(x.shape[1] - 1, 0))
    tie = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if x.shape[0] == 0 or x.shape[1] == 1:  # nothing to solve (and no step would ever report done)
        return x0.clone(), sigma, tie
    x, lam, center, sigma = _start(x, lam, scale)
    eps = torch.finfo(x.dtype).eps
    work = _Work(x)
    # The outputs, all B rows (None until the first compaction stores them); the loop runs
    # on the working set: the rows still running (``idx`` their indices among the B, None
    # while it is all of them), with its own stores yw, sw, tw of the rows that finished
    # since the last compaction (yw, sw None while none has).
    y = sig_out = idx = yw = sw = None
    tw = tie
    todo = torch.ones_like(tie)
    for _ in range(max_iter):
        z = _step(x, lam, sigma, eps, work)
        ok = work.ok.all(1)
        done = todo & ok
        todo = todo & ~ok
        # One host read per step (a boolean-mask index would be another sync on CUDA):
        # how many rows finish now, how many are left?
        n_done, n_left = torch.stack([done.sum(), todo.sum()]).tolist()
        if n_done:
            tw = torch.where(done, _near(lam, sigma, z, work), tw)
            if yw is None and not n_left:  # every row of the working set finishes now
                yw, sw = work.yk, sigma
            else:
                if yw is None:
                    yw, sw = torch.empty_like(x), torch.empty_like(sigma)
                torch.where(done.unsqueeze(1), work.yk, yw, out=yw)
                torch.where(done.unsqueeze(1), sigma, sw, out=sw)
        if not n_left:
            y, sig_out, tie = (_put(o, idx, w) for o, w in ((y, yw), (sig_out, sw), (tie, tw)))
            del work  # (its buffers go before y's last passes)
            y.add_(center)  # (y is the loop's own: a work buffer, a store or index_copy's result)
            if scale is not None:
                y.div_(scale)
            # λ = 0 gives y = x exactly; the segment means of equal neighbours can round.
            return (torch.where(lam0 == 0, x0, y) if zero_lam else y), sig_out, tie
        torch.where(todo.unsqueeze(1), _next_signs(lam, z, work), sigma, out=sigma)
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
            x, lam, sigma, todo = (t.index_select(0, keep) for t in (x, lam, sigma, todo))
            del work  # (before the smaller set's buffers are made)
            work, yw, sw, tw = _Work(x), None, None, torch.zeros_like(todo)
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
