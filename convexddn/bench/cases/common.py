"""Pieces shared by the benchmark cases: row records and the cone-program comparison."""
from __future__ import annotations

import statistics
from typing import Any, Callable

import torch

from ..harness import agreement, fwd_bwd

# (name, pooling shape (B, C, N), projection shape (B, n) or None). "small" also holds
# the cone-program comparison; "issue" is the shape at which issue 13 measured the DDN
# reference (pooling only); "paper" is the paper's.
SHAPES = {
    "small": ((4, 64, 256), (16, 64)),
    "issue": ((4, 256, 1024), None),
    "paper": ((24, 1024, 2048), (256, 512)),
}
CVXPY_ROWS = 8  # rows solved by the cone-program path per measurement (milliseconds each)
CVXPY_ROUNDS = 3  # timed calls of the cone-program path (after an untimed first one)


def measure_cvxpy(row: dict, rows: list[dict], native: Callable, cvxpy: Callable,
                  sample: tuple[torch.Tensor, torch.Tensor, float], B: int, mean_f: float, mean_b: float,
                  progress, repeats: int, whole_sample: bool = True) -> None:
    """Time the cvxpy path and record how far it is from the native path, on ``row`` and
    on the native row. ``sample = (X, G, per_sample)``: the rows of one sample, their
    upstream gradients, and the factor that turns the time of all of them into a time
    per sample.

    After an untimed first call on the first :data:`CVXPY_ROWS` rows (canonicalisation,
    caches): where the layer solved them per element, their cost is linear in the rows,
    and the median of ``min(repeats, CVXPY_ROUNDS)`` calls on them (one cone program per
    row is slow) is scaled to the whole sample; where it
    solved them as one batch, the cost per row falls with the batch (quadratic pooling:
    0.76 ms per row at 8 rows, 0.10 at 256), so the whole sample is timed instead (after
    its own first call): no scaling. Without ``whole_sample`` (``--quick``, a smoke test)
    the first rows are timed and scaled in both cases, and the note says so (the robust
    Huber rows' batched call on a whole sample took 20 s, most of the quick run).
    """
    X, G, per_sample = sample
    rounds = min(repeats, CVXPY_ROUNDS)
    k = min(CVXPY_ROWS, X.shape[0])
    x, g, per_sample = X[:k], G[:k], per_sample * X.shape[0] / k
    cpu = torch.device("cpu")
    fwd_bwd(cvxpy, x.cpu(), g.cpu(), cpu)
    info = getattr(cvxpy, "last_solve", None)
    batched = info is not None and len(info.backend) > 0 and all(b == "batched" for b in info.backend)
    if batched and whole_sample:
        x, g, per_sample = sample
        fwd_bwd(cvxpy, x.cpu(), g.cpu(), cpu)
    times = [fwd_bwd(cvxpy, x.cpu(), g.cpu(), cpu) for _ in range(rounds)]
    f = statistics.median(t[0] for t in times)
    b = statistics.median(t[1] for t in times)
    progress.update(1)
    fs, bs = f * per_sample, b * per_sample
    how = ("one solve per row, scaled to one sample" if not batched else "one batched solve" if whole_sample
           else "one batched solve, scaled to one sample (--quick)")
    row.update(fwd_ms_per_sample=1e3 * fs, bwd_ms_per_sample=1e3 * bs, rounds=rounds,
               fwd_rel_mean=fs * B / mean_f, bwd_rel_mean=bs * B / mean_b,
               note=f"timed on {x.shape[0]} rows ({how}); median of {rounds} calls after a first one; "
                    f"Δ columns on the first {min(8, x.shape[0])} rows")
    ds, dg = agreement(native, cvxpy, x[:8].cpu())  # (the note says how many rows)
    progress.update(1)
    for r in [row] + [r for r in rows if r["node"] == row["node"] and r["path"] == "native"]:
        r.update(max_solution_diff=ds, max_grad_diff=dg)


def row_record(family, node, path, shape, dtype, device, f, b, fr, br, rounds=None) -> dict[str, Any]:
    """One row of the pooling or projection table; ``rounds``: the timed rounds its
    figures are the medians of (None: not timed)."""
    return {
        "family": family, "node": node, "path": path, "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""), "device": str(device),
        "fwd_ms_per_sample": None if f is None else 1e3 * f,
        "bwd_ms_per_sample": None if b is None else 1e3 * b,
        "fwd_rel_mean": fr, "bwd_rel_mean": br,
        "max_solution_diff": None, "max_grad_diff": None, "note": "", "rounds": rounds,
    }
