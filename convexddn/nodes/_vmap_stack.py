"""A node call under ``torch.func.vmap`` as the node's own call on the stacked batch.

The pooling solvers decide on the host from the values (when to stop, which start
wins, which rows to compact), which a vmap cannot batch (torch: "Cannot access data
pointer of Tensor that doesn't have storage"). Their sets are solved independently, so
a vmapped call is the call on the vmapped sets stacked along a new leading batch
dimension: :func:`stacked_under_vmap` unwraps the vmap's dimension, calls the node on
the stacked tensors and batches the result again (nested vmaps stack one level per
call). Autograd records the stacked call, so gradients flow through it as through the
batched call.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._autograd import batched_values
from ..errors import ProblemError

try:  # the innermost torch.func transform around a call (a torch without it: none)
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter as _innermost
except ImportError:  # pragma: no cover
    _innermost = None

__all__ = ["stacked_under_vmap"]


def stacked_under_vmap(name: str, x: torch.Tensor, alpha: Any, batch: list[int],
                       call: Callable[[torch.Tensor, Any], torch.Tensor],
                       again: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """``call(xs, al)`` on the vmapped values stacked, batched again by that vmap, where
    the innermost torch.func transform is a vmap that batches ``x`` or ``alpha``;
    ``None`` where none batches the values (no transform, or a vmap over tangents or
    cotangents: torch.func.jacfwd, jacrev).

    ``xs`` is ``x`` with the vmapped dimension first (expanded where only ``alpha`` is
    vmapped): ``call`` shifts the dimensions it pools by one. ``al`` is ``alpha`` with
    the vmapped dimension first and ones before its own shape, so that it broadcasts
    against the stacked output ``(size, *batch)`` as ``alpha`` did against ``batch``
    (the output's dimensions, to which the caller checked that it broadcasts); an
    unbatched ``alpha`` as it is. ``again()`` is the node's call on ``x`` and ``alpha`` as
    given, made where an outer vmap batches them but this one does not (it stacks them
    there).

    Raises:
        ProblemError: values batched by a vmap around another transform
            (``vmap(grad(f))``, ``vmap(jacfwd(f))``): that transform's wrappers sit
            between the vmap and the call, so the sets cannot be stacked here.
    """
    if _innermost is None or not torch._C._are_functorch_transforms_active():
        return None
    interpreter = _innermost()
    if not str(interpreter.key()).endswith("Vmap"):
        if batched_values(x) or batched_values(alpha):
            raise ProblemError(
                f"{name} does not run under a torch.func transform inside torch.func.vmap "
                "(e.g. vmap(grad(f)), vmap(jacfwd(f))): its solver decides on the host from the batched "
                "values; stack the sets along a batch dimension of x instead (they are solved "
                "independently) and differentiate that one call (torch.autograd, torch.func.jacfwd)")
        return None
    level, size = interpreter.level(), interpreter.batch_size()
    functorch = torch._C._functorch
    xs, x_dim = functorch._unwrap_batched(x, level)
    al, a_dim = functorch._unwrap_batched(alpha, level) if isinstance(alpha, torch.Tensor) else (alpha, None)
    with interpreter.lower():
        if x_dim is None and a_dim is None:  # batched by an outer vmap only: stacked there
            return again()
        xs = xs.movedim(x_dim, 0) if x_dim is not None else xs.expand(size, *xs.shape)
        if a_dim is not None:  # (size, 1, ..., *its shape), broadcasting to (size, *batch)
            al = al.movedim(a_dim, 0)
            shape = al.shape[1:] if batch else ()  # (without a batch: one value, of any shape)
            al = al.reshape(size, *[1] * (len(batch) - len(shape)), *shape)
        else:  # an unbatched alpha broadcasts to the stacked batch as it is
            al = alpha
        y = call(xs, al)
    return functorch._add_batch_dim(y, 0, level)
