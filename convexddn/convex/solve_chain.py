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
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from .dissent import judge, within_reach
from .own_unit import try_in_unit
from .rescues import failure_cause

__all__ = ["OPINION", "after_failure"]

OPINION = "Clarabel"  # the solver consulted on a certificate that is not exact, where it has not run


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


def after_failure(backend, args: dict[str, Any], A: sp.csc_matrix, b: np.ndarray, c: np.ndarray,
                  fail: tuple) -> tuple[tuple | None, tuple, str, str | None, str | None]:
    """What becomes of an element whose first solver (``backend.solver``, with ``args``) failed
    with ``fail``: ``(out, fail, used, note, cause)``, ``out`` a solution as ``_try`` returns it or
    ``None``, ``fail`` the failure that then stands ``(message, kind, ...)``, ``used`` the last
    solver tried, ``note`` and ``cause`` what the rescue's ``SolverWarning`` says (:mod:`.rescues`).

    The fallback runs unless there is none (``None`` or the first solver) or the first failure
    stands on an exact ray; then :data:`OPINION` where :func:`_needs_opinion` (with
    ``fallback=None`` its solution is not returned: it only makes the claim uncertain); then
    :func:`.dissent.judge` weighs the claim that stands against every run.
    """
    first, fallback, cones = backend.solver, backend.fallback, backend._cones
    ran, failures, message, cause = [first], [fail], fail[0], failure_cause(fail)
    # An exact ray (an LP's, typically) decides: no other solver's run can change the verdict.
    decided = fail[1] in ("infeasible", "unbounded") and fail[3] is not None and fail[3].exact
    method = fallback if fallback not in (None, first) and not decided else (
        OPINION if _needs_opinion(fail, ran, [fail]) else None)
    while method is not None:
        # (the opinion as the first solver is tried: in its own unit too where it fails without a certificate)
        solve = backend._try if method == fallback else lambda *a: try_in_unit(backend, *a)
        out, fail2 = solve(method, {}, A, b, c)
        ran.append(method)
        name = f"fallback {method}" if method == fallback else (
            f"{method} (consulted on a certificate not exact to rounding)")
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
            why = f"solved by the {name}" if method == fallback else f"solved by {name}"
            return out, fail, method, f"{message}; {why}", f"{cause}; {why}"
        failures.append(fail2)
        said = "fallback" if method == fallback else "consulted on a certificate not exact to rounding:"
        message, cause = f"{message}; {said} {fail2[0]}", f"{cause}; {said} {failure_cause(fail2)}"
        mine = _standing(failures)
        method = OPINION if _needs_opinion(mine, ran, failures) else None
    # A verified certificate from any solver decides the kind of failure unless another run
    # contradicts it (.dissent: a certificate has a reach).
    mine = _standing(failures)
    # (the consulted solver re-solves at the reach too, but not where fallback=None forbids its solution)
    methods = [(m, args if m == first else {}) for m in ran if fallback is not None or m == first]
    out, fail, note = judge(backend, methods, A, b, c, mine, [f for f in failures if f is not mine], message)
    return out, fail, ran[-1], note, f"{cause}; solved at the certificate's reach"
