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

A wait that would never end raises a ``ProblemError`` (:meth:`SwapGuard._await`): two nodes
whose objectives read each other's ``state_dict()``, run in two threads, each held its own swap
and waited for the other's. Every guard keeps its bookkeeping under one lock, so a thread about
to wait sees who holds what and who waits for what at one moment, and follows the waits from
the holders it waits for: back to itself is a cycle, which only its wait could close.

A node among another's submodules (``outer.inner``) is swapped by the outer's swap too (its tensors are
among the outer's): :func:`guarded` holds, with a module's guard, those of its submodules that guard their
own (:func:`_in_order`). With only its own, one thread's training of ``outer`` and another's
``inner.state_dict()`` read the outer backward's float64 cast of ``inner.w`` (752k of 775k), and training
both in two threads failed 308 of 400 calls (``DTypeError``: one solve read the other's casts).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
import weakref
from collections.abc import Callable, Iterator

import torch
from torch.nn.utils.stateless import _reparametrize_module

from ..errors import ProblemError
from ._held_estimates import held_estimates

__all__ = ["SwapGuard", "guarded", "mid_swap_error", "named_state", "read_as", "swapped_here"]

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


# One lock for every guard's bookkeeping (each guard waits on a Condition of its own over it): a
# thread about to wait then sees, at once, what each thread holds and waits for (see _cycle).
_LOCK = threading.Lock()
# Each waiting thread's ident -> (the guard it waits for, its wait's blockers: threads, from the state now).
_WAITS: dict[int, tuple[SwapGuard, Callable[[], set[int]]]] = {}


def _cycle(me: int, holders: set[int]) -> list[str] | None:
    """The guards' names along a cycle of waits back to thread ``me`` (blocked by ``holders``):
    each thread of it waits for one that waits, in turn, ..., for ``me``; ``None`` if none. Under
    ``_LOCK``: the holds and waits seen are those of one moment."""
    path: dict[int, list[str]] = {t: [] for t in holders}
    todo = list(holders)
    while todo:
        t = todo.pop()
        if t == me:
            return path[t]
        wait = _WAITS.get(t)
        if wait is not None:
            for u in wait[1]():
                if u not in path:
                    path[u] = [*path[t], wait[0].name]
                    todo.append(u)
    return None


class SwapGuard:
    """Shared ``reading()`` (forwards) and exclusive ``swapping()`` of one module's tensors
    (``name``: the module's class, for messages).

    A wait that would never end raises a ``ProblemError`` instead: where the threads that hold
    what this thread waits for wait, in turn, for what it holds (two nodes whose objectives read
    each other's ``state_dict()``, run in two threads: each held its own swap and waited for the
    other's, for ever). The thread that closes the cycle raises; its holds end as the error
    unwinds, and the others go on."""

    def __init__(self, name: str = "module") -> None:
        self.name = name
        self._cond = threading.Condition(_LOCK)
        self._readers: dict[int, int] = {}  # thread -> its reads under way
        self._writer: int | None = None  # the thread swapping now
        self._depth = 0  # its nested swaps
        self._waiting: set[int] = set()  # threads waiting to swap: new forwards let them go first (no starvation)
        self._own: _Tensors | None = None  # the module's tensors before the swap under way
        self.serial = next(_SERIALS)  # (the order of guards that neither holds the other: see _in_order)
        _GUARDS.add(self)

    def __reduce__(self) -> tuple:
        # Any copy (pickle, copy.copy, deepcopy) is a new, free guard: a copied module owns
        # new tensors, which no read or swap of the original's is under way on, and a lock
        # does not copy (torch's parametrize deep-copies a module's __dict__ itself, past
        # DeclarativeNode.__getstate__: "cannot pickle '_thread.lock'").
        return (SwapGuard, (self.name,))

    def _await(self, me: int, blockers: Callable[[], set[int]], what: str) -> None:
        """Wait (``_LOCK`` held) until ``blockers()`` is empty; raise where the wait would never end."""
        while holders := blockers():
            cycle = _cycle(me, holders)
            if cycle is not None:
                raise ProblemError(
                    f"{self.name}: this thread would wait for ever to {what} {self.name}'s tensors: the thread that "
                    f"holds them waits for {' -> '.join(cycle)}, which this thread holds (its swap: in its "
                    "objective, constraints or backward, or its forward). Two nodes whose objectives read "
                    "each other's state (state_dict(), a copy, a call), run in two threads, wait for each other so; "
                    "read the other node's tensors before the call (pass them as inputs), or run the two in one thread")
            _WAITS[me] = (self, blockers)
            try:
                self._cond.wait()
            finally:
                del _WAITS[me]

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        me = threading.get_ident()

        def blockers() -> set[int]:
            # (a thread that holds a read goes on: a swap waiting for it waits for it to end)
            # A swap waiting goes first: a backward behind a stream of forwards waited
            # 4.6 s with 4 threads of 10 ms forwards before.
            if self._readers.get(me) or self._writer == me:
                return set()
            return {self._writer} if self._writer is not None else set(self._waiting)

        with self._cond:
            self._await(me, blockers, "read")
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
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
                own = bool(self._readers.get(me))

                def blockers() -> set[int]:
                    if self._writer is not None:
                        return {self._writer}
                    return set() if own else set(self._readers)

                self._waiting.add(me)
                try:
                    self._await(me, blockers, "swap")
                finally:
                    self._waiting.discard(me)
                    self._cond.notify_all()  # (forwards that let this swap go first)
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
        lock is new (:func:`_after_fork_in_child`): another thread may have held it at the fork."""
        me = threading.get_ident()
        self._cond = threading.Condition(_LOCK)
        self._readers = {me: self._readers[me]} if self._readers.get(me) else {}
        self._waiting = set()
        if self._writer not in (None, me):
            if self._own is not None:
                _put_back(self._own)
            self._writer, self._depth, self._own = None, 0, None


_GUARDS: weakref.WeakSet[SwapGuard] = weakref.WeakSet()
_SERIALS = itertools.count()


def _after_fork_in_child() -> None:
    global _LOCK
    _LOCK = threading.Lock()
    _WAITS.clear()
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


def mid_swap_error(copied: str, swapped: str, how: str) -> ProblemError:
    """The error for a copy (``how``: "deep-copied", "pickled") of ``copied`` made while this thread evaluates
    the problem of node ``swapped`` (its class's name), whose tensors are swapped then."""
    return ProblemError(
        f"{copied} was {how} while {swapped}'s objective or constraints were evaluated (copy.deepcopy(self), or of "
        "a submodule, in the objective, say): the node's parameters and buffers, its submodules' too, are swapped "
        "then for the tensors the implicit differentiation reads (implicit_dtype casts, stand-ins that require "
        "grad), which the copy would take for its own, cut off from the node's parameters (no gradient would reach "
        "them). Read the tensors directly (self.weight, self.sub(x)), or copy in solve, __init__ or outside the node")


def _guard(module: torch.nn.Module) -> SwapGuard:
    """``module``'s guard, made on first use (in ``module.__dict__`` as ``_swap_guard``)."""
    return module.__dict__.get("_swap_guard") or module.__dict__.setdefault("_swap_guard",
                                                                            SwapGuard(type(module).__name__))


def _in_order(module: torch.nn.Module) -> list[torch.nn.Module]:
    """``module`` and its submodules that guard their own swaps (``_guards_swaps``: a nested node),
    in the one order every thread takes their guards in, whatever module it starts from: a module
    before those it holds (by its height, the longest chain of such modules below it, which a
    module holding it exceeds), ties by the guards' age. Two threads taking two guards in
    opposite orders (``outer``, ``inner``, ``mid`` beside ``mid``, ``inner``) waited for each other."""
    heights: dict[int, int] = {}

    def height(m: torch.nn.Module) -> int:
        if id(m) not in heights:
            heights[id(m)] = 0  # (a module that holds itself: no endless recursion)
            heights[id(m)] = max((height(c) + _guards(c) for c in m.children()), default=0)
        return heights[id(m)]

    mods = [m for m in module.modules() if m is module or _guards(m)]
    return sorted(mods, key=lambda m: (-height(m), _guard(m).serial)) if len(mods) > 1 else mods


def _guards(module: torch.nn.Module) -> bool:
    return bool(getattr(type(module), "_guards_swaps", False))


@contextlib.contextmanager
def _holding(mods: list[torch.nn.Module], swap: bool) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for m in mods:
            stack.enter_context(_guard(m).swapping(m) if swap else _guard(m).reading())
        yield


def guarded(module: torch.nn.Module, swap: bool) -> contextlib.AbstractContextManager:
    """``module``'s :class:`SwapGuard` held, and those of its submodules that guard their own
    (:func:`_in_order`): a swap of ``module`` swaps theirs, a swap of theirs changes what
    ``module`` reads. Exclusively with ``swap``; nothing while torch.compile traces."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    mods = _in_order(module)
    if len(mods) == 1:
        return _guard(module).swapping(module) if swap else _guard(module).reading()
    return _holding(mods, swap)


def named_state(module: torch.nn.Module, kinds=("_parameters", "_buffers")) -> list[tuple[str, torch.Tensor]]:
    """``module``'s parameters, then its buffers (``kinds``: which dicts of each submodule), by name: one name
    per place that holds one (a submodule's ``_parameters`` or ``_buffers`` key). A tied tensor (two
    submodules' attributes bound to it) comes under each of its names: both places are swapped. A submodule
    held under two names (``self.a = self.b = lin``) comes once, by its first name: its names are one place,
    which a swap by both names swapped twice, and whose restore left the first stand-in there in place of the
    parameter (a plain tensor, cut off from the optimizer's, after a call's probe; the probe named the other
    name's parameters unread, a false GradientWarning)."""
    mods = list(module.named_modules())  # (a submodule under two names: once)
    return [(f"{prefix}.{key}" if prefix else key, t) for kind in kinds
            for prefix, m in mods for key, t in getattr(m, kind).items() if t is not None]


@contextlib.contextmanager
def read_as(module: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Within: ``module`` as its problem's evaluations read it: its floating parameters and buffers
    read as ``dtype`` (differentiably), and its spectral norms' estimates held
    (:func:`~._held_estimates.held_estimates`); a swap, to be held under :func:`guarded` with ``swap=True``."""
    with torch.enable_grad():  # the casts must carry gradients back to parameters
        casts = {name: t.to(dtype) for name, t in named_state(module) if t.is_floating_point() and t.dtype != dtype}
    with held_estimates(module), (_reparametrize_module(module, casts) if casts else contextlib.nullcontext()):
        yield
