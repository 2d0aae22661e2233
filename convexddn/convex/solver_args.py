"""The solver options ConvexLayer accepts: :func:`validate_solver_args` (keyword
arguments the chosen solver knows, with values of the right type and range) and
:func:`solver_choice` (a solver's name). Each raises an
:class:`~convexddn.errors.OptionError` naming the key, what was expected and what came;
inside :func:`spelled`, errors about the solver choice name the option as a wrapper's
user wrote it (:class:`~convexddn.convex.compat.CvxpyLayer`: ``solver_args['solve_method']``).
"""
from __future__ import annotations

import contextvars
from contextlib import AbstractContextManager
import functools
import math
import numbers
from typing import Any, Mapping

from .._checks import check_bool, check_int, check_positive, real_number
from ..errors import OptionError
from .._context import bound

__all__ = ["check_setting", "check_solver_cones", "solver_choice", "solver_settings", "spelled", "spelling",
           "validate_solver_args"]

# What the value of each solver keyword argument must be: checked when the layer is
# built (and per call) so that a wrong value is an OptionError naming the key, not a raw
# TypeError from inside the solver once a batch is running.
_COUNT = "an integer >= 1 (an iteration limit)"
_NATURAL = "an integer >= 0"
_INTEGER = "an integer"
_POSITIVE = "a finite number > 0"
_NONNEG = "a finite number >= 0"  # tolerances, regularisations: 0 is the solver's to judge
_SECONDS = "a number of seconds >= 0 (0 or inf: no limit)"
_BOOL = "True or False"
_TEXT = "a string"
_RELAXATION = "a number in (0, 2)"  # SCS's over-relaxation
_JOBS = "an integer >= 1, or -1 (one job per CPU)"
_MODES = ("dense", "lpgd", "lpgd_left", "lpgd_right", "lsmr", "lsqr")
_MODE = f"one of {list(_MODES)}"
_DICT = "a dict"
_WARM_STARTS = "None or a list (one (x, y, s) warm start per batch element)"
# Kinds judged by one predicate each (with _solver_value's message).
_SHAPED = {_JOBS: lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and (v >= 1 or v == -1),
           _MODE: lambda v: isinstance(v, str) and v in _MODES, _DICT: lambda v: isinstance(v, dict),
           _WARM_STARTS: lambda v: v is None or isinstance(v, (list, tuple))}


class _Choice(str):
    """A kind whose values are a solver's own list (SCS's ``scs.LinearSolver``): the
    value, or that enum's member, must be one of ``values``."""

    values: tuple[str, ...]
    enum: Any

    def __new__(cls, values: tuple[str, ...], enum: Any = None) -> "_Choice":
        kind = super().__new__(cls, f"one of {list(values)}" + (f" (or a {enum.__module__}.{enum.__name__})"
                                                               if enum is not None else ""))
        kind.values, kind.enum = values, enum
        return kind

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, str) and value in self.values) or (
            self.enum is not None and isinstance(value, self.enum))


# SCS's and ECOS's settings as their documentation lists them (their Python APIs pass keyword
# arguments straight to C, with no settings object to read them from): SCS 3.3's
# (https://www.cvxgrp.org/scs/api/settings.html), and its Python wrapper's linear_solver, whose
# values are read from SCS's own scs.LinearSolver. SCS judges the settings itself when a layer
# takes them (_accepted), so a key the installed SCS lacks is refused then, naming SCS.
# Clarabel's are read from its own settings object.
_SCS_DOCUMENTED = {"max_iters": _COUNT, "eps_abs": _NONNEG, "eps_rel": _NONNEG, "eps_infeas": _NONNEG,
                   "alpha": _RELAXATION, "rho_x": _POSITIVE, "scale": _POSITIVE, "adaptive_scale": _BOOL,
                   "adaptive_diag_scale": _BOOL, "normalize": _BOOL,
                   "acceleration_lookback": _INTEGER,  # < 0: type-I Anderson
                   "acceleration_interval": _COUNT, "acceleration_type_1": _BOOL,
                   "acceleration_regularization": _NONNEG, "acceleration_relaxation": _NONNEG,
                   "time_limit_secs": _SECONDS, "verbose": _BOOL,
                   "write_data_filename": _TEXT, "log_csv_filename": _TEXT}
# Settings that write files: left out of SCS's trial solve (_scs_trial).
_SCS_FILES = ("write_data_filename", "log_csv_filename")


@functools.lru_cache(maxsize=None)
def _scs_args() -> dict[str, str | None]:
    import scs

    linear = getattr(scs, "LinearSolver", None)  # (SCS >= 3.3)
    if linear is None:
        return dict(_SCS_DOCUMENTED)
    return {**_SCS_DOCUMENTED, "linear_solver": _Choice(tuple(s.value for s in linear), linear)}


_ECOS_ARGS = {**dict.fromkeys(("feastol", "abstol", "reltol", "feastol_inacc", "abstol_inacc",
                               "reltol_inacc"), _POSITIVE),  # ECOS refuses 0
              "max_iters": _COUNT, "nitref": _NATURAL, "verbose": _BOOL}
# diffcp's own (cvxpylayers' layer between the solvers and the user), with SCS 2's eps, which
# diffcp passes on to SCS as eps_abs and eps_rel: only CvxpyLayer accepts them (and ignores them).
_DIFFCP_ARGS = {"eps": _NONNEG, "mode": _MODE, "n_jobs_forward": _JOBS, "n_jobs_backward": _JOBS,
                "derivative_kwargs": _DICT, "warm_starts": _WARM_STARTS, "raise_on_error": _BOOL}


@functools.lru_cache(maxsize=None)
def _clarabel_args() -> dict[str, str | None]:
    import clarabel

    def kind(name: str, default: Any) -> str | None:
        # The default's type says what the setting is (bool before int: bool is an int).
        if isinstance(default, bool):
            return _BOOL
        if isinstance(default, int):  # (inner limits such as equilibrate_max_iter may be 0)
            return _COUNT if name == "max_iter" else _NATURAL
        if isinstance(default, float):
            return _SECONDS if math.isinf(default) else _NONNEG  # time_limit: inf
        return _TEXT if isinstance(default, str) else None  # None: passed on unchecked

    settings = clarabel.DefaultSettings()
    return {k: kind(k, getattr(settings, k)) for k in dir(settings)
            if not k.startswith("_") and k != "default"}


def _solver_kinds(solver: str) -> dict[str, str | None]:
    return {"Clarabel": _clarabel_args, "SCS": _scs_args, "ECOS": lambda: _ECOS_ARGS,
            "diffcp": lambda: _DIFFCP_ARGS}[solver]()


def check_setting(key: Any, value: Any, what: str = "solver_args") -> None:
    """``OptionError`` unless ``value`` is what each of SCS, ECOS, Clarabel and diffcp that
    has a setting ``key`` takes: for a key a wrapper accepts but does not pass on
    (:class:`~convexddn.convex.compat.CvxpyLayer`'s ``eps``), whose plainly wrong value (a
    negative tolerance, a string) is a mistake to report, not a no-op."""
    for solver in ("SCS", "ECOS", "Clarabel", "diffcp"):
        if key in _solver_kinds(solver):
            _solver_value(f"{what}[{key!r}]", _solver_kinds(solver)[key], value)


def solver_settings(solver: str) -> frozenset[str]:
    """The keyword arguments ``solver`` (``"Clarabel"``, ``"SCS"`` or ``"ECOS"``) takes."""
    return frozenset(_solver_kinds(solver))


# Each solver's own spelling of "no time limit": SCS refuses inf ("0 disables"), Clarabel
# stops at once at 0 (status Failure on every element). A limit of 0 s can never solve
# anything, so 0 and inf both mean "no limit" and reach each solver as its own spelling
# (cvxpylayers' time_limit_secs is SCS's, where 0 is the way to say it).
_NO_LIMIT = {"SCS": 0.0, "Clarabel": math.inf}


def _solver_value(name: str, kind: str | None, value: Any) -> Any:
    """``value`` checked against ``kind`` (and made a plain int/float), or ``OptionError``."""
    if kind == _BOOL:
        check_bool(name, value)
    elif kind in (_COUNT, _NATURAL, _INTEGER):
        return check_int(name, value, minimum={_COUNT: 1, _NATURAL: 0}.get(kind))
    elif kind in (_POSITIVE, _NONNEG, _SECONDS, _RELAXATION):
        # check_positive takes tensors (node options may be learned); a solver does not.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise OptionError(f"{name} must be {kind}, got {value!r}")
        number = real_number(value)  # ±inf for an int beyond the float range
        if kind == _POSITIVE:
            check_positive(name, value)
        elif kind == _RELAXATION and not 0 < number < 2:
            raise OptionError(f"{name} must be {kind}, got {value!r}")
        elif math.isnan(number) or number < 0 or (kind == _NONNEG and math.isinf(number)):
            raise OptionError(f"{name} must be {kind}, got {value!r}")
        return number
    elif ((kind == _TEXT and not isinstance(value, str)) or (kind in _SHAPED and not _SHAPED[kind](value))
          or (isinstance(kind, _Choice) and not kind.accepts(value))):
        raise OptionError(f"{name} must be {kind}, got {value!r}")
    return value


def validate_solver_args(solver: str, args: Any, what: str = "solver_args",
                         names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Return ``args`` as a dict of checked values, or raise ``OptionError`` naming an
    unknown key (and the valid ones) or a key whose value has the wrong type or range.

    ``names`` maps a key of ``args`` to the key its caller's user wrote, where a wrapper
    translated it (:class:`~convexddn.convex.compat.CvxpyLayer`: cvxpylayers'
    ``max_iters`` reaches Clarabel as ``max_iter``): errors name the key as written."""
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise OptionError(f"{what} must be a dict, got {type(args).__name__}")
    names = names or {}
    kinds = _solver_kinds(solver)
    unknown = sorted(names.get(k, k) for k in args if k not in kinds)
    if unknown:
        raise OptionError(
            f"{what} has key(s) {unknown} that solver {solver!r} does not take; valid keys "
            f"are {sorted(kinds)}")
    checked = {k: _solver_value(f"{what}[{names.get(k, k)!r}]", kinds[k], v) for k, v in args.items()}
    for k, v in checked.items():
        if kinds[k] == _SECONDS and v in (0, math.inf):
            checked[k] = _NO_LIMIT[solver]
    if solver in _TRIALS and checked:
        _accepted(solver, checked, what, names)
    return checked


def _accepted(solver: str, args: dict[str, Any], what: str, names: Mapping[str, str]) -> None:
    """The solver's own judgement of the settings, on a one-variable program (Clarabel: an
    unknown ``direct_solve_method``, an iteration limit beyond its integer type; SCS: a key
    the installed SCS does not take, a ``linear_solver`` whose library it lacks): an
    OptionError now, not a bare ``Exception`` from every element of a batch (naming the
    settings as ``names`` spells them, see :func:`validate_solver_args`). Per-call
    solver_args come here on every call: the same settings are judged once."""
    try:
        key = tuple(sorted((k, type(v), v) for k, v in args.items()))  # (type: True and 1 apart)
        hash(key)
    except TypeError:  # (an unhashable value: judged each time)
        error = _TRIALS[solver](args)
    else:
        error = _trial_error(solver, key)
    if error is not None:
        given = {names.get(k, k): v for k, v in args.items()}
        raise OptionError(f"{what} {given!r} are not accepted by {_judge_name(solver)}: {error}") from None


@functools.lru_cache(maxsize=64)
def _trial_error(solver: str, key: tuple) -> str | None:
    return _TRIALS[solver]({k: v for k, _, v in key})


def _judge_name(solver: str) -> str:
    if solver == "SCS":
        import scs

        return f"SCS {scs.__version__}"
    return solver


def _clarabel_trial(args: dict[str, Any]) -> str | None:
    """Clarabel's error with ``args`` on a one-variable program, or None (it raises a bare
    ``Exception``, "Bad settings")."""
    import clarabel
    import numpy as np
    import scipy.sparse as sp

    settings = clarabel.DefaultSettings()
    try:
        for k, v in args.items():
            setattr(settings, k, v)
        clarabel.DefaultSolver(sp.csc_matrix((1, 1)), np.zeros(1), sp.csc_matrix(np.ones((1, 1))), np.ones(1),
                               [clarabel.NonnegativeConeT(1)], settings)
    except Exception as err:  # noqa: BLE001
        return str(err)
    return None


def _scs_trial(args: dict[str, Any]) -> str | None:
    """SCS's error with ``args`` (but the settings that write files) on a one-variable
    program, silent, or None."""
    import numpy as np
    import scipy.sparse as sp
    import scs

    trial = {k: v for k, v in args.items() if k not in _SCS_FILES}
    try:
        scs.solve({"A": sp.csc_matrix(np.ones((1, 1))), "b": np.ones(1), "c": -np.ones(1)}, {"l": 1},
                  **{**trial, "verbose": False})
    except Exception as err:  # noqa: BLE001 - TypeError, ValueError, ImportError (a linear solver not built)
        return str(err)
    return None


_TRIALS = {"Clarabel": _clarabel_trial, "SCS": _scs_trial}


def solver_choice(name: str, value: Any, valid: tuple[str, ...], optional: bool = False) -> str:
    """The case-insensitive choice among ``valid``, in its canonical spelling (``optional``:
    the caller also takes None, which the message says)."""
    if isinstance(value, str):
        for v in valid:
            if v.lower() == value.lower():
                return v
    extra = " or None" if optional else ""
    raise OptionError(f"{name} must be one of {list(valid)}{extra}, got {value!r}")


# Cones a per-element solver cannot take: diffcp hands them over anyway and the solver
# fails on every element of every call (ECOS: "PSD cone not supported by ECOS").
_CONES_NOT_TAKEN = {"ECOS": (("psd", "semidefinite cones (constraints such as X >> 0)"),)}
# CVXPY's cone-dimension attribute -> its key in diffcp's cone dictionary (CVXPY's dims_to_solver_dict).
_CONE_KEYS = {"psd": "s"}


def takes_cones(solver: str, cone_dict: dict) -> bool:
    """Whether ``solver`` takes every cone of diffcp's cone dictionary ``cone_dict`` (a count, or a list
    of block sizes, per key): the same table as :func:`check_solver_cones`'s."""
    return not any(cone_dict.get(_CONE_KEYS[attr]) for attr, _ in _CONES_NOT_TAKEN.get(solver, ()))


def check_solver_cones(dims: Any, **solvers: str | None) -> None:
    """``OptionError`` where a solver named in ``solvers`` (option name -> solver) cannot
    take a cone of CVXPY's cone dimensions ``dims``: at construction, not per call (the
    option as :func:`spelling` names it)."""
    for option, solver in solvers.items():
        for attr, what in _CONES_NOT_TAKEN.get(solver, ()):
            if getattr(dims, attr, None):
                raise OptionError(f"{spelling(option)}={solver!r} cannot solve {what}, which this problem has; "
                                  f"use 'Clarabel' or 'SCS' there")


# Option -> how the user of a wrapper spelled it (and "batched_remedy": how that user reaches
# the batched solver), for errors raised while the wrapper builds a ConvexLayer: a context
# variable, so that each thread (and asyncio task) sees its own.
_SPELLING: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("convexddn_spelling", default={})


def spelled(**names: str) -> AbstractContextManager[None]:
    """Within the block, errors about ConvexLayer's options name them as ``names`` says
    (option -> the caller's spelling; ``batched_remedy``: the advice that reaches the
    batched solver), e.g. ``spelled(solver="solver_args['solve_method']")``."""
    return bound(_SPELLING, {**_SPELLING.get(), **names})


def spelling(option: str, default: str | None = None) -> str:
    """``option`` as the caller's user wrote it (see :func:`spelled`), else ``default``
    (``option`` itself when ``default`` is None)."""
    return _SPELLING.get().get(option, option if default is None else default)
