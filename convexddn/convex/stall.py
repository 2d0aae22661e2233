"""Has a refined KKT solve stalled? The backward's check that a small residual means a right answer.

:meth:`.kkt.KKTSystem.solve` refines against the exact (limit) system with the
regularised factorisation. The error contracts by :math:`\\rho = \\delta/(\\lambda +
\\delta)` per step along an eigendirection of the equality rows' Schur complement with
eigenvalue :math:`\\lambda`: where rows are nearly parallel (:math:`\\lambda \\sim d^2`;
rows 1e-6 apart: ρ = 1 − 1.7e-4) a step gains nothing, yet the residual, δ times the
missing part, is small (2e-7), and the backward accepted a gradient 1e3 times too small
without a warning. The error is then along the last correction :math:`c`: the step
:math:`\\tau c` that minimises :math:`\\lVert r - \\tau K c \\rVert_2` cuts the residual
to rounding, and :math:`|\\tau| \\lVert c \\rVert_\\infty` estimates the error (9.5e5 and
9.5e6 where rows 1e-6 and 1e-7 apart give solutions of 9.8e5 and 9.8e6). Where the
corrections wander along a null direction instead (an auxiliary variable that is not
unique: entmax through CVXPY's cone forms), :math:`K c \\approx 0` and no step cuts the
residual: not a stall. (Rows 1e-8 apart are singular to working precision, λ ~ eps:
:math:`K c` is rounding there too; the backward's probe finds those rows nearly
dependent, :func:`~.uniqueness.limit_inconsistency`, and a dense solve's error estimate
does not certify them, :func:`~.vjp._certify`: zeroed and warned.)
"""
from __future__ import annotations

import torch

__all__ = ["RATE_CAP", "STALL_ERROR", "STALL_FLOOR", "refinement_error", "stall_error"]

# Estimated error, relative to the solution, above which a stalled solve counts (the
# gradients' promised accuracy; the constrained MPC's derivative, refined to 2e-8, is 2e-6
# off) ...
STALL_ERROR = 1e-4
# ... tested only where the last correction was above this part of the solution (converged
# solves end at rounding; stalled ones at ~the solution's size).
STALL_FLOOR = 1e-10


# The largest contraction per step the estimate below takes from two corrections: ρ ≥ 1 (a correction
# as large as the one before, as at a rounding floor) counts as 0.99, an error of 99 corrections.
RATE_CAP = 0.99


def _inf(*vs: torch.Tensor) -> torch.Tensor:
    return torch.stack([v.flatten(1).abs().amax(1) if v[0].numel() else v.new_zeros(v.shape[0]) for v in vs]).amax(0)


def _dot(a, b) -> torch.Tensor:
    return sum((p * q).flatten(1).sum(1) for p, q in zip(a, b))


def stall_error(kkt, rhs, lim, point, step, size: torch.Tensor) -> torch.Tensor:
    """(B,) how far a refined solve's answer is estimated to be from the exact system's,
    where the refinement stalled (see the module docstring); 0 elsewhere.

    Args:
        kkt: the :class:`~.kkt.KKTSystem` (its ``residual`` and ``scaling``).
        rhs: ``(r_x, r_E, t)`` the scaled right-hand side; ``lim`` the exact limit rows.
        point, step: the answer and the last correction, each ``(x, z_E, ẑ)``.
        size: ``(B,)`` ‖(x, z)‖∞ of the answer (``z_I``, not ẑ).
    """
    none = torch.zeros_like(size)
    if step is None:
        return none
    move = _moved(kkt, step)
    if not bool((move > STALL_FLOOR * size).any()):  # (a host sync; the solve takes one a step)
        return none
    r = kkt.residual(*rhs, point, lim)
    kc = kkt.residual(*(torch.zeros_like(v) for v in rhs), step, lim)  # -K c
    tau = -_dot(r, kc) / _dot(kc, kc).clamp_min(torch.finfo(size.dtype).tiny)
    after = [p + tau.view(-1, *(1,) * (p.dim() - 1)) * q for p, q in zip(r, kc)]
    left = tau.abs() * move
    stalled = (_dot(after, after) <= 0.25 * _dot(r, r)) & (move > STALL_FLOOR * size) & (left > STALL_ERROR * size)
    return torch.where(stalled, left, none)


def _moved(kkt, step) -> torch.Tensor:
    """(B,) ‖(x, z_E, z_I)‖∞ of a correction ``(x, z_E, ẑ)``."""
    return _inf(step[0], step[1], step[2] if kkt.scaling is None else kkt.scaling.apply_inv(step[2]))


def refinement_error(kkt, prev, step, size: torch.Tensor) -> torch.Tensor:
    """(B,) the relative error of a refined answer as its last two corrections estimate it: where
    each step contracts the error by :math:`\\rho`, the last correction :math:`c_k` leaves
    :math:`\\rho/(1 - \\rho)\\,\\lVert c_k \\rVert`, with :math:`\\rho = \\lVert c_k \\rVert /
    \\lVert c_{k-1} \\rVert` (at most :data:`RATE_CAP`); 0 where no step was taken.

    The residual does not bound that error: relative to the right-hand side it is at most
    κ times smaller, and refinement stops at :data:`~.vjp_gates.BACKWARD_RTOL`. Measured
    (the error against a dense solve or a closed form): ``argmin u^4 − q u`` at u* = 10,
    residual 4e-10, corrections 5.4e-5, 4.6e-6, error 4.0e-7 (estimated 4.0e-7); u^2.5 at
    u* = 100 (ρ = 0.55) 3.8e-7 (6.4e-8); one element of a constrained MPC 2.7e-7 (3.2e-7, for
    the bench's cotangent); the n = 100 QP's elements 2e-12 to 3e-11 (3e-11 and below). It is
    an estimate, not a bound (6× under above; the iterate kept is the one of least residual,
    which may precede the last correction). Corrections along a direction
    the system leaves free (auxiliary variables that are not unique) read as an error too,
    which is why the backward only takes a better answer on this estimate's word
    (:func:`~.vjp._confirm`) and flags nothing.

    Args:
        kkt: the :class:`~.kkt.KKTSystem` (its ``scaling``).
        prev, step: the corrections before and at the last step, each ``(x, z_E, ẑ)`` (``prev``
            the first answer where one step was taken; ``step`` None: none).
        size: ``(B,)`` ‖(x, z)‖∞ of the answer (``z_I``, not ẑ).
    """
    if step is None:
        return torch.zeros_like(size)
    last, before = _moved(kkt, step), _moved(kkt, prev)
    tiny = torch.finfo(size.dtype).tiny
    rate = (last / before.clamp_min(tiny)).clamp(max=RATE_CAP)
    return last * rate / (1.0 - rate) / size.clamp_min(tiny)
