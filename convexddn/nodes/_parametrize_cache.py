"""``torch.nn.utils.parametrize.cached()`` kept out of a node's own evaluations of its problem.

Within ``parametrize.cached()``, reading a parametrized tensor (``w = exp(raw)`` registered with
``register_parametrization``, ``weight_norm``'s ``weight``) computes it once and then returns it from
one global cache, keyed by ``(id(module), name)``. A :class:`~.declarative.DeclarativeNode`'s probe,
backward and jvp differentiate its objective with respect to stand-ins swapped in for ``raw`` (leaves
that require grad, ``implicit_dtype`` casts); the cached ``w`` was computed from the real ``raw`` (or,
read first in ``solve``, under ``no_grad``, from nothing), so no gradient reached a stand-in: ``raw``
got 0, silently, and the probe warned it unused. A ``w`` first read in ``solve`` was also cached
without a graph for the caller's own use of it after the call (a regulariser on ``node.w``: 0 too).

:func:`uncached` hides the node's entries from the cache for each such evaluation (and for
``solve``): ``w`` is computed from what ``raw``'s name holds then, cached for the rest of that one
evaluation only, and the caller's entries are back after it.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.nn.utils import parametrize

__all__ = ["fresh_parametrizations", "uncached"]


def _caching() -> bool:
    """Whether a ``parametrize.cached()`` scope is open (torch's private counter; where a later torch
    renames it, as if none were: the evaluations then read what torch's cache gives)."""
    return bool(getattr(parametrize, "_cache_enabled", 0))


def _parametrized(module: torch.nn.Module) -> set[int]:
    """The ids of ``module`` and its submodules that hold parametrizations (the cache's keys)."""
    return {id(m) for m in module.modules() if parametrize.is_parametrized(m)}


@contextlib.contextmanager
def fresh_parametrizations(module: torch.nn.Module) -> Iterator[None]:
    """Within: the parametrized tensors of ``module`` (and of its submodules) are computed anew, not read
    from the cache of an enclosing ``parametrize.cached()``; its entries for them are restored on exit,
    and those made within dropped. Nothing is done outside ``cached()``."""
    ids = _parametrized(module) if _caching() else set()
    if not ids:
        yield
        return
    # (the dict of this cached() scope: its outermost exit binds a new one)
    cache = getattr(parametrize, "_cache", None)
    if not isinstance(cache, dict):
        yield
        return
    held = {k: cache.pop(k) for k in [k for k in list(cache) if k[0] in ids]}
    try:
        yield
    finally:
        for k in [k for k in list(cache) if k[0] in ids]:
            cache.pop(k, None)
        cache.update(held)


def uncached(module: torch.nn.Module, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (one of the user's methods, as the node calls it), each call of it under
    :func:`fresh_parametrizations` of ``module`` where a ``parametrize.cached()`` scope is open.
    (Nothing is read of the module here: a walk over its submodules at each wrap cost every
    call of every node, also outside ``cached()``.)"""
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not _caching():  # (outside cached(): fn as it is)
            return fn(*args, **kwargs)
        with fresh_parametrizations(module):
            return fn(*args, **kwargs)

    return call
