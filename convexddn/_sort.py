"""Sorted values of float tensors, faster on CPUs (one place for the integer-key trick).

torch's CPU sort of float32 rows compares floats with NaN handling; the same rows read
as int32 keys sort about 1.4x faster (1024 rows of 2048 entries: 41 against 63 ms; of
float64 as int64 nothing is gained, 7.6 against 7.4 ms for 128 rows). The keys: a
float's bit pattern read as a signed integer orders non-negative floats correctly and
negative ones in reverse; flipping the 31 low bits of the negative ones (an
involution, so the same flip maps back) orders every float as its key: -inf < finite
< +inf, -0 before +0, and NaN with the sign bit first, without it last.

Faster still: torch sorts a *one-dimensional* integer tensor of at least 32768 entries
by a parallel radix sort (fbgemm's), rows only by comparison. So rows of float32 are
sorted in chunks of about :data:`_CHUNK` entries as one flat array of int64 keys, the
row's index above the 32 bits of its value's key: the flat order is the rows' orders one
after another. Measured on the 2-core machine (float32, interleaved rounds, median ms;
torch's sort, the row-wise int32 keys, this): 1024 rows of 1024: 21.2, 17.8, 7.7;
512 rows of 2048: 23.0, 18.2, 7.1; 6144 rows of 2048: 315-317, 316-325, 89-197 (in
different processes). Chunks of 32768 entries were slower than of 131072. Where one
chunk holds everything (256 rows of 512, 2048 of 64) this was 1.2-1.8× faster than the
row-wise keys in some processes and 0.6-0.9× in others, so it takes over only from
:data:`_RADIX_MIN` entries and rows of :data:`_RADIX_ROW`. CUDA tensors and other
dtypes take torch's sort unchanged.
"""
from __future__ import annotations

import torch

from . import _workspace as workspace

__all__ = ["sort_values"]

# Entries per flat sort (about: the rows are split into equal chunks). torch's 1-D
# integer sorts are radix sorts from 32768 entries (its GRAIN_SIZE).
_CHUNK = 1 << 17
# Flat sorts from two chunks on (see the module docstring), of rows this long at least
# (shorter rows sort faster row by row: 0.5-0.7× for rows of 16 to 48).
_RADIX_MIN = 2 * _CHUNK
_RADIX_ROW = 64
_LOW = (1 << 32) - 1


def _flip(keys: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.bitwise_xor(keys, (keys >> 31) & 0x7FFFFFFF, out=out)


def sort_values(x: torch.Tensor, dim: int = -1, descending: bool = False) -> torch.Tensor:
    """``torch.sort(x, dim, descending).values``, a contiguous tensor; equal to it
    entry for entry up to the order of -0.0 and +0.0 (equal values), for NaN-free
    rows. (Float32 on a CPU sorts the bit patterns: a NaN with its sign bit set, as
    x86 arithmetic makes them, e.g. inf - inf, sorts first instead of last. The caller
    reads a row's two ends and refuses non-finite ones.)"""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return torch.sort(x, dim=dim, descending=descending).values.contiguous()
    if x.numel() < _RADIX_MIN or x.dim() == 0 or x.shape[dim] < _RADIX_ROW:
        keys = torch.sort(_flip(x.contiguous().view(torch.int32)), dim=dim, descending=descending).values
        return _flip(keys).view(torch.float32)
    rows = x.movedim(dim, -1)
    if rows.numel() == rows.shape[-1]:
        # One row: its int32 keys sorted flat need no row tag, in place (5x the row's
        # bytes at the sort's peak, torch's int64 indices and its radix sort's second
        # keys and indices, instead of 10x; 1e7 entries 280 against 540 ms).
        keys = _flip(rows.reshape(-1).view(torch.int32))
        torch.sort(keys, descending=descending, out=(keys, torch.empty(keys.shape, dtype=torch.int64)))
        _flip(keys, out=keys)
        return keys.view(torch.float32).reshape(x.shape)
    out = _radix_rows(rows.reshape(-1, rows.shape[-1]), descending).view(rows.shape)
    return out.movedim(-1, dim).contiguous()


def _radix_rows(x: torch.Tensor, descending: bool) -> torch.Tensor:
    """Each row of ``x`` ``(R, N)`` sorted, by flat int64 radix sorts of row-tagged keys."""
    R, N = x.shape
    keys = x.contiguous().view(torch.int32)
    out = torch.empty_like(keys)
    chunks = -(-R * N // _CHUNK)
    step = -(-R // chunks)
    tags = (torch.arange(step, dtype=torch.int64, device=x.device) << 32).unsqueeze(-1)
    # The keys, their sorted copy and its indices: buffers kept between calls
    # (:mod:`._workspace`), not three fresh MiB per chunk faulted in page by page.
    bufs = [workspace.take(step * N, torch.int64, x.device) for _ in range(3)]
    for i in range(0, R, step):
        part = keys[i:i + step]
        r = part.shape[0]
        k, v, idx = (b[: r * N] for b in bufs)
        # The value's key as unsigned 32 bits (+2^31), its complement for a descending
        # order; the row above it.
        k.view(r, N).copy_(_flip(part)).add_(1 << 31)
        if descending:
            torch.sub(_LOW, k, out=k)
        k.view(r, N).bitwise_or_(tags[:r])
        torch.sort(k, out=(v, idx))
        v &= _LOW
        if descending:
            torch.sub(_LOW, v, out=v)
        out[i:i + r] = _flip(v.sub_(1 << 31).view(r, N).to(torch.int32))
    workspace.give(*bufs)
    return out.view(torch.float32)
