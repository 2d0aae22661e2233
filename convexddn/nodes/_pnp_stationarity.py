"""Is the pose that PnP's forward returned stationary enough for its implicit derivative?

The backward (and forward-mode) derivative :math:`d\\theta = -H^{-1} B\\,dx` differentiates
the optimality condition :math:`\\nabla_\\theta f(\\theta, x) = 0`; at a pose that stops short
of it (a loose ``tol``, ``max_iter`` reached) it is the derivative of the minimiser's map
evaluated at another point, not the derivative of the map the forward computes: with Huber
at ``tol=0.1`` the pose stopped 0.09 from the minimiser and a directional derivative came
back as -3.46 against 7.58 (finite differences), silently.

The error estimate is one Newton step, :math:`\\delta = H^{-1} \\nabla_\\theta f` with the
Hessian the derivative solves with anyway (the distance to the stationary point, to first
order), measured relative to the pose as :class:`~.declarative.DeclarativeNode`'s
stationarity check measures ``y``'s error (:func:`~.step_error.newton_step_error`: ``δ``
against ``‖θ‖``, less what the gradient's rounding makes), against the same level,
:func:`~.optimality.default_solution_tol` of the caller's dtype.
"""
from __future__ import annotations

import torch

from .._warn import warn
from ..errors import GradientWarning
from .degeneracy import failed_indices, shown_indices
from .multipliers import scaled_norm
from .step_error import _ROUNDING, _step_error

__all__ = ["stationarity_error", "warn_stationarity"]

Tensor = torch.Tensor


def stationarity_error(theta: Tensor, g: Tensor, H: Tensor, singular: Tensor, level: float) -> Tensor:
    """``(B,)`` the pose's relative error ``‖H⁻¹ ∇_θf‖ / ‖θ‖`` as its Newton step estimates it.

    ``theta``, ``g = ∇_θ f`` ``(B, 6)``, ``H`` ``(B, 6, 6)`` at the pose; ``singular`` ``(B,)``:
    elements whose Hessian :func:`~.dense.checked_solve` called singular (no step: 0 here, their
    own warning says the derivative does not exist). The gradient's rounding level is
    ``8 eps (‖H‖ ‖θ‖ + ‖∇_θ f‖)``, the scale of :func:`~.optimality.kkt_residuals` for an
    unconstrained problem (``‖H‖`` Frobenius); a step that only rounding makes scores at most
    ``level`` (:func:`~.step_error._step_error`). Batched, no host sync.
    """
    eps = torch.finfo(theta.dtype).eps
    # (the 6x6 solve is the backward's own system; singular elements solve with I instead:
    # their step is discarded, and LU of a singular matrix fails)
    eye = torch.eye(6, dtype=H.dtype, device=H.device)
    step = torch.linalg.solve_ex(torch.where(singular[:, None, None], eye, H), g)[0]
    dy, rn, y_norm = scaled_norm(torch.stack([step, g, theta], 0)).unbind(0)  # (one reduction for the three)
    nu = _ROUNDING * eps * (scaled_norm(H.flatten(1)) * y_norm + rn)
    err = _step_error(dy, rn, nu, y_norm, level)
    # (not finite: a non-finite Hessian or gradient is no evidence of stationarity)
    return torch.where(singular, 0.0, torch.where(torch.isfinite(err), err, torch.inf))


def warn_stationarity(theta: Tensor, g: Tensor, H: Tensor, singular: Tensor, level: float, tol: float) -> None:
    """A :class:`~convexddn.errors.GradientWarning` naming the elements (in the caller's batch
    shape within :func:`~.degeneracy.naming_batch`) whose pose is off stationarity by more than
    ``level`` (:func:`stationarity_error`): there the implicit gradient is not the derivative of
    the returned pose. ``tol``: the solve's step tolerance, which the message names. One host sync."""
    err = stationarity_error(theta, g, H, singular, level)
    off = err > level
    if not bool(off.any()):
        return
    worst = float(err.amax())
    warn(f"pnp: the pose is not stationary for {shown_indices(off)}: one Newton step -H⁻¹∇f from it moves it by "
         f"up to {worst:.2e} of its norm (above {level:g}), so the implicit gradient, which assumes "
         f"∇f = 0, is not the derivative of the returned pose (tol={tol:g} let the solve stop there: a smaller tol, "
         "or the default, lets it reach the stationary pose; where max_iter was reached, a larger max_iter)",
         GradientWarning, elements=failed_indices(off))
