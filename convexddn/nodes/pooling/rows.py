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
    them alone is a view."""

    x: Tensor
    alpha: Tensor
    alpha_f: float | None
    clamp: bool = False
    index: Tensor | None = None
    buf: Tensor | None = None
    prefix: int = 0

    @property
    def count(self) -> int:
        return self.x.shape[0] if self.index is None else self.index.numel()

    def select(self, idx: Tensor) -> Rows:
        a = self.alpha if self.alpha.dim() == 0 else self.alpha.index_select(0, idx)
        index = idx if self.index is None else self.index.index_select(0, idx)
        if index.numel() * self.x.shape[1] * self.x.element_size() < _LAZY_BYTES:
            return Rows(self.x.index_select(0, index), a, self.alpha_f, self.clamp)
        return Rows(self.x, a, self.alpha_f, self.clamp, index, self.buf)

    def extended(self, idx: Tensor) -> Rows:
        """These rows followed by the rows ``idx`` of them again (a second start of some
        rows solved in the same pass as the first of all). On a CPU the blocks of the
        first rows stay views of ``x`` and only one holding repeated rows is gathered;
        elsewhere the rows are copied into one tensor (cheap there, and the iteration's
        captured graphs need one: see :func:`.iterations.step_graphs`)."""
        if self.index is not None:
            raise ValueError("Rows.extended: rows that are already a selection")  # (no caller makes one)
        a = self.alpha if self.alpha.dim() == 0 else torch.cat([self.alpha, self.alpha.index_select(0, idx)])
        if self.x.device.type != "cpu":
            return Rows(torch.cat([self.x, self.x.index_select(0, idx)]), a, self.alpha_f, self.clamp)
        own = torch.arange(self.x.shape[0], device=idx.device)
        return Rows(self.x, a, self.alpha_f, self.clamp, torch.cat([own, idx]), None, self.x.shape[0])

    def block(self, sl: slice) -> Tensor:
        """Rows ``sl`` of the solve, ``(r, N)``: a view of x, or gathered from it."""
        if self.index is None or sl.stop <= self.prefix:
            return self.x[sl]
        idx = self.index[sl]
        numel = idx.numel() * self.x.shape[1]
        if self.buf is None or self.buf.numel() < numel:
            self.buf = self.x.new_empty(numel)
        return torch.index_select(self.x, 0, idx, out=self.buf[:numel].view(idx.numel(), self.x.shape[1]))

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
