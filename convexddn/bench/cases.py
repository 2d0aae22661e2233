"""The cases of ``convexddn bench``: robust pooling, projections, ConvexLayer workers.

Each case function builds its inputs, times the operations with :mod:`.harness` and
returns rows (dicts) for :mod:`.report`. Times are per sample (one leading batch
element), beside mean pooling ``x.mean(-1)`` timed in the same run; the cone-program path
(``convexddn.layer(..., backend="cvxpy")``) runs a fixed number of rows and is scaled.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any, Callable

import torch

from ..convex.layer import ConvexLayer
from ..factory import layer
from ..functional import project_lp, project_simplex, robust_pool
from ..nodes.pooling import CONVEX_PENALTIES
from ..nodes.pooling import PENALTIES as POOL_PENALTIES
from .harness import agreement, fwd_bwd, median_times, timed_sort

PROJECTIONS = (("lp_ball p=1", 1), ("lp_ball p=2", 2), ("lp_ball p=inf", math.inf), ("simplex", None))

# (name, pooling shape (B, C, N), projection shape (B, n))
SHAPES = {
    "small": ((4, 64, 256), (16, 64)),
    "paper": ((24, 1024, 2048), (256, 512)),
}
CVXPY_ROWS = 8  # rows solved by the cone-program path per measurement (milliseconds each)


def pool_cases(shape, device, dtype, with_cvxpy: bool, repeats: int, progress) -> list[dict]:
    B, C, N = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    x[..., : N // 10] += 5.0  # 10 % outliers, so the robust penalties have work to do
    g = torch.randn(B, C, generator=gen).to(device=device, dtype=dtype)
    ops: dict[str, Callable[[], tuple[float, float]]] = {
        "mean": lambda: fwd_bwd(lambda t: t.mean(-1), x, g, device),
        "sort": lambda: (timed_sort(x, device), float("nan")),
    }
    for p in POOL_PENALTIES:
        ops[p] = (lambda p=p: fwd_bwd(lambda t: robust_pool(t, p, 1.0), x, g, device))
    warmups: dict[str, float] = {}
    native = median_times(ops, repeats, progress, warmups)
    rows = []
    mean_f, mean_b = native["mean"]
    sort_f = native["sort"][0]
    for name in ("mean", "sort") + POOL_PENALTIES:
        f, b = native[name]
        rows.append(_row("pooling", name, "torch" if name in ("mean", "sort") else "native",
                         shape, dtype, device, f / B, b / B, f / mean_f, b / mean_b))
        if name in POOL_PENALTIES:
            rows[-1]["first_call_s"] = warmups[name]
            if tuple(shape) == SHAPES["paper"][0]:  # the goals are set at this shape
                rows[-1].update(_goals(name, f, b, mean_f, mean_b, sort_f))
    rows[1]["note"] = "one x.sort(-1) of the same tensor (forward only)"
    rows[1]["bwd_ms_per_sample"] = None
    rows[1]["bwd_rel_mean"] = None
    for p in CONVEX_PENALTIES:
        row = _row("pooling", p, "cvxpy", shape, dtype, device, None, None, None, None)
        if with_cvxpy:
            cone = layer("robust_pool", n=N, penalty=p, alpha=1.0, backend="cvxpy")
            _measure_cvxpy(row, rows, lambda t: robust_pool(t, p, 1.0), cone,
                           x.reshape(-1, N)[:CVXPY_ROWS], g.reshape(-1)[:CVXPY_ROWS], C / CVXPY_ROWS,
                           B, mean_f, mean_b, progress,
                           f"timed on {CVXPY_ROWS} rows (one solve each), scaled to {C} rows per sample")
        else:
            row["note"] = "skipped: one cone program per row is too slow at this size"
        rows.append(row)
    return rows


# Goals at the paper's shape, set when the native nodes were planned (README
# "Benchmarks"), and the DDN reference code's forward times (multiples of mean pooling)
# measured side by side on a 2-core CPU when the goals were set.
FWD_GOALS = {"quadratic": ("mean", 2.0), "pseudo_huber": ("mean", 15.0), "huber": ("mean", 15.0),
               "welsch": ("mean", 60.0), "trunc_quad": ("sort", 2.0)}
BWD_GOAL = 5.0
PROJECTION_GOALS = {"lp_ball p=1": ("sort", 2.0), "lp_ball p=2": ("l2 closed form", 1.0),
                      "lp_ball p=inf": ("clamp", 1.0), "simplex": ("sort", 2.0)}
DDN_REFERENCE_FWD = {"quadratic": 90.0, "huber": 200.0, "welsch": 400.0}


def _goals(name: str, f: float, b: float, mean_f: float, mean_b: float, sort_f: float) -> dict:
    base, limit = FWD_GOALS[name]
    ratio = f / (mean_f if base == "mean" else sort_f)
    out = {"goal": f"fwd ≤ {limit:g}× {base}, bwd ≤ {BWD_GOAL:g}× mean", "goal_base": base,
           "goal_met": bool(ratio <= limit and b / mean_b <= BWD_GOAL),
           "fwd_rel_goal_base": ratio}
    if name in DDN_REFERENCE_FWD:
        out["speedup_vs_ddn_reference"] = DDN_REFERENCE_FWD[name] / (f / mean_f)
    return out


def projection_cases(shape, device, dtype, with_cvxpy: bool, repeats: int, progress) -> list[dict]:
    B, n = shape
    gen = torch.Generator().manual_seed(1)
    x = (2 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)
    g = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    def native_fn(p):
        return (lambda t: project_simplex(t)) if p is None else (lambda t: project_lp(t, p, "ball"))

    def cvxpy_fn(p):
        return (layer("simplex", n=n, backend="cvxpy") if p is None
                else layer("lp_ball", n=n, p=p, backend="cvxpy"))

    ops = {"mean": lambda: fwd_bwd(lambda t: t.mean(-1), x, g[:, 0], device),
           "l2 closed form": lambda: fwd_bwd(lambda t: t * (1 / t.norm(dim=-1, keepdim=True)).clamp(max=1), x, g, device),
           "clamp": lambda: fwd_bwd(lambda t: t.clamp(-1, 1), x, g, device),
           "sort": lambda: (timed_sort(x, device), float("nan"))}
    for name, p in PROJECTIONS:
        ops[name] = (lambda p=p: fwd_bwd(native_fn(p), x, g, device))
    native = median_times(ops, repeats, progress)
    mean_f, mean_b = native["mean"]
    rows = []
    for name, (f, b) in native.items():
        path = "native" if name.startswith(("lp_ball", "simplex")) else "torch"
        b = None if name == "sort" else b
        rows.append(_row("projection", name, path, shape, dtype, device, f / B, None if b is None else b / B,
                         f / mean_f, None if b is None else b / mean_b))
        if name in PROJECTION_GOALS and tuple(shape) == SHAPES["paper"][1]:
            base, limit = PROJECTION_GOALS[name]
            ratio = f / native[base][0]
            rows[-1].update(goal=f"fwd ≤ {limit:g}× {base}", goal_met=bool(ratio <= limit),
                            fwd_rel_goal_base=ratio, goal_base=base)
            if base != "sort":  # the closed forms have a backward to compare with too
                both = (f + b) / sum(native[base])
                rows[-1]["fwd_bwd_rel_goal_base"] = both
    for name, p in PROJECTIONS:
        row = _row("projection", name, "cvxpy", shape, dtype, device, None, None, None, None)
        if with_cvxpy:
            done = min(CVXPY_ROWS, B)
            _measure_cvxpy(row, rows, native_fn(p), cvxpy_fn(p), x[:done], g[:done], 1 / done,
                           B, mean_f, mean_b, progress, f"timed on {done} rows")
        else:
            row["note"] = "skipped: one cone program per row is too slow at this size"
        rows.append(row)
    return rows


def _measure_cvxpy(row: dict, rows: list[dict], native: Callable, cvxpy: Callable, x: torch.Tensor,
                   g: torch.Tensor, per_sample: float, B: int, mean_f: float, mean_b: float,
                   progress, note: str) -> None:
    """Time the cvxpy path on a few rows (scaled by ``per_sample`` to one sample) and
    record how far it is from the native path, on ``row`` and on the native row."""
    f, b = fwd_bwd(cvxpy, x.cpu(), g.cpu(), torch.device("cpu"))
    progress.update(1)
    fs, bs = f * per_sample, b * per_sample
    row.update(fwd_ms_per_sample=1e3 * fs, bwd_ms_per_sample=1e3 * bs,
               fwd_rel_mean=fs * B / mean_f, bwd_rel_mean=bs * B / mean_b, note=note)
    ds, dg = agreement(native, cvxpy, x[:8].cpu())
    progress.update(1)
    for r in [row] + [r for r in rows if r["node"] == row["node"] and r["path"] == "native"]:
        r.update(max_solution_diff=ds, max_grad_diff=dg)


def _row(family, node, path, shape, dtype, device, f, b, fr, br) -> dict[str, Any]:
    return {
        "family": family, "node": node, "path": path, "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""), "device": str(device),
        "fwd_ms_per_sample": None if f is None else 1e3 * f,
        "bwd_ms_per_sample": None if b is None else 1e3 * b,
        "fwd_rel_mean": fr, "bwd_rel_mean": br,
        "max_solution_diff": None, "max_grad_diff": None, "note": "",
    }


def _nnls_layer(workers: int):
    """A user problem: non-negative least squares with learnable A and b."""
    import cvxpy as cp

    A = cp.Parameter((30, 20), name="A")
    b = cp.Parameter(30, name="b")
    z = cp.Variable(20, name="z")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ z - b)), [z >= 0])
    return ConvexLayer(prob, [A, b], [z], workers=workers)


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
    cases = [("qp (n=50, 40 ≤, 10 =)", lambda w: layer("qp", n=n, n_ineq=m, n_eq=p, workers=w), qp_data),
             ("user NNLS (30×20)", _nnls_layer, nnls_data)]
    rows = []
    for name, make, data in cases:
        times = {}
        for w in sorted({1, cores}):
            layer = make(w)
            layer(*data)  # starts the pool, canonicalises
            runs = []
            for _ in range(repeats):
                args = [d.clone().requires_grad_(True) for d in data]
                t0 = time.perf_counter()
                y = layer(*args)
                torch.autograd.grad(y.sum(), args)
                runs.append(time.perf_counter() - t0)
            times[w] = statistics.median(runs)
        rows.append({"problem": name, "batch": batch, "cores": cores,
                     "seconds_1_process": times[1], "seconds_workers": times[cores],
                     "speedup": times[1] / times[cores]})
    return rows
