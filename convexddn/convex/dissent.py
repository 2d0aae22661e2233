"""Second opinions on an infeasibility or unboundedness certificate, per element.

A certificate that passes :func:`~.cone_checks.verify_certificate` proves less than it
seems: each of its tests is relative, and an approximate ray has a reach. For
``Ax + s = b, s ∈ K`` and a dual ray ``y ∈ K*`` (projected there), any ``x`` with slack
``ŝ = Π_K(b − Ax)`` and residual ``r = Ax + ŝ − b`` satisfies, exactly,

.. math::

    b^T y = x^T A^T y + ŝ^T y - r^T y, \\qquad ŝ^T y \\ge 0,

so an exact ray (``Aᵀy = 0``) gives ``rᵀy ≥ −bᵀy = |bᵀy|`` at every point: no point is
feasible. An approximate one only excludes the points whose ``−xᵀAᵀy`` stays below
``|bᵀy|``, those with ``‖x‖∞ < |bᵀy| / ‖Aᵀy‖₁``. That radius can be the size of the
solution itself: the projection of ``a ~ 1e6`` onto the exponential cone, canonicalised
with an epigraph ``t ≥ ‖y − a‖²`` (a second-order cone), has ``t ≈ 6e11``; Clarabel's
ray (its head ``(1, 1)`` at the edge of K*) missed the ``t`` column by 3.8e-12, relative
1.9e-12 and far inside the test, with ``bᵀy = −2.29``: radius ``2.29 / 3.8e-12 = 6e11``,
and the feasible problem was reported infeasible. No test of the ray alone can tell (the
program *is* within 2e-12 of an infeasible one); a point, or another solver, can.
Symmetrically a primal ray ``d`` with ``−Ad = s_d + e`` (``s_d ∈ K``) and any dual point
``y ∈ K*`` with residual ``r = Aᵀy + c``: ``cᵀd = rᵀd + yᵀs_d + yᵀe``, so an exact ray
gives ``rᵀd ≤ cᵀd < 0`` at every ``y``, and an approximate one excludes only the dual
points with ``‖y‖₁ < |cᵀd| / ‖e‖∞`` (``min y log y − 25 y``: SCS's ray ``(−1, 0.054)``
lies within ``0.054 e^{−18.3} = 6e-10`` of K_exp, radius 6e8, while the dual solution is
``e^{24} = 2.6e10``).

:func:`believed` therefore weighs a verified certificate against the other runs
(:class:`Run` records what each solver run left):

- the other solver claims the same with a certificate that verifies: it stands (even if both
  are inaccurate; a claim that does not verify is no opinion);
- a point a run reached (not a claimant's: that is its ray) lies beyond the certificate's
  reach, by the identity above with half the margin (``rᵀy < ½|bᵀy|``, resp.
  ``rᵀd > ½cᵀd``, rounding discounted): it falls (Clarabel's last dual iterate ``2.0e10``
  on ``min y log y − 25 y``: ``rᵀd = −0.011`` against ``cᵀd = −0.36``);
- in doubt — a run reports the problem solved (``solved``, ``optimal``, inaccurate or not:
  SCS's "solved (inaccurate)" beside Clarabel's verified ray on every false report seen),
  or the claim is inaccurate by its own solver's measure (Clarabel's ``Almost…``, SCS's
  ``inaccurate``: its scaled ray missed the solver's own tolerance) — an infeasibility is
  re-solved at its reach (:func:`reach_scaling`): confirmed by a ray that verifies again,
  or solved there, or it falls; an unboundedness in doubt falls (``min ‖x‖² − bᵀx − Σ log x``,
  ``b ~ 1e6``: SCS's "unbounded (inaccurate - reached max_iters)" beside Clarabel's failure);
- otherwise it stands. A ray with no reach limit (``Aᵀy = 0`` to the rounding of its terms,
  or a part of it that certifies alone so, :func:`.reach.exact_ray`) stands in doubt too, and the
  per-element path runs no other solver for it: on an O(1) QP infeasible by two rows,
  Clarabel's ray leaned on the objective's cone at its edge (a "reach" of 1.4e12), SCS ran
  to its iteration limit ("solved (inaccurate)", 2.5 s a run) three times, and the re-solve at
  that reach confirmed nothing: a SolverError after 7 s.

Status alone cannot decide: ``x <= 1e6, log x >= log(1e6) + 1`` (infeasible) drew the
same "Infeasible" from Clarabel and "solved (inaccurate)" from SCS as the feasible
projections; at the reach its ray verified again, theirs did not.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import diffcp
import numpy as np
import scipy.sparse as sp

from .cone import POLISH_ABOVE, ResidualMap
from .cone_checks import project, verify_certificate
from .edge_boost import boost_frame
from .feasibility import infeasible_without_objective
from .reach import reach_point, reach_scaling
from .status import status_kind

__all__ = ["Run", "believed", "claims_solved", "judge", "reaches", "within_reach"]

_EPS = np.finfo(np.float64).eps


@dataclasses.dataclass
class Run:
    """What one failed solver run left, for :func:`believed`.

    Attributes:
        method: the solver (``"Clarabel"``, ``"SCS"``, ``"ECOS"``).
        claim: ``status_kind`` of its status (``"infeasible"``, ``"unbounded"``, ``"other"``).
        status: the solver's own status.
        also: statuses of the runs it started (SCS warm-started from its point).
        ray: its certificate as returned (``y`` for a claimed infeasibility, ``x`` for
            unboundedness), where it claims one.
        verified: whether that certificate verifies (:func:`~.cone_checks.verify_certificate`).
        exact: whether its certificate verifies and is exact to rounding (:func:`.reach.exact_claim`).
        points: ``(status, x, y)`` of the points it reached (its point, polished, and SCS's
            from it), each with the status of the solve that gave it.
    """

    method: str
    claim: str
    status: str
    also: list[str] = dataclasses.field(default_factory=list)
    ray: np.ndarray | None = None
    verified: bool = False
    exact: bool = False
    points: list[tuple[str, np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)


def claims_solved(status: str) -> bool:
    """Whether a status reports the problem solved, accurately or not (Clarabel ``Solved``,
    ``Optimal Inaccurate``; SCS ``solved (inaccurate - reached max_iters)``; ECOS ``Close to
    optimal solution found``); not ``unsolved`` or ``unfinished``."""
    return status_kind(status) == "other" and re.search(r"\b(solved|optimal)\b", status.lower()) is not None


def _inaccurate(status: str) -> bool:
    """Whether a claim is inaccurate by its solver's own measure (Clarabel's
    ``AlmostPrimalInfeasible`` reaches diffcp as ``Infeasible Inaccurate``; SCS
    ``infeasible (inaccurate - reached max_iters)``)."""
    s = status.lower()
    return "inaccurate" in s or "almost" in s


def reaches(A: sp.csc_matrix, b: np.ndarray, c: np.ndarray, cones: list, claim: str, ray: np.ndarray,
            x: np.ndarray, y: np.ndarray) -> bool:
    """Whether the certificate ``ray`` of ``claim`` reaches the point ``(x, y)``: whether
    at least half its margin there rests on the point's own residual (see the module's
    identity), rounding discounted.

    - infeasible: ``ȳ = Π_{K*}(ray / ‖ray‖∞)``, ``ŝ = Π_K(b − Ax)``, ``r = Ax + ŝ − b``:
      reached where ``rᵀȳ + 64 eps (|A||x| + |ŝ| + |b|)ᵀ|ȳ| ≥ ½|bᵀȳ|``;
    - unbounded: ``d = ray / ‖ray‖∞``, ``ỹ = Π_{K*}(y)``, ``r = Aᵀỹ + c``: reached where
      ``rᵀd − 64 eps (|A|ᵀ|ỹ| + |c|)ᵀ|d| ≤ ½cᵀd``.

    A point not finite on the side tested is reached (it shows nothing).
    """
    absA = abs(A)
    if claim == "infeasible":
        if not np.all(np.isfinite(x)):
            return True
        yb = project(ray / np.max(np.abs(ray)), cones, dual=True)
        v = b - A @ x
        sh = project(v, cones)
        r = sh - v
        noise = 64 * _EPS * float((absA @ np.abs(x) + np.abs(sh) + np.abs(b)) @ np.abs(yb))
        return float(r @ yb) + noise >= 0.5 * abs(float(b @ yb))
    if not np.all(np.isfinite(y)):
        return True
    d = ray / np.max(np.abs(ray))
    yt = project(y, cones, dual=True)
    r = A.T @ yt + c
    noise = 64 * _EPS * float((absA.T @ np.abs(yt) + np.abs(c)) @ np.abs(d))
    return float(r @ d) - noise <= 0.5 * float(c @ d)


def within_reach(A, b, c, cones: list, run: Run | None, x: np.ndarray, y: np.ndarray, r: float) -> bool:
    """Whether the verified certificate of ``run`` accounts for a point ``(x, y)`` that passed the
    tolerance above rounding (KKT residual ``r`` > ``POLISH_ABOVE``): exact, or reaching it (:func:`reaches`),
    the point's violation is the infeasibility (unboundedness) it proves, and the point refutes nothing.
    (QPs with data ~1e-4 infeasible by 2e-7, or unbounded along an exact ray: SCS's points passed at
    1e-7 in the residual's absolute floor, tol (1 + |b|), and were returned as solutions.)"""
    return (run is not None and run.verified and run.claim != "other" and r > POLISH_ABOVE
            and (run.exact or reaches(A, b, c, cones, run.claim, run.ray, x, y)))


def _refuted(A, b, c, cones: list, mine: Run, others: list[Run]) -> str | None:
    """A point of the runs that the certificate of ``mine`` does not reach (:func:`reaches`),
    named, or ``None``. Only points of solves that claimed neither infeasibility nor
    unboundedness count: a claimant's point is its ray, not a point."""
    for run in [mine, *others]:
        for status, x, y in run.points:
            if status_kind(status) == "other" and not reaches(A, b, c, cones, mine.claim, mine.ray, x, y):
                which = "x" if mine.claim == "infeasible" else "y"
                size = np.max(np.abs(x if mine.claim == "infeasible" else y))
                return (f"a point {run.method}{'' if status == run.status else '→SCS'} reached (‖{which}‖∞ "
                        f"{size:.1e}) lies beyond the certificate's reach")
    return None


def _doubt(mine: Run, others: list[Run]) -> str | None:
    """Why the claim of ``mine`` is in doubt by the runs' statuses (``others``: the other runs),
    or ``None``: a run reports the problem solved, or the claim is inaccurate by its own solver's
    measure."""
    runs = [(mine.method + "→SCS", s) for s in mine.also]
    for run in others:
        runs += [(run.method, run.status)] + [(run.method + "→SCS", s) for s in run.also]
    for name, status in runs:
        if claims_solved(status):
            return f"{name} reports it {status}"
    if _inaccurate(mine.status):
        return f"the certificate is inaccurate by {mine.method}'s own measure"
    return None


def _near_feasible(A, b, x: np.ndarray, s: np.ndarray, tol: float) -> bool:
    """Whether ``Ax + s = b`` holds in the data's scale once the rounding of its terms is
    discounted: ``max(|Ax + s − b|_i − 64 eps (|A||x| + |s|)_i, 0) <= tol (1 + |b_i|)``.
    Relative to its own terms alone a far-off point passes (an infeasible LP: ‖x‖ 5.8e15,
    rows off by 1.8); a solution of size 6e11 carries rounding of 1e-4 in rows of 1."""
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(s))):
        return False
    excess = np.abs(A @ x + s - b) - 64 * _EPS * (abs(A) @ np.abs(x) + np.abs(s))
    return bool(np.all(excess <= tol * (1.0 + np.abs(b))))


def believed(A: sp.csc_matrix, b: np.ndarray, c: np.ndarray, cones: list, mine: tuple, theirs: list[tuple],
             resolve: Callable, polish: Callable, tol: float) -> tuple[str, str, tuple | None]:
    """The kind of failure ``mine`` stands for, what to add to its message, and a solution
    where one was found on the way (else ``None``).

    ``mine``, ``theirs``: failures of the per-element solve, ``(message, kind, claim, run)``
    with ``kind`` the verified claim (or ``"other"``) and ``run`` a :class:`Run` (or
    ``None``); ``theirs`` the other solvers' (empty: there was none). First, where any run's
    claim of infeasibility (verified or not, not exact) stretches a second-order cone along an edge
    at its reach, a solution is looked for in the frame that balances it (:func:`.edge_boost.boost_frame`):
    ``resolve(D, boost)`` yields each solver's ``(method, status, x, y, s)`` on ``(B A D, B b, D c)``,
    back in the caller's frame. Then the verified claim stands where another solver makes it too,
    verified; it falls where a point of the runs lies beyond its reach. In doubt (a run reports the
    problem solved, or the claim is inaccurate: see the module's docstring) an infeasibility is
    re-solved at its reach, ``resolve(D)``: a ray of the same claim that verifies confirms it. A point
    that ``polish`` (``(x, y, s) -> (x, y, s, r)`` on the program as given) takes to ``r <= tol``,
    feasible in the data's scale, is the solution ``(x, y, s, r, method, status)``. An
    unboundedness in doubt falls.
    """
    kind, run = mine[1], mine[3]
    others = [f[3] for f in theirs if f[3] is not None]
    for claimant in (run, *others):  # (a solution ends every doubt)
        ray = None if claimant is None or claimant.claim != "infeasible" or claimant.exact else claimant.ray
        usable = ray is not None and np.all(np.isfinite(ray)) and np.any(ray)
        frame = boost_frame(A, b, cones, reach_point(A, b, cones, ray)) if usable else None
        for method, status, x, y, s in resolve(*frame[:2]) if frame is not None else ():
            if status_kind(status) == "infeasible":  # (a boost frames solutions, not rays: at t >= ‖y − a‖²,
                break  # a ~ 1e9 (t ~ 1e18), SCS's ray there verified but reached 5e15 only)
            x, y, s, r = polish(x, y, s)
            if r <= tol and _near_feasible(A, b, x, s, tol):
                where = f"{method} re-solving at the certificate's reach ({frame[2]})"
                return "solved", f"; infeasible not certain: solved by {where}", (x, y, s, r, method, status)
    if kind not in ("infeasible", "unbounded") or run is None:
        return kind, "", None
    if run.exact:  # (a ray exact to rounding: every point within its reach, see .reach.exact_ray)
        return kind, "", None
    if any(other.claim == run.claim and other.verified for other in others):
        return kind, "", None  # (a claim that does not verify is no opinion: both solvers claimed a feasible
        #                        program with t ~ 3e18 infeasible)
    why = _refuted(A, b, c, cones, run, others)
    if why is None:
        why = _doubt(run, others)
        if why is None:
            return kind, "", None
        D = reach_scaling(A, b, cones, run.ray) if kind == "infeasible" else None
        if kind == "infeasible" and D is None:
            return kind, "", None  # an exact ray: no reach to doubt
        for method, status, x, y, s in resolve(D) if D is not None else ():
            where = f"{method} re-solving at the certificate's reach (columns scaled up to {D.max():.1e})"
            if status_kind(status) == kind and verify_certificate(A, b, c, cones, x, y, kind):
                return kind, f"; confirmed by {where}", None
            x, y, s, r = polish(x, y, s)
            if r <= tol and _near_feasible(A, b, x, s, tol):
                return "solved", f"; {kind} not certain ({why}): solved by {where}", (x, y, s, r, method, status)
        if D is not None:
            why += "; no solver re-solving it at the certificate's reach confirms it"
    return "other", (f"; {kind} not certain: {why} (the solvers disagree: the data may be badly scaled "
                     "or the solution very large)"), None


def judge(backend, methods: list[tuple[str, dict]], A: sp.csc_matrix, b: np.ndarray, c: np.ndarray, mine: tuple,
          theirs: list[tuple], message: str) -> tuple[tuple | None, tuple | None, str | None]:
    """The per-element backend's verdict on a program its solvers did not solve (``mine``,
    ``theirs``: their failures, ``theirs`` empty where there was one solver; ``methods``: the
    ``(solver, solver_args)`` that ran, which re-solve at a reach; ``message`` what they said),
    by :func:`believed`: ``(solution, None, note)`` where one was found at the certificate's reach
    (``solution`` as :meth:`~.per_element.CheckedDiffcp._try` returns it), else
    ``(None, (message, kind), None)``. A ray alone ("disputed") does not decide where a solver
    claimed infeasibility: it proves no point."""
    programs: list = []  # (built at the first polish: most failures never get there)

    def polish(x, y, s):
        # As the per-element solve polishes (backend._polish): not a point that is not
        # finite (a re-solve's NaN ray, SCS's answer to an unbounded program), whose
        # projection onto a PSD cone raised numpy's LinAlgError out of a solve that never raises.
        if not programs:
            programs.append(ResidualMap(A, b, c, backend._cones, backend._cones_cpp, backend._mode, backend._colours))
        try:
            return backend._polish(programs[0], x, y, s)
        except (ValueError, RuntimeError, ArithmeticError):
            return x, y, s, float("inf")

    def resolve(D: np.ndarray, boost=None):
        As, bs, cs = sp.csc_matrix(A @ sp.diags(D)), b, c * D
        if boost is not None:
            As, bs = boost.program(As, b)
        for method, margs in methods:
            try:
                x, y, s, status = backend._solve_with(method, margs, As, bs, cs)
            except (diffcp.SolverError, ValueError, RuntimeError, ArithmeticError):
                continue
            if boost is not None:
                y, s = boost.back(y, s)
            yield method, status, x * D, y, s

    kind, why, found = believed(A, b, c, backend._cones, mine, theirs, resolve, polish, backend.tol)
    if found is not None:
        x, y, s, r, method, status = found
        return (programs[0], x, y, s, f"{status} (re-solved at the reach)", r, method, None), None, message + why
    claims = [f[2] for f in (mine, *theirs)]
    kind = "disputed" if kind == "unbounded" and "infeasible" in claims else kind
    if kind == "other" and infeasible_without_objective(backend, A, b):
        # No certificate stands, yet infeasibility does not depend on the objective (a curved one kept
        # the solvers from a ray): the constraints alone give one exact to rounding (.feasibility).
        kind, why = "infeasible", why + ("; infeasible: Clarabel on its constraints alone (objective dropped) "
                                         "claims it, certificate verified (exact to rounding)")
    return None, (message + why, kind), None
