"""The rows of one robust-pooling solve (:class:`Rows`) and its per-row outcome (:class:`Result`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Selections of rows at least this large are gathered block by block (see Rows).
_LAZY_BYTES = 16 << 20


@dataclass
class Rows:
    """The rows of one solve: ``x (R, N)`` or, with ``index``, the rows ``x[index]``;
    alpha (0-d or ``(R, 1)``; ``alpha_f`` a float when one alpha serves all rows), and
    whether residuals are clamped at the penalty's saturation (rows whose spread over
    alpha could overflow a square).

    A selection of at least :data:`_LAZY_BYTES` keeps ``x`` and gathers each block of its
    rows when a pass reads it, into a reused buffer: gathering 7424 of 24576 rows of
    2048 float32 into a fresh tensor took 19-24 ms (the first touch of 60 MB of new
    memory), into a reused one 4 ms a pass -- and after the selection a sweep or two
    usually remain. A smaller one is copied at once (its memory comes back from the
    allocator's free lists, and later sweeps read it contiguously). The first ``prefix``
    rows of an ``index`` are ``x``'s own first rows (see :meth:`extended`): a block of
    them alone is a view.

    ``dtype``: the solve's dtype where it differs from x's (a float32 row solved again in
    float64): each block (or column chunk, :func:`.kernels.col_ranges`) is converted when
    a pass reads it, so that the iterations make no float64 copy of a long row (it was twice
    the input, and a float32 Huber row of 1e7 always takes that second solve); the starts read
    such a row chunk by chunk too (their ``on_chunks`` form, see :func:`.chunks.block_sums`), so
    the buffer never holds more than a block or chunk."""

    x: Tensor
    alpha: Tensor
    alpha_f: float | None
    clamp: bool = False
    index: Tensor | None = None
    buf: Tensor | None = None
    prefix: int = 0
    dtype: torch.dtype | None = None

    @property
    def count(self) -> int:
        return self.x.shape[0] if self.index is None else self.index.numel()

    @property
    def like(self) -> Tensor:
        """A tensor of the solve's dtype and device, ``(*, N)``: x itself, or an empty one
        ``(0, N)`` where the solve converts x's blocks (its dtype, device and N are all
        the solvers take from it)."""
        if self.dtype is None or self.dtype == self.x.dtype:
            return self.x
        return self.x.new_empty((0, self.x.shape[1]), dtype=self.dtype)

    def select(self, idx: Tensor, dtype: torch.dtype | None = None) -> Rows:
        """The rows ``idx`` of these, solved in ``dtype`` (default: these rows' own). A
        conversion to another dtype is lazy on a CPU only where the selection is large
        (elsewhere a copy: CUDA's captured iterations need one tensor, see
        :func:`.iterations.step_graphs`); alpha is converted at once."""
        dtype = dtype or self.dtype or self.x.dtype
        a = self.alpha if self.alpha.dim() == 0 else self.alpha.index_select(0, idx)
        a = a.to(dtype)
        index = idx if self.index is None else self.index.index_select(0, idx)
        cast = dtype != self.x.dtype
        size = index.numel() * self.x.shape[1] * max(self.x.element_size(), dtype.itemsize)
        if size < _LAZY_BYTES or (cast and self.x.device.type != "cpu"):
            return Rows(self.x.index_select(0, index).to(dtype), a, self.alpha_f, self.clamp)
        return Rows(self.x, a, self.alpha_f, self.clamp, index, None if cast else self.buf, dtype=dtype)

    def take(self, idx: Tensor) -> Tensor:
        """The rows ``idx`` of these as one tensor in the solve's dtype (a rare path's copy)."""
        index = idx if self.index is None else self.index.index_select(0, idx)
        return self.x.index_select(0, index).to(self.dtype or self.x.dtype)

    def extended(self, idx: Tensor) -> Rows:
        """These rows followed by the rows ``idx`` of them again (a second start of some
        rows solved in the same pass as the first of all). On a CPU the blocks of the
        first rows stay views of ``x`` and only one holding repeated rows is gathered;
        elsewhere the rows are copied into one tensor (cheap there, and the iteration's
        captured graphs need one: see :func:`.iterations.step_graphs`)."""
        a = self.alpha if self.alpha.dim() == 0 else torch.cat([self.alpha, self.alpha.index_select(0, idx)])
        if self.index is not None:  # (a selection solved in another dtype: every block gathered)
            return Rows(self.x, a, self.alpha_f, self.clamp, torch.cat([self.index, self.index.index_select(0, idx)]),
                        None, 0, self.dtype)
        if self.x.device.type != "cpu":
            return Rows(torch.cat([self.x, self.x.index_select(0, idx)]), a, self.alpha_f, self.clamp)
        own = torch.arange(self.x.shape[0], device=idx.device)
        return Rows(self.x, a, self.alpha_f, self.clamp, torch.cat([own, idx]), None, self.x.shape[0])

    def block(self, sl: slice, cols: slice = slice(None)) -> Tensor:
        """Rows ``sl`` of the solve, columns ``cols``, ``(r, c)``: a view of x, or gathered
        from it (and converted to the solve's dtype) into a reused buffer."""
        cast = self.dtype is not None and self.dtype != self.x.dtype
        if not cast and (self.index is None or sl.stop <= self.prefix):
            return self.x[sl, cols]
        part = self.x[:, cols]
        r = (sl.stop - sl.start) if self.index is None else self.index[sl].numel()
        numel = r * part.shape[1]
        if self.buf is None or self.buf.numel() < numel:
            self.buf = self.x.new_empty(numel, dtype=self.dtype or self.x.dtype)
        out = self.buf[:numel].view(r, part.shape[1])
        if self.index is None:
            return out.copy_(part[sl])
        if not cast:
            return torch.index_select(part, 0, self.index[sl], out=out)
        return out.copy_(part.index_select(0, self.index[sl]))

    def alpha_arg(self, sl: slice, ndim: int):
        if self.alpha_f is not None:
            return self.alpha_f
        return self.alpha[sl].reshape(-1, *([1] * (ndim - 1)))


@dataclass
class Result:
    """Per row: the point, its objective (nonconvex solves), and flags: stopped at the
    rounding-noise level wider than the tolerance (unresolved), stopped at all
    (converged), and non-finite sums with finite data (to solve apart, scaled)."""

    u: Tensor
    f: Tensor | None
    unresolved: Tensor
    converged: Tensor
    special: Tensor
