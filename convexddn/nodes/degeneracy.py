"""The warnings of a degenerate implicit derivative, one text per degeneracy, on every
path (:mod:`.linear_solvers`' dense and CG solves, the native nodes' own backward passes):
a singular KKT system, dependent active constraints, an ill-conditioned system; and how
they name batch elements."""
from __future__ import annotations

import torch

from .._generic import generic_vector
from .._warn import warn
from ..errors import GradientWarning
from .dense import default_rcond
from .krylov import independent_rows

__all__ = ["dependence_reaches_data", "dependent_to_warn", "shown_indices", "warn_degenerate"]

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
    not_minimum: Tensor | None = None,
) -> None:
    """The one warning text per degeneracy of the KKT system, on every path (and, where
    the KKT matrix's inertia is known, ``not_minimum``: a stationary point that is not
    a minimiser)."""
    if not_minimum is not None and bool(not_minimum.any()):
        warn(
            f"solve returned a stationary point that is not a minimiser for "
            f"{shown_indices(not_minimum)}: the Hessian of the Lagrangian has negative "
            "curvature along the active constraints' tangent space (a saddle point or a "
            "maximiser), so the gradient is this point's, not that of the argmin the node "
            "declares; check solve (or the objective's sign)",
            GradientWarning,
        )
    if bool(singular.any()):
        warn(
            "the KKT system of the implicit derivative is singular for "
            f"{shown_indices(singular)}: the solution is not locally unique (a flat "
            "objective, a symmetry, or a Hessian singular on the constraints' tangent "
            "space), so its derivative does not exist; the gradient uses the "
            "minimum-norm least-squares (pseudo-inverse) solution (Gould et al. 2021, "
            "§4.7.4)",
            GradientWarning,
        )
    if dependent is not None:
        dependent = dependent & ~singular
        if bool(dependent.any()):
            warn(
                "the active constraints are linearly dependent for "
                f"{shown_indices(dependent)}: the KKT system is singular and the "
                "multipliers are not unique, so the derivative with respect to data "
                "that enters only the constraints is not unique either; the gradient "
                "uses the minimum-norm multipliers (drop redundant constraints to "
                "silence this)",
                GradientWarning,
            )
    ill = ill & ~singular
    if bool(ill.any()):
        worst = "" if cond is None else (
            f" (condition number up to {float(torch.where(ill, cond, 0).amax()):.1e})"
        )
        warn(
            f"the KKT system of the implicit derivative is ill-conditioned{worst} for "
            f"{shown_indices(ill)}: the solution is close to non-unique and the gradient "
            "is very sensitive to the data and to the accuracy of solve",
            GradientWarning,
        )


def dependence_reaches_data(c: Tensor, A: Tensor, inactive: Tensor, inputs: tuple[Tensor, ...],
                            params: tuple[Tensor, ...]):
    """``dependent (B,) -> (B,)``: of the elements with dependent active constraints, those
    whose gradient is not unique (a ``warn_dependent`` for the linear solvers).

    The multipliers are unique only up to ν with Aᵀν = 0 (a combination of the active
    constraints whose y-gradients cancel: the null rows of
    :func:`~.krylov.independent_rows`); the data's gradient moves along such ν by
    νᵀ ∂c/∂θ, which is 0 where the redundancy holds for every θ (h and 2h: the gradient
    is unique, and a warning said it was not). Runs only where dependence was found:
    one vjp of the constraints ``c`` per constraint row.
    """
    def reaches(dependent: Tensor) -> Tensor:
        batch, r = A.shape[0], A.shape[1]
        _, pin, T, _ = independent_rows(A, inactive, default_rcond(A.shape[-1] + r, A.dtype))
        null = pin.diagonal(dim1=-2, dim2=-1) > 0  # (B, r) the null columns of T
        # An inactive row's multiplier is pinned to 0: no free direction there (its unit
        # vector shares the null space, and eigh may mix it in).
        N = T * (~inactive).unsqueeze(-1).to(T.dtype)
        # A shared parameter's vjp sums over the batch: generic weights per element keep
        # one element's component from cancelling another's (deterministic: no RNG use).
        weight = (1.0 + 0.5 * generic_vector(batch, A.dtype, A.device)).unsqueeze(-1)
        norms = []  # (B,) size of ν_jᵀ ∂c/∂θ over every data tensor, per column j
        for j in range(r):
            grads = torch.autograd.grad(c, inputs + params, N[..., j] * weight, retain_graph=True,
                                        allow_unused=True)
            norm = A.new_zeros(batch)
            for i, g in enumerate(grads):
                if g is not None:
                    part = g.reshape(batch, -1).abs().amax(-1) if i < len(inputs) else g.abs().amax().expand(batch)
                    norm = torch.maximum(norm, part)
            norms.append(norm)
        norms = torch.stack(norms, -1)  # (B, r)
        moved = (null & (norms > 1e-8 * norms.amax(-1, keepdim=True))).any(-1)
        return dependent & moved
    return reaches


def dependent_to_warn(dependent: Tensor | None, warn_dependent) -> Tensor | None:
    """The dependent-constraints mask to warn about: none (``warn_dependent`` False), all,
    or, for a callable (:func:`dependence_reaches_data`'s), those it keeps (called only
    where some element is dependent)."""
    if dependent is None or not warn_dependent:
        return None
    if callable(warn_dependent) and bool(dependent.any()):
        return warn_dependent(dependent)
    return dependent
