"""The per-element solve after the first solver failed: the fallback, another solver's opinion on
a certificate that is not exact, and the verdict (:func:`.dissent.judge`).

A verified certificate of infeasibility or unboundedness proves the claim only within its reach
(:mod:`.dissent`) unless its ray is exact to rounding (:func:`.reach.exact_claim`); where it is not,
the claim is weighed against the points the other solvers reached. With ``solver="SCS"`` (whose
default fallback is SCS itself) or ``"ECOS"`` (which errors on exponential cones, leaving its
fallback SCS alone) no other solver had run, and nothing weighed SCS's ray: on
``min −Σentr(y) − aᵀy`` with ``y* = e^{a−1} ~ 1e8`` it lies 6e-10 off K_exp, excludes the dual
points below ~1e9 only, and a bounded problem raised ``UnboundedError`` "certificate verified"
while Clarabel solves it. So where the solvers that ran do not include :data:`OPINION` (Clarabel,
a dependency: always there) and the claim standing is not exact, it is consulted: its solution
goes through the usual checks (a point within the certificate's reach leaves the certificate
standing, :func:`.dissent.within_reach`; one beyond it is returned with the fallback's
``SolverWarning``), and its failure is one more run for :func:`.dissent.judge` to weigh. An exact
ray (an LP's, typically) decides with no such run, as before.

Where the first solver and the fallback both failed and no verified certificate stands (nothing
claims the problem infeasible or unbounded), the solvers of :data:`LAST_RESORT` that have not run and take
the program's cones (:func:`takes_cones`) are tried, once each, before the verdict: ``max Σ log y
s.t. aᵀy = 1`` with ``a ~ 1e8`` (``y = 1/(n a)``) left Clarabel at KKT residual 1.6e-6 and SCS at its
iteration limit, while ECOS (a dependency) solves it to 4e-7. Its point goes through the
checks of any other (the residual, the own-unit retry, the certificate's reach), is returned with
the fallback's ``SolverWarning`` ("solved by the last resort ECOS"), and its failure joins the
others in the error. ``fallback=None`` (no other solver, the user said) runs none, nor does a
fallback that is the first solver (``solver="SCS"``'s default), which never runs.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from .dissent import judge, within_reach
from .own_unit import try_in_unit
from .solver_args import takes_cones
from .rescues import failure_cause

__all__ = ["LAST_RESORT", "OPINION", "after_failure"]

OPINION = "Clarabel"  # the solver consulted on a certificate that is not exact, where it has not run
#: Solvers tried, in order, where the first solver and the fallback failed with no verified certificate
#: standing (:func:`_last_resort`); a solver that ran already, or cannot take the cones, is skipped.
LAST_RESORT = ("ECOS",)


def _needs_opinion(fail: tuple, ran: list[str], failures: list[tuple]) -> bool:
    """Whether the failure ``fail`` (``(message, kind, claim, run)``, see :meth:`~.per_element.CheckedDiffcp._try`)
    stands on a verified certificate that is not exact to rounding, :data:`OPINION` is not among the
    solvers that ran (``ran``), and no other run of ``failures`` settles the claim already: an exact
    ray, or a second verified certificate of the same claim (:func:`.dissent.judge` lets it stand)."""
    run = fail[3]
    if not (fail[1] in ("infeasible", "unbounded") and run is not None and not run.exact and OPINION not in ran):
        return False
    others = [f[3] for f in failures if f is not fail and f[3] is not None and f[3].verified]
    return not any(o.exact or o.claim == run.claim for o in others)


def _within_any(A, b, c, cones: list, failures: list[tuple], out: tuple) -> tuple | None:
    """The first failure of ``failures`` whose verified certificate accounts for the solution ``out``
    (:func:`.dissent.within_reach`), or None."""
    x, y, r = out[1], out[2], out[5]
    return next((f for f in failures if f[3] is not None and within_reach(A, b, c, cones, f[3], x, y, r)), None)


def _standing(failures: list[tuple]) -> tuple:
    """The claim that stands among ``failures``: the first verified one (as the fallback's verdict
    always took), else the first failure."""
    return next((f for f in failures if f[1] != "other"), failures[0])


def _last_resort(backend, ran: list[str], failures: list[tuple]) -> str | None:
    """The first solver of :data:`LAST_RESORT` to try now, or None: only where the fallback ran
    after the first solver (``ran``: not with ``fallback=None``, nor where it is the first solver,
    ``solver="SCS"``'s default: there the layer's batched check of results in doubt comes next, and
    on ``min (a x − 1)²`` at ``a = 1e-15`` it solved silently what ECOS solved only with a warning), no
    verified certificate stands among ``failures`` (:func:`_standing`), and the solver has not run
    and takes the program's cones (:func:`takes_cones`)."""
    if backend.fallback not in ran[1:] or _standing(failures)[1] != "other":  # (fallback None: never in ran)
        return None
    return next((m for m in LAST_RESORT if m not in ran and takes_cones(m, backend._cone_dict)), None)


def _next_run(backend, ran: list[str], failures: list[tuple]) -> tuple[str | None, str | None]:
    """``(solver, role)`` of the run that follows the failures so far, or ``(None, None)``:
    :data:`OPINION` on a certificate not exact (:func:`_needs_opinion`), else a last resort."""
    if _needs_opinion(_standing(failures), ran, failures):
        return OPINION, "opinion"
    last = _last_resort(backend, ran, failures)
    return (last, "last resort") if last is not None else (None, None)


# Per role of a run after the first: its name in messages, what its solution was ("solved by <that>"), and
# what precedes its failure's message ("<solver>: ..."); {m}: the solver.
_NAMED = {"fallback": "fallback {m}", "opinion": "{m} (consulted on a certificate not exact to rounding)",
          "last resort": "last resort {m}"}
_SOLVED_BY = {"fallback": "the fallback {m}", "opinion": _NAMED["opinion"], "last resort": "the last resort {m}"}
_FAILED = {"fallback": "fallback", "opinion": "consulted on a certificate not exact to rounding:",
           "last resort": "last resort"}


def after_failure(backend, args: dict[str, Any], A: sp.csc_matrix, b: np.ndarray, c: np.ndarray,
                  fail: tuple) -> tuple[tuple | None, tuple, str, str | None, str | None]:
    """What becomes of an element whose first solver (``backend.solver``, with ``args``) failed
    with ``fail``: ``(out, fail, used, note, cause)``, ``out`` a solution as ``_try`` returns it or
    ``None``, ``fail`` the failure that then stands ``(message, kind, ...)``, ``used`` the last
    solver tried, ``note`` and ``cause`` what the rescue's ``SolverWarning`` says (:mod:`.rescues`).

    The fallback runs unless there is none (``None`` or the first solver) or the first failure
    stands on an exact ray; then :data:`OPINION` where :func:`_needs_opinion` (with
    ``fallback=None`` its solution is not returned: it only makes the claim uncertain), or where no
    verified certificate stands a solver of :data:`LAST_RESORT` (:func:`_last_resort`); then
    :func:`.dissent.judge` weighs the claim that stands against every run.
    """
    first, fallback, cones = backend.solver, backend.fallback, backend._cones
    ran, failures, message, cause = [first], [fail], fail[0], failure_cause(fail)
    # An exact ray (an LP's, typically) decides: no other solver's run can change the verdict.
    decided = fail[1] in ("infeasible", "unbounded") and fail[3] is not None and fail[3].exact
    method, role = (fallback, "fallback") if fallback not in (None, first) and not decided else (
        _next_run(backend, ran, failures))
    while method is not None:
        # (the others as the first solver is tried: in their own unit too where they fail without a certificate)
        solve = backend._try if role == "fallback" else lambda *a: try_in_unit(backend, *a)
        out, fail2 = solve(method, {}, A, b, c)
        ran.append(method)
        name, by = _NAMED[role].format(m=method), _SOLVED_BY[role].format(m=method)
        # A point any verified certificate so far accounts for leaves that certificate standing.
        held = None if out is None else _within_any(A, b, c, cones, failures, out)
        if held is not None:
            return None, (f"{message}; {name}: {out[4]} at residual {out[5]:.1e}, within the certificate's reach",
                          held[3].claim, held[3].claim, held[3]), method, None, None
        mine = _standing(failures)
        if out is not None and fallback is None:  # (no other solver's point returned: the option says so)
            return None, (f"{message}; {mine[1]} not certain: {name} solves it at residual {out[5]:.1e} "
                          "(fallback=None: its solution not returned)", "other"), method, None, None
        if out is not None:
            return out, fail, method, f"{message}; solved by {by}", f"{cause}; solved by {by}"
        failures.append(fail2)
        said = _FAILED[role]
        message, cause = f"{message}; {said} {fail2[0]}", f"{cause}; {said} {failure_cause(fail2)}"
        method, role = _next_run(backend, ran, failures)
    # A verified certificate from any solver decides the kind of failure unless another run
    # contradicts it (.dissent: a certificate has a reach).
    mine = _standing(failures)
    # (the consulted solver re-solves at the reach too, but not where fallback=None forbids its solution)
    methods = [(m, args if m == first else {}) for m in ran if fallback is not None or m == first]
    out, fail, note = judge(backend, methods, A, b, c, mine, [f for f in failures if f is not mine], message)
    return out, fail, ran[-1], note, f"{cause}; solved at the certificate's reach"
