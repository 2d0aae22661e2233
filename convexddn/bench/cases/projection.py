"""Benchmark case: Lp-ball and simplex projections against their closed forms and the cone program."""
from __future__ import annotations

import math

import torch

from ...factory import layer
from ...functional import project_lp, project_simplex
from ..harness import fwd_bwd, median_times, timed_sort
from .common import SHAPES, measure_cvxpy, row_record

__all__ = ["projection_cases", "PROJECTIONS"]

PROJECTIONS = (("lp_ball p=1", 1), ("lp_ball p=2", 2), ("lp_ball p=inf", math.inf), ("simplex", None))
# Goals at the paper's projection shape (README "Benchmarks").
PROJECTION_GOALS = {"lp_ball p=1": ("sort", 2.0), "lp_ball p=2": ("l2 closed form", 1.0),
                    "lp_ball p=inf": ("clamp", 1.0), "simplex": ("sort", 2.0)}


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
        rows.append(row_record("projection", name, path, shape, dtype, device, f / B, None if b is None else b / B,
                         f / mean_f, None if b is None else b / mean_b, repeats))
        if name in PROJECTION_GOALS and tuple(shape) == SHAPES["paper"][1]:
            base, limit = PROJECTION_GOALS[name]
            ratio = f / native[base][0]
            rows[-1].update(goal=f"fwd ≤ {limit:g}× {base}", goal_met=bool(ratio <= limit),
                            fwd_rel_goal_base=ratio, goal_base=base)
            if base != "sort":  # the closed forms have a backward to compare with too
                both = (f + b) / sum(native[base])
                rows[-1]["fwd_bwd_rel_goal_base"] = both
    for name, p in PROJECTIONS:
        row = row_record("projection", name, "cvxpy", shape, dtype, device, None, None, None, None)
        if with_cvxpy:
            measure_cvxpy(row, rows, native_fn(p), cvxpy_fn(p), (x, g, 1 / B), B, mean_f, mean_b, progress,
                          repeats=repeats)
        else:
            row["note"] = "skipped: one cone program per row is too slow at this size"
        rows.append(row)
    return rows
