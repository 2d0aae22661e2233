"""The range helpers the projections share: where a radius needs a wider dtype
(:func:`wide_dtype`, :func:`narrowed`), per-row power-of-two scaling (:func:`row_pow2`),
and the warnings for results the dtype cannot hold (:func:`warn_unrepresentable`)."""
from __future__ import annotations

import math

import torch

from ..._checks import check_device, check_positive, check_tensor, positive_range
from ..._pow2 import pow2_floor
from ..._warn import warn
from ...errors import ConvexDDNWarning, SolverError
from .._repr import format_option
from ..degeneracy import failed_indices


def _along(values: torch.Tensor, d: int, ndim: int) -> torch.Tensor:
    """Reshape a 1-D tensor so it lies along dim d of an ndim-dimensional tensor."""
    shape = [1] * ndim
    shape[d] = values.numel()
    return values.view(shape)


def _sum_to(grad: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return grad.sum_to_size(r.shape) if grad.shape != r.shape else grad


def row_pow2(ax: torch.Tensor, d: int) -> torch.Tensor:
    """Per row (along ``d``, kept), the largest power of two at most ``max_i |x_i|`` (1 for
    all-zero rows), in float64: ``x / a`` is exact and its entries lie in ``(-2, 2)``, so
    reductions over it neither overflow nor lose bits to subnormals. (Dividing by the max
    itself rounded ``x / a``: a row exactly on the ball's boundary, float16
    ``[0.0234375, -0.0703125, -0.10546875]`` at ``r = 0.12890625``, came out outside.)
    The exponent is clamped at float64's smallest normal, ``2^-1022``: a subnormal float64
    row keeps ``x / a ≥ 2^-52``.

    Shape: ``(*, n, *) -> (*, 1, *)``, float64."""
    a = ax.amax(d, keepdim=True).double()
    return torch.where(a > 0, pow2_floor(torch.where(a > 0, a, torch.ones_like(a))), torch.ones_like(a))


def _small_norm(dtype: torch.dtype) -> float:
    """Below this ‖x‖₂ the squares of the largest entries are subnormal: rescale first."""
    info = torch.finfo(dtype)
    return math.sqrt(info.tiny / info.eps)


def _may_underflow(r: float | torch.Tensor, n: int, dtype: torch.dtype) -> bool:
    """Whether r/n can round to zero (host test for a float radius; a tensor: assume so)."""
    if isinstance(r, torch.Tensor):
        return True
    return r < n * torch.finfo(dtype).tiny


def wide_dtype(radius: float | torch.Tensor, x: torch.Tensor,
               name: str = "radius") -> tuple[float | torch.Tensor, torch.dtype | None]:
    """Validate ``radius`` (a positive number, or a floating-point tensor on x's device,
    finite and > 0) and return it (a tensor as ``check_tensor`` returns it) with the dtype
    to solve in, float64, where x's dtype cannot hold it (``None`` for x's own):

    - beyond x's largest float (for 16-bit x too, where float32 rounded x − max and ‖x‖,
      and float16 [32768, 32752, 2^-24] took the support {1, 2} on the simplex z = 65520,
      not {1, 2, 3}); cast to x's dtype, such a radius overflowed (float16 x, z = 1e5:
      torch's scalar conversion error, or a radius of Inf);
    - a tensor radius below x's smallest normal float (float32 x, a float64 radius 1e-46;
      float16 x, a float32 one 1e-8): cast to x's dtype it rounded to 0 or a subnormal, and
      the L1 and L∞ gradients with respect to it came out 0 (x = [0.5, -2, 1], p = ∞:
      0, not −0.6), silently; a float radius there too: it has no gradient, but x's does (a float32
      0 inside the L∞ ball of radius 1e-50, which rounds to 0, read as pinned at its face: gradient
      0 for the identity).

    The device is checked before any value is read; a tensor radius costs the one host
    read of its positivity check, which also reads its minimum and maximum where its
    dtype's range is wider than x's (inside torch.compile none: x's dtype is kept, and
    such a tiny radius's gradient is what x's dtype gives, documented)."""
    info = torch.finfo(x.dtype)
    if isinstance(radius, torch.Tensor):
        radius = check_tensor(name, radius)
        check_device(name, radius, x)
        rinfo = torch.finfo(radius.dtype)
        if ((rinfo.max <= info.max and rinfo.tiny >= info.tiny) or radius.numel() == 0
                or torch.compiler.is_compiling()):
            check_positive(name, radius)
            return radius, None
        low, value = positive_range(name, radius)
    else:
        check_positive(name, radius)
        value = low = float(radius)
    return radius, (None if value <= info.max and low >= info.tiny else torch.float64)


def narrowed(y: torch.Tensor, dtype: torch.dtype, d: int, what: str, name: str,
             radius: float | torch.Tensor, on: str | None = None) -> torch.Tensor:
    """``y``, solved in a wider dtype, in ``dtype``; ``SolverError`` where it does not fit.
    ``on`` (``"sphere"``, ``"simplex"``: sets without 0, whose rows in ``y`` are never all
    zero): warn where whole rows rounded to zero (:func:`warn_unrepresentable`)."""
    out = y.to(dtype)
    bad = ~torch.isfinite(out).all(d)
    if bool(bad.any()):
        indices = failed_indices(bad, bad.shape)  # (bad has the batch shape: y's without dim)
        raise SolverError(
            f"{what}: the projection does not fit {dtype} for {len(indices)} of {bad.numel()} "
            f"vector(s) (batch indices {indices[:8]}; an entry beyond {torch.finfo(dtype).max:g}, with "
            f"{name}={format_option(radius)}); pass x in a wider dtype or a smaller {name}",
            indices=indices, statuses=["overflow"] * len(indices))
    if on is not None:
        warn_unrepresentable(out, d, what, name, on)
    return out


def warn_unrepresentable(y: torch.Tensor, d: int, what: str, name: str = "radius", on: str = "sphere") -> None:
    """Warn when whole rows of a sphere (or simplex: ``name="z"``, ``on="simplex"``)
    projection rounded to zero (``name`` too small); ``y`` may be any tensor that is zero
    along ``d`` exactly where a row is (the simplex passes its threshold, one per row)."""
    zero = y.abs().amax(d) == 0
    if bool(zero.any()):
        warn(f"{what}: {name} too small for {y.dtype} ({int(zero.sum())} of {zero.numel()} projected vector(s) "
             f"rounded to zero, which is not on the {on}); use a larger {name} or a wider dtype", ConvexDDNWarning)
