"""Peak resident memory of one forward + backward of robust pooling, in a fresh process.

``python -m convexddn.bench.memory_probe B,C,N PENALTY`` prints the bytes added at the
peak and the input's size (``PENALTY`` may be ``mean`` for mean pooling). Run by
:func:`convexddn.bench.harness.peak_memory`.
"""
from __future__ import annotations

import gc
import os
import sys
import threading
import time

import torch

from convexddn.functional import robust_pool


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str]) -> None:
    shape, penalty = tuple(map(int, argv[0].split(","))), argv[1]
    op = (lambda t: t.mean(-1)) if penalty == "mean" else (lambda t: robust_pool(t, penalty, 1.0))
    x = torch.randn(shape).requires_grad_(True)
    g = torch.randn(shape[:-1])
    torch.autograd.grad(op(x), x, g)  # warm-up: compilation and kernel loading are not counted
    gc.collect()
    base, peak, done = _rss(), [0], [False]

    def sample() -> None:
        while not done[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample)
    thread.start()
    torch.autograd.grad(op(x), x, g)
    done[0] = True
    thread.join()
    print(max(peak[0], _rss()) - base, x.numel() * x.element_size())


if __name__ == "__main__":
    main(sys.argv[1:])
