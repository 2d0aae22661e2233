"""The gradient-overflow check shared by the closed-form backward passes (least
squares, the L2 sphere projection), and the gain beyond which a node runs it.

Their inputs are checked to be finite in the forward, so a NaN or Inf in a gradient
they return, with a finite incoming gradient, means that the true gradient (or a sum
or product formed on the way to it) exceeds the largest number of the dtype: float32
least squares with ``A ~ 1e-20`` (gradients ~1e40), an L2 sphere projection of radius
3e38. :func:`warn_gradient_overflow` says so, naming the batch elements; it costs one
sum per gradient and one host read when everything is finite.

Which backward passes check: those whose own gain (the size of a Jacobian entry) can
carry an ordinary incoming gradient out of the dtype's range. An ordinary gradient is
one up to :data:`GAIN_MARGIN` = 2**20 in size (√max = 256 for float16, whose range is
narrower than 2**40), so a node is flagged where ``gain > gain_limit(dtype)`` (float32:
3.2e32); the forward computes that flag inside a host read it already does, and a node
that is not flagged costs its backward nothing (no host read, no sync on CUDA). The L1
ball and sphere, the simplex, the L∞ ball and sphere and the L2 ball have Jacobian
entries bounded by 1 (radius gradients by the row length): never flagged. Gradients
that overflow only because the incoming gradient is within that margin of the dtype's
range (an incoming 3e38 in float32; fp16 gradients scaled by ``GradScaler``, which
overflow by design and are skipped by it) are torch's ordinary overflow, Inf as in its
own reductions, and are not checked.
"""
from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence

import torch

from .._warn import warn
from ..errors import GradientWarning
from .degeneracy import shown_indices

__all__ = ["GAIN_MARGIN", "gain_limit", "may_overflow", "warn_gradient_overflow"]

GAIN_MARGIN = 2.0**20


def gain_limit(dtype: torch.dtype) -> float:
    """The largest gain (Jacobian entry size) of a node whose backward is not checked:
    ``max / margin``, margin ``GAIN_MARGIN`` (√max where that is smaller: float16)."""
    top = torch.finfo(dtype).max
    return top / min(GAIN_MARGIN, math.sqrt(top))


def may_overflow(gain: float, dtype: torch.dtype) -> bool:
    """Whether a backward of this gain (a host number, read by the forward) must check
    its gradients with :func:`warn_gradient_overflow`: ``gain > gain_limit(dtype)``, or
    a NaN gain."""
    return not gain <= gain_limit(dtype)


def _rows(bad: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """``bad`` reduced (any, keepdim) over those of ``dims`` (negative) that it has."""
    for d in dims:
        if -d <= bad.ndim:
            bad = bad.any(d, keepdim=True)
    return bad


def _caused(upstream: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Whether a non-finite incoming gradient reaches each element of a gradient of
    ``shape`` (summed over the dims that it broadcast along, if any)."""
    try:
        fits = torch.broadcast_shapes(shape, upstream.shape) == upstream.shape
    except RuntimeError:
        fits = False
    if not fits:
        return upstream.any().expand(shape)
    return upstream.sum_to_size(shape) > 0


def warn_gradient_overflow(
    what: str,
    incoming: torch.Tensor,
    grads: Sequence[tuple[str, torch.Tensor | None]],
    dims: Sequence[int],
) -> None:
    """Warn (:class:`~convexddn.errors.GradientWarning`) when a returned gradient holds
    NaN or Inf that the incoming gradient does not explain.

    Common path: one sum per gradient (in float32 at least) and one host read (a sum
    that overflows where no entry does only sends the call down the exact path, which
    then finds nothing). Skipped inside a compiled graph (no host read there). Call it
    only where the node's gain is flagged (module docstring, :func:`gain_limit`).

    Args:
        what: the node's name, which starts the message.
        incoming: the gradient with respect to the node's output.
        grads: ``(input name, gradient or None)`` pairs, in the order named. Each is laid
            out like ``incoming`` (batch dims first, aligned from the right) so that
            reducing ``dims`` leaves one flag per batch element that broadcasts
            against ``incoming``'s.
        dims: the non-batch dims, negative (counted from the end); a gradient with
            fewer dims is reduced over those it has.
    """
    present = [(name, g) for name, g in grads if g is not None and g.numel()]
    if not present or torch.compiler.is_compiling():
        return
    # 16-bit gradients summed in float32: a finite float16 gradient whose sum overflows
    # 65504 took the exact path (more host reads) to find nothing.
    total = functools.reduce(operator.add, [
        g.detach().sum(dtype=torch.promote_types(g.dtype, torch.float32)) for _, g in present])
    if bool(torch.isfinite(total)):
        return
    upstream = _rows(~torch.isfinite(incoming.detach()), dims)
    parts, dtypes = [], []
    for name, g in present:
        bad = _rows(~torch.isfinite(g.detach()), dims)
        new = bad & ~_caused(upstream, bad.shape)
        if bool(new.any()):
            parts.append(f"{name} at {shown_indices(new.flatten())}")
            dtypes.append(g.dtype)
    if not parts:  # a NaN or Inf came in: torch's propagation, not ours to report
        return
    dtype = min(dtypes, key=lambda t: torch.finfo(t).max)
    advice = ("rescale the problem" if torch.finfo(dtype).max >= torch.finfo(torch.float64).max
              else "use float64 inputs")
    warn(
        f"{what}: the gradient with respect to {'; '.join(parts)} holds Inf or NaN "
        "although the inputs and the incoming gradient are finite there: the true "
        f"gradient (or a sum or product in its computation) exceeds the range of {dtype} "
        f"(largest {torch.finfo(dtype).max:.1e}); {advice}",
        GradientWarning,
    )
