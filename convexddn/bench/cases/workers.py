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
from ..harness import round_order

__all__ = ["workers_speedup"]


def _nnls_layer(workers: int):
    """A user problem: non-negative least squares with learnable A and b."""
    import cvxpy as cp

    A = cp.Parameter((30, 20), name="A")
    b = cp.Parameter(30, name="b")
    z = cp.Variable(20, name="z")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ z - b)), [z >= 0])
    return ConvexLayer(prob, [A, b], [z], workers=workers, solver="Clarabel")


def _cvxpylayers_jobs(make_layer, jobs: int):
    """cvxpylayers' default path (diffcp + SCS) with its thread pool of ``jobs`` threads."""
    from cvxpylayers.torch import CvxpyLayer

    module = make_layer(1)
    cvx = CvxpyLayer(module.problem, parameters=module.parameters_, variables=module.variables_)
    args = {"n_jobs_forward": jobs, "n_jobs_backward": jobs}
    return lambda *v: cvx(*v, solver_args=args)[0]


def workers_speedup(batch: int = 64, repeats: int = 3) -> list[dict[str, Any]]:
    """Forward + backward time with 1 and with ``cpu_count`` workers, on the registry QP
    and a user problem: ConvexLayer's worker processes (pools started before timing)
    and, on the same inputs in the same interleaved rounds, cvxpylayers' thread pool
    (diffcp's ``n_jobs``), after one untimed forward + backward each; medians of
    ``repeats`` rounds, recorded in each row's ``rounds``."""
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
    paths = [("ConvexLayer worker processes", lambda make, w: make(w)),
             ("cvxpylayers thread pool", _cvxpylayers_jobs)]
    rows = []
    for name, make, data in cases:
        fns = {(path, w): build(make, w) for path, build in paths for w in sorted({1, cores})}
        for fn in fns.values():
            # Starts pools, canonicalises; inputs that need gradients, as timed (diffcp's
            # solve-only entry point takes no backward job count). The backward too: warmed
            # up by the forward only, each path's first backward (its derivative's set-up,
            # the workers' first adjoint) fell into timed round 0.
            args = [d.clone().requires_grad_(True) for d in data]
            torch.autograd.grad(fn(*args).sum(), args, allow_unused=True)
        runs: dict[tuple, list[float]] = {key: [] for key in fns}
        for i in range(repeats):
            for key in round_order(fns, i):
                fn = fns[key]
                args = [d.clone().requires_grad_(True) for d in data]
                t0 = time.perf_counter()
                y = fn(*args)
                torch.autograd.grad(y.sum(), args, allow_unused=True)
                runs[key].append(time.perf_counter() - t0)
        for path, _ in paths:
            one, many = statistics.median(runs[(path, 1)]), statistics.median(runs[(path, cores)])
            rows.append({"problem": name, "path": path, "batch": batch, "cores": cores,
                         "seconds_1_process": one, "seconds_workers": many, "speedup": one / many,
                         "rounds": repeats})
    return rows
