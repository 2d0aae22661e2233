"""Tests of convexddn.convex.worker_pool (the per-element path's processes are exercised
through ConvexLayer(workers=k) in test_layer.py)."""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest

import convexddn
from convexddn.convex.worker_pool import WorkerPool, chunks
from convexddn.errors import WorkerError


def test_chunks_cover_the_batch_in_order_without_empty_ones():
    for batch, workers in ((1, 4), (5, 2), (7, 3), (8, 8), (3, 10)):
        parts = chunks(batch, workers)
        assert len(parts) == min(batch, workers)
        assert all(p.size for p in parts)
        assert np.concatenate(parts).tolist() == list(range(batch))


def test_no_pool_for_one_worker_or_one_element():
    assert WorkerPool(1).get(64) is None
    assert WorkerPool(2).get(1) is None


def test_a_pickled_pool_starts_without_processes():
    pool = WorkerPool(2)
    copy = pickle.loads(pickle.dumps(pool))
    assert copy.workers == 2 and copy._executor is None and copy._pid is None


def test_a_crashed_worker_is_reported_as_a_possible_crash_with_its_signal():
    """A worker that dies of a segmentation fault (a read of address 0 here; a singular
    matrix inside SuperLU in the report) was reported with a missing
    ``if __name__ == '__main__':`` guard as the cause; the message names the signal and
    the possible causes instead, and the pool is dropped for a fresh one."""
    pool = WorkerPool(2)
    with pytest.raises(WorkerError, match=r"died \(exit codes: [^)]*SIGSEGV") as info:
        pool.gather(pool.get(2), [(ctypes.string_at, 0)])
    assert "may have crashed" in str(info.value) and "or, as worker processes are spawned" in str(info.value)
    assert ".." not in str(info.value)  # (the pool's own message ends with a period)
    assert pool._executor is None


def _live(procs) -> set[int]:
    return {p.pid for p in procs if p.is_alive()}


def test_a_pool_broken_under_two_threads_is_replaced_once():
    """Threads that used one pool all fail when a worker dies. Thread "a" failed first and
    started a fresh pool; thread "b" failing on the old pool afterwards dropped the fresh
    one, whose finaliser kept it and its workers alive (orphaned) for the layer's
    lifetime, while the next call started a third. Only the broken pool is dropped now,
    and it is shut down."""
    pool = WorkerPool(2)
    first = pool.get(2)
    b_has_pool, a_done, failures = threading.Event(), threading.Event(), []

    def b() -> None:
        mine = pool.get(2)
        b_has_pool.set()
        a_done.wait(5.0)
        try:
            pool.gather(mine, [(sorted, [2, 1])])
        except WorkerError as err:
            failures.append(err)

    thread = threading.Thread(target=b)
    thread.start()
    assert b_has_pool.wait(5.0)
    with pytest.raises(WorkerError):
        pool.gather(first, [(os._exit, 3)])  # thread "a": its worker dies
    fresh = pool.get(2)
    assert fresh is not first and pool.gather(fresh, [(sorted, [2, 1])]) == [1, 2]
    workers = list(fresh._processes.values())
    a_done.set()
    thread.join(10.0)
    assert len(failures) == 1  # (b's call on the broken pool)
    assert pool._executor is fresh and pool.get(2) is fresh
    assert pool.gather(fresh, [(sorted, [4, 3])]) == [3, 4] and _live(workers) == _live(fresh._processes.values())
    assert first._processes is None  # shut down (its queues closed)


def test_a_pool_stopped_by_the_interpreter_shutdown_runs_the_calls_in_this_process(monkeypatch):
    """Once the main thread has returned, concurrent.futures stops every pool and starts
    none before the other threads are joined and atexit handlers run: a call then raised
    RuntimeError('cannot schedule new futures after shutdown'); it is solved here now.
    Here the pool stopped between :meth:`WorkerPool.get` and the submission."""
    pool = WorkerPool(2)
    stopped = pool.get(2)
    stopped.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):  # not at shutdown: an error as before
        pool.gather(stopped, [(sorted, [2, 1])])
    monkeypatch.setattr(threading, "_SHUTTING_DOWN", True)  # (what threading's shutdown sets first)
    assert pool.get(2) is None
    assert pool.gather(stopped, [(sorted, [2, 1]), (sorted, [4, 3])]) == [1, 2, 3, 4]


def test_a_pool_started_while_a_spawned_child_imports_the_main_module_names_the_guard(monkeypatch):
    """A spawned worker imports the caller's main module; in a script without the
    ``if __name__ == '__main__':`` guard it reached the layer's pool start, where
    multiprocessing raised its raw "bootstrapping phase" RuntimeError (its idiom shows
    ``freeze_support()``). The start now raises a WorkerError naming the guard, whatever
    the batch (a re-run script must not fail on some batches only)."""
    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    for batch in (4, 1):
        with pytest.raises(WorkerError, match=r"if __name__ == '__main__':.*or pass workers=1"):
            WorkerPool(2).get(batch)
    assert WorkerPool(1).get(4) is None  # (no process is started: nothing to guard)


def _run(script) -> subprocess.CompletedProcess:
    """``script`` run by a fresh interpreter that imports the package under test."""
    root = os.path.dirname(os.path.dirname(convexddn.__file__))  # (the package under test, in the child too)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=240)


def test_an_unguarded_script_gets_the_guard_error_in_each_worker(tmp_path):
    """The same, for real: each of the two workers re-runs the unguarded script and its pool
    start raises the WorkerError (caught and printed by the script); the parent's call is solved."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import os\n"
        "from convexddn.convex.worker_pool import WorkerPool\n"
        "pool = WorkerPool(2)\n"
        "try:\n"
        "    line = f'result {pool.gather(pool.get(2), [(sorted, [2, 1]), (sorted, [4, 3])])}'\n"
        "except Exception as err:\n"
        "    line = f'error {type(err).__name__} {err}'\n"
        "os.write(1, (line + chr(10)).encode())  # (one write: three processes share the pipe)\n")
    done = _run(script)
    lines = done.stdout.splitlines()
    assert "bootstrapping phase" not in done.stdout + done.stderr, done.stderr[-2000:]
    assert lines.count("result [1, 2, 3, 4]") == 1, (done.stdout, done.stderr[-2000:])
    errors = [line for line in lines if line.startswith("error ")]
    assert len(errors) == 2 and all(e.startswith("error WorkerError ConvexLayer(workers=2)") and
                                    "if __name__ == '__main__':" in e for e in errors), lines


def test_the_pool_leaves_the_process_wide_start_method_unset(tmp_path):
    """A fresh process whose start method is unset: after the pool has run calls it is still
    unset, and the script can still choose one (starting the spawned workers fixed it to
    'fork', and the caller's set_start_method('spawn') raised "context has already been set")."""
    script = tmp_path / "start_method.py"
    script.write_text(
        "import multiprocessing as mp\n"
        "from convexddn.convex.worker_pool import WorkerPool\n"
        "if __name__ == '__main__':\n"
        "    assert mp.get_start_method(allow_none=True) is None\n"
        "    pool = WorkerPool(2)\n"
        "    result = pool.gather(pool.get(2), [(sorted, [2, 1]), (sorted, [4, 3])])\n"
        "    after = mp.get_start_method(allow_none=True)\n"
        "    mp.set_start_method('forkserver')\n"
        "    print('result', result, 'after', after, 'now', mp.get_start_method())\n")
    done = _run(script)
    assert done.stdout.strip() == "result [1, 2, 3, 4] after None now forkserver", (done.stdout, done.stderr[-2000:])
