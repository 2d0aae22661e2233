"""Benchmark case: ConvexLayer with worker processes against one process.

Workers serve the per-element path (``solver="Clarabel"``): the batched path is one
process's torch code and takes its threads from torch instead."""
from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch

from ...convex.layer import ConvexLayer
from ...factory import layer

__all__ = ["workers_speedup"]


def _nnls_layer(workers: int):
    """A user problem: non-negative least squares with learnable A and b."""
    import cvxpy as cp

    A = cp.Parameter((30, 20), name="A")
    b = cp.Parameter(30, name="b")
    z = cp.Variable(20, name="z")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ z - b)), [z >= 0])
    return ConvexLayer(prob, [A, b], [z], workers=workers, solver="Clarabel")


def workers_speedup(batch: int = 64, repeats: int = 3) -> list[dict[str, Any]]:
    """Forward + backward time of ConvexLayer with 1 and with `cpu_count` worker
    processes (pools started before timing), on the registry QP and a user problem."""
    cores = os.cpu_count() or 1
    gen = torch.Generator().manual_seed(0)
    n, m, p = 50, 40, 10
    qp_data = [torch.randn(batch, n, n, dtype=torch.float64, generator=gen) / n ** 0.5
               + torch.eye(n, dtype=torch.float64),
               torch.randn(batch, n, dtype=torch.float64, generator=gen),
               torch.randn(batch, m, n, dtype=torch.float64, generator=gen),
               torch.rand(batch, m, dtype=torch.float64, generator=gen) * 0.1,
               torch.randn(batch, p, n, dtype=torch.float64, generator=gen),
               torch.randn(batch, p, dtype=torch.float64, generator=gen) * 0.1]
    nnls_data = [torch.randn(batch, 30, 20, dtype=torch.float64, generator=gen),
                 torch.randn(batch, 30, dtype=torch.float64, generator=gen)]
    cases = [("qp (n=50, 40 ≤, 10 =)", lambda w: layer("qp", n=n, n_ineq=m, n_eq=p, workers=w,
                                                                    solver="Clarabel"), qp_data),
             ("user NNLS (30×20)", _nnls_layer, nnls_data)]
    rows = []
    for name, make, data in cases:
        times = {}
        for w in sorted({1, cores}):
            module = make(w)
            module(*data)  # starts the pool, canonicalises
            runs = []
            for _ in range(repeats):
                args = [d.clone().requires_grad_(True) for d in data]
                t0 = time.perf_counter()
                y = module(*args)
                torch.autograd.grad(y.sum(), args)
                runs.append(time.perf_counter() - t0)
            times[w] = statistics.median(runs)
        rows.append({"problem": name, "batch": batch, "cores": cores,
                     "seconds_1_process": times[1], "seconds_workers": times[cores],
                     "speedup": times[1] / times[cores]})
    return rows
