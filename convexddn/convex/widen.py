"""The float64 working copy of a caller's tensor, whose gradient goes back checked, and
the cast of a solution back to the caller's dtype, whose forward-mode tangent does.

Both backends solve and differentiate in float64. A parameter given in a narrower dtype
(float16, bfloat16, float32) gets its gradient cast back to that dtype, where a finite
float64 gradient beyond the dtype's range becomes ±inf: ``dL/da = -1e5`` for a float16
``a`` came back as ``-inf``, silently. :func:`widened` makes that cast one that warns.
The solution goes back to the caller's dtype too, its forward-mode tangent with it:
``dy = 1e5`` (float16) came back as ``inf``, silently; :func:`narrowed` warns there, by
the same check (:func:`_cast_checked`).
"""
from __future__ import annotations


import torch

from .._warn import warn
from .._autograd import bind_fast, may_carry_tangents
from .._first_order import first_order, first_order_jvp
from ..errors import GradientWarning

__all__ = ["narrowed", "widened"]


def _cast_checked(v: torch.Tensor, dtype: torch.dtype, mode: str, what: str, whose: str) -> torch.Tensor:
    """``v`` (a derivative, float64) cast to ``dtype``, with a ``GradientWarning`` where
    finite entries became ±inf: "ConvexLayer ``mode``: k ``what`` exceed the range ...",
    the remedy naming ``whose`` dtype to widen. One host read."""
    out = v.to(dtype)
    lost = int((torch.isinf(out) & torch.isfinite(v)).sum())
    if lost:
        warn(f"ConvexLayer {mode}: {lost} {what} exceed the range of {dtype} and are returned as ±inf (their "
             f"float64 values are finite); pass {whose} in a wider dtype, or scale the problem", GradientWarning)
    return out


@bind_fast
class _Widen(torch.autograd.Function):
    """``x.to(float64)``; backward: the gradient cast to x's dtype, with a
    ``GradientWarning`` naming the parameter where finite entries became ±inf."""

    @staticmethod
    def forward(x, label):  # type: ignore[override]
        return x.to(torch.float64)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.dtype, ctx.label = inputs[0].dtype, inputs[1]

    @staticmethod
    @first_order("ConvexLayer")
    def backward(ctx, g):  # type: ignore[override]
        return _cast_checked(g, ctx.dtype, "backward", f"gradient entries of {ctx.label}", "the parameter"), None

    @staticmethod
    @first_order_jvp("ConvexLayer")
    def jvp(ctx, x_t, _):  # type: ignore[override]
        return x_t.to(torch.float64)


@bind_fast
class _Narrow(torch.autograd.Function):
    """``x.to(dtype)`` of a float64 ``x``; its forward-mode tangent cast likewise, with a
    ``GradientWarning`` where finite entries became ±inf (the backward widens: exact)."""

    @staticmethod
    def forward(x, dtype):  # type: ignore[override]
        return x.to(dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.dtype = inputs[1]

    @staticmethod
    @first_order("ConvexLayer")
    def backward(ctx, g):  # type: ignore[override]
        return g.to(torch.float64), None

    @staticmethod
    @first_order_jvp("ConvexLayer")
    def jvp(ctx, x_t, _):  # type: ignore[override]
        return _cast_checked(x_t, ctx.dtype, "forward mode", "tangent entries of the solution", "the parameters")


def widened(value: torch.Tensor, label: str) -> torch.Tensor:
    """``value`` as float64; where it is narrower and requires grad, through :class:`_Widen`.

    Shape: any -> the same.
    """
    if value.dtype == torch.float64 or not (torch.is_grad_enabled() and value.requires_grad):
        return value.to(torch.float64)
    return _Widen.apply(value, label)


def narrowed(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` (float64) as ``dtype``; where that is narrower, through :class:`_Narrow`
    (a forward-mode tangent, which a plain cast would carry along unchecked, may be there
    without ``requires_grad``).

    Shape: any -> the same.
    """
    if dtype == value.dtype:
        return value
    if not may_carry_tangents(value):  # (no tangent to check: the plain cast, no Function node)
        return value.to(dtype)
    return _Narrow.apply(value, dtype)
