"""The contract of a user's ``linear_solver`` for the implicit backward
(:class:`~convexddn.DeclarativeNode`, :mod:`convexddn.nodes.implicit`): its result,
checked before any gradient is formed from it."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DTypeError, ShapeError, SolverError
from .degeneracy import failed_indices, shown_indices

__all__ = ["checked_solver_result"]


def checked_solver_result(result: object, batch: int, m: int, r: int | None) -> tuple[Tensor, Tensor | None]:
    """A user ``linear_solver``'s ``(w (B, m), mu (B, r) or None)``, checked: the right
    structure, shapes and finite values (``r`` is None without constraints).

    Raises:
        DTypeError: not a pair of real floating-point tensors (``mu`` may be None without
            constraints).
        ShapeError: ``w`` or ``mu`` of the wrong shape.
        SolverError: NaN or Inf in the result (the gradient would be garbage).
    """
    what = "linear_solver must return (w, mu): w (B, m) and mu (B, r) (None without constraints)"
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise DTypeError(f"{what}, got {type(result).__name__}")
    w, mu = result
    if not isinstance(w, Tensor) or not (isinstance(mu, Tensor) or (mu is None and r is None)):
        raise DTypeError(f"{what}, got ({type(w).__name__}, {type(mu).__name__})")
    shapes = [("w", w, (batch, m))] + ([] if r is None else [("mu", mu, (batch, r))])
    for name, t, want in shapes:
        if tuple(t.shape) != want:
            raise ShapeError(f"{what}; {name} has shape {tuple(t.shape)}, expected {want}")
        if not t.is_floating_point():  # (an int64 w was used as is; a complex one failed in torch)
            raise DTypeError(f"{what}; {name} must be real floating point, got {t.dtype}")
    bad = ~torch.isfinite(w).all(-1)
    if mu is not None:
        bad = bad | ~torch.isfinite(mu).all(-1)
    if bool(bad.any()):
        indices = failed_indices(bad)
        raise SolverError(f"linear_solver returned NaN or Inf for {shown_indices(bad)}", indices=indices,
                          statuses=["non-finite"] * len(indices))
    return w, mu
