"""Infeasibility decided without the objective, for an element its solvers could not decide.

Primal infeasibility of ``Ax + s = b, s ∈ K`` does not depend on the objective: a dual ray
``y ∈ K*`` with ``Aᵀy = 0`` and ``bᵀy < 0`` proves it whatever ``c`` is. A curved objective
can still keep both per-element solvers from finding one: clearly infeasible programs (margins
of 10 % to 100 %) with an exponential cone objective (``sum(exp(w x))``, ``-entr(t)``) and curved
constraints (a second-order cone ball with a halfspace beyond it, PSD, log-sum-exp, an
exponential cone), at data scales of 1e-4, 1e-2 or 1e4, ended in Clarabel's ``Failure`` and SCS
at its iteration limit, with no certificate or one that did not verify, while the same
constraints under a linear or quadratic objective gave a verified ray.

So where an element failed on every solver with no certificate that stands (:func:`~.dissent.judge`'s
verdict ``"other"``), :func:`infeasible_without_objective` solves its feasibility problem (the same
``A``, ``b`` and cones, ``c = 0``) with Clarabel, as the per-element path calls it, and believes an
infeasibility only with a ray exact to rounding (:func:`~.reach.exact_ray`, which verifies it):
such a ray has no reach, so no feasible program is called infeasible this way. A feasible point,
any other status, or a ray that is not exact leaves the element's failure as it was. Only this
failure path pays for it. (Unboundedness is not tried so: its certificate depends on the objective.)
"""
from __future__ import annotations

import diffcp
import numpy as np
import scipy.sparse as sp

from .reach import exact_ray
from .status import status_kind

__all__ = ["infeasible_without_objective"]


def infeasible_without_objective(backend, A: sp.csc_matrix, b: np.ndarray) -> bool:
    """Whether Clarabel, on the element's constraints alone (``c = 0``, the per-element backend's
    ``_solve_with``), claims infeasibility with a dual ray exact to rounding (:func:`~.reach.exact_ray`)."""
    try:
        _, y, _, status = backend._solve_with("Clarabel", {}, A, b, np.zeros(A.shape[1]))
    except (diffcp.SolverError, ValueError, RuntimeError, ArithmeticError):
        return False
    if status_kind(status) != "infeasible" or not np.all(np.isfinite(y)) or not np.any(y):
        return False
    return bool(exact_ray(A, b, backend._cones, y))
