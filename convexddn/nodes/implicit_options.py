"""The options of the implicit derivative (:func:`~.implicit.declarative_vjp`,
:func:`~.implicit_jvp.declarative_jvp`, :class:`~convexddn.DeclarativeNode`), checked by
one validator."""
from __future__ import annotations

import inspect
from typing import Any

import torch

from .._checks import check_bool, check_choice, check_count, check_int, check_number, check_tolerance
from ..errors import OptionError
from .linear_solvers import LINEAR_SOLVERS, solve_kkt_cg

__all__ = ["WORK_DTYPES", "check_implicit_options"]

#: The dtypes the implicit derivative's linear algebra may run in.
WORK_DTYPES = (torch.float64, torch.float32)
# What cg_options may hold: solve_kkt_cg's keyword options but the two this module sets.
_CG_KEYS = frozenset(name for name, p in inspect.signature(solve_kkt_cg).parameters.items()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY) - {"warn_dependent", "check_minimum"}
# The names DeclarativeNode gives cg_options' entries (its options), as errors show them.
_CG_NAMES = {"tol": "cg_tol", "max_iter": "cg_max_iter"}


def check_implicit_options(linear_solver: Any, dense_max: Any, active_tol: Any, cg_options: Any,
                           check_solution: Any, solution_tol: Any, work_dtype: Any, check_minimum: Any,
                           dtype_name: str = "work_dtype") -> None:
    """The one validator of the implicit derivative's options, for :class:`~convexddn.DeclarativeNode`
    and for :func:`~.implicit.declarative_vjp` / :func:`~.implicit_jvp.declarative_jvp`
    called directly (where ``active_tol=nan`` made every inequality active, silently).
    ``cg_options``: keyword arguments of :func:`~.linear_solvers.solve_kkt_cg` (values
    may be None); ``tol`` and ``max_iter`` are checked here, the others there. A CG
    option that is not None with a ``linear_solver`` that never runs CG (``"dense"``, a
    callable) is refused: it was ignored silently (and a node's repr showed it)."""
    if not callable(linear_solver):
        check_choice("linear_solver", linear_solver, LINEAR_SOLVERS, or_else=" or a callable")
    if dense_max is not None:
        check_int("dense_max", dense_max, minimum=0)
    check_number("active_tol", active_tol, above=0)  # a constant: a tensor would reach the comparisons
    if cg_options is not None:
        if not isinstance(cg_options, dict) or set(cg_options) - _CG_KEYS:
            raise OptionError(f"cg_options must be a dict of solve_kkt_cg's keyword arguments "
                              f"{sorted(_CG_KEYS)}, got {cg_options!r}")
        if cg_options.get("tol") is not None:
            check_tolerance("cg_tol", cg_options["tol"])  # >= 1 would stop CG before its first step
        if cg_options.get("max_iter") is not None:
            check_count("cg_max_iter", cg_options["max_iter"])
        unused = [_CG_NAMES.get(k, f"cg_options[{k!r}]") for k, v in cg_options.items() if v is not None]
        if unused and (callable(linear_solver) or linear_solver == "dense"):
            solver = getattr(linear_solver, "__name__", repr(linear_solver)) if callable(linear_solver) else "'dense'"
            raise OptionError(f"CG option(s) {', '.join(unused)} given, but linear_solver={solver} never runs CG "
                              "(only 'cg' does, and 'auto' where it picks CG); leave them None")
    check_bool("check_solution", check_solution)
    check_bool("check_minimum", check_minimum)
    if solution_tol is not None:
        check_tolerance("solution_tol", solution_tol)  # >= 1 would accept any point
    if work_dtype not in WORK_DTYPES:
        raise OptionError(f"{dtype_name} must be one of {list(WORK_DTYPES)}, got {work_dtype!r}")
