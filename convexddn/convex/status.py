"""What a ConvexLayer call solved, per batch element, and the error for the ones it did not.

:class:`SolveInfo` is what ``layer.last_solve`` returns (per thread); :func:`failure_error`
turns failed elements into the one error of :mod:`convexddn.errors` that fits them all,
naming their indices in the caller's batch shape and the solver's status;
:func:`masked_outputs` returns the others' values and NaN for them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
from torch.autograd import forward_ad

from .._warn import warn
from .._autograd import refuse_transforms
from ..errors import ConvexDDNWarning, InfeasibleError, ProblemError, SolverError, SolverWarning, UnboundedError
from .measures import FEASIBLE_DUAL, FEASIBLE_PRIMAL, FLAT, UNVERIFIABLE
from .nullspace import NEARLY_DEPENDENT
from .widen import narrowed

__all__ = ["INFO_KEYS", "SolveInfo", "adopt_certificates", "demote", "doubt_certificates", "failure_error",
           "masked_outputs", "refuse_per_element", "merge_resolved", "refuse_unverifiable", "status_kind", "unravel",
           "name_elements", "batched_saw", "warn_flat_faces", "warn_masked"]


@dataclasses.dataclass
class SolveInfo:
    """Per-element outcome of a ConvexLayer call (flat batch order).

    Attributes:
        backend: per element, the path that produced the returned solution
            (``"batched"`` for the torch interior point, ``"per_element"`` for
            Clarabel/SCS/ECOS one at a time).
        solvers: per element, the solver whose solution was returned (or tried last):
            ``"batched"`` for the torch iterations, ``"Clarabel (batched form)"`` for the
            second opinion on elements they did not certify (Clarabel on the same
            program, checked and differentiated by the batched path), else the
            per-element solver (``"Clarabel→SCS"`` where its point was improved by
            SCS warm-started there, whose point was returned).
        statuses: per element, the status that solver reported, in SCS's words as diffcp
            reports it (Clarabel's ``MaxIterations``, ``MaxTime``, ``NumericalError`` and
            ``InsufficientProgress`` all read ``"Failure"``, ``AlmostSolved`` ``"Optimal
            Inaccurate"``; for ``"Clarabel→SCS"`` both: ``"<Clarabel's>; SCS from its point:
            <SCS's>"``).
        residuals: per element, the relative KKT residual of the returned solution.
        solved: a bool tensor of the caller's batch shape: True where the element was
            solved (False only with ``on_failure="mask"``, where its output is NaN).
    """

    backend: list[str]
    solvers: list[str]
    statuses: list[str]
    residuals: list[float]
    solved: torch.Tensor


def unravel(flat: list[int], batch: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Flat indices -> index tuples into ``batch`` (empty tuples for an unbatched call)."""
    if not batch:
        return [() for _ in flat]
    return [tuple(int(j) for j in torch.unravel_index(torch.tensor(i, device="cpu"), batch)) for i in flat]


def name_elements(where: tuple[Sequence[int], tuple[int, ...]] | None, idx: list[int]) -> str:
    """The elements ``idx`` of a solve, for messages: in the caller's batch where
    ``where`` (their flat positions there, and its shape) is known; first 20."""
    more = ", ..." if len(idx) > 20 else ""
    if where is None:
        return f"flat indices {idx[:20]}{more}"
    return f"batch indices {unravel([where[0][i] for i in idx[:20]], where[1])}{more}"


def element_list(where: tuple[Sequence[int], tuple[int, ...]] | None, idx: list[int]) -> list:
    """All the elements ``idx`` of a solve, as :func:`name_elements` names its first 20:
    index tuples in the caller's batch where ``where`` is known, else flat indices."""
    return list(idx) if where is None else unravel([where[0][i] for i in idx], where[1])


def forward_mode_refused(where: tuple[Sequence[int], tuple[int, ...]], reason: str) -> ProblemError:
    """The error for elements whose forward-mode tangent the per-element path cannot give."""
    n = len(where[0])
    return ProblemError(f"ConvexLayer: forward-mode differentiation is implemented on the batched path only, and "
                        f"{n} batch element(s) ({name_elements(where, list(range(n)))}) {reason}; use reverse "
                        "mode (backward) there")


def refuse_per_element(flat: Sequence[torch.Tensor], where: tuple[Sequence[int], tuple[int, ...]], solver: str) -> None:
    """Raise where the elements ``where`` need the per-element path (``solver``, or the
    batched one's problem or verdict) in a call it cannot serve: tangents to carry
    (forward mode), or a torch.func transform around it (it solves in numpy: torch's
    "Cannot access data pointer" at the copy)."""
    why = f"solver={solver!r}, a problem the batched path does not take, or elements it did not certify"
    if any(forward_ad.unpack_dual(v).tangent is not None for v in flat):
        raise forward_mode_refused(where, f"need the per-element path ({why})")
    refuse_transforms(f"ConvexLayer: the per-element path ({why})", "it solves in numpy")


def status_kind(status: str) -> str:
    """'unbounded' (a dual infeasibility certificate), 'infeasible' (a primal one) or 'other'.

    Solvers spell these differently (Clarabel ``DualInfeasible``, SCS ``unbounded``, …);
    "dual infeasible" means the primal is unbounded, so it is tested first.
    """
    s = status.lower().replace(" ", "").replace("_", "")
    if "unbounded" in s or "dualinfeasible" in s:
        return "unbounded"
    if "infeasible" in s:
        return "infeasible"
    return "other"


def failure_error(flat: list[int], statuses: list[str], batch: tuple[int, ...],
                  kinds: list[str] | None = None) -> SolverError:
    """The error for the failed elements: Infeasible/Unbounded only when *every* one is.

    ``kinds`` (per failed element: "infeasible", "unbounded", "disputed" or "other", from
    verified certificates) decide the class; without them the statuses are read.
    """
    idx = unravel(flat, batch)
    kinds = [status_kind(s) for s in statuses] if kinds is None else kinds
    if all(k == "infeasible" for k in kinds):
        cls, what = InfeasibleError, "infeasible"
    elif all(k == "unbounded" for k in kinds):
        cls, what = UnboundedError, "unbounded"
    else:
        cls, what = SolverError, "not solved"
        if any("badly scaled" in s for s in statuses):
            what = "not solved (the data may be badly scaled)"
    shown = "; ".join(f"{i}: {s}" for i, s in list(zip(idx, statuses))[:5])
    more = f" (and {len(idx) - 5} more)" if len(idx) > 5 else ""
    return cls(
        f"problem {what} at {len(idx)} batch index(es) {idx[:20]}{'…' if len(idx) > 20 else ''} "
        f"of batch shape {batch}; solver status: {shown}{more}",
        indices=idx, statuses=statuses)


def warn_masked(flat: list[int], statuses: list[str], batch: tuple[int, ...]) -> None:
    """The ``SolverWarning`` of ``on_failure="mask"`` for the failed elements ``flat``: their
    count, the first 20 in the caller's ``batch`` shape and the first 5 statuses in its
    message; ``elements`` lists every one (index tuples) and ``notes`` their statuses, in the
    same order, as the layer's other warnings do (the message alone cut a batch's list at 20)."""
    where = (range(math.prod(batch)), batch)
    warn(f"ConvexLayer: {len(flat)} batch element(s) not solved, their outputs set to NaN (on_failure='mask'): "
         f"{name_elements(where, flat)}; statuses {statuses[:5]}{' ...' if len(statuses) > 5 else ''}",
         SolverWarning, elements=element_list(where, flat), notes=list(statuses))


INFO_KEYS = ("backend", "solvers", "statuses", "residuals", "solved", "kinds")


def merge_resolved(sols: list[torch.Tensor], info: dict, idx: list[int], fixed: Sequence[torch.Tensor],
                   part: dict, take: Sequence[bool] | None = None) -> None:
    """Put the re-solved elements ``idx`` (those with ``take``, all by default) into the
    outputs ``sols`` and the per-element lists of ``info`` (keys :data:`INFO_KEYS`), in
    place; ``fixed`` and ``part`` are their outputs and lists, in the order of ``idx``."""
    rows = [j for j in range(len(idx)) if take is None or take[j]]
    if not rows:
        return
    dest = torch.tensor([idx[j] for j in rows], device=sols[0].device)
    pick = torch.tensor(rows, device=fixed[0].device)
    for k, (s, f) in enumerate(zip(sols, fixed)):
        sols[k] = s.index_copy(0, dest, f.index_select(0, pick).to(device=s.device, dtype=s.dtype))
    for key in INFO_KEYS:
        for j in rows:
            info[key][idx[j]] = part[key][j]


def adopt_certificates(info: dict, idx: list[int], verdicts: list[tuple[str, str]]) -> None:
    """Give the elements ``idx`` that stayed unsolved with no verified certificate of
    their own the other path's verified ``(kind, status)``, in place.

    The batched path verifies its rays in the caller's units
    (:func:`~.rays.verified_rays`); the per-element path may not verify its own on
    badly scaled data (a Huber fit with data ~5e4, infeasible by construction, ended in
    a SolverError after SCS's iteration limit). The error then names the certificate.
    A "disputed" element (a verified ray where a solver claimed infeasible: a ray proves
    no feasible point) takes an infeasibility certificate only: an LP infeasible by an
    exact Farkas certificate was reported unbounded on the strength of rays.
    """
    for i, (kind, status) in zip(idx, verdicts):
        mine = info["kinds"][i]
        if not info["solved"][i] and (mine == "other" and kind in ("infeasible", "unbounded")
                                      or mine == "disputed" and kind == "infeasible"):
            info["kinds"][i] = kind
            info["statuses"][i] = f"{info['statuses'][i]}; batched path: {status} (certificate verified)"


def doubt_certificates(info: dict, idx: Sequence[int], points: Sequence[int]) -> None:
    """Elements ``idx`` left unsolved as infeasible (unbounded) although a batched solve
    found a primal (dual) feasible point for them (``points``: its
    :func:`~.measures.caller_measures` bits, in the order of ``idx``): their verdict
    becomes "other" and their status says why, in place.

    A certificate's relative tests pass on data mixing scales: ``x >= (1e6, 1)`` with a
    squared objective was reported infeasible (SCS's ray, verified), with the batched
    path's feasible point (1e6, 1.6) at hand.
    """
    for i, bits in zip(idx, points):
        kind = info["kinds"][i]
        if info["solved"][i] or kind not in ("infeasible", "unbounded"):
            continue
        if kind == "infeasible" and bits & FEASIBLE_PRIMAL:
            seen = "a primal feasible point (relative residual <= tol_accept)"
        elif kind == "unbounded" and bits & FEASIBLE_DUAL:
            seen = "a dual feasible point (a finite lower bound)"
        else:
            continue
        demote(info, i, f"the batched path found {seen}: {kind} not certain (the data may be badly scaled)")


def demote(info: dict, i: int, why: str) -> None:
    """Element ``i``'s infeasible or unbounded verdict becomes "other" (no certain claim), in
    place, its status saying ``why``."""
    info["kinds"][i] = "other"
    info["statuses"][i] = f"{info['statuses'][i]}; but {why}"


def refuse_unverifiable(info: dict, idx: Sequence[int], points: Sequence[int]) -> None:
    """Elements ``idx`` that another solver reports solved although the batched path
    found that no point of their program can be verified (``points`` with
    :data:`~.measures.UNVERIFIABLE`: equality rows measured nearly dependent, see
    :func:`~.nullspace.unverifiable`) become unsolved, their status saying why, in place:
    a residual check alone passed points 0.02 to 2 off on two equality rows parallel to
    1e-10 (Clarabel, per element)."""
    for i, bits in zip(idx, points):
        if info["solved"][i] and bits & UNVERIFIABLE:
            info["solved"][i], info["kinds"][i] = False, "other"
            info["statuses"][i] = (f"{info['statuses'][i]}; not verified: the equality constraints are nearly "
                                   "linearly dependent (after equilibration, measured by their singular values or "
                                   f"their QR factor's diagonal: the least at most {NEARLY_DEPENDENT:g} of the "
                                   "largest): the solution is ill-determined by the data and no residual check can "
                                   "vouch for a point; drop or combine nearly parallel rows")


def warn_flat_faces(where: tuple[Sequence[int], tuple[int, ...]], info: dict, idx: Sequence[int],
                    points: Sequence[int]) -> None:
    """The SolverWarning for elements ``idx`` of ``info`` (``where``: the whole solve's) that
    another solver reports solved where the batched path found the cost still falling along a face
    of its point's limit system beyond rounding and its active-set steps did not end at a solution
    (``points``, in the order of ``idx``, with :data:`~.measures.FLAT`; :mod:`.flat_face`). The
    other solver's residual check cannot tell such a point from the solution: with a cost margin μ
    along the face, a point inside it has a KKT residual ~μ, so the error reaches residual / μ (up
    to the face's extent), or a ray of unboundedness is exact (``min c @ x s.t. x >= 0,
    x1 - x0 <= 1`` at ``c = (1 - 1e-13, -1)``: Clarabel's x ≈ (0.6, 1.6), "solved", on an
    unbounded LP)."""
    flat = [i for i, bits in zip(idx, points) if bits & FLAT and info["solved"][i]]
    if flat:
        warn(f"ConvexLayer, {name_elements(where, flat)}: accepted from another solver, but the batched "
             "path found the cost still falling along a face at its point (the reduced gradient along a null "
             "direction of the limit system above 4 rounding levels of the dual scale: a cost margin near "
             "rounding) and its active-set steps could not resolve it: the solution is not determined to the "
             "promised accuracy (its error may reach the residual over that margin, or the program is unbounded "
             "along a ray); check the result", SolverWarning, elements=element_list(where, flat))


def batched_saw(info: dict, where: tuple[Sequence[int], tuple[int, ...]], idx: Sequence[int]) -> None:
    """What the batched path saw of elements ``idx`` that another solver then took (their
    ``info["points"]`` bits), weighed against its results in place: certificates
    (:func:`doubt_certificates`), unverifiable rows (:func:`refuse_unverifiable`) and flat faces
    (:func:`warn_flat_faces`; ``where``: the whole solve's elements)."""
    seen = [info["points"][i] for i in idx]
    doubt_certificates(info, idx, seen)
    refuse_unverifiable(info, idx, seen)
    warn_flat_faces(where, info, idx, seen)


def masked_outputs(sols: Sequence[torch.Tensor], shapes: Sequence[tuple[int, ...]], solved: torch.Tensor,
                   device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """The solutions ``(B, ...)`` in the caller's ``shapes`` (batch shape first), device
    and dtype, NaN for the elements not ``solved`` (its batch shape). Entries beyond the
    range of a ``dtype`` narrower than float64 (float16: 65504; float32: 3.4e38) become
    ±inf in the cast, with a ``ConvexDDNWarning`` (and in their forward-mode tangents, with a
    ``GradientWarning``: :func:`~.widen.narrowed`)."""
    ok = None if bool(solved.all()) else solved.to(device)
    outs, over = [], 0
    for s, shape in zip(sols, shapes):
        s = s.to(device=device).reshape(shape)
        if ok is not None:
            s = torch.where(ok.view(ok.shape + (1,) * (s.dim() - ok.dim())), s, torch.full_like(s, math.nan))
        outs.append(narrowed(s, dtype))
        if torch.finfo(dtype).max < torch.finfo(s.dtype).max:  # (float32 too: 1e40 came back inf, silently)
            over += int((torch.isinf(outs[-1]) & torch.isfinite(s)).sum())
    if over:
        wider = "float32 or float64" if torch.finfo(dtype).max < torch.finfo(torch.float32).max else "float64"
        warn(f"ConvexLayer: {over} solution entries exceed the range of {dtype} and are "
             f"returned as ±inf; pass {wider} parameters", ConvexDDNWarning)
    return outs
