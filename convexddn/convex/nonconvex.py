"""Why a solve failed where the objective is nonconvex at the given parameter values.

``cp.psd_wrap(P)`` tells CVXPY to trust that ``P`` is positive semidefinite, so
``quad_form(x, psd_wrap(P))`` of a parameter ``P`` passes DCP and DPP for any value; an
indefinite value makes the program nonconvex, and the batched interior point (the only
path that keeps a parametric quadratic objective) then ended in a bare "numerical
trouble" that named neither ``P`` nor the quadratic term. A ``PSD=True`` parameter is
refused before any solve (:func:`.declarations.check_parameter_attributes`); this is the
diagnosis for the rest, run on the failed elements only, so a call that solves pays
nothing: one fill of their canonical data and one symmetric eigenvalue problem each.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import cvxpy as cp
import torch

from ..errors import InputError
from .status import unravel
from .validation import element_subset

if TYPE_CHECKING:
    from .batched import BatchedProgram

__all__ = ["explain_nonconvex", "NONCONVEX_TOL"]

#: A failed element's quadratic objective matrix P counts as not PSD where its smallest
#: eigenvalue is below ``-max(NONCONVEX_TOL, 100·n·eps)`` times its largest |eigenvalue|
#: (scale-invariant). Forming P (products of the presolve's elimination maps) and
#: ``eigvalsh`` each move an eigenvalue of a PSD P by at most ~n·eps·‖P‖ (Weyl's bound on
#: rounding); 100·n·eps leaves a margin for that, and the floor, the order of the layer's
#: own float64 PSD check (declarations: 64e-12), one for cancellation in those products.
#: A psd_wrap of an indefinite matrix is far beyond it (diag(1, -1, 1): -1).
NONCONVEX_TOL = 1e-10


def _wrapped(problem: cp.Problem) -> list[str]:
    """The parameters under a ``psd_wrap`` in the objective, by name (for the message)."""
    from cvxpy.atoms.affine.wraps import psd_wrap

    names: list[str] = []
    stack = [problem.objective.expr]
    while stack:
        expr = stack.pop()
        if isinstance(expr, psd_wrap):
            names += [p.name() for p in expr.parameters() if p.name() not in names]
        stack.extend(getattr(expr, "args", ()))
    return names


def explain_nonconvex(program: BatchedProgram | bool | None, problem: cp.Problem, parameters: Sequence[cp.Parameter],
                      flat: list[torch.Tensor], failed: list[int], info: dict, batch: tuple[int, ...],
                      raising: bool) -> None:
    """Name the ``failed`` elements whose objective's quadratic part is not PSD at their values.

    ``program`` is the layer's :class:`~.batched.BatchedProgram` (None or False: the problem
    has no quadratic objective kept, nothing to test); ``flat`` the call's flat parameter
    values. Each such element's status in ``info`` says so (what ``on_failure="mask"``
    warns and ``last_solve`` reports); with ``raising``, an ``InputError`` names the batch
    indices, the smallest eigenvalue relative to the largest, and the likely cause.
    """
    # (an element certified infeasible stays so: its feasible set does not depend on the objective)
    every, failed = failed, [i for i in failed if info["kinds"][i] != "infeasible"]
    if not failed or not program:
        return
    data = program.data
    try:  # (a diagnosis only: where it cannot be made, the solve's own error stands)
        with torch.no_grad():
            sub = [v.detach().to(device="cpu", dtype=torch.float64) for v in element_subset(parameters, flat, failed)]
            P = data.fill(data.parameter_vector(sub, len(failed)))[0]
            n = P.shape[-1]
            if n == 0 or not bool(P.any()):  # (no quadratic objective: an LP, an SOCP)
                return
            eig = torch.linalg.eigvalsh(0.5 * (P + P.mT))
    except (RuntimeError, ValueError):  # (torch.linalg.LinAlgError is a RuntimeError)
        return
    lowest, size = eig[:, 0], eig.abs().amax(-1)
    tol = max(NONCONVEX_TOL, 100 * n * torch.finfo(torch.float64).eps)
    bad = torch.nonzero(lowest < -tol * size).flatten().tolist()  # (one host read)
    if not bad:
        return
    for j in bad:
        info["statuses"][failed[j]] += (
            f"; the objective's quadratic part is not positive semidefinite here (smallest eigenvalue "
            f"{float(lowest[j]):.3g}, largest |eigenvalue| {float(size[j]):.3g}): nonconvex at these values")
    if not raising:
        return
    where = unravel([failed[j] for j in bad], batch)
    first = bad[0]
    names = _wrapped(problem)
    cause = (f"cp.psd_wrap of {', '.join(names)}" if names else "cp.psd_wrap of a parameter expression")
    named = {failed[j] for j in bad}
    others = [i for i in every if i not in named]
    raise InputError(
        f"ConvexLayer: the objective's quadratic part is not positive semidefinite at {len(bad)} batch "
        f"index(es) {where[:20]}{'…' if len(where) > 20 else ''} of batch shape {batch}, so the problem is "
        f"nonconvex for those parameter values and was not solved: at batch index {where[0]} its smallest "
        f"eigenvalue is {float(lowest[first]):.3g}, {float(lowest[first] / size[first]):.3g} times its largest "
        f"|eigenvalue| {float(size[first]):.3g}. Likely {cause} given a matrix that is not PSD (psd_wrap tells "
        "CVXPY to trust that it is, unchecked): pass PSD values (e.g. L @ L.T + eps * I), or declare the "
        "parameter PSD=True, which the layer checks before solving"
        + (f"; {len(others)} other element(s) failed too, the first with status {info['statuses'][others[0]]!r}"
           if others else ""))
