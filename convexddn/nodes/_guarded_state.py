"""A module's state read or written by one thread while another swaps its tensors.

:class:`~.declarative.DeclarativeNode`'s backward (and its first-call probe) swaps the
module's parameters and buffers, and its submodules', for others under
:func:`~._swap_guard.guarded` (``swap=True``): the ``implicit_dtype`` casts (float64
non-leaf tensors for a float32 ``nn.Parameter``), the forward's tensors, stand-ins that
require grad. A ``state_dict()``, pickle or ``copy.deepcopy`` taken meanwhile in another
thread read the module mid-swap: ``state_dict()['theta']`` was float64, the unpickled copy
held a plain float64 Tensor in place of its ``nn.Parameter`` (not in ``parameters()``),
and deepcopy raised torch's "Only Tensors created explicitly by the user (graph leaves)
support the deepcopy protocol" (220k of 245k copies bad in 40 s beside a loop of
backwards). A ``load_state_dict`` or ``.to(...)`` meanwhile wrote into the casts, and the
swap's end put back the module's own tensors, unchanged. :class:`GuardedState` takes the
guard's reading side for these: they wait for a swap under way, and a swap waits for them,
so they read and write the module's own tensors.

- ``state_dict`` (an enclosing model's calls it), ``load_state_dict``, ``_apply`` (``.to``,
  ``.double()``, ``.cuda()``, ...; an enclosing model's calls it): under the guard. An
  enclosing model's ``load_state_dict`` loads each submodule apart: the node's own tensors
  under its guard, those of the node's submodules not.
- ``copy.deepcopy`` and ``copy.copy``: the whole copy made under the guard.
- pickle (and ``torch.save`` of the module): the pickler reads the state after
  ``__getstate__`` has returned, when a swap may have begun; so ``__getstate__`` takes,
  under the guard, a snapshot: the module's parameter and buffer dicts, and its submodules
  as shallow clones holding their dicts' snapshots (a submodule shared within the module
  stays shared; one shared with a module outside is pickled as a copy of its own, whose
  parameters stay shared).
"""
from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.utils.parametrize import is_parametrized

from ._swap_guard import guarded, mid_swap_error, swapped_here

__all__ = ["GuardedState"]

# Ids of the modules this thread copies whole under their guard (deepcopy, copy): their
# __getstate__ hands the live state, which no swap can change before the copy is made.
_whole = threading.local()


@contextlib.contextmanager
def _copying_whole(module: torch.nn.Module) -> Iterator[None]:
    held = _whole.__dict__.setdefault("ids", set())
    fresh = id(module) not in held
    held.add(id(module))
    try:
        yield
    finally:
        if fresh:
            held.discard(id(module))


def _clone(module: torch.nn.Module, memo: dict[int, torch.nn.Module]) -> torch.nn.Module:
    """A shallow clone of ``module`` whose parameter, buffer and submodule dicts are new
    (the tensors themselves shared), its submodules cloned alike; ``memo``: id -> clone."""
    if id(module) in memo:
        return memo[id(module)]
    clone = object.__new__(type(module))
    memo[id(module)] = clone
    state = dict(module.__dict__)
    _own_dicts(state, memo)
    object.__setattr__(clone, "__dict__", state)
    return clone


def _own_dicts(state: dict, memo: dict[int, torch.nn.Module]) -> None:
    """``state`` (a module's ``__dict__`` copy) with new parameter and buffer dicts and cloned submodules."""
    for key in ("_parameters", "_buffers"):
        if key in state:
            state[key] = dict(state[key])
    if "_modules" in state:
        state["_modules"] = {name: None if m is None else _clone(m, memo) for name, m in state["_modules"].items()}


def _refuse_mid_swap(module: torch.nn.Module, how: str) -> None:
    """Raise where this thread swaps ``module``'s tensors (or those of a module it holds or is held by):
    a deep copy made in the node's own objective or constraints (``copy.deepcopy(self)``) took the stand-ins
    as its tensors, torch's raw "Only Tensors created explicitly by the user (graph leaves) support the
    deepcopy protocol" for an ``implicit_dtype`` cast, else a copy cut off from the node's parameters."""
    swapped = swapped_here(module)
    if swapped is not None:
        raise mid_swap_error(type(module).__name__, type(swapped).__name__, how)


class GuardedState(torch.nn.Module):
    """A module whose ``state_dict``, ``load_state_dict``, ``_apply``, pickle, ``copy`` and
    ``deepcopy`` exclude a swap of its tensors under :func:`~._swap_guard.guarded` (see the
    module's docstring)."""

    _guards_swaps = True  # (a module holding this one takes its guard too: see _swap_guard._in_order)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        with guarded(self, swap=False):
            return super().state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        with guarded(self, swap=False):
            return super().load_state_dict(*args, **kwargs)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        with guarded(self, swap=False):  # (an enclosing model's load_state_dict calls it)
            super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, *args: Any, **kwargs: Any) -> Any:
        with guarded(self, swap=False):
            return super()._apply(*args, **kwargs)

    def __getstate__(self) -> dict:
        with guarded(self, swap=False):
            state = super().__getstate__()
            if id(self) not in getattr(_whole, "ids", ()):
                _refuse_mid_swap(self, "pickled")
                # (the pickler reads it after the guard is let go: a snapshot, taken under it)
                _own_dicts(state, {id(self): self})
            return state

    def _copy(self, deep: bool, memo: dict | None) -> GuardedState:
        """Python's own copy (``__reduce_ex__``'s state through ``__setstate__``), made whole
        under the guards: the live state, no snapshot (a shallow copy shares the dicts, as before)."""
        if deep:  # (a shallow copy shares the dicts: it reads what the node reads, the stand-ins too)
            _refuse_mid_swap(self, "deep-copied")
        with guarded(self, swap=False), _copying_whole(self):
            new = type(self).__new__(type(self))
            if deep:
                memo[id(self)] = new  # (before the state: a submodule may refer back to this one)
            # (a parametrized module's class refuses __getstate__: torch copies its __dict__ instead)
            state = dict(self.__dict__) if is_parametrized(self) else self.__getstate__()
            new.__setstate__(copy.deepcopy(state, memo) if deep else state)
            return new

    def __copy__(self) -> GuardedState:
        return self._copy(False, None)

    def __deepcopy__(self, memo: dict) -> GuardedState:
        return self._copy(True, memo)
