"""What a declarative node takes and what its ``solve`` returns: checks and flattening.

:class:`~.declarative.DeclarativeNode` flattens its inputs' leading ``batch_dims``
dimensions into one batch dimension ``B`` before solving, and checks the user's
``solve`` output against that batch before any backward can run.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .._checks import check_finite, check_tensor
from ..errors import DTypeError, InputError, ShapeError

__all__ = ["checked_solution", "flatten_inputs", "input_names"]

Tensor = torch.Tensor


def input_names(count: int) -> list[str]:
    """How messages name a node's ``count`` inputs: ``x`` alone, else ``input 0``, ``input 1``, ..."""
    return ["x"] if count == 1 else [f"input {i}" for i in range(count)]


def flatten_inputs(xs: tuple[Any, ...], batch_dims: int,
                   names: list[str] | None = None) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
    """Check the inputs (floating, finite, one dtype and device, one batch shape) and
    flatten their first ``batch_dims`` dimensions. Messages name them by ``names`` (the
    node's ``solve`` parameters), else as :func:`input_names` does.

    Shape:
        ``xs[i]``: ``(*batch_shape, *rest_i)`` -> ``(B, *rest_i)`` with ``B = prod(batch_shape)``.

    Returns:
        ``(flat inputs, batch_shape)``.
    """
    names = names or input_names(len(xs))
    xs = tuple(check_tensor(n, x) for n, x in zip(names, xs))
    for n, x in zip(names, xs):
        check_finite(n, x)
    first = xs[0]
    for n, x in zip(names[1:], xs[1:]):
        if x.dtype != first.dtype:
            raise DTypeError(
                f"all inputs must have one dtype: {names[0]} is {first.dtype}, {n} is {x.dtype}"
            )
        if x.device != first.device:
            raise InputError(
                f"all inputs must be on one device: {names[0]} is on {first.device}, {n} on "
                f"{x.device}"
            )
    k = batch_dims
    for n, x in zip(names, xs):
        if x.ndim < k:
            raise ShapeError(
                f"{n} must have at least batch_dims={k} dimension(s) (the batch "
                f"dimensions first), got shape {tuple(x.shape)}"
            )
    batch_shape = tuple(first.shape[:k])
    for n, x in zip(names[1:], xs[1:]):
        if tuple(x.shape[:k]) != batch_shape:
            raise ShapeError(
                f"every input must have the batch shape of {names[0]}, {batch_shape} (its "
                f"first batch_dims={k} dimension(s)); {n} has shape {tuple(x.shape)}"
            )
    batch = math.prod(batch_shape)
    return tuple(x.reshape((batch,) + tuple(x.shape[k:])) for x in xs), batch_shape


def checked_solution(name: str, y: Any, xs: tuple[Tensor, ...]) -> Tensor:
    """``y`` from the user's ``solve`` (named ``name``), checked against the flat inputs
    ``xs``: a tensor of their dtype and device with the batch first, detached, and a
    fresh copy that shares memory with nothing.

    Always copied: ``solve`` may return an input (autograd would take y for that
    input), a view of a parameter (``self.c.expand(B, 3)``), a preallocated buffer it
    refills at every call (``self.out.copy_(x)``) or a cached tensor; the next call
    would then overwrite this output and the tensors saved for its backward. Telling a
    fresh tensor apart needs its reference counts (no public API, and a tensor returned
    as is shares its TensorImpl with the module attribute), while one copy of the
    output costs O(size of y), far below any solve that produces it.

    Raises:
        DTypeError: not a tensor (a tuple gets a hint), or another dtype.
        ShapeError: the first dimension is not the batch.
        InputError: on another device than the inputs.
    """
    if not isinstance(y, torch.Tensor):
        hint = " (return y alone: multipliers are recovered by eq. 25)" if isinstance(
            y, tuple) else ""
        raise DTypeError(f"{name} must return a torch.Tensor, got {type(y).__name__}{hint}")
    if y.dtype != xs[0].dtype:
        raise DTypeError(f"{name} must return the inputs' dtype ({xs[0].dtype}), got {y.dtype}")
    batch = xs[0].shape[0]
    if y.ndim == 0 or y.shape[0] != batch:
        raise ShapeError(
            f"{name} must return shape (B, ...) with B = {batch} (the batch dimension "
            f"first), got {tuple(y.shape)}"
        )
    if y.device != xs[0].device:
        raise InputError(
            f"{name} must return a tensor on the inputs' device ({xs[0].device}), got "
            f"one on {y.device}"
        )
    return y.detach().clone()
