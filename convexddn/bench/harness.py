"""The timing and memory harness of ``convexddn bench``: it knows no particular case.

Timing protocol: each figure is the median over ``repeats`` rounds; within a round the
operations run interleaved, so drifting load from other processes hits all alike. The
first call of each operation (compilation, CVXPY canonicalisation) is a warm-up and is
not counted. Peak memory is measured in a fresh process per operation
(:mod:`.memory_probe`).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, NamedTuple

import torch

from ..experiments.running import synchronize as sync

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

__all__ = ["sync", "Timing", "fwd_bwd", "round_order", "median_times", "agreement", "timed_sort", "peak_memory"]


class Timing(NamedTuple):
    """Seconds of one forward and one backward, and the minor page faults the backward
    took (None where the platform does not count them)."""

    fwd: float
    bwd: float
    bwd_faults: int | None = None


def _minor_faults() -> int | None:
    """This process's minor page faults so far (None without ``resource``: Windows)."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, g: torch.Tensor,
            device: torch.device) -> Timing:
    """One forward and one backward of ``fn`` at ``x``, the gradient ``g`` (materialised).

    The backward's page faults are counted because they can decide its time: a gradient
    the size of a large input is a fresh mapping that the kernel faults in a 4 KiB page at
    a time (49,153 faults, ~2 ms/sample at (24, 1024, 2048) float32) unless glibc serves
    it from freed memory it kept: after ``convexddn bench --quick`` its heap held 208 MiB
    of freed memory, 11 MiB of it at the top where it can be trimmed, and a fresh 64 MiB
    tensor took no page fault where a free block that large was left (in one such process
    of two). In one benchmark process that happened for some calls and not others, for
    mean pooling and the robust penalties alike (the same op's backward 4-7x apart
    between rounds)."""
    x = x.detach().requires_grad_(True)
    sync(device)
    t0 = time.perf_counter()
    y = fn(x)
    sync(device)
    t1 = time.perf_counter()
    f0 = _minor_faults()  # (its system call in neither phase)
    t2 = time.perf_counter()
    materialised(torch.autograd.grad(y, x, g))
    sync(device)
    t3 = time.perf_counter()
    f1 = _minor_faults()
    return Timing(t1 - t0, t3 - t2, None if f0 is None or f1 is None else f1 - f0)


def materialised(grads):
    """The gradients as full tensors: a training step accumulates them into ``.grad``,
    so a stride-0 view (quadratic pooling's backward returns one) pays its copy there;
    every timed path pays it here too (free for a gradient that is already full)."""
    return [g.contiguous() if g is not None else None for g in grads]


def round_order(keys: Iterable[Any], k: int) -> list[Any]:
    """The order of interleaved round ``k``: ``keys`` as given in even rounds, reversed in
    odd ones, so that each op runs before and after its neighbours equally often. An op
    timed right after another pays for the state that one left (memory handed back and
    paged in again, caches): two robust-pooling implementations timed in a fixed order
    at (8, 1024, 2048) came out 4-9 % apart, alternating the order 0.2-0.7 %."""
    keys = list(keys)
    return keys if k % 2 == 0 else keys[::-1]


def median_times(ops: dict[str, Callable[[], tuple[float, ...]]], repeats: int,
                  progress, warmups: dict[str, float] | None = None,
                  faults: dict[str, int | None] | None = None) -> dict[str, tuple[float, float]]:
    """Median forward and backward seconds of each op over ``repeats`` interleaved rounds,
    after a warm-up call each (its seconds go to ``warmups``); ``faults`` gets the median
    of the backward's page faults where the op reports them (a :class:`Timing`)."""
    times: dict[str, list[tuple[float, ...]]] = {k: [] for k in ops}
    for name, op in ops.items():  # warm-up: compile, canonicalise, allocate
        t0 = time.perf_counter()
        op()
        if warmups is not None:
            warmups[name] = time.perf_counter() - t0
        progress.update(1)
    for k in range(repeats):
        for name in round_order(ops, k):
            times[name].append(ops[name]())
        progress.update(len(ops))
    if faults is not None:
        for k, v in times.items():
            counts = [t[2] for t in v if len(t) > 2 and t[2] is not None]
            faults[k] = statistics.median_low(counts) if counts else None
    return {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
            for k, v in times.items()}


def agreement(native: Callable, cvxpy: Callable, x: torch.Tensor) -> tuple[float, float]:
    """Largest |difference| of solutions and of gradients (float64, same upstream grad)."""
    x64 = x.detach().double()
    gen = torch.Generator().manual_seed(0)
    outs, grads = [], []
    g = None
    for fn in (native, cvxpy):
        xi = x64.clone().requires_grad_(True)
        y = fn(xi)
        if g is None:
            g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
        (gx,) = torch.autograd.grad(y, xi, g)
        outs.append(y.detach())
        grads.append(gx)
    return float((outs[0] - outs[1]).abs().max()), float((grads[0] - grads[1]).abs().max())


def timed_sort(x: torch.Tensor, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    x.sort(-1)
    sync(device)
    return time.perf_counter() - t0


def peak_memory(shape: tuple[int, ...], penalties: tuple[str, ...]) -> list[dict[str, Any]]:
    """Peak resident memory added by one forward + backward, per penalty, in units of
    the input tensor's size: a fresh process each, after a warm-up call, the gradient
    materialised. The peak is the kernel's high-water mark (``peak_method`` ``"hwm"``)
    or, where /proc/self/clear_refs is not available, the resident set sampled every
    0.5 ms (``"sampled"``, which can miss short peaks); see :mod:`.memory_probe`.
    The gradient itself is one input-sized tensor, so 1× is the floor for any node: a
    figure below it missed the peak (the report flags it)."""
    # Large blocks always mmapped, so freed memory leaves the resident set at once and
    # RSS tracks what is live (glibc's adaptive threshold would keep freed blocks).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for p in penalties:
        out = subprocess.run([sys.executable, "-m", "convexddn.bench.memory_probe", ",".join(map(str, shape)), p],
                             capture_output=True, text=True, check=True, env=env).stdout.split()
        added, size = int(out[0]), int(out[1])
        rows.append({"node": p, "shape": list(shape), "peak_added_bytes": added,
                     "input_bytes": size, "peak_over_input": added / size, "peak_method": out[2]})
    return rows
