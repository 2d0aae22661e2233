"""A user's ``linear_solver`` judged by the system it was given (:class:`~.implicit_system.ImplicitSystem`).

:func:`~.solver_result.checked_solver_result` checks the answer's shapes and finite values;
:func:`checked_custom_solve` checks that it solves

.. math::

    \\begin{bmatrix} H & A^\\top \\\\ A & D \\end{bmatrix}
    \\begin{bmatrix} w \\\\ \\mu \\end{bmatrix}
    = \\begin{bmatrix} v \\\\ 0 \\end{bmatrix}

(one more Hessian-vector product and two products with ``A``, batched), and where it does
not, solves those elements again with the built-in solver (``"auto"``) and says so. A CG
truncated at 5 iterations (condition 1e3) gave a gradient 1.6 off (relative), silently.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .._warn import warn
from ..errors import GradientWarning
from .degeneracy import shown_indices
from .linear_solvers import _default_cg_tol
from .multipliers import scaled_norm

__all__ = ["checked_custom_solve", "kkt_residual"]

Tensor = torch.Tensor


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, 0 where ``num`` is 0 (an exact answer of a zero system: ``v = 0``)."""
    return torch.where(num > 0, num / den.clamp_min(torch.finfo(num.dtype).tiny), 0.0)


def kkt_residual(hvp: Callable[[Tensor], Tensor], A: Tensor | None, inactive: Tensor | None, v: Tensor,
                 w: Tensor, mu: Tensor | None) -> Tensor:
    """``(B,)`` the relative residual of ``(w, mu)`` in the KKT system above: the largest of

    - stationarity, :math:`\\|Hw + A^\\top\\mu - v\\| / (\\|Hw\\| + \\sum_j |\\mu_j|\\|a_j\\| + \\|v\\|)`:
      the residual against the size of the terms it sums (a normwise backward error, at most
      the relative residual :math:`\\|r\\|/\\|v\\|` by which the built-in CG stops, so whatever
      it accepts passes; a backward-stable direct solve passes also where the system is
      ill-conditioned). Scaling the objective (``H``, ``w`` by ``s``, ``1/s``) or a constraint
      (``a_j``, ``μ_j`` by ``s``, ``1/s``) leaves it as it is;
    - feasibility of each active row, :math:`|a_j^\\top w| / (\\|a_j\\|\\|w\\|)` (the cosine of
      ``w`` with the row: dimensionless, whatever the constraint's scale);
    - the inactive rows' multipliers, pinned to 0 by ``D``, against all of ``μ``:
      :math:`\\|\\mu_{inactive}\\| / \\|\\mu\\|` (they enter the gradient as :math:`\\mu_j D_x c_j`).
    """
    Hw = hvp(w.unsqueeze(0))[0]
    r = Hw - v
    scale = scaled_norm(Hw) + scaled_norm(v)
    worst = torch.zeros_like(scale)
    if A is not None:
        r = r + (A.transpose(1, 2) @ mu.unsqueeze(-1)).squeeze(-1)
        rows = scaled_norm(A)  # (B, r): each row's norm (inactive rows are zero)
        scale = scale + (mu.abs() * rows).sum(-1)
        Aw = (A @ w.unsqueeze(-1)).squeeze(-1).abs()
        worst = _ratio(Aw, rows * scaled_norm(w).unsqueeze(-1)).amax(-1)
        if inactive is not None:
            worst = torch.maximum(worst, _ratio(scaled_norm(torch.where(inactive, mu, 0.0)), scaled_norm(mu)))
    return torch.maximum(worst, _ratio(scaled_norm(r), scale))


def checked_custom_solve(hvp: Callable[[Tensor], Tensor], A: Tensor | None, inactive: Tensor | None, v: Tensor,
                         w: Tensor, mu: Tensor | None, fallback, who: str = "") -> tuple[Tensor, Tensor | None]:
    """``(w, mu)``, a user solver's answer, where its :func:`kkt_residual` is within the built-in
    CG's own tolerance (``1e-10`` in float64, ``1e-5`` in float32: :func:`~.linear_solvers.solve_kkt_cg`'s
    default ``tol``, one source); elsewhere the answer of ``fallback`` (the built-in ``"auto"``
    solver, with its own checks and warnings), and a :class:`~convexddn.errors.GradientWarning`
    naming those elements, with the worst residual. One host sync where all pass.

    Falling back rather than only warning: the answer is known not to solve the system, so its
    gradient is wrong by up to the condition number times the residual (1.6 relative at 0.1), and
    the built-in solve costs what a node's backward costs anyway (dense where small, CG within
    the dense solve's time otherwise: :func:`~.linear_solvers.resolve_linear_solver`); a warning
    alone would hand back a gradient known to be wrong. It solves the whole batch, the elements
    that passed with a zero right-hand side: its degeneracy warnings then name elements in the
    caller's batch, and are about their systems, whatever solver answered them.
    """
    work = v.dtype  # (the system's dtype: a user's float32 answer is judged, and replaced, in it)
    w = w.to(work)
    mu = None if mu is None else mu.to(work)
    tol = _default_cg_tol(work)
    res = kkt_residual(hvp, A, inactive, v, w, mu)
    bad = ~(res <= tol)  # (NaN: no answer either)
    if not bool(bad.any()):
        return w, mu
    worst = float(res[bad].amax())
    w_b, mu_b = fallback(hvp, A, inactive, torch.where(bad.unsqueeze(-1), v, 0.0))
    w = torch.where(bad.unsqueeze(-1), w_b, w)
    mu = None if mu is None else torch.where(bad.unsqueeze(-1), mu_b, mu)
    warn(f"{who}the custom linear_solver's answer does not solve the KKT system it was given for "
         f"{shown_indices(bad)}: relative residual {worst:.2e} > tol={tol:g} (the built-in conjugate "
         "gradients' tolerance); their gradients would be off by up to the system's condition number times "
         "that, so those elements were solved again by the built-in solver (linear_solver='auto')",
         GradientWarning)
    return w, mu
