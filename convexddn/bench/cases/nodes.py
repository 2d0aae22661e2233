"""Benchmark case: the node library — forward and backward time of every ready-made node.

Each node runs on a fixed, seeded input (float64 unless noted) with a random upstream
gradient; figures are medians of interleaved rounds. Where the DDN reference
implementation of the same node is available (the folder named by
``CONVEXDDN_DDN_REFERENCE``, see :mod:`..reference`) it is timed in the same rounds and
the ratio reference ÷ ours is reported; otherwise the row says it was skipped.
"""
from __future__ import annotations

import importlib.util
import os
import statistics
import time
from typing import Callable

import torch

from ...nodes.eigen import eigen_decomposition
from ...nodes.entmax import entmax
from ...nodes.least_squares import least_squares
from ...nodes.total_variation import tv_denoise
from ...nodes.transport import sinkhorn
from ...nodes.vector_pool import robust_vector_pool
from ..harness import materialised, round_order, sync
from ..reference import ENV_VAR

__all__ = ["node_cases"]

F64 = torch.float64


def _reference(relpath: str, name: str):
    """A class or function of the DDN reference, imported from its file, or None."""
    folder = os.environ.get(ENV_VAR)
    if not folder:
        return None
    path = os.path.join(folder, "ddn", "pytorch", relpath)
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location(f"_ddn_reference_{relpath[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - a reference that does not import is reported as absent
        return None
    return getattr(module, name, None)


def _time(fn: Callable, inputs: list[torch.Tensor], gen: torch.Generator,
          device: torch.device) -> tuple[float, float]:
    args = [t.detach().to(device).requires_grad_(t.is_floating_point()) for t in inputs]
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    sync(device)
    t1 = time.perf_counter()
    out = out[0] if isinstance(out, tuple) else out
    g = torch.randn(out.shape, dtype=out.dtype, generator=gen).to(device)
    sync(device)
    t2 = time.perf_counter()  # the upstream gradient's making is in neither phase
    materialised(torch.autograd.grad(out, [a for a in args if a.requires_grad], g, allow_unused=True))
    sync(device)
    return t1 - t0, time.perf_counter() - t2


def _cases(gen: torch.Generator) -> list[tuple[str, str, Callable, list, Callable | None]]:
    """(node, shape, ours, inputs, reference or None)."""
    C = torch.rand(2, 100, 100, dtype=F64, generator=gen)
    X = torch.randn(64, 32, 32, dtype=F64, generator=gen)
    X = X + X.transpose(-1, -2)
    A = torch.randn(64, 40, 12, dtype=F64, generator=gen)
    b = torch.randn(64, 40, dtype=F64, generator=gen)
    cases = []
    ot_ref = _reference("optimal_transport.py", "OptimalTransportLayer")
    # Costs in [0, 1) (a spread of 10 ε: the reference's plain Sinkhorn converges in a few
    # iterations) and randn costs as in the DDN tutorial (a spread of ~80 ε: it runs
    # into its iteration cap).
    for costs, label in ((C, "rand"), (torch.randn(2, 100, 100, dtype=F64, generator=gen), "randn")):
        cases.append((f"entropic OT (eps=0.1, {label} costs)", "(2, 100, 100)", lambda c: sinkhorn(c, eps=0.1),
                      [costs], (lambda c, layer=ot_ref(gamma=10.0): layer(c)) if ot_ref is not None else None))
    eig_ref = _reference("eigen_decomposition.py", "EigenDecompositionFcn")
    cases.append(("eigen decomposition (all)", "(64, 32, 32)", lambda x: eigen_decomposition(x)[1], [X],
                  (lambda x: eig_ref.apply(x, None)) if eig_ref is not None else None))
    # float32 input: ours decomposes in float64 (correct at any eigengap) and casts
    # back; the reference decomposes in float32.
    cases.append(("eigen decomposition (all) float32", "(64, 32, 32)", lambda x: eigen_decomposition(x)[1],
                  [X.float()], (lambda x: eig_ref.apply(x, None)) if eig_ref is not None else None))
    cases.append(("least squares", "(64, 40, 12)", lambda a, y: least_squares(a, y), [A, b], None))
    cases.append(("robust vector pool (huber)", "(16, 8, 36)",
                  lambda x: robust_vector_pool(x, "huber", 1.0), [torch.randn(16, 8, 36, dtype=F64, generator=gen)],
                  None))
    cases.append(("entmax (alpha=1.5)", "(256, 1000) float32", lambda x: entmax(x, 1.5),
                  [torch.randn(256, 1000, generator=gen)], None))
    cases.append(("total variation 1-D (lam=0.5)", "(64, 1000) float32", lambda x: tv_denoise(x, 0.5),
                  [torch.randn(64, 1000, generator=gen).cumsum(-1) * 0.1], None))
    return cases


def node_cases(repeats: int, progress, device: torch.device | str = "cpu") -> list[dict]:
    """Forward and backward seconds of every node (and of the reference where present).

    Inputs are made on the CPU from a seeded generator and moved to ``device``; on CUDA
    each phase is timed between synchronisations.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for node, shape, ours, inputs, ref in _cases(gen):
        fns = {"convexddn": ours} | ({"DDN reference": ref} if ref is not None else {})
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
        for fn in fns.values():  # warm-up
            _time(fn, inputs, gen, device)
        for i in range(repeats):
            for k in round_order(fns, i):
                times[k].append(_time(fns[k], inputs, gen, device))
            progress.update(1)
        f = statistics.median(t[0] for t in times["convexddn"])
        b = statistics.median(t[1] for t in times["convexddn"])
        row = {"family": "nodes", "node": node, "shape": shape, "device": str(device),
               "fwd_ms": 1e3 * f, "bwd_ms": 1e3 * b}
        if ref is not None:
            rf = statistics.median(t[0] for t in times["DDN reference"])
            rb = statistics.median(t[1] for t in times["DDN reference"])
            row.update(ref_fwd_ms=1e3 * rf, ref_bwd_ms=1e3 * rb, speedup_fwd=rf / f, speedup_bwd=rb / b)
        else:
            row["note"] = ("no DDN reference for this node" if node.startswith(("least", "robust", "entmax", "total"))
                           else f"DDN reference not found (set {ENV_VAR})")
        rows.append(row)
    return rows
