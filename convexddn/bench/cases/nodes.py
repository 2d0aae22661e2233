"""Benchmark case: the node library — forward and backward time of every ready-made node.

Each node runs on a fixed, seeded input (float64 unless noted) with a random upstream
gradient; figures are medians of interleaved rounds. Where the DDN reference has the
same node (a :class:`_Ref`: its file, the names it needs, and how to call it on our
inputs) and that file imports (the folder named by ``CONVEXDDN_DDN_REFERENCE``, see
:mod:`..reference`), it is timed in the same rounds and the ratio reference ÷ ours is
reported; otherwise the row's note says which: the reference has no such node, or why
its file was not loaded.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from ...nodes.eigen import eigen_decomposition
from ...nodes.entmax import entmax
from ...nodes.least_squares import least_squares
from ...nodes.projection import project_lp, project_simplex
from ...nodes.total_variation import tv_denoise
from ...nodes.transport import sinkhorn
from ...nodes.tridiagonal import tridiagonal_solve
from ...nodes.vector_pool import robust_vector_pool
from ..harness import materialised, round_order, sync
from ..reference import call_guarded, load_reference_names

__all__ = ["node_cases"]

F64 = torch.float64

NO_REFERENCE_NODE = "the DDN reference has no such node"


@dataclass(frozen=True)
class _Ref:
    """The DDN reference's version of a node: ``make(module)``, where ``module`` is
    ``ddn/pytorch/<file>`` holding every name of ``names``, is a function of the same
    inputs as ours returning the same output."""

    file: str
    names: tuple[str, ...]
    make: Callable[[ModuleType], Callable]


def _reference(ref: _Ref | None) -> tuple[Callable | None, str]:
    """The reference's function for a node, or None and why (the row's note)."""
    if ref is None:
        return None, NO_REFERENCE_NODE
    module, note = load_reference_names(ref.file, ref.names)
    if module is None:
        return None, note
    return ref.make(module), note


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


def _projection_ref(set_name: str) -> _Ref:
    """The reference's projection onto its radius-1 set ``set_name`` (projections.py)."""
    radius = torch.ones(1)  # the reference reads it with .item()
    return _Ref("projections.py", ("EuclideanProjectionFn", set_name),
                lambda m: (lambda x: m.EuclideanProjectionFn.apply(x, getattr(m, set_name), radius)))


def _cases(gen: torch.Generator) -> list[tuple[str, str, Callable, list, _Ref | None]]:
    """(node, shape, ours, inputs, the reference's version or None where it has none)."""
    C = torch.rand(2, 100, 100, dtype=F64, generator=gen)
    X = torch.randn(64, 32, 32, dtype=F64, generator=gen)
    X = X + X.transpose(-1, -2)
    A = torch.randn(64, 40, 12, dtype=F64, generator=gen)
    b = torch.randn(64, 40, dtype=F64, generator=gen)
    cases = []
    # Built once per case: the reference's layer holds no state between calls.
    ot_ref = _Ref("optimal_transport.py", ("OptimalTransportLayer",),
                  lambda m: (lambda c, layer=m.OptimalTransportLayer(gamma=10.0): layer(c)))
    # Costs in [0, 1) (a spread of 10 ε: the reference's plain Sinkhorn converges in a few
    # iterations) and randn costs as in the DDN tutorial (a spread of ~80 ε: it runs
    # into its iteration cap).
    for costs, label in ((C, "rand"), (torch.randn(2, 100, 100, dtype=F64, generator=gen), "randn")):
        cases.append((f"entropic OT (eps=0.1, {label} costs)", "(2, 100, 100)", lambda c: sinkhorn(c, eps=0.1),
                      [costs], ot_ref))
    eig_ref = _Ref("eigen_decomposition.py", ("EigenDecompositionFcn",),
                   lambda m: (lambda x: m.EigenDecompositionFcn.apply(x, None)))
    cases.append(("eigen decomposition (all)", "(64, 32, 32)", lambda x: eigen_decomposition(x)[1], [X], eig_ref))
    # float32 input: ours decomposes in float64 (correct at any eigengap) and casts
    # back; the reference decomposes in float32.
    cases.append(("eigen decomposition (all) float32", "(64, 32, 32)", lambda x: eigen_decomposition(x)[1],
                  [X.float()], eig_ref))
    # The reference solves (B, M, N) A and (B, M, 1) b by QR (BasicLeastSquaresFcn).
    cases.append(("least squares", "(64, 40, 12)", lambda a, y: least_squares(a, y), [A, b],
                  _Ref("leastsquares.py", ("BasicLeastSquaresFcn",),
                       lambda m: (lambda a, y: m.BasicLeastSquaresFcn.apply(a, y[..., None]).squeeze(-1)))))
    # The reference pools (B, C, *) over everything after C: a trailing unit dim pools
    # the same 36 vectors of length 8. Its Huber is a class of its module.
    cases.append(("robust vector pool (huber)", "(16, 8, 36)",
                  lambda x: robust_vector_pool(x, "huber", 1.0), [torch.randn(16, 8, 36, dtype=F64, generator=gen)],
                  _Ref("robust_vec_pool.py", ("RobustVectorPool2dFcn", "Huber"),
                       lambda m: (lambda x: m.RobustVectorPool2dFcn.apply(x[..., None], m.Huber, 1.0)))))
    cases.append(("entmax (alpha=1.5)", "(256, 1000) float32", lambda x: entmax(x, 1.5),
                  [torch.randn(256, 1000, generator=gen)], None))
    cases.append(("total variation 1-D (lam=0.5)", "(64, 1000) float32", lambda x: tv_denoise(x, 0.5),
                  [torch.randn(64, 1000, generator=gen).cumsum(-1) * 0.1], None))
    # Appended last, so that the inputs above stay those of earlier runs. The reference's
    # balls and simplex (projections.py, radius 1) against ours, at the paper's
    # projection shape: every row of 2·randn(512) lies outside each set.
    P = 2 * torch.randn(256, 512, dtype=F64, generator=gen)
    for label, ours, cls in (("L1 ball", lambda x: project_lp(x, 1, "ball"), "L1Ball"),
                             ("L2 ball", lambda x: project_lp(x, 2, "ball"), "L2Ball"),
                             ("L∞ ball", lambda x: project_lp(x, math.inf, "ball"), "LInfBall"),
                             ("simplex", lambda x: project_simplex(x), "Simplex")):
        cases.append((f"projection onto the {label} (radius 1)", "(256, 512)", ours, [P], _projection_ref(cls)))
    # Appended after those for the same reason. A strictly diagonally dominant system
    # (|b| >= 2.5 > |a| + |c|); the reference's TriDiagSolveFcn (its default, cyclic
    # reduction) takes (B, N, K) right-hand sides.
    diag = 2.5 + torch.rand(64, 1024, dtype=F64, generator=gen)
    lower, upper = (2 * torch.rand(64, 1023, dtype=F64, generator=gen) - 1 for _ in range(2))
    cases.append(("tridiagonal solve", "(64, 1024)", tridiagonal_solve,
                  [diag, lower, upper, torch.randn(64, 1024, dtype=F64, generator=gen)],
                  _Ref("tridiagsolve.py", ("TriDiagSolveFcn",),
                       lambda m: (lambda b, a, c, d: m.TriDiagSolveFcn.apply(b, a, c, d[..., None]).squeeze(-1)))))
    return cases


def node_case_count() -> int:
    """How many rows :func:`node_cases` times (for the progress bar)."""
    return len(_cases(torch.Generator().manual_seed(0)))


def node_cases(repeats: int, progress, device: torch.device | str = "cpu") -> list[dict]:
    """Forward and backward seconds of every node (and of the reference where present).

    Inputs are made on the CPU from a seeded generator and moved to ``device``; on CUDA
    each phase is timed between synchronisations. A row without reference figures has
    a note saying why: the reference has no such node, its file was not found, did not
    import or lacks a name (the reason :func:`..reference.load_reference_names` gives),
    or its call raised (:func:`..reference.reference_raised`). Each row records its
    ``rounds``.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for node, shape, ours, inputs, spec in _cases(gen):
        ref, why = _reference(spec)
        fns = {"convexddn": ours} | ({"DDN reference": ref} if ref is not None else {})
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}

        def timed(k: str) -> tuple[float, float] | None:
            """One call of ``fns[k]``; where the reference's own call raises, None, and
            the row's note says what (only its call is guarded: ours raising is a bug
            of this library and stops the bench)."""
            nonlocal ref, why
            t, failed = call_guarded(lambda: _time(fns[k], inputs, gen, device), k == "DDN reference")
            if failed is not None:
                ref, why = None, failed
                del fns[k], times[k]
            return t

        for k in list(fns):  # warm-up
            timed(k)
        for i in range(repeats):
            for k in round_order(fns, i):
                t = timed(k)
                if t is not None:
                    times[k].append(t)
            progress.update(1)
        f = statistics.median(t[0] for t in times["convexddn"])
        b = statistics.median(t[1] for t in times["convexddn"])
        row = {"family": "nodes", "node": node, "shape": shape, "device": str(device),
               "fwd_ms": 1e3 * f, "bwd_ms": 1e3 * b, "rounds": repeats}
        if ref is not None:
            rf = statistics.median(t[0] for t in times["DDN reference"])
            rb = statistics.median(t[1] for t in times["DDN reference"])
            row.update(ref_fwd_ms=1e3 * rf, ref_bwd_ms=1e3 * rb, speedup_fwd=rf / f, speedup_bwd=rb / b)
        else:
            row["note"] = why
        rows.append(row)
    return rows
