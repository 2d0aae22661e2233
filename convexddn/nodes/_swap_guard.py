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
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch.nn.utils.stateless import _reparametrize_module

__all__ = ["SwapGuard", "guarded", "read_as"]


class SwapGuard:
    """Shared ``reading()`` (forwards) and exclusive ``swapping()`` of one module's tensors."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None  # the thread swapping now
        self._depth = 0  # its nested swaps
        self._waiting = 0  # swaps waiting: new forwards let them go first (no starvation)
        self._mine = threading.local()  # this thread's reads under way

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
    def swapping(self) -> Iterator[None]:
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
                self._writer, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                    self._cond.notify_all()


def guarded(module: torch.nn.Module, swap: bool) -> contextlib.AbstractContextManager:
    """``module``'s :class:`SwapGuard` held (made on first use, in ``module.__dict__`` as
    ``_swap_guard``), exclusively with ``swap``; nothing while torch.compile traces."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    guard = module.__dict__.get("_swap_guard") or module.__dict__.setdefault("_swap_guard", SwapGuard())
    return guard.swapping() if swap else guard.reading()


@contextlib.contextmanager
def read_as(module: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Within: ``module``'s floating parameters and buffers read as ``dtype`` (differentiably;
    a swap, to be held under :func:`guarded` with ``swap=True``)."""
    with torch.enable_grad():  # the casts must carry gradients back to parameters
        casts = {
            name: t.to(dtype)
            for name, t in [*module.named_parameters(remove_duplicate=False),
                            *module.named_buffers(remove_duplicate=False)]
            if t.is_floating_point() and t.dtype != dtype
        }
    if not casts:
        yield
        return
    with _reparametrize_module(module, casts):
        yield
