"""The result of the batched interior-point method (:func:`~.interior_point.solve_cone_batch`):
each element's point, status, residual and error estimate, and what the backward needs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .consistent_rows import DISAGREEMENT
from .equilibration import Scaled
from .kkt import KKTSystem

__all__ = ["DUAL_INFEASIBLE", "EXACT_RAY", "INCONSISTENT", "MAX_ITERATIONS", "NUMERICAL", "PRIMAL_INFEASIBLE",
           "RUNNING", "SOLVED", "STATUS_NAMES", "ConeSolution"]

RUNNING, SOLVED, PRIMAL_INFEASIBLE, DUAL_INFEASIBLE, MAX_ITERATIONS, NUMERICAL = -1, 0, 1, 2, 3, 4
# Unbounded along a ray exact to rounding (rays.exact_unbounded_ray): no other solver is asked.
EXACT_RAY = 5
# Dependent equality rows whose right-hand sides disagree beyond tolerance (.consistent_rows).
INCONSISTENT = 6
STATUS_NAMES = {
    SOLVED: "solved",
    PRIMAL_INFEASIBLE: "primal infeasible",
    DUAL_INFEASIBLE: "dual infeasible (unbounded)",
    MAX_ITERATIONS: "max iterations",
    NUMERICAL: "numerical trouble",
    EXACT_RAY: "dual infeasible (unbounded along a ray exact to rounding)",
    INCONSISTENT: DISAGREEMENT,
}


@dataclass
class ConeSolution:
    """Per-element result of :func:`~.interior_point.solve_cone_batch` (original, unscaled units).

    ``x, s, z`` are the solution where ``status == 0``, finite but meaningless elsewhere.
    ``residual`` is the larger of :func:`~.measures.kkt_measures`' relative KKT residual of the
    equilibrated program (cone violations included) and of the caller's program,
    ``error`` one more Newton step's size relative to the solution (equilibrated units),
    an estimate of its error. ``scaled`` and ``kkt`` (equilibrated data, KKT matrix
    factorised at the solution) are kept for the backward when asked for; ``undecided``
    marks solved elements where strict complementarity fails (no derivative), ``undetermined``
    those whose requested outputs float64 does not determine (:func:`~.uniqueness.undetermined`), ``unresolved``
    ``(B, n)`` their columns the solve left unresolved (:mod:`.resolution`); ``points``
    :func:`~.measures.caller_measures`' feasibility bits (0 for a certificate's ray).
    """

    x: torch.Tensor
    s: torch.Tensor
    z: torch.Tensor
    status: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor
    error: torch.Tensor
    points: torch.Tensor | None = None
    scaled: Scaled | None = None
    kkt: KKTSystem | None = None  # or one with its solve and failed (null-space form, PatchedKKT)
    undecided: torch.Tensor | None = None
    undetermined: torch.Tensor | None = None
    unresolved: torch.Tensor | None = None
