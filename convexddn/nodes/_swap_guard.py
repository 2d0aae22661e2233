"""Calls that read a module's tensors, and swaps of them, from several threads.

:class:`~.declarative.DeclarativeNode`'s backward and its first-call probe swap the
module's parameters and buffers for other tensors (the forward's, their
``implicit_dtype`` casts, stand-ins that require grad) and put them back after. Two
threads swapping one module at once restored each other's tensors: the module kept a
float64 cast in place of its parameter for good; and a forward in one thread while
another swapped solved with the casts (``DTypeError``). :class:`SwapGuard` lets
forwards run together and a swap run alone: a swap waits for the forwards under way,
forwards wait for a swap under way. A thread that already holds the guard never waits
for itself (a ``solve`` that calls its own node again).

A forked child (a DataLoader worker, ``multiprocessing``'s "fork") keeps only the thread
that forked: the holds of the others, and a swap under way in another thread, would never
end there (the child's forward waited for ever, and its module held the backward's float64
casts in place of its parameters). After a fork the child lets them go and puts the
module's own tensors back.
"""
from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator

import torch
from torch.nn.utils.stateless import _reparametrize_module

from ._held_estimates import held_estimates

__all__ = ["SwapGuard", "guarded", "read_as", "swapped_here"]

# The modules this thread swaps now (innermost last): a copy of one of them made meanwhile, in its own
# objective, would take the stand-ins for its tensors (see swapped_here).
_here = threading.local()

# A module's own tensors, per submodule: (module, its _parameters, its _buffers).
_Tensors = list[tuple[torch.nn.Module, dict, dict]]


def _tensors_of(module: torch.nn.Module) -> _Tensors:
    return [(m, dict(m._parameters), dict(m._buffers)) for m in module.modules()]


def _put_back(tensors: _Tensors) -> None:
    # (by name, as torch's swaps write them: a key's place in the dict is kept)
    for m, params, buffers in tensors:
        for name, t in params.items():
            m._parameters[name] = t
        for name, t in buffers.items():
            m._buffers[name] = t


class SwapGuard:
    """Shared ``reading()`` (forwards) and exclusive ``swapping()`` of one module's tensors."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None  # the thread swapping now
        self._depth = 0  # its nested swaps
        self._waiting = 0  # swaps waiting: new forwards let them go first (no starvation)
        self._mine = threading.local()  # this thread's reads under way
        self._own: _Tensors | None = None  # the module's tensors before the swap under way
        _GUARDS.add(self)

    def __reduce__(self) -> tuple:
        # Any copy (pickle, copy.copy, deepcopy) is a new, free guard: a copied module owns
        # new tensors, which no read or swap of the original's is under way on, and a lock
        # and a thread-local do not copy (torch's parametrize deep-copies a module's
        # __dict__ itself, past DeclarativeNode.__getstate__: "cannot pickle '_thread.lock'").
        return (SwapGuard, ())

    def _own_reads(self) -> int:
        return getattr(self._mine, "reads", 0)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            # (a thread that holds a read goes on: a swap waiting for it waits for it to end)
            # A swap waiting goes first: a backward behind a stream of forwards waited
            # 4.6 s with 4 threads of 10 ms forwards before.
            while (self._writer not in (None, me) or (self._waiting and self._writer != me)) \
                    and not self._own_reads():
                self._cond.wait()
            self._readers += 1
        self._mine.reads = self._own_reads() + 1
        try:
            yield
        finally:
            self._mine.reads -= 1
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def swapping(self, module: torch.nn.Module | None = None) -> Iterator[None]:
        """Held alone; ``module``'s tensors are noted on entry, for a forked child to put
        back (:meth:`_after_fork_in_child`)."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._depth += 1
            else:
                # A thread that holds a read (a swap inside its own forward) waits only for
                # a swap under way: waiting for the reads would wait for itself, and two
                # such threads for each other.
                own = self._own_reads()
                self._waiting += 1
                try:
                    while self._writer is not None or (self._readers and not own):
                        self._cond.wait()
                finally:
                    self._waiting -= 1
                # (noted before the writer: a child forked in between finds them)
                self._own = None if module is None else _tensors_of(module)
                self._writer, self._depth = me, 1
        held = _here.__dict__.setdefault("modules", [])
        held.append(module)
        try:
            yield
        finally:
            held.pop()
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer, self._own = None, None
                    self._cond.notify_all()

    def _after_fork_in_child(self) -> None:
        """In a forked child only the forking thread lives: the other threads' reads and
        waits end, and a swap of another thread is undone (its tensors put back). The
        lock is new: another thread may have held it at the fork."""
        me = threading.get_ident()
        self._cond = threading.Condition(threading.Lock())
        self._readers, self._waiting = self._own_reads(), 0
        if self._writer not in (None, me):
            if self._own is not None:
                _put_back(self._own)
            self._writer, self._depth, self._own = None, 0, None


_GUARDS: weakref.WeakSet[SwapGuard] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for guard in list(_GUARDS):
        guard._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def swapped_here(module: torch.nn.Module) -> torch.nn.Module | None:
    """The module this thread swaps now that ``module`` is, holds or is held by (``None`` if none)."""
    inside = getattr(_here, "modules", ())
    if not inside:
        return None
    mine = {id(m) for m in module.modules()}
    return next((m for m in inside if m is not None and (id(m) in mine or any(s is module for s in m.modules()))),
                None)


def guarded(module: torch.nn.Module, swap: bool) -> contextlib.AbstractContextManager:
    """``module``'s :class:`SwapGuard` held (made on first use, in ``module.__dict__`` as
    ``_swap_guard``), exclusively with ``swap``; nothing while torch.compile traces."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    guard = module.__dict__.get("_swap_guard") or module.__dict__.setdefault("_swap_guard", SwapGuard())
    return guard.swapping(module) if swap else guard.reading()


@contextlib.contextmanager
def read_as(module: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Within: ``module`` as its problem's evaluations read it: its floating parameters and buffers
    read as ``dtype`` (differentiably), and its spectral norms' estimates held
    (:func:`~._held_estimates.held_estimates`); a swap, to be held under :func:`guarded` with ``swap=True``."""
    with torch.enable_grad():  # the casts must carry gradients back to parameters
        casts = {
            name: t.to(dtype)
            for name, t in [*module.named_parameters(remove_duplicate=False),
                            *module.named_buffers(remove_duplicate=False)]
            if t.is_floating_point() and t.dtype != dtype
        }
    with held_estimates(module), (_reparametrize_module(module, casts) if casts else contextlib.nullcontext()):
        yield
