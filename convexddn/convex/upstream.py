"""Incoming gradients that hold NaN or Inf (a fault upstream of the layer): one rule for
both paths' backward, :func:`zero_nonfinite`.

An element whose cotangent is not finite has no meaningful gradient. Its cotangent is
replaced by zero before any solve (the batched derivative system would otherwise call it
"not solved accurately", with a NaN residual, and the per-element adjoint returned NaN, or
numpy's overflow warning for Inf, silently), so its own gradient is exactly zero, a
parameter shared by the batch gets the other elements' sum (NaN there would hide every
element's contribution), and a :class:`~convexddn.errors.GradientWarning` names it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .._warn import warn
from ..errors import GradientWarning
from .status import element_list, name_elements

__all__ = ["zero_nonfinite"]


def zero_nonfinite(mode: str, where: tuple[Sequence[int], tuple[int, ...]] | None,
                   grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``grads`` (cotangents, each ``(B, ...)`` over the solve's ``B`` elements, or None)
    with every element where any of them holds NaN or Inf set to zero in all of them; a
    GradientWarning names those elements (``where``: their place in the caller's batch,
    see :func:`~.status.name_elements`; ``mode`` opens the message). One host sync."""
    present = [g for g in grads if g is not None and g.dim() > 0]
    if not present:
        return list(grads)
    bad = torch.stack([~torch.isfinite(g.unsqueeze(-1)).flatten(1).all(1) for g in present]).any(0)  # (B,)
    idx = torch.nonzero(bad).squeeze(1).tolist()
    if not idx:
        return list(grads)
    warn(f"ConvexLayer {mode}: the incoming gradient (of the loss with respect to the outputs) holds NaN or "
         f"Inf for {len(idx)} batch element(s) ({name_elements(where, idx)}): a fault upstream of the layer; "
         "their gradient is set to zero (a parameter shared by the batch gets the other elements' sum)",
         GradientWarning, elements=element_list(where, idx))
    return [g if g is None or g.dim() == 0 else torch.where(bad.view((-1,) + (1,) * (g.dim() - 1)), 0.0, g)
            for g in grads]
