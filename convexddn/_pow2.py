"""Powers of two near a magnitude, for exact rescaling, without overflow.

Scaling by a power of two is exact (short of the subnormal range), which is why the
solvers bring data to unit size that way. ``exp2(floor(log2(v)))`` and
``exp2(round(log2(v)))`` are the obvious forms, but ``log2`` rounds: for float32's
largest number, 3.4028235e38, ``log2`` returns exactly 128, so the "power of two below
it" came out as ``exp2(128) = inf`` and the mean of two such entries as NaN (and float64
alike at 1.797e308). These work from the exponent ``frexp`` gives, exactly, and never
return a power beyond the dtype's range.
"""
from __future__ import annotations

import math

import torch

__all__ = ["pow2_floor", "pow2_round"]


def _pow2(e: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """2**e (integer tensor ``e``) in ``like``'s dtype, the exponent held within the
    dtype's normal range."""
    finfo = torch.finfo(like.dtype)
    # (From frexp too: math.log2 of float64's largest number rounds to 1024.)
    top = math.frexp(finfo.max)[1] - 1  # 127 (float32), 1023 (float64)
    bottom = math.frexp(finfo.tiny)[1] - 1  # -126, -1022
    return torch.ldexp(torch.ones_like(like), e.clamp(bottom, top))


def pow2_floor(v: torch.Tensor) -> torch.Tensor:
    """The largest power of two at most ``v`` (entries finite and > 0), elementwise:
    ``2**floor(log2 v)``, exact.

    Shape:
        ``(*) -> (*)``, ``v``'s dtype.
    """
    # v = m 2^e with m in [0.5, 1): 2^(e-1) <= v < 2^e.
    return _pow2(torch.frexp(v)[1] - 1, v)


def pow2_round(v: torch.Tensor) -> torch.Tensor:
    """The power of two nearest ``v`` in ratio (entries finite and > 0), elementwise:
    ``2**round(log2 v)``, held within the dtype's range.

    Shape:
        ``(*) -> (*)``, ``v``'s dtype.
    """
    m, e = torch.frexp(v)
    # log2 v = e + log2 m with log2 m in [-1, 0): it rounds to e where m >= 1/sqrt(2).
    return _pow2(e - (m < math.sqrt(0.5)).to(e.dtype), v)
