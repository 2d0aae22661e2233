"""A layer's CVXPY problem and what it pickles.

- :func:`uncached`: a copy of the user's problem, ready to be compiled again by another
  layer and to pickle (its own, empty solver cache);
- :func:`picklable_state`, :func:`restore_state`: a layer's ``__getstate__`` and
  ``__setstate__`` (without transient members and solver models; through
  ``nn.Module.__setstate__``); :func:`drop_derived_caches` after a deep copy.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import cvxpy as cp
from torch import nn

__all__ = ["drop_derived_caches", "picklable_state", "restore_state", "uncached"]


def uncached(problem: cp.Problem) -> cp.Problem:
    """A shallow copy of ``problem`` with its own, empty caches: CVXPY's compilation cache
    and its solver cache. The layer compiles the copy; the user's problem is not touched.

    The solver cache holds the model of a user's ``prob.solve()``, which does not pickle
    (Clarabel's): a layer holding the problem failed to pickle after one. The compilation
    cache was shared with the user's problem before, and CVXPY reuses a problem's last
    compilation when asked for the same solver again: it refills the parameters it split
    from their values (an ``imag=True`` parameter without a value then failed with
    "Invalid dimensions () for Parameter value", so a second layer on one problem failed
    at construction), and a deep copy of a layer whose problem another layer had compiled
    held that compilation with the original parameters: its first second opinion
    aborted the process in CVXPY's C++ backend (``std::out_of_range``, ``map::at``).
    """
    problem = copy.copy(problem)
    problem._cache = type(problem._cache)()  # (cvxpy.problems.problem.Cache: all fields None)
    problem._solver_cache = {}
    return problem


def drop_derived_caches(problem: cp.Problem) -> None:
    """Delete CVXPY's lazily cached properties (attributes named ``_lazy…``: canonical
    forms, curvature) on every node of ``problem``'s expression tree.

    ``copy.deepcopy`` gives every CVXPY node a new id but copies those caches, whose
    canonical forms name the old ids: compiling a deep copy of a layer whose problem had
    been compiled before (by another layer's second opinion) aborted the process in
    CVXPY's C++ backend (``std::out_of_range``, ``map::at``). They are rebuilt on need.
    """
    stack, seen = [problem.objective, *problem.constraints], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for name in [k for k in vars(node) if k.startswith("_lazy")]:
            delattr(node, name)
        stack.extend(getattr(node, "args", ()))


def picklable_state(module: nn.Module, transient: Sequence[str] = ()) -> dict:
    """``module.__dict__`` to pickle, without ``transient`` members (locks, thread-local data);
    problems in it (or in a tuple) that cache a solver's model are :func:`uncached`."""
    def clean(v: Any) -> Any:
        return uncached(v) if isinstance(v, cp.Problem) and getattr(v, "_solver_cache", None) else v
    return {k: tuple(map(clean, v)) if type(v) is tuple else clean(v)
            for k, v in module.__dict__.items() if k not in transient}


def restore_state(module: nn.Module, state: dict, defaults: dict, hidden: Sequence[str] = ()) -> None:
    """``module.__setstate__``: ``state`` over ``defaults`` through ``nn.Module.__setstate__`` (it
    adds the hooks older torch lacks); ``hidden`` members leave the module tree if in it."""
    nn.Module.__setstate__(module, defaults | state)
    for name in hidden:
        if name in module._modules:
            object.__setattr__(module, name, module._modules.pop(name))
