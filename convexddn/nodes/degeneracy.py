"""The warnings of a degenerate implicit derivative, one text per degeneracy, on every
path (:mod:`.linear_solvers`' dense and CG solves, the native nodes' own backward passes):
a singular KKT system, dependent active constraints, an ill-conditioned system; and how
they name batch elements."""
from __future__ import annotations

import warnings

import torch

from ..errors import GradientWarning

__all__ = ["shown_indices", "warn_degenerate"]

Tensor = torch.Tensor
_MAX_INDICES_SHOWN = 8


def shown_indices(mask: Tensor) -> str:
    """Format the first few flat batch indices where ``mask`` is true (one host sync)."""
    idx = torch.nonzero(mask).flatten()
    shown = idx[:_MAX_INDICES_SHOWN].tolist()
    more = ", ..." if idx.numel() > _MAX_INDICES_SHOWN else ""
    return f"{idx.numel()} of {mask.numel()} batch element(s) (flat indices {shown}{more})"


def warn_degenerate(
    singular: Tensor,
    dependent: Tensor | None,
    ill: Tensor,
    cond: Tensor | None,
    stacklevel: int,
    not_minimum: Tensor | None = None,
) -> None:
    """The one warning text per degeneracy of the KKT system, on every path (and, where
    the KKT matrix's inertia is known, ``not_minimum``: a stationary point that is not
    a minimiser)."""
    if not_minimum is not None and bool(not_minimum.any()):
        warnings.warn(
            f"solve returned a stationary point that is not a minimiser for "
            f"{shown_indices(not_minimum)}: the Hessian of the Lagrangian has negative "
            "curvature along the active constraints' tangent space (a saddle point or a "
            "maximiser), so the gradient is this point's, not that of the argmin the node "
            "declares; check solve (or the objective's sign)",
            GradientWarning,
            stacklevel=stacklevel + 1,
        )
    if bool(singular.any()):
        warnings.warn(
            "the KKT system of the implicit derivative is singular for "
            f"{shown_indices(singular)}: the solution is not locally unique (a flat "
            "objective, a symmetry, or a Hessian singular on the constraints' tangent "
            "space), so its derivative does not exist; the gradient uses the "
            "minimum-norm least-squares (pseudo-inverse) solution (Gould et al. 2021, "
            "§4.7.4)",
            GradientWarning,
            stacklevel=stacklevel + 1,
        )
    if dependent is not None:
        dependent = dependent & ~singular
        if bool(dependent.any()):
            warnings.warn(
                "the active constraints are linearly dependent for "
                f"{shown_indices(dependent)}: the KKT system is singular and the "
                "multipliers are not unique, so the derivative with respect to data "
                "that enters only the constraints is not unique either; the gradient "
                "uses the minimum-norm multipliers (drop redundant constraints to "
                "silence this)",
                GradientWarning,
                stacklevel=stacklevel + 1,
            )
    ill = ill & ~singular
    if bool(ill.any()):
        worst = "" if cond is None else (
            f" (condition number up to {float(torch.where(ill, cond, 0).amax()):.1e})"
        )
        warnings.warn(
            f"the KKT system of the implicit derivative is ill-conditioned{worst} for "
            f"{shown_indices(ill)}: the solution is close to non-unique and the gradient "
            "is very sensitive to the data and to the accuracy of solve",
            GradientWarning,
            stacklevel=stacklevel + 1,
        )
