"""Rows longer than a block, in column chunks: the solvers' row sums (:func:`block_sums`)
and the backward's weights (:func:`chunked_weights`) of one block of rows.

A row longer than a block (:func:`.kernels.block_rows`) was one block of its own, and
every scratch buffer as long as the row: float32 rows of 1e6-2e7 entries took 3-8x the
input in temporaries. What the iterations read of a block are row sums of elementwise
functions of the residuals ``u - x_i`` (``g = sum_i phi'``, ``h = sum_i phi''``, ...),
and the backward's closed form (Table 1) is elementwise weights over their row sum: both
are taken over the chunks of :func:`.kernels.col_ranges`, into scratch buffers of a
chunk each, the sums added. A block of whole rows is one chunk, taken as before.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .kernels import PART, Scratch, row_sums, sub_into
from .penalties import Penalty
from .rows import Rows


def block_sums(pen: Penalty, method: str, rows: Rows, sl: slice, u: Tensor, al, scratch: Scratch, clamp: bool,
               use_compile: bool, cols: list[slice], first: tuple | None = None) -> tuple[list[Tensor], Tensor | None]:
    """``(row sums, terms' norm or None)`` of :func:`.kernels.row_sums` for the rows ``sl``
    of ``rows`` at ``u`` (``(r, 1)``, or ``(r, k, 1)`` for ``k`` starts), over the column
    chunks ``cols``: the chunks' sums added, the norms' squares added under a root.

    ``first = (ends, fill, start)``: also append the rows' ``(min, max)`` ``(r, 1)`` to
    ``ends`` and, unless ``start`` is None, set ``fill[sl] = start(x rows)``. A start
    reads a whole row; where the row is chunked it is ``start.on_chunks(read, n, cols)``,
    which reads the rows only as ``read(columns)`` (each read into the buffer the next
    one reuses), so that a gathered or converted long row is never made whole."""
    k3 = u.dim() == 3
    total, sq = None, None
    lo = hi = None
    if first is not None and first[2] is not None and len(cols) > 1:
        # (before the chunks: a gathered row's columns go through the buffer they take too)
        first[1][sl] = first[2].on_chunks(lambda c: rows.block(sl, c), rows.x.shape[1], cols)
    for c in cols:
        xb = rows.block(sl) if len(cols) == 1 else rows.block(sl, c)  # (whole rows: as before)
        if first is not None:
            if first[2] is not None and len(cols) == 1:
                first[1][sl] = first[2](xb)
            lo_c, hi_c = xb.amin(-1, keepdim=True), xb.amax(-1, keepdim=True)
            lo, hi = (lo_c, hi_c) if lo is None else (torch.minimum(lo, lo_c), torch.maximum(hi, hi_c))
        *res, nb = row_sums(pen, method, u, xb.unsqueeze(1) if k3 else xb, al, scratch, clamp, use_compile)
        if len(cols) == 1:
            total, sq = res, nb
            break
        total = res if total is None else [t + r for t, r in zip(total, res)]
        if nb is not None:
            sq = nb * nb if sq is None else sq.addcmul_(nb, nb)
    if first is not None:
        first[0].append((lo, hi))
    return total, (sq if len(cols) == 1 or sq is None else sq.sqrt_())


def chunked_weights(penalty: Penalty, x: Tensor, yb: Tensor, al, scratch: Scratch, cols: list[slice],
                    need_alpha: bool, out: Tensor | None, zsum: Tensor | None,
                    adjust: Callable[[Tensor], None]) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The backward's weights of the rows ``x`` ``(r, N)`` (a block) at ``y`` (``yb``
    ``(r, 1)``) over the column chunks ``cols``: ``(sum w (r, 1) float64, sum wa,
    the signed weights' size sum or None)``, the weights ``w`` themselves written into
    ``out`` ``(r, N)`` (the gradient's buffer, scaled by the caller) where given, and the
    residuals' row sums into ``zsum`` where given; ``adjust(z)`` then changes a chunk's
    residuals in place as the backward does a block's (clamped where they may overflow a
    square; coarse rows' moved by y's remainder).

    ``sum w`` is :func:`.backward._row_sum`'s to the bit in float32: the partial sums of
    :data:`.kernels.PART` terms are the same (the chunks are multiples of it), added in
    float64 over the whole row in the same order."""
    r, n = x.shape
    f32 = x.dtype != torch.float64
    parts = x.new_empty(r, n // PART) if f32 else None
    sw = torch.zeros(r, 1, dtype=torch.float64, device=x.device)
    swa = size = None
    for c in cols:
        z, *work = scratch.get(r, c.stop - c.start)
        sub_into(z, yb, x[:, c])
        if zsum is not None:
            zsum += z.sum(-1, keepdim=True)
        adjust(z)
        w, wa, wsize = penalty.hessian_weights(z, al, work, need_alpha)
        if f32:
            m = (c.stop - c.start) // PART * PART
            torch.sum(w[:, :m].view(r, -1, PART), -1, out=parts[:, c.start // PART:(c.start + m) // PART])
            if m < w.shape[1]:  # (the row's tail: the last chunk)
                sw += w[:, m:].sum(-1, keepdim=True, dtype=torch.float64)
        else:
            sw += w.sum(-1, keepdim=True)
        if need_alpha:
            swa = wa if swa is None else swa + wa
        if wsize is not None:
            size = wsize if size is None else size + wsize
        if out is not None:
            out[:, c].copy_(w)
    if f32:
        # (as _row_sum: the partial sums summed in float64, then the tail added)
        sw = parts.sum(-1, keepdim=True, dtype=torch.float64) + sw
    return sw, swa, size
