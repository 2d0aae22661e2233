"""cvxpylayers' ``solver_args`` as :class:`~convexddn.convex.compat.CvxpyLayer` reads them:
which keys reach our solvers (:data:`APPLIED_SOLVER_ARGS`, under each solver's spelling),
which are accepted and ignored (:data:`IGNORED_SOLVER_ARGS`, with the reason the warning
gives) and which are refused (:func:`classify`). Every value is checked, an ignored key's
too, by :mod:`.solver_args` (:func:`~convexddn.convex.solver_args.check_setting`).
"""
from __future__ import annotations

from typing import Any

from ..errors import OptionError
from .per_element import SOLVERS
from .solver_args import check_setting, solver_choice, solver_settings

__all__ = ["ALIASES", "APPLIED_SOLVER_ARGS", "AUTO_ONLY", "BACKENDS", "IGNORED_SOLVER_ARGS", "REPLACED_BACKENDS",
           "SOLVER_NAMES", "canon_backend", "canon_backends", "classify", "per_element", "replaced_reason",
           "solver_name"]

# Our solvers by lower-case name (``solve_method`` and ``solver=`` spellings).
SOLVER_NAMES = {s.lower(): s for s in SOLVERS}

# cvxpylayers' backends (its ``solver=``) all map to ConvexLayer's default, "auto" (the
# batched interior point where it applies, per-element Clarabel otherwise), unless
# ``solve_method`` names a solver. MOREAU and MPAX (other algorithms) are replaced with
# the one warning; CuClarabel's batched interior point is what "auto" does.
BACKENDS = ("diffcp", "cuclarabel", "moreau", "mpax")
REPLACED_BACKENDS = ("moreau", "mpax")

#: solver_args that reach our solvers: key -> {solver: that solver's spelling}. With
#: "auto" they reach the per-element solver (Clarabel), which solves whatever the batched
#: interior point does not certify.
APPLIED_SOLVER_ARGS: dict[str, dict[str, str]] = {
    "max_iters": {"SCS": "max_iters", "ECOS": "max_iters", "Clarabel": "max_iter", "auto": "max_iter"},
    "max_iter": {"SCS": "max_iters", "ECOS": "max_iters", "Clarabel": "max_iter", "auto": "max_iter"},
    "verbose": {"SCS": "verbose", "ECOS": "verbose", "Clarabel": "verbose", "auto": "verbose"},
    # A per-solve time limit (SCS's is diffcp's default solver); ECOS has none (refused there).
    "time_limit_secs": {"SCS": "time_limit_secs", "Clarabel": "time_limit", "auto": "time_limit"},
    "time_limit": {"SCS": "time_limit_secs", "Clarabel": "time_limit", "auto": "time_limit"},
}
# Keys that name one setting (cvxpylayers' spelling, Clarabel's): at most one per call.
ALIASES = (("max_iters", "max_iter"), ("time_limit_secs", "time_limit"))

AUTO_ONLY = ("reach only the per-element solver under the default solver: it solves the elements the "
              "batched interior point does not certify; pass solve_method='Clarabel' (or 'SCS', 'ECOS') "
              "to solve every element with one solver (not for a quad_form(x, P) of a parameter P, "
              "which only the batched solver takes)")
_TOLERANCE = "a solver tolerance (solutions are polished and verified to the layer's tol)"
_SCS_TUNING = "SCS convergence tuning (solutions are polished and verified to the layer's tol)"
_DERIVATIVE = "diffcp's derivative settings (the adjoint is solved to full accuracy)"
_WARM_STARTS = "diffcp's warm starts (each problem is solved from scratch; a warm start changes only SCS's speed)"
_SCS_ONLY = ("SCS's setting: SCS, cvxpylayers' default solver, runs only with solve_method='SCS' here (the "
             "default is the batched interior point, then Clarabel)")
_RAISE_ON_ERROR = ("diffcp's raise_on_error (a failed solve always raises InfeasibleError, UnboundedError "
                   "or SolverError; ConvexLayer(on_failure='mask') returns NaN for failed elements instead)")

#: solver_args accepted and ignored (one warning per layer): key -> why.
IGNORED_SOLVER_ARGS: dict[str, str] = {
    **{k: _TOLERANCE for k in (
        "eps", "eps_abs", "eps_rel", "eps_infeas",                      # SCS
        "abstol", "reltol", "feastol", "abstol_inacc", "reltol_inacc", "feastol_inacc",  # ECOS
        "tol_gap_abs", "tol_gap_rel", "tol_feas", "tol_infeas_abs", "tol_infeas_rel",
        "tol_ktratio")},                                                # Clarabel
    **{k: _SCS_TUNING for k in (
        "acceleration_lookback", "acceleration_interval", "acceleration_type_1", "acceleration_regularization",
        "acceleration_relaxation", "normalize", "scale", "adaptive_scale", "adaptive_diag_scale", "rho_x", "alpha")},
    **{k: _DERIVATIVE for k in ("mode", "n_jobs_forward", "n_jobs_backward", "derivative_kwargs")},
    "warm_starts": _WARM_STARTS,
    "raise_on_error": _RAISE_ON_ERROR,
}

_COMMON_KEYS = frozenset({"solve_method", *APPLIED_SOLVER_ARGS, *IGNORED_SOLVER_ARGS})


def solver_name(value: Any, what: str) -> str | None:
    if value is None:  # diffcp's default: the layer's solver here
        return None
    if isinstance(value, str) and value.lower() in SOLVER_NAMES:
        return SOLVER_NAMES[value.lower()]
    raise OptionError(f"{what} must be None or one of {sorted(SOLVER_NAMES.values())}, got {value!r}")


def per_element(solver: str) -> str:
    """The solver that ``solver_args`` reach: the per-element one (Clarabel under "auto")."""
    return "Clarabel" if solver == "auto" else solver


def replaced_reason(backend: str) -> str:
    """Why a setting of ``backend`` (cvxpylayers' ``solver=``, one of :data:`REPLACED_BACKENDS`)
    that no solver here takes is ignored (the warning's text)."""
    return (f"settings of solver={backend!r}, which convexddn replaces by its default solver: they reach "
            "no solver here")


def classify(args: dict[str, Any], solver: str, replaced: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """cvxpylayers' ``solver_args`` (less ``solve_method``) for ``solver`` -> (applied:
    the keys that reach it, ignored: key -> why); ``OptionError`` for a key that only
    another solver takes (naming it) or that no solver takes (listing the valid keys).

    ``replaced``: the cvxpylayers backend (``solver="MOREAU"``, as written) the default solver
    stands in for: a key no solver here takes is taken as that backend's setting (Moreau's
    ``tol``, MPAX's ``algorithm``) and ignored with the warning, as the backend itself is."""
    own = solver_settings(per_element(solver))
    applied, ignored, foreign = {}, {}, []
    for key, value in args.items():
        if key in IGNORED_SOLVER_ARGS:
            ignored[key] = IGNORED_SOLVER_ARGS[key]
        elif key in APPLIED_SOLVER_ARGS or key in own:
            applied[key] = value
        elif solver == "auto" and key in solver_settings("SCS"):
            ignored[key] = _SCS_ONLY
        else:
            foreign.append(key)
    unknown = sorted(str(k) for k in foreign if not any(k in solver_settings(s) for s in SOLVERS))
    if unknown and replaced is not None:
        ignored.update(dict.fromkeys(unknown, replaced_reason(replaced)))
        foreign, unknown = [k for k in foreign if str(k) not in unknown], []
    if unknown:
        raise OptionError(
            f"solver_args has unknown key(s) {unknown}; valid keys are {sorted(_COMMON_KEYS)} (see "
            f"convexddn.convex.compat for what each does here) and {per_element(solver)}'s own settings "
            f"{sorted(own - _COMMON_KEYS)}")
    if foreign:
        key = sorted(foreign)[0]
        takes = [s for s in SOLVERS if key in solver_settings(s)]
        chosen = "the default solver's per-element one, Clarabel" if solver == "auto" else solver
        raise OptionError(
            f"solver_args[{key!r}] is a setting of {' and '.join(takes)}, not of {chosen} (cvxpylayers passes it "
            f"on and the solver raises a TypeError or AttributeError); pass solve_method={takes[0]!r} or drop the key")
    for key in ignored:  # ignored, yet a value no solver takes (eps=-1, eps="a") is a mistake to report
        check_setting(key, args[key])
    return applied, ignored


def canon_backends() -> tuple[str, ...]:
    """CVXPY's canonicalisation backends (``cvxpy.settings.*_CANON_BACKEND``), as CVXPY spells them."""
    from cvxpy import settings

    return tuple(sorted({getattr(settings, n) for n in dir(settings)
                         if n.endswith("_CANON_BACKEND") and n != "DEFAULT_CANON_BACKEND"}))


def canon_backend(value: Any) -> str | None:
    """cvxpylayers' ``canon_backend``: None or one of CVXPY's backends (case-insensitive; it is
    ignored here, the problem being canonicalised once by convexddn), else ``OptionError`` naming
    the accepted values (cvxpylayers, through CVXPY, raises ``ValueError: Unknown backend``)."""
    return None if value is None else solver_choice("canon_backend", value, canon_backends(), optional=True)
