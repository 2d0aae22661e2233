"""The warning for a gradient that overflows its dtype, shared by the closed-form
backward passes (least squares, the projections).

Their inputs are checked to be finite in the forward, so a NaN or Inf in a gradient
they return, with a finite incoming gradient, means that the true gradient (or a sum
or product formed on the way to it) exceeds the largest number of the dtype: float32
least squares with ``A ~ 1e-20`` (gradients ~1e40), an L2 sphere projection of radius
3e38. :func:`warn_gradient_overflow` says so, naming the batch elements; it costs one
sum per gradient and one host read when everything is finite.
"""
from __future__ import annotations

import functools
import operator
import warnings
from collections.abc import Sequence

import torch

from ..errors import GradientWarning
from .degeneracy import shown_indices

__all__ = ["warn_gradient_overflow"]


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
    stacklevel: int = 3,
) -> None:
    """Warn (:class:`~convexddn.errors.GradientWarning`) when a returned gradient holds
    NaN or Inf that the incoming gradient does not explain.

    Common path: one sum per gradient and one host read (a sum that overflows where no
    entry does only sends the call down the exact path, which then finds nothing).
    Skipped inside a compiled graph (no host read there).

    Args:
        what: the node's name, which starts the message.
        incoming: the gradient with respect to the node's output.
        grads: ``(input name, gradient or None)`` pairs, in the order named. Each is laid
            out like ``incoming`` (batch dims first, aligned from the right) so that
            reducing ``dims`` leaves one flag per batch element that broadcasts
            against ``incoming``'s.
        dims: the non-batch dims, negative (counted from the end); a gradient with
            fewer dims is reduced over those it has.
        stacklevel: passed to :func:`warnings.warn`.
    """
    present = [(name, g) for name, g in grads if g is not None and g.numel()]
    if not present or torch.compiler.is_compiling():
        return
    total = functools.reduce(operator.add, [g.detach().sum() for _, g in present])
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
    warnings.warn(
        f"{what}: the gradient with respect to {'; '.join(parts)} holds Inf or NaN "
        "although the inputs and the incoming gradient are finite there: the true "
        f"gradient (or a sum or product in its computation) exceeds the range of {dtype} "
        f"(largest {torch.finfo(dtype).max:.1e}); {advice}",
        GradientWarning,
        stacklevel=stacklevel,
    )
