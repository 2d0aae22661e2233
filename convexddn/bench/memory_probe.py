"""Peak resident memory of one forward + backward of robust pooling, in a fresh process.

``python -m convexddn.bench.memory_probe B,C,N PENALTY`` prints the bytes added at the
peak, the input's size and how the peak was measured (``PENALTY`` may be ``mean`` for
mean pooling); a usage mistake is one line on stderr and exit status 2, as for the
``convexddn`` command (``--help`` lists the arguments). Run by
:func:`convexddn.bench.harness.peak_memory`, one process per call, so the process's peak
is the call's.

The peak is the kernel's high-water mark of the resident set (``VmHWM`` in
``/proc/self/status``), reset to the current resident set just before the call by
writing ``5`` to ``/proc/self/clear_refs``: no peak is missed, however short. Where
that is not available, a thread samples the resident set every 0.5 ms instead (method
``sampled``), which can miss a peak shorter than that.

The gradient is materialised as a training step's accumulation into ``.grad`` would
(:func:`.harness.materialised`): quadratic pooling's backward returns a stride-0 view
that holds nothing, and a peak measured without the copy was 0.00× the input.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
from typing import Sequence

import torch

from convexddn.bench.harness import materialised
from convexddn.cli_parser import Parser
from convexddn.functional import robust_pool
from convexddn.nodes.pooling import PENALTIES

PROG = "python -m convexddn.bench.memory_probe"

HWM = "hwm"  # the kernel's high-water mark, reset before the call
SAMPLED = "sampled"  # the resident set sampled every 0.5 ms (no clear_refs)


def _status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current resident set; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmHWM") <= _status_bytes("VmRSS") + (1 << 20)  # reset, up to page churn
    except OSError:
        return False


def peak_added(call) -> tuple[int, str]:
    """Bytes the peak resident set of ``call()`` lies above the resident set before it,
    and the method (:data:`HWM` or :data:`SAMPLED`)."""
    gc.collect()
    if _reset_high_water_mark():
        base = _status_bytes("VmRSS")
        call()
        return _status_bytes("VmHWM") - base, HWM
    base, peak, done = _rss(), [0], [False]

    def sample() -> None:
        while not done[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        call()
    finally:
        done[0] = True
        thread.join()
    return max(peak[0], _rss()) - base, SAMPLED


def _shape(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated positive integers (the last is the pooled one)."""
    try:
        shape = tuple(int(n) for n in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers such as 24,1024,2048, "
                                         f"got {text!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    """The probe's arguments (without them it ended in an IndexError or ValueError traceback)."""
    parser = Parser(prog=PROG, description="Peak resident memory added by one forward + backward of robust "
                                           "pooling; prints the bytes added, the input's bytes and the method.")
    parser.add_argument("shape", metavar="B,C,N", type=_shape, help="the input's shape, pooled over the last")
    parser.add_argument("penalty", metavar="PENALTY", choices=("mean",) + PENALTIES,
                        help=f"mean (mean pooling) or a penalty: {', '.join(PENALTIES)}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print; exit status 0, or 2 (from argparse) for a usage mistake."""
    args = build_parser().parse_args(argv)
    shape, penalty = args.shape, args.penalty
    op = (lambda t: t.mean(-1)) if penalty == "mean" else (lambda t: robust_pool(t, penalty, 1.0))
    x = torch.randn(shape).requires_grad_(True)
    g = torch.randn(shape[:-1])

    def call():
        return materialised(torch.autograd.grad(op(x), x, g))

    call()  # warm-up: compilation and kernel loading are not counted
    added, method = peak_added(call)
    print(added, x.numel() * x.element_size(), method)
    return 0


if __name__ == "__main__":
    sys.exit(main())
