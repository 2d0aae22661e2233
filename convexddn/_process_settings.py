"""Process-wide settings held while calls run, safe when several threads call at once.

``warnings.catch_warnings()`` and threadpoolctl's ``threadpool_limits`` save the global
state on entry and put it back on exit. Two threads inside at once interleave: the one
leaving last restores what the other had set, so the per-element solvers, called from
several threads, left an "ignore every warning" filter installed for the whole process
(every later warning, the library's own included, was lost) and numpy's BLAS pools at
one thread. :class:`HeldSetting` applies a setting once for the threads inside.

- The warning filter is applied when the first thread enters and removed when the last
  one leaves; it is narrowed to the solver packages, so that other threads' warnings
  are shown meanwhile.
- The BLAS limit is applied and restored by one thread, the one that entered first
  (threadpoolctl lets only one thread at a time change OpenBLAS's process-wide count:
  another thread's restore did nothing, and the limit stayed). Threads inside meanwhile
  share it until that thread leaves.
"""
from __future__ import annotations

import contextlib
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["HeldSetting", "single_threaded_blas", "solver_warnings_ignored"]


class HeldSetting:
    """A process-wide setting held while threads are inside the context: ``apply()`` when
    the first one enters, ``restore(its result)`` when the last one leaves; with
    ``by_one_thread``, when the thread that applied it leaves (the next thread to enter
    then applies it again)."""

    def __init__(self, apply: Callable[[], Any], restore: Callable[[Any], None], by_one_thread: bool = False) -> None:
        self._apply, self._restore, self._by_one = apply, restore, by_one_thread
        self._lock = threading.Lock()
        self._users = 0
        self._holder: int | None = None  # the thread that applied it (by_one_thread)
        self._token: Any = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._lock:
            applies = not self._users if not self._by_one else self._holder is None
            if applies:
                self._token, self._holder = self._apply(), me
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if (applies if self._by_one else not self._users):
                    token, self._token, self._holder = self._token, None, None
                    self._restore(token)


def _limit_blas() -> Any:
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def _unlimit_blas(limiter: Any) -> None:
    limiter.restore_original_limits()
    # threadpoolctl >= 3.8 lets the first thread that sets OpenBLAS's count keep control
    # while it lives: hand it back, for the next thread that holds the limit.
    import threadpoolctl

    release = getattr(getattr(threadpoolctl, "OpenBLASController", None), "clear_controlling_thread", None)
    if release is not None:
        release()  # (only where this thread has control)


#: Small dense factorisations in a loop: BLAS threads only fight torch's OpenMP pool.
single_threaded_blas = HeldSetting(_limit_blas, _unlimit_blas, by_one_thread=True)

# The solvers' own notices ("Solved/Inaccurate.", CSC conversions): the per-element
# path checks every point itself. Only warnings raised from these packages' code.
_SOLVER_MODULES = r"(diffcp|scs|ecos|clarabel|_clarabel)(\.|$)"


def _filter_item() -> tuple:
    return ("ignore", None, Warning, re.compile(_SOLVER_MODULES), 0)


def _ignore_solver_warnings() -> None:
    warnings.filterwarnings("ignore", module=_SOLVER_MODULES)


def _show_solver_warnings(_: Any) -> None:
    # (Gone already where other code reset the filters meanwhile.)
    with contextlib.suppress(ValueError):
        warnings.filters.remove(_filter_item())
    mutated = getattr(warnings, "_filters_mutated", None)
    if mutated is not None:
        mutated()


solver_warnings_ignored = HeldSetting(_ignore_solver_warnings, _show_solver_warnings)
