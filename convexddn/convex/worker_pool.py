"""The worker processes of the per-element path (``ConvexLayer(..., workers=k)``): one
spawned process pool per layer and process, started on first use, and the chunks of a
batch it solves or differentiates.

Processes, not threads: the solvers hold the GIL. Spawned, not forked: a fork would copy
torch's threads. A spawned worker imports the caller's main module, so a script must build
and call the layer under ``if __name__ == "__main__":``; without the guard each worker re-ran
the script (its prints and work) up to its own pool start, which failed with multiprocessing's
"bootstrapping phase" RuntimeError: that start raises a :class:`~convexddn.errors.WorkerError`
naming the guard instead. Once the interpreter shuts down (the main thread has returned: a
non-daemon thread or an atexit handler still calling the layer), the calls are solved in
this process, as with one worker: concurrent.futures has stopped every pool by then."""
from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing import util as mp_util
from multiprocessing.connection import wait as wait_ready

import numpy as np

from ..errors import WorkerError

__all__ = ["WorkerPool", "chunks"]


@contextlib.contextmanager
def _start_method_kept():
    """Leave multiprocessing's process-wide default start method unset if it was: starting a
    spawn-context process records the parent's start method (CPython's
    ``spawn.get_preparation_data`` calls ``get_start_method()``), which fixes the default as a
    side effect, and the caller's later ``multiprocessing.set_start_method("spawn")`` (its own
    pools, a DataLoader's) raised "context has already been set" after one call of a layer
    with ``workers=k``. The pool itself uses its own spawn context, never the default."""
    default = getattr(getattr(multiprocessing, "context", None), "_default_context", None)
    unset = default is not None and getattr(default, "_actual_context", False) is None
    try:
        yield
    finally:
        if unset:
            default._actual_context = None


class WorkerPool:
    """``workers`` spawned processes, started on first use in each process (a forked
    child's copy has no manager thread); a pickled copy starts without one."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._pid: int | None = None
        self._stop: mp_util.Finalize | None = None  # shuts self._executor down (once)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"workers": self.workers}  # a pool (and its lock) belongs to one process

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["workers"])

    def get(self, batch: int) -> concurrent.futures.ProcessPoolExecutor | None:
        """The pool, or None to solve in this process: one worker, a batch of one, a
        daemonic process (a DataLoader's), which may not have children, or an interpreter
        shutting down, which may start no pool and has stopped this one. A
        :class:`~convexddn.errors.WorkerError` in a spawned process still importing the main
        module (a script without the ``__main__`` guard, re-run by a worker)."""
        if self.workers <= 1:
            return None
        if _bootstrapping():  # (before the batch test: a script's re-run must not depend on its batch)
            raise WorkerError(
                f"ConvexLayer(workers={self.workers}) was called in a spawned process (a worker of the layer, or of "
                "another multiprocessing pool) while it was still importing your main module: your script calls "
                "the layer at import time. The layer's workers are spawned, and each imports the main module: put "
                "the code that builds and calls the layer under `if __name__ == '__main__':` (without it every "
                "worker re-runs your script, its prints and its work), or pass workers=1")
        if batch < 2 or multiprocessing.current_process().daemon or _exiting():
            return None
        with self._lock:
            if self._executor is None or self._pid != os.getpid():
                ctx = multiprocessing.get_context("spawn")
                self._executor = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=ctx)
                self._pid = os.getpid()
                # Shut down when the layer goes, or at exit before multiprocessing waits for
                # this process's children (a child that used the layer never exited) and
                # closes its queues (priority 10: the workers' stop signals were lost).
                self._stop = mp_util.Finalize(self, self._executor.shutdown,
                                              kwargs={"wait": True, "cancel_futures": True}, exitpriority=20)
            return self._executor

    def gather(self, pool: concurrent.futures.ProcessPoolExecutor, calls: list[tuple]) -> list:
        """Submit ``calls`` (function and arguments each, returning lists) and concatenate
        their results in order; a dead worker raises :class:`~convexddn.errors.WorkerError`
        and the next call starts a fresh pool. A pool stopped by the interpreter's shutdown
        between :meth:`get` and here: the calls run in this process."""
        jobs: list[concurrent.futures.Future] = []
        try:
            with _start_method_kept():  # (the pool's processes start at the first submits)
                for call in calls:
                    jobs.append(pool.submit(*call))
            return [r for job in jobs for r in job.result()]
        except concurrent.futures.process.BrokenProcessPool as err:
            exits = _exits(pool)  # (before the shutdown below forgets the processes)
            with self._lock:
                # Other threads that were using this pool fail here too, maybe after one of them
                # started a fresh pool: only the first drops it (a later one would orphan the fresh
                # pool, kept alive with its workers by its finaliser for the layer's lifetime).
                stop = self._stop if self._executor is pool else None
                if stop is not None:
                    self._executor = self._stop = None
            if stop is not None:
                stop()  # (its workers are terminated; this joins its thread and closes its queues)
            # The cause is not known here: say what the exit codes show and list the usual ones
            # (a segmentation fault in SuperLU was reported as a missing __main__ guard).
            raise WorkerError(
                f"a worker process of the layer (workers={self.workers}) died{exits}: {str(err).rstrip('.')}. It may "
                "have crashed (a fault in a native solver or factorisation: the same call with workers=1 "
                "shows it in this process) or been killed (out of memory, a signal); or, as worker "
                "processes are spawned, a script that calls the layer at import time without an "
                "`if __name__ == '__main__':` guard stopped them at start") from err
        except (RuntimeError, concurrent.futures.CancelledError):
            # submit refuses a pool stopped at shutdown, which may also have cancelled pending jobs
            # (a job's own RuntimeError comes back here too: re-raised, or at shutdown by its rerun).
            if not _exiting():
                raise
            for job in jobs:
                job.cancel()
            return [r for fn, *args in calls for r in fn(*args)]


def _bootstrapping() -> bool:
    """Whether this process is a spawned child still importing the parent's main module:
    multiprocessing's own test (``spawn._check_not_importing_main``) of the flag its
    ``spawn._main`` sets until the child's process object is unpickled. ``parent_process()``
    is still None then, and ``current_process().name`` "MainProcess": neither tells."""
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def _exiting() -> bool:
    """Whether the interpreter is shutting down: once the main thread has returned, the
    exit hooks of ``threading`` (``_SHUTTING_DOWN`` set first) stop every
    concurrent.futures pool and refuse new ones, before the non-daemon threads are joined
    and atexit handlers run; the main thread is marked ended just after."""
    return getattr(threading, "_SHUTTING_DOWN", False) or not threading.main_thread().is_alive() or sys.is_finalizing()


def _exits(pool: concurrent.futures.ProcessPoolExecutor) -> str:
    """`` (exit codes: ...)`` of the pool's workers that have ended, signals by name
    (SIGSEGV: a crash), or ``""`` where none is known (``_processes``: the pool's own)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    ended = set(wait_ready([p.sentinel for p in procs], timeout=0))
    codes = []
    deadline = time.monotonic() + 1.0
    for proc in procs:
        # An ended worker's pipe closes as it exits, a moment before the kernel holds its status,
        # and the pool's thread may reap it first (then it sets the code): wait up to a second.
        while proc.sentinel in ended and proc.exitcode is None and time.monotonic() < deadline:
            proc.join(timeout=0.01)
        code = proc.exitcode
        if code is not None:
            codes.append(signal.Signals(-code).name if code < 0 and -code in _SIGNALS else str(code))
    return f" (exit codes: {', '.join(sorted(set(codes)))})" if codes else ""


_SIGNALS = {int(sig) for sig in signal.Signals}


def chunks(batch: int, workers: int) -> list[np.ndarray]:
    """The batch indices split into at most ``workers`` nonempty contiguous chunks."""
    return [ix for ix in np.array_split(np.arange(batch), min(workers, batch)) if ix.size]
