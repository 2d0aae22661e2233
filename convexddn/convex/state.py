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
    """A shallow copy of ``problem`` with its own, empty solver cache, and CVXPY's cached
    compilation dropped where compiling it again would fail.

    The solver cache holds the model of a user's ``prob.solve()``, which does not pickle
    (Clarabel's): a layer holding the problem failed to pickle after one. CVXPY (1.9)
    keeps a problem's last compilation and, asked for the same solver again,
    refills the parameters it split from their values: an ``imag=True`` parameter
    without a value (layers compile without values) then fails with "Invalid dimensions
    () for Parameter value". So a second layer on one problem (a second ConvexLayer, a
    ``CvxpyLayer`` call with another ``solve_method``) failed at construction on the
    per-element solvers, and under ``solver="auto"`` lost its batched solver. Every
    layer compiles through this; layers built before keep their own copy of the data.
    """
    cache = getattr(problem, "_cache", None)
    if getattr(cache, "param_prog", None) is not None and any(
            p.is_complex() and p.value is None for p in problem.parameters()):
        cache.invalidate()
    problem = copy.copy(problem)
    problem._solver_cache = {}
    return problem


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
