"""Incoming gradients (and forward-mode tangents) that hold NaN or Inf (a fault upstream
of the layer): one rule for both paths, :func:`split_nonfinite` then :func:`poison`.

An element whose cotangent is not finite gets NaN gradients, as torch propagates it: a
parameter of its own gets NaN in that element's entries, and a parameter shared by the
batch (broadcast over it) gets NaN in its sum, since that element's contribution is NaN.
This is what ``torch.amp.GradScaler`` relies on: an fp16 overflow of the loss's gradient
in one element must reach the parameters, so that the scaler skips the step and lowers its
scale. The other elements' gradients are exact (as if the bad element were not in the batch).

The solves never see the NaN: the bad elements' cotangents are replaced by zero before any
solve (the batched derivative system mixes elements in its checks and would call the system
"not solved accurately", with a NaN residual; the per-element adjoint returned NaN, or
numpy's overflow warning for Inf), and their gradients are set to NaN after it, before
autograd reduces them over the batch dimensions that a shared parameter broadcast along.
Forward mode likewise: a tangent of the data that holds NaN or Inf in an element makes that
element's output tangents NaN.

Silent, as torch, cvxpylayers' layer and the native nodes are: the NaN is the caller's, and
a GradScaler run overflows routinely (a warning at every such step would be noise).
Until 2026-12-06 the bad elements' gradients were zeroed under a GradientWarning, which hid
the overflow from the scaler (docs/which-path.md).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["split_nonfinite", "poison"]


def _rows(bad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The ``(B,)`` mask ``bad`` shaped to broadcast against ``g`` ``(B, ...)``."""
    return bad.view((-1,) + (1,) * (g.dim() - 1))


def split_nonfinite(grads: Sequence[torch.Tensor | None]
                    ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """``(finite, bad)``: ``grads`` (cotangents or tangents, each ``(B, ...)`` over the
    solve's ``B`` elements, or None) with every element where any of them holds NaN or Inf
    set to zero in all of them, and the ``(B,)`` mask of those elements (None where no
    tensor has a batch dimension). Give the solve ``finite`` and hand its results to
    :func:`poison` with ``bad``. No host sync."""
    present = [g for g in grads if g is not None and g.dim() > 0]
    if not present:
        return list(grads), None
    bad = torch.stack([~torch.isfinite(g.unsqueeze(-1)).flatten(1).all(1) for g in present]).any(0)  # (B,)
    return [g if g is None or g.dim() == 0 else torch.where(_rows(bad, g), 0.0, g) for g in grads], bad


def poison(bad: torch.Tensor | None, results: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``results`` (per-element gradients or tangents, each ``(B, ...)``, or None) with the
    ``bad`` elements (:func:`split_nonfinite`) set to NaN in all of them: call it on the
    per-element results, before any reduction over the batch (autograd's, for a shared
    parameter), so that a shared parameter's sum is NaN, as torch gives. No host sync."""
    if bad is None:
        return list(results)
    return [r if r is None or r.dim() == 0 else torch.where(_rows(bad.to(r.device), r), math.nan, r)
            for r in results]
