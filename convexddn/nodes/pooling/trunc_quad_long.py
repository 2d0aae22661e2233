"""The exact truncated-quadratic minimiser of long rows, in column chunks (CPU).

:func:`.trunc_quad.trunc_quad_runs` holds a dozen row-sized float64 and int64
temporaries (its prefix sums, run sizes and sums): for a single float32 row of 1e7
entries, 24 times the input. Here every candidate is ranked from the same prefix sums,
computed in column chunks (:func:`_cols`), so that a row costs its sorted copy and its
int32 run starts (1x the input each, float32) plus chunk-sized buffers.

The prefix sums ``p[m] = sum_{j < m} d_j`` (and of ``d_j^2``) are needed at three
positions per candidate: at its run's end ``k + 1`` and at its start ``l_k`` (entry
runs ``[l_k, k]``), and at ``i + 1`` and ``r_i`` (exit runs ``[i + 1, r_i)``). All three
move forward along the row (``l`` and ``r`` are nondecreasing), so each is a window of a
:class:`_Prefix` stream that only moves forward: a window's first value is carried from
the previous one (or from a run of chunks summed past), and torch's float64 cumsum on a
CPU is sequential, ``c_m = c_{m-1} + d_m``: a window's cumsum with the carried total
added to its first term is the whole row's cumsum to the bit. The candidates' ranks, the
winning run and every output equal :func:`.trunc_quad.trunc_quad_runs`'s to the bit.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .trunc_quad import _TQ_RISK, _mean_rounding, frame, split_mean

__all__ = ["long_starts", "trunc_quad_long"]

# Entries per column chunk: at least _COLS (a float64 chunk: 512 KiB), and at most _PARTS
# chunks a row (each chunk is a few dozen small ops: 153 chunks of 2^16 on a 1e7 row ran
# 2-3x slower than one pass with 2 threads on a loaded machine, 32 within 1.3x); and the row
# length from which a row takes this path (shorter rows' dozen row-sized temporaries are a block's).
_COLS, _PARTS = 1 << 16, 32
TQ_LONG = 1 << 18


def _cols(n: int) -> int:
    """Column chunk of a row of ``n`` entries (a multiple of 256)."""
    return max(_COLS, -(-n // (_PARTS * 256)) * 256)


def long_starts(s: Tensor, a: Tensor) -> Tensor:
    """``l_k = min(k, #{j : s_j < s_k - 2 alpha})`` (int32, ``(R, N)``) of sorted rows ``s``
    ``(R, N)``, column chunk by chunk: ``torch.searchsorted(s, s - 2 a)`` without its
    row-sized ``s - 2 a``, and clamped as :func:`.trunc_quad.trunc_quad_runs` clamps it."""
    rows, n = s.shape
    cols = _cols(n)
    lft = torch.empty(rows, n, dtype=torch.int32, device=s.device)
    for c in range(0, n, cols):
        e = min(c + cols, n)
        part = torch.searchsorted(s, s[:, c:e] - 2 * a, out_int32=True)
        torch.minimum(part, torch.arange(c, e, dtype=torch.int32, device=s.device), out=part)
        lft[:, c:e] = part
    return lft


class _Prefix:
    """Windows ``[a, b]`` of the prefix sums ``p1[m] = sum_{j<m} d_j``, ``p2[m] = sum_{j<m} d_j^2``
    (``m`` in ``0..N``, ``(1, b - a + 1)`` float64 each) of ``d = (s - centre) / unit`` for one
    sorted row ``s`` ``(1, N)``, requested with ``a`` nondecreasing: bit-identical to
    ``cumsum`` over the whole row (see the module docstring)."""

    def __init__(self, s: Tensor, shift: Tensor, inv: Tensor, cols: int) -> None:
        self.s, self.shift, self.inv, self.cols = s, shift, inv, cols
        zero = torch.zeros(1, 1, dtype=torch.float64, device=s.device)
        self.w0, self.p1, self.p2 = 0, zero, zero  # the last window: positions [w0, w0 + len)

    def _sums(self, a: int, b: int, c1: Tensor, c2: Tensor) -> tuple[Tensor, Tensor]:
        """``p1, p2`` at positions ``[a, b]`` from their values ``c1, c2`` ``(1, 1)`` at ``a``."""
        p1 = torch.empty(1, b - a + 1, dtype=torch.float64, device=self.s.device)
        p2 = torch.empty_like(p1)
        p1[:, :1], p2[:, :1] = c1, c2
        if b > a:
            # (s - centre) / unit as trunc_quad_runs takes it (one rounding: unit is a power of two)
            d = torch.addcmul(self.shift, self.s[:, a:b], self.inv)
            dd = d * d
            # The carried total enters as the running sum would: fl(p[a] + d_a), then sequential.
            d[:, :1] += c1
            dd[:, :1] += c2
            torch.cumsum(d, -1, out=p1[:, 1:])
            torch.cumsum(dd, -1, out=p2[:, 1:])
        return p1, p2

    def window(self, a: int, b: int) -> tuple[Tensor, Tensor]:
        """``(p1, p2)`` at positions ``[a, b]``, ``a`` at least the previous window's ``a``."""
        end = self.w0 + self.p1.shape[1] - 1
        if a <= end:
            c1, c2 = self.p1[:, a - self.w0:a - self.w0 + 1], self.p2[:, a - self.w0:a - self.w0 + 1]
        else:  # sum the chunks between the last window and this one, keeping their totals only
            c1, c2 = self.p1[:, -1:], self.p2[:, -1:]
            for m in range(end, a, self.cols):
                q1, q2 = self._sums(m, min(m + self.cols, a), c1, c2)
                c1, c2 = q1[:, -1:], q2[:, -1:]
        self.w0 = a
        self.p1, self.p2 = self._sums(a, b, c1, c2)
        return self.p1, self.p2


def _pieces(ends: Tensor, cols: int) -> list[tuple[int, int, int, int]]:
    """Split the positions of a nondecreasing ``ends`` ``(C,)`` (int64, the run ends of a
    chunk's candidates) into pieces whose ends span at most ``cols``: ``(i, j, lo, hi)``,
    candidates ``[i, j)`` of the chunk with ends in ``[lo, hi]``."""
    out, i, c = [], 0, ends.shape[0]
    while i < c:
        lo = int(ends[i])
        j = i + int(torch.searchsorted(ends[i:], torch.tensor(lo + cols, device=ends.device)))
        out.append((i, j, lo, int(ends[j - 1])))
        i = j
    return out


def _keep(best: list, g: Tensor, s1: Tensor, size: Tensor) -> None:
    """Fold a piece's candidates into ``best = [value, s1, size]`` ``(1, 1)`` each: its least
    ``g`` where strictly below the best so far (ties: the earlier candidate, as ``min`` keeps)."""
    val, i = g.min(-1, keepdim=True)
    better = val < best[0]
    best[0] = torch.where(better, val, best[0])
    best[1] = torch.where(better, s1.gather(-1, i), best[1])
    best[2] = torch.where(better, size.gather(-1, i), best[2])


def trunc_quad_long(s: Tensor, lft: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`.trunc_quad.trunc_quad_runs` of one long sorted row ``s`` ``(1, N)`` with its
    clamped run starts ``lft`` (:func:`long_starts`) and ``a`` (0-d or ``(1, 1)``), in column
    chunks: the same ``(y, risky, rounding, rem)`` ``(1,)``, to the bit.

    Entry runs ``[l_k, k]`` read the prefix sums at ``k + 1`` and ``l_k``; exit runs
    ``[i + 1, r_i)``, ``r_i = #{k : l_k <= i}`` (a binary search in the nondecreasing
    ``lft``), at ``i + 1`` and ``r_i``; each candidate's ``SSE - alpha^2 |W|`` is formed
    by the same ops on the same operands as there."""
    n = s.shape[1]
    centre, unit, inv, a2 = frame(s, a)
    shift = -centre * inv
    cols = _cols(n)
    main, lag, lead = (_Prefix(s, shift, inv, cols) for _ in range(3))
    inf = torch.full((1, 1), float("inf"), dtype=torch.float64, device=s.device)
    best_e, best_x = [inf, inf, inf], [inf, inf, inf]
    for c in range(0, n, cols):
        e = min(c + cols, n)
        p1, p2 = main.window(c, e)
        idx = torch.arange(c + 1, e + 1, dtype=torch.float64, device=s.device).unsqueeze(0)
        # Entry runs [l_k, k], k in [c, e).
        lc = lft[0, c:e].to(torch.int64)
        for i, j, lo, hi in _pieces(lc, cols):
            q1, q2 = lag.window(lo, hi)
            at = (lc[i:j] - lo).unsqueeze(0)
            n_e = torch.sub(idx[:, i:j], lc[i:j].unsqueeze(0))
            s1_e = torch.sub(p1[:, 1 + i:1 + j], q1.gather(-1, at))
            g_e = torch.sub(p2[:, 1 + i:1 + j], q2.gather(-1, at))
            g_e.addcdiv_(s1_e * s1_e, n_e, value=-1).addcmul_(a2, n_e, value=-1)
            _keep(best_e, g_e, s1_e, n_e)
        # Exit runs [i + 1, r_i), possibly empty (they never win: see trunc_quad_runs).
        rc = torch.searchsorted(lft, torch.arange(c, e, dtype=torch.int32, device=s.device).unsqueeze(0),
                                right=True)[0]
        for i, j, lo, hi in _pieces(rc, cols):
            q1, q2 = lead.window(lo, hi)
            at = (rc[i:j] - lo).unsqueeze(0)
            n_x = torch.sub(rc[i:j].unsqueeze(0), idx[:, i:j])
            size_x = n_x.clamp(min=1)
            s1_x = q1.gather(-1, at).sub_(p1[:, 1 + i:1 + j])
            g_x = q2.gather(-1, at).sub_(p2[:, 1 + i:1 + j])
            g_x.addcdiv_(s1_x * s1_x, size_x, value=-1).addcmul_(a2, n_x, value=-1)
            _keep(best_x, g_x, s1_x, size_x)
    total = main.p2[:, -1:]  # p2[N]: the last window ends at N
    exit_wins = best_x[0] < best_e[0]
    s1 = torch.where(exit_wins, best_x[1], best_e[1])
    size = torch.where(exit_wins, best_x[2], best_e[2])
    y, rem = split_mean(centre, s1 / size * unit, s.dtype)
    return y, (total > _TQ_RISK * a2).squeeze(-1), _mean_rounding(total, n, size, unit), rem
