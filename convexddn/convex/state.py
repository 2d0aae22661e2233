"""A layer's CVXPY problem and what it pickles.

- :func:`uncached`: a copy of the user's problem, ready to be compiled again by another
  layer and to pickle (its own, empty solver cache);
- :func:`picklable_state`, :func:`restore_state`: a layer's ``__getstate__`` and
  ``__setstate__`` (without transient members and solver models; through
  ``nn.Module.__setstate__``).
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import cvxpy as cp
from torch import nn

__all__ = ["picklable_state", "restore_state", "uncached"]


def uncached(problem: cp.Problem) -> cp.Problem:
    """A shallow copy of ``problem`` with its own, empty caches: CVXPY's compilation cache
    and its solver cache. The layer compiles the copy; the user's problem is not touched.

    The solver cache holds the model of a user's ``prob.solve()``, which does not pickle
    (Clarabel's): a layer holding the problem failed to pickle after one. The compilation
    cache was shared with the user's problem before, and CVXPY reuses a problem's last
    compilation when asked for the same solver again: it refills the parameters it split
    from their values (an ``imag=True`` parameter without a value then failed with
    "Invalid dimensions () for Parameter value", so a second layer on one problem failed
    at construction). Every compile goes through here, so the nodes' derived caches are
    dropped here too (``_drop_derived_caches``: a deep copy's caches name old ids).
    """
    problem = copy.copy(problem)
    problem._cache = type(problem._cache)()  # (cvxpy.problems.problem.Cache: all fields None)
    problem._solver_cache = {}
    _drop_derived_caches(problem)
    return problem


def _drop_derived_caches(problem: cp.Problem) -> None:
    """Delete CVXPY's lazily cached properties (attributes named ``_lazy…``: canonical
    forms, curvature) on every CVXPY node reachable from ``problem``: its objective and
    constraints, their arguments, and expressions held elsewhere (a variable's
    ``bounds``, a perspective's function). They are rebuilt on need.

    ``copy.deepcopy`` gives every CVXPY node a new id but copies those caches, whose
    canonical forms name the old ids: compiling a deep copy of a problem compiled before
    (a layer's deep copy, or the user's copy of the problem) aborted or crashed the
    process in CVXPY's C++ backend (``std::out_of_range``, ``map::at``; a segfault with
    parameters in a variable's bounds). A nested problem's own ``_lazy_constraints`` is
    state, not a cache, and is kept.
    """
    from cvxpy.utilities.canonical import Canonical

    stack, seen = [problem], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        attrs = vars(node)
        if not isinstance(node, cp.Problem):
            for name in [k for k in attrs if k.startswith("_lazy")]:
                delattr(node, name)
        for value in list(attrs.values()):  # args, a variable's attributes (bounds), ...
            for item in _members(value):
                stack.extend(v for v in _members(item) if isinstance(v, Canonical))


def _members(value: Any) -> tuple | list:
    """A container's members (a dict's values), or the value alone."""
    if isinstance(value, dict):
        return list(value.values())
    return value if isinstance(value, (list, tuple)) else (value,)


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
