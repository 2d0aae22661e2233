"""The float64 working copy of a caller's tensor, whose gradient goes back checked.

Both backends solve and differentiate in float64. A parameter given in a narrower dtype
(float16, bfloat16, float32) gets its gradient cast back to that dtype, where a finite
float64 gradient beyond the dtype's range becomes ±inf: ``dL/da = -1e5`` for a float16
``a`` came back as ``-inf``, silently. :func:`widened` makes that cast one that warns.
"""
from __future__ import annotations


import torch

from .._warn import warn
from .._autograd import bind_fast
from .._first_order import first_order, first_order_jvp
from ..errors import GradientWarning

__all__ = ["widened"]


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
        out = g.to(ctx.dtype)
        lost = int((torch.isinf(out) & torch.isfinite(g)).sum())  # one host read
        if lost:
            warn(
                f"ConvexLayer backward: {lost} gradient entries of {ctx.label} exceed the range of "
                f"{ctx.dtype} and are returned as ±inf (their float64 values are finite); pass the "
                "parameter in a wider dtype, or scale the problem", GradientWarning)
        return out, None

    @staticmethod
    @first_order_jvp("ConvexLayer")
    def jvp(ctx, x_t, _):  # type: ignore[override]
        return x_t.to(torch.float64)


def widened(value: torch.Tensor, label: str) -> torch.Tensor:
    """``value`` as float64; where it is narrower and requires grad, through :class:`_Widen`.

    Shape: any -> the same.
    """
    if value.dtype == torch.float64 or not (torch.is_grad_enabled() and value.requires_grad):
        return value.to(torch.float64)
    return _Widen.apply(value, label)
