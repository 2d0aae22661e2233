"""How far ``y`` is from the solution that a residual of its optimality conditions implies:
the Newton step of the residual, measured against ``‖y‖`` (:func:`newton_step_error`).

:func:`~.optimality.kkt_residuals` divides each residual by the problem's scale, which
its largest terms set: an offset in the data (``‖B‖‖x‖``, ``‖∇_y f‖``), a stiff term or a
large multiplier (``‖H‖``). An error along a direction that those terms do not measure
(a weakly curved coordinate beside a stiff one) then scores far below its size; the step
of the KKT system for the residual is invariant to them. It costs a solve, done only where
the residual is above rounding and the scale or a coordinate's own curvature
(:func:`coordinate_reach`) says that the step could exceed ``tol``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .krylov import pseudo_random_directions
from .multipliers import scaled_norm

__all__ = ["coordinate_reach", "newton_step_error", "offset_checked"]

Tensor = torch.Tensor

# Residual of a correctly rounded solution, in eps of its scale (sums of a few terms).
_ROUNDING = 8.0


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    tiny = torch.finfo(num.dtype).tiny
    return torch.where(num > 0, num / den.clamp_min(tiny), torch.zeros_like(num))


def _above(residual: Tensor, noise: Tensor) -> Tensor:
    """What of ``residual`` exceeds its rounding level ``noise`` (0 below it)."""
    return (residual - noise).clamp_min(0.0)


def newton_step_error(step: Callable[[Tensor], Tensor], r: Tensor, y: Tensor, curvature: Tensor, scale: Tensor,
                      noise: Tensor, stationarity: Tensor, tol: float, eps: float,
                      reach: Tensor | None = None) -> Tensor:
    """``stationarity`` (B,), raised to ``y``'s relative error where the scale hid it.

    The scale of :func:`~.optimality.kkt_residuals` includes ``‖B‖‖x‖`` and ``‖∇_y f‖``, which a
    common offset in the inputs or the prices inflates without making ``y`` any less
    determined: at coordinates ~5e6, a solve of ``argmin_u Σ wᵢ(u + r − pᵢ)²`` off by
    0.5 scored 1e-7 and passed. The Newton step ``δy`` of the KKT system for the residual,

    .. math::

        \\begin{bmatrix} H & A^\\top \\\\ A & 0 \\end{bmatrix}
        \\begin{bmatrix} \\delta y \\\\ \\delta\\lambda \\end{bmatrix}
        = \\begin{bmatrix} r \\\\ 0 \\end{bmatrix},

    estimates ``y``'s error and is invariant to those offsets; it is measured against
    ``‖y‖``, or, where ``y`` is ~0, against the step that a residual at the rounding
    level ``ν = 8 eps · scale`` makes: ``‖δy‖ (1 − ν/‖r‖)₊ / max(‖y‖, ‖δy‖ ν / (tol ‖r‖))``
    (a rounding-level residual scores at most ``tol``). The solve is done only where
    ``‖r‖ / (‖H u‖ ‖y‖)`` (the step's size from the probe's curvature) exceeds ``tol``
    and the other terms make up more than half the scale, or where ``reach`` (B,), the
    step's size estimated coordinate by coordinate (:func:`coordinate_reach`), scores above
    ``tol`` as the step would: otherwise the scale measures ``y``'s error already.
    ``curvature``: ``‖H u‖ ‖y‖`` (B,).
    """
    return offset_checked(stationarity, r, y, curvature, scale, noise, tol, eps, step, reach)


def coordinate_reach(r: Tensor, hu: Tensor | None, m: int) -> Tensor | None:
    """``(B,)`` ``‖r_i / c_i‖``: the Newton step of the residual ``r`` (B, m), coordinate by
    coordinate, with ``c_i = |(H u)_i| / max|u|`` the curvature that the probe ``H u`` shows
    along ``y_i`` (at most the row's ``‖H_i‖₁``; 0 where it shows none: an infinite reach).

    ``‖H u‖`` is the largest curvature's: a stiff term (``k (y₀ − x₀)²`` at ``k = 1e6``) or
    a large multiplier made ``‖H u‖ ‖y‖`` so large that a solve 0.1 off along a weakly
    curved coordinate scored 2e-7 and passed, its gradient 15 % off. Each coordinate's
    residual against its own curvature sees it; ``None`` without a probe (``H = 0``).
    """
    if hu is None:
        return None
    u = pseudo_random_directions(m, 1, r.dtype, r.device)
    c = hu.detach().abs() / u.abs().amax()
    return scaled_norm(torch.where(r == 0, 0.0, r.abs() / c))


def offset_checked(score: Tensor, residual: Tensor, y: Tensor, own: Tensor, scale: Tensor, noise: Tensor,
                   tol: float, eps: float, step: Callable[[Tensor], Tensor], reach: Tensor | None = None) -> Tensor:
    """``score`` (B,), raised to ``‖δy‖`` relative to ``y`` where the scale's terms other than
    ``own`` (the part that ``y``'s own size makes) dominate and ``residual`` (B, k) could
    still mean a step above ``tol``, or where ``reach`` (B,), an estimate of the step, scores
    above ``tol``: ``δy = step(residual)`` on those elements only (see :func:`newton_step_error`)."""
    nu = torch.maximum(_ROUNDING * eps * scale, noise)
    rn = scaled_norm(residual)
    y_norm = scaled_norm(y)
    above = _above(rn, nu)
    suspect = (above > tol * own) & (scale > 2 * own)
    if reach is not None:
        # (not <= tol: a coordinate without curvature in the probe has an infinite reach, scored NaN)
        suspect = suspect | ((above > 0) & ~(_step_error(reach, rn, nu, y_norm, tol) <= tol))
    if not bool(suspect.any()):
        return score
    # (scaled: a step of 5e154 had its squares overflow, its score inf / inf = NaN, which passed)
    dy = scaled_norm(step(torch.where(suspect.unsqueeze(-1), residual, 0.0)))
    return torch.where(suspect, torch.maximum(score, _step_error(dy, rn, nu, y_norm, tol)), score)


def _step_error(dy: Tensor, rn: Tensor, nu: Tensor, y_norm: Tensor, tol: float) -> Tensor:
    """``(B,)`` the step ``dy`` of a residual of norm ``rn`` as ``y``'s relative error, less what its
    rounding ``nu`` makes (see :func:`newton_step_error`)."""
    safe = rn.clamp_min(torch.finfo(rn.dtype).tiny)
    length = torch.maximum(y_norm, dy * nu / (tol * safe))
    return _ratio(dy * (1.0 - nu / safe).clamp_min(0.0), length)
