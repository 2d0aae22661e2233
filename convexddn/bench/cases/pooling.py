"""Benchmark case: robust pooling, every penalty, against mean pooling, one sort and the cone program."""
from __future__ import annotations

from typing import Callable

import torch

from ...factory import layer
from ...functional import robust_pool
from ...nodes.pooling import CONVEX_PENALTIES
from ...nodes.pooling import PENALTIES as POOL_PENALTIES
from ..harness import fwd_bwd, median_times, timed_sort
from .common import CVXPY_ROWS, SHAPES, measure_cvxpy, row_record

__all__ = ["pool_cases", "POOL_PENALTIES", "CONVEX_PENALTIES"]


# Goals at the paper's shape, set when the native nodes were planned (README
# "Benchmarks"), and the DDN reference code's forward times (multiples of mean pooling)
# measured side by side on a 2-core CPU when the goals were set.
FWD_GOALS = {"quadratic": ("mean", 2.0), "pseudo_huber": ("mean", 15.0), "huber": ("mean", 15.0),
               "welsch": ("mean", 60.0), "trunc_quad": ("sort", 2.0)}
BWD_GOAL = 5.0
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
        rows.append(row_record("pooling", name, "torch" if name in ("mean", "sort") else "native",
                         shape, dtype, device, f / B, b / B, f / mean_f, b / mean_b))
        if name in POOL_PENALTIES:
            rows[-1]["first_call_s"] = warmups[name]
            if tuple(shape) == SHAPES["paper"][0]:  # the goals are set at this shape
                rows[-1].update(_goals(name, f, b, mean_f, mean_b, sort_f))
    rows[1]["note"] = "one x.sort(-1) of the same tensor (forward only)"
    rows[1]["bwd_ms_per_sample"] = None
    rows[1]["bwd_rel_mean"] = None
    for p in CONVEX_PENALTIES:
        row = row_record("pooling", p, "cvxpy", shape, dtype, device, None, None, None, None)
        if with_cvxpy:
            cone = layer("robust_pool", n=N, penalty=p, alpha=1.0, backend="cvxpy")
            measure_cvxpy(row, rows, lambda t: robust_pool(t, p, 1.0), cone,
                           x.reshape(-1, N)[:CVXPY_ROWS], g.reshape(-1)[:CVXPY_ROWS], C / CVXPY_ROWS,
                           B, mean_f, mean_b, progress,
                           f"timed on {CVXPY_ROWS} rows (one solve each), scaled to {C} rows per sample")
        else:
            row["note"] = "skipped: one cone program per row is too slow at this size"
        rows.append(row)
    return rows
