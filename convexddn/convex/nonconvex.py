"""Why a solve failed where the objective is nonconvex at the given parameter values.

``cp.psd_wrap(P)`` tells CVXPY to trust that ``P`` is positive semidefinite, so
``quad_form(x, psd_wrap(P))`` of a parameter ``P`` passes DCP and DPP for any value; an
indefinite value makes the program nonconvex, and the batched interior point (the only
path that keeps a parametric quadratic objective) then ended in a bare "numerical
trouble" that named neither ``P`` nor the quadratic term. A ``PSD=True`` parameter is
refused before any solve (:func:`.declarations.check_parameter_attributes`); this is the
diagnosis for the rest. Where the quadratic part reads a parameter it runs on every
element of every call (a program that is nonconvex at its values may also "converge", to
a local minimiser: returned as solved, silently), at the cost of one fill of the
canonical data and one batched Cholesky factorisation, with eigenvalues only for the
elements that fail it; otherwise on the failed elements only, so a call that solves pays
nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import cvxpy as cp
import torch

from ..errors import InputError
from .declarations import psd_rounding
from .status import unravel
from .tensor_cache import cached
from .validation import element_subset

if TYPE_CHECKING:
    from .batched import BatchedProgram

__all__ = ["explain_nonconvex", "NONCONVEX_TOL"]

#: An element's quadratic objective matrix P counts as not PSD where the smallest eigenvalue of
#: ``Zᵀ P Z`` (Z the null space of its equality rows: the directions the feasible set spans) is
#: below ``-max(NONCONVEX_TOL, 100·n·eps)`` times its largest |eigenvalue| (scale-invariant).
#: Forming P (products of the presolve's elimination maps) and
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


def unsolved(info: dict) -> list[int]:
    """The elements ``info`` marks unsolved."""
    return [i for i, ok in enumerate(info["solved"]) if not ok]


def _quadratic_is_parametric(data) -> bool:
    """Whether the objective's quadratic blocks read a parameter (``psd_wrap`` of one): only then
    can a value make the program nonconvex (a constant quadratic part is checked by CVXPY)."""
    def build():
        last = data.n_cols - 1  # (the constant column)
        return any(bool((m.col < last).any()) for k, m in data.maps.items() if k in ("PKK", "PUU", "PKU"))
    return cached(data._cache, "quadratic is parametric", build)


def _screened(P: torch.Tensor, tol: float) -> torch.Tensor:
    """``(B,)`` the elements whose symmetric ``P`` ``(B, n, n)`` may not be PSD to ``tol``: a
    Cholesky factorisation of ``P + tol·‖P‖_F/√n·I`` fails (``‖P‖_F/√n`` is at most its largest
    |eigenvalue|, so one that passes has its smallest eigenvalue above ``-tol`` times that
    largest, the test below; a batched factorisation, where the eigenvalues of every
    element would cost several)."""
    n = P.shape[-1]
    shift = tol * P.flatten(-2).norm(dim=-1).clamp_min(torch.finfo(P.dtype).tiny) / n ** 0.5
    eye = torch.eye(n, dtype=P.dtype, device=P.device)
    return torch.linalg.cholesky_ex(P + shift[:, None, None] * eye).info != 0


def _on_equalities(P: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """``Zᵀ P Z`` ``(B, k, k)``: ``P`` ``(B, n, n)`` on the null space of the equality rows ``E``
    ``(B, p, n)`` (Z orthonormal, k = n − rank E, the rank from E's singular values above
    ``n·eps`` of the largest; a batch's k is that of its largest rank, the other elements'
    extra directions lying in their null space too, so it can only pass more). The program
    is convex where this is PSD, whatever P is off the feasible set's directions."""
    if E.shape[-2] == 0:
        return P
    _, sv, Vh = torch.linalg.svd(E, full_matrices=True)
    cut = sv[:, :1] * (E.shape[-1] * torch.finfo(E.dtype).eps)
    rank = int((sv > cut).sum(-1).max())  # (one host read)
    Z = Vh[:, rank:, :].mT
    return Z.mT @ P @ Z


def explain_nonconvex(program: BatchedProgram | bool | None, problem: cp.Problem, parameters: Sequence[cp.Parameter],
                      flat: list[torch.Tensor], failed: list[int], info: dict, batch: tuple[int, ...],
                      raising: bool, input_eps: float = float(torch.finfo(torch.float64).eps)) -> list[int]:
    """Name the elements whose objective's quadratic part is not PSD at their values: the
    ``failed`` ones, and where the quadratic part reads a parameter (``psd_wrap``), every
    element, solved or not (an interior point converged on such a nonconvex program to a
    local minimiser that is not the global one, returned as solved: 8 of 26 box QPs with
    ``P = diag(1, -λ)``); those are made unsolved, in place.

    ``program`` is the layer's :class:`~.batched.BatchedProgram` (None or False: the problem
    has no quadratic objective kept, nothing to test); ``flat`` the call's flat parameter
    values (float64), ``input_eps`` the machine epsilon of the least precise dtype they came in
    (its rounding is forgiven, as the PSD check before the solve forgives it:
    :func:`~.declarations.psd_rounding`). Each such element's status in ``info`` says so (what ``on_failure="mask"``
    warns and ``last_solve`` reports); with ``raising``, an ``InputError`` names the batch
    indices, the smallest eigenvalue relative to the largest, and the likely cause.
    Returns the elements left unsolved (``failed`` and those made so).
    """
    if not program:
        return failed
    data = program.data
    every = failed
    if _quadratic_is_parametric(data):
        failed = list(range(len(info["solved"])))
    # (an element certified infeasible stays so: its feasible set does not depend on the objective)
    failed = [i for i in failed if info["kinds"][i] != "infeasible"]
    if not failed:
        return unsolved(info)
    # (and the rounding of the dtype the values came in, as the PSD check before the solve takes
    # it: a float32 Gram matrix of rank 2, smallest eigenvalue -7.6e-9 of its largest, passed
    # PSD=True there and was refused here as nonconvex, with advice to declare it PSD=True)
    tol = max(NONCONVEX_TOL, 100 * data.n * torch.finfo(torch.float64).eps, psd_rounding(input_eps, data.n))
    try:  # (a diagnosis only: where it cannot be made, the solve's own result stands)
        with torch.no_grad():
            sub = [v.detach().to(dtype=torch.float64) for v in element_subset(parameters, flat, failed)]
            P, _, A, _ = data.fill(data.parameter_vector(sub, len(failed)))[:4]
            n = P.shape[-1]
            if n == 0 or not bool(P.any()):  # (no quadratic objective: an LP, an SOCP)
                return unsolved(info)
            P = 0.5 * (P + P.mT)
            maybe = torch.nonzero(_screened(P, tol)).flatten().tolist()  # (one host read)
            if not maybe:
                return unsolved(info)
            failed = [failed[j] for j in maybe]
            # (on the equality rows' null space: P = diag(1, -0.5) with y₁ + y₂ = b is convex)
            eig = torch.linalg.eigvalsh(_on_equalities(P[maybe], A[maybe][:, :data.layout.zero]))
            if eig.shape[-1] == 0:  # (the equalities fix every variable)
                return unsolved(info)
    except (RuntimeError, ValueError):  # (torch.linalg.LinAlgError is a RuntimeError)
        return unsolved(info)
    lowest, size = eig[:, 0], eig.abs().amax(-1)
    bad = torch.nonzero(lowest < -tol * size).flatten().tolist()  # (one host read)
    if not bad:
        return unsolved(info)
    for j in bad:
        info["solved"][failed[j]], info["kinds"][failed[j]] = False, "other"
        info["statuses"][failed[j]] += (
            f"; the objective's quadratic part is not positive semidefinite here (on the directions the "
            f"equality constraints leave free: smallest eigenvalue "
            f"{float(lowest[j]):.3g}, largest |eigenvalue| {float(size[j]):.3g}): nonconvex at these values")
    if not raising:
        return unsolved(info)
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
