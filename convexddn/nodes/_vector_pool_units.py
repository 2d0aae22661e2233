"""Robust vector pooling's sets as the solver takes them: in working units (a power of
two near alpha, relative to a midpoint where a set lies far from 0, in float64 where
float32 cannot hold it).

y(σx, σα) = σ y(x, α) and y(x + t) = y(x) + t, so both moves are exact and undone on
the solution (:func:`convexddn.nodes.vector_pool.robust_vector_pool`). (Under
torch.func.vmap the sets are stacked first: :mod:`._vmap_stack`.)

The Jacobians ∂y/∂x and ∂y/∂α carry no units, so the change of units is invisible to
derivatives: :func:`rescaled` passes them through unchanged at both of its ends. Through
autograd's own division and product the cotangent was multiplied by σ before the
Hessian solve and divided after, and overflowed or underflowed where σ is far from 1
(float32 data and α in units of 1e20: an Inf gradient; of 1e-25: zero; silently).
"""
from __future__ import annotations

import math

import torch

from .._autograd import eager_with_tangents
from .._checks import check_finite
from .._pow2 import pow2_round
from ..errors import SolverError
from .degeneracy import failed_indices

__all__ = ["in_units", "rescaled"]

# Largest spread of a pooled set, in units of alpha, whose squared distances stay finite,
# for sets of up to 2^8 components; over C > 2^8 components it is 2^4 / √C times this
# (the squared distance sums C squares: float32 sets of 1024 features spreading 8e17
# alpha overflowed it, and Huber returned 2e11 for data within [-4e-12, 8e5], silently).
# Float32 sets beyond it are solved in float64.
_SPREAD_LIMIT = {torch.float32: 2.0**60, torch.float64: 2.0**500}

# A set whose entries reach further from 0 than this many times (its spread + alpha) is
# solved relative to the midpoint of each coordinate's range (y(x + t) = y(x) + t): its
# sums then stay within the spread's range (the mean of 100 float32 vectors at 1e37 was
# Inf; entries of 1e300 with alpha = 1e-5 overflowed float64 in units of alpha), and the
# stopping tolerance, relative to alpha + max|y|, no longer to its offset (float32
# vectors (1e6, r_i), alpha = 1: Huber stopped 0.2 alpha short in r). The differences
# from the midpoint lose nothing (half an ulp of a difference within the spread); a set
# nearer 0 is left where it is (an anchor near a far outlier would round the cluster
# near 0 to the outlier's ulps).
_FAR = 16.0


def spread_limit(dtype: torch.dtype, C: int) -> float:
    """Largest spread over alpha that ``dtype`` holds for sets of ``C`` components."""
    return _SPREAD_LIMIT[dtype] * min(1.0, 16.0 / math.sqrt(max(C, 1)))


@eager_with_tangents  # (torch.compile would trace its forward alone in forward mode: t_t·factor)
class _Rescaled(torch.autograd.Function):
    """``t * factor`` or ``t / factor``, whose derivatives pass through unchanged (see
    :func:`rescaled`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(t, factor, divide):  # type: ignore[override]
        return t / factor if divide else t * factor

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        pass

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g, None, None

    @staticmethod
    def jvp(ctx, t_t, *_):  # type: ignore[override]
        return t_t


def rescaled(t: torch.Tensor, factor: torch.Tensor, divide: bool = False) -> torch.Tensor:
    """``t * factor`` (``t / factor`` with ``divide``; a power of two: exact) with the
    identity as its derivative: one end of a change of units around a map whose Jacobian
    has none, the other end being the inverse call; together the two are exact in value
    and in every derivative. (Divided, not multiplied by the reciprocal: 1 / 2^-1039
    overflows.)"""
    return _Rescaled.apply(t, factor, divide)


def in_units(x: torch.Tensor, x3: torch.Tensor, alpha: torch.Tensor, rescale: bool, batch: tuple[int, ...] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(x3, a, scale, anchor)``: the sets less ``anchor`` (R, C) (``None``: none
    moved), and alpha, in units of ``scale``, a power of two near alpha (``None``: not
    rescaled); in float64 where a float32 set spreads beyond 2^60 alpha or the scale is no
    normal float32 number. A set's anchor is the midpoint of each coordinate's range
    where it lies far from 0 (``_FAR``), else 0.

    Judged on the unscaled data, in float64 (dividing first overflowed float32 at alpha
    = 1e-40, or data of 1e30 with alpha = 1e-9, and reported a spread of "inf" times
    alpha); raises where even float64 cannot hold a set's spread, and
    ``NonFiniteError`` for NaN or Inf in ``x``. One pass over the sets and one host read,
    which the finiteness check of ``x`` rides on (a NaN or Inf makes the spread
    non-finite)."""
    a64 = alpha.detach().double()
    scale = pow2_round(a64) if rescale else None
    dtype, anchor = x3.dtype, None
    if x3.shape[0]:
        hi, lo = x3.detach().amax(1).double(), x3.detach().amin(1).double()
        # Per set, in units of alpha: the spread, and how far the largest |entry| exceeds
        # _FAR times it (far: by more than _FAR); their maxima and the scale's range.
        # (In halves, doubled after the division: 1e308 - (-1e308) overflows.)
        sp = (hi * 0.5 - lo * 0.5).amax(-1)
        ext = torch.stack([sp, torch.maximum(hi, -lo).amax(-1).mul_(0.5).sub_(sp, alpha=_FAR)]).div_(a64).mul_(2.0)
        stats = ext.amax(-1)
        if scale is not None:
            stats = torch.cat([stats, scale.min().view(1), scale.max().view(1)])
        spread, excess, s_min, s_max = (stats.tolist() + [1.0, 1.0])[:4]
        if not math.isfinite(spread):
            check_finite("x", x)  # names the NaN/Inf; an infinite ratio of finite data goes on
        normal = torch.finfo(torch.float32).tiny <= s_min and s_max <= 2.0**126
        C = x3.shape[-1]
        if dtype == torch.float32 and not (spread <= spread_limit(dtype, C) and normal):
            dtype = torch.float64
        if spread > spread_limit(torch.float64, C):
            indices = failed_indices(ext[0] > spread_limit(torch.float64, C), batch)  # (batch: the caller's)
            raise SolverError(f"robust_vector_pool: {len(indices)} pooled set(s) (batch indices {indices[:8]}) "
                              f"spread up to {spread:.1e} times alpha, beyond {spread_limit(torch.float64, C):.0e}: "
                              "their squared distances overflow float64; scale the outlying entries down or raise "
                              "alpha", indices=indices, statuses=["overflow"] * len(indices))
        if excess > _FAR:
            # (Halves first: hi + lo overflows float64 for entries above 9e307.)
            anchor = torch.where((ext[1] > _FAR).unsqueeze(-1), hi.mul_(0.5).add_(lo, alpha=0.5), 0.0).to(dtype)
    x3 = x3.to(dtype)
    if anchor is not None:
        x3 = x3 - anchor.unsqueeze(1)
    if scale is None:
        return x3, alpha.to(dtype), None, anchor
    # Exact (powers of two); alpha is divided in float64, where it and the scale are normal.
    x3 = rescaled(x3, (scale.view(-1, 1, 1) if scale.dim() else scale).to(dtype), divide=True)
    return x3, rescaled(alpha.to(torch.float64), scale, divide=True).to(dtype), scale.to(dtype), anchor
