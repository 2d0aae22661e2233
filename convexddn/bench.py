"""``convexddn bench``: speed and agreement of the convex (cvxpy) and native paths.

For every robust pooling penalty and every Lp-ball projection (p = 1, 2, ∞) plus the
simplex, at a small and a paper-sized shape, the benchmark times forward and backward
of each path that supports the node, per sample (one leading batch element), beside
mean pooling ``x.mean(-1)`` timed in the same run, and measures how far the paths'
solutions and gradients are apart (float64, same upstream gradient).

Outputs (under ``--out``, default ``results/``): a markdown table on stdout,
``bench.json`` with every figure and the machine, ``bench.png`` (log-scale bars).

Timing protocol: each figure is the median over ``repeats`` rounds; within a round
the nodes run interleaved, so drifting load from other processes hits all alike.
The first call of each node (compilation, CVXPY canonicalisation) is a warm-up and is
not counted. The cvxpy path runs a fixed number of rows (it costs milliseconds per
row, not per tensor) and is scaled per sample; at the paper size it is skipped with
the time it would take, estimated from the small shape.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
import warnings
from typing import Any, Callable

import torch

from ._machine import machine
from .pooling import CONVEX_PENALTIES, robust_pool
from .pooling import PENALTIES as POOL_PENALTIES
from .projection import project_lp, project_simplex
PROJECTIONS = (("lp_ball p=1", 1), ("lp_ball p=2", 2), ("lp_ball p=inf", math.inf), ("simplex", None))

# (name, pooling shape (B, C, N), projection shape (B, n))
SHAPES = {
    "small": ((4, 64, 256), (16, 64)),
    "paper": ((24, 1024, 2048), (256, 512)),
}
CVXPY_ROWS = 8  # rows solved by the cvxpy path per measurement (milliseconds each)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, g: torch.Tensor,
             device: torch.device) -> tuple[float, float]:
    x = x.detach().requires_grad_(True)
    _sync(device)
    t0 = time.perf_counter()
    y = fn(x)
    _sync(device)
    t1 = time.perf_counter()
    torch.autograd.grad(y, x, g)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


def _median_times(ops: dict[str, Callable[[], tuple[float, float]]], repeats: int,
                  progress, warmups: dict[str, float] | None = None) -> dict[str, tuple[float, float]]:
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in ops}
    for name, op in ops.items():  # warm-up: compile, canonicalise, allocate
        t0 = time.perf_counter()
        op()
        if warmups is not None:
            warmups[name] = time.perf_counter() - t0
        progress.update(1)
    for _ in range(repeats):
        for name, op in ops.items():
            times[name].append(op())
        progress.update(len(ops))
    return {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
            for k, v in times.items()}


def _agreement(native: Callable, cvxpy: Callable, x: torch.Tensor) -> tuple[float, float]:
    """Largest |difference| of solutions and of gradients (float64, same upstream grad)."""
    x64 = x.detach().double()
    gen = torch.Generator().manual_seed(0)
    outs, grads = [], []
    g = None
    for fn in (native, cvxpy):
        xi = x64.clone().requires_grad_(True)
        y = fn(xi)
        if g is None:
            g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
        (gx,) = torch.autograd.grad(y, xi, g)
        outs.append(y.detach())
        grads.append(gx)
    return float((outs[0] - outs[1]).abs().max()), float((grads[0] - grads[1]).abs().max())


def _pool_cases(shape, device, dtype, with_cvxpy: bool, repeats: int, progress) -> list[dict]:
    B, C, N = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    x[..., : N // 10] += 5.0  # 10 % outliers, so the robust penalties have work to do
    g = torch.randn(B, C, generator=gen).to(device=device, dtype=dtype)
    ops: dict[str, Callable[[], tuple[float, float]]] = {
        "mean": lambda: _fwd_bwd(lambda t: t.mean(-1), x, g, device),
        "sort": lambda: (_timed_sort(x, device), float("nan")),
    }
    for p in POOL_PENALTIES:
        ops[p] = (lambda p=p: _fwd_bwd(lambda t: robust_pool(t, p, 1.0), x, g, device))
    warmups: dict[str, float] = {}
    native = _median_times(ops, repeats, progress, warmups)
    rows = []
    mean_f, mean_b = native["mean"]
    sort_f = native["sort"][0]
    for name in ("mean", "sort") + POOL_PENALTIES:
        f, b = native[name]
        rows.append(_row("pooling", name, "torch" if name in ("mean", "sort") else "native",
                         shape, dtype, device, f / B, b / B, f / mean_f, b / mean_b))
        if name in POOL_PENALTIES:
            rows[-1]["first_call_s"] = warmups[name]
            if tuple(shape) == SHAPES["paper"][0]:  # the targets are set at this shape
                rows[-1].update(_targets(name, f, b, mean_f, mean_b, sort_f))
    rows[1]["note"] = "one x.sort(-1) of the same tensor (forward only)"
    rows[1]["bwd_ms_per_sample"] = None
    rows[1]["bwd_rel_mean"] = None
    for p in CONVEX_PENALTIES:
        row = _row("pooling", p, "cvxpy", shape, dtype, device, None, None, None, None)
        if with_cvxpy:
            _measure_cvxpy(row, rows, lambda t: robust_pool(t, p, 1.0),
                           lambda t: robust_pool(t, p, 1.0, backend="cvxpy"),
                           x.reshape(-1, N)[:CVXPY_ROWS], g.reshape(-1)[:CVXPY_ROWS], C / CVXPY_ROWS,
                           B, mean_f, mean_b, progress,
                           f"timed on {CVXPY_ROWS} rows (one solve each), scaled to {C} rows per sample")
        else:
            row["note"] = "skipped: one cone program per row is too slow at this size"
        rows.append(row)
    return rows


# Issue 3's targets at the paper's shape, and the DDN reference code's forward times
# (multiples of mean pooling) measured side by side when the targets were set.
FWD_TARGETS = {"quadratic": ("mean", 2.0), "pseudo_huber": ("mean", 15.0), "huber": ("mean", 15.0),
               "welsch": ("mean", 60.0), "trunc_quad": ("sort", 2.0)}
BWD_TARGET = 5.0
PROJECTION_TARGETS = {"lp_ball p=1": ("sort", 2.0), "lp_ball p=2": ("l2 closed form", 1.0),
                      "lp_ball p=inf": ("clamp", 1.0), "simplex": ("sort", 2.0)}
DDN_REFERENCE_FWD = {"quadratic": 90.0, "huber": 200.0, "welsch": 400.0}


def _targets(name: str, f: float, b: float, mean_f: float, mean_b: float, sort_f: float) -> dict:
    base, limit = FWD_TARGETS[name]
    ratio = f / (mean_f if base == "mean" else sort_f)
    out = {"target": f"fwd ≤ {limit:g}× {base}, bwd ≤ {BWD_TARGET:g}× mean", "target_base": base,
           "target_met": bool(ratio <= limit and b / mean_b <= BWD_TARGET),
           "fwd_rel_target_base": ratio}
    if name in DDN_REFERENCE_FWD:
        out["speedup_vs_ddn_reference"] = DDN_REFERENCE_FWD[name] / (f / mean_f)
    return out


def _timed_sort(x: torch.Tensor, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    x.sort(-1)
    _sync(device)
    return time.perf_counter() - t0


def _proj_cases(shape, device, dtype, with_cvxpy: bool, repeats: int, progress) -> list[dict]:
    B, n = shape
    gen = torch.Generator().manual_seed(1)
    x = (2 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)
    g = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    def native_fn(p):
        return (lambda t: project_simplex(t)) if p is None else (lambda t: project_lp(t, p, "ball"))

    def cvxpy_fn(p):
        return ((lambda t: project_simplex(t, backend="cvxpy")) if p is None
                else (lambda t: project_lp(t, p, "ball", backend="cvxpy")))

    ops = {"mean": lambda: _fwd_bwd(lambda t: t.mean(-1), x, g[:, 0], device),
           "l2 closed form": lambda: _fwd_bwd(lambda t: t * (1 / t.norm(dim=-1, keepdim=True)).clamp(max=1), x, g, device),
           "clamp": lambda: _fwd_bwd(lambda t: t.clamp(-1, 1), x, g, device),
           "sort": lambda: (_timed_sort(x, device), float("nan"))}
    for name, p in PROJECTIONS:
        ops[name] = (lambda p=p: _fwd_bwd(native_fn(p), x, g, device))
    native = _median_times(ops, repeats, progress)
    mean_f, mean_b = native["mean"]
    rows = []
    for name, (f, b) in native.items():
        path = "native" if name.startswith(("lp_ball", "simplex")) else "torch"
        b = None if name == "sort" else b
        rows.append(_row("projection", name, path, shape, dtype, device, f / B, None if b is None else b / B,
                         f / mean_f, None if b is None else b / mean_b))
        if name in PROJECTION_TARGETS and tuple(shape) == SHAPES["paper"][1]:
            base, limit = PROJECTION_TARGETS[name]
            ratio = f / native[base][0]
            rows[-1].update(target=f"fwd ≤ {limit:g}× {base}", target_met=bool(ratio <= limit),
                            fwd_rel_target_base=ratio, target_base=base)
            if base != "sort":  # the closed forms have a backward to compare with too
                both = (f + b) / sum(native[base])
                rows[-1]["fwd_bwd_rel_target_base"] = both
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
    f, b = _fwd_bwd(cvxpy, x.cpu(), g.cpu(), torch.device("cpu"))
    progress.update(1)
    fs, bs = f * per_sample, b * per_sample
    row.update(fwd_ms_per_sample=1e3 * fs, bwd_ms_per_sample=1e3 * bs,
               fwd_rel_mean=fs * B / mean_f, bwd_rel_mean=bs * B / mean_b, note=note)
    ds, dg = _agreement(native, cvxpy, x[:8].cpu())
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


_MEMORY_PROBE = """
import gc, os, sys, threading, time, torch
from convexddn.pooling import robust_pool
shape, penalty = tuple(map(int, sys.argv[1].split(","))), sys.argv[2]
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
op = (lambda t: t.mean(-1)) if penalty == "mean" else (lambda t: robust_pool(t, penalty, 1.0))
x = torch.randn(shape).requires_grad_(True)
g = torch.randn(shape[:-1])
torch.autograd.grad(op(x), x, g)  # warm-up: compilation and kernel loading are not counted
gc.collect()
base, peak, done = rss(), [0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
t = threading.Thread(target=sample); t.start()
(gx,) = torch.autograd.grad(op(x), x, g)
done[0] = True; t.join()
print(max(peak[0], rss()) - base, x.numel() * x.element_size())
"""


def peak_memory(shape: tuple[int, ...], penalties=("mean",) + POOL_PENALTIES) -> list[dict[str, Any]]:
    """Peak resident memory added by one forward + backward, per penalty, in units of
    the input tensor's size: a fresh process each, after a warm-up call, sampling the
    resident set every 0.5 ms during the call. The gradient itself is one input-sized
    tensor, so 1× is the floor for any node."""
    import subprocess
    import sys

    # Large blocks always mmapped, so freed memory leaves the resident set at once and
    # RSS tracks what is live (glibc's adaptive threshold would keep freed blocks).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for p in penalties:
        out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, ",".join(map(str, shape)), p],
                             capture_output=True, text=True, check=True, env=env).stdout.split()
        added, size = int(out[0]), int(out[1])
        rows.append({"node": p, "shape": list(shape), "peak_added_bytes": added,
                     "input_bytes": size, "peak_over_input": added / size})
    return rows


def _nnls_layer(workers: int):
    """A user problem: non-negative least squares with learnable A and b."""
    import cvxpy as cp

    from .layer import ConvexLayer

    A = cp.Parameter((30, 20), name="A")
    b = cp.Parameter(30, name="b")
    z = cp.Variable(20, name="z")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ z - b)), [z >= 0])
    return ConvexLayer(prob, [A, b], [z], workers=workers)


def workers_speedup(batch: int = 64, repeats: int = 3) -> list[dict[str, Any]]:
    """Forward + backward time of ConvexLayer with 1 and with `cpu_count` worker
    processes (pools started before timing), on the registry QP and a user problem."""
    from .registry import build_layer

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
    cases = [("qp (n=50, 40 ≤, 10 =)", lambda w: build_layer("qp", n=n, n_ineq=m, n_eq=p, workers=w), qp_data),
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


def _estimate_skipped(rows: list[dict]) -> None:
    """Fill the skipped cvxpy rows' notes with the time the small shape predicts."""
    small = {(r["family"], r["node"]): r for r in rows
             if r["path"] == "cvxpy" and r["fwd_ms_per_sample"] is not None}
    for r in rows:
        ref = small.get((r["family"], r["node"]))
        if r["path"] == "cvxpy" and r["fwd_ms_per_sample"] is None and ref is not None:
            per_row = (ref["fwd_ms_per_sample"] + ref["bwd_ms_per_sample"]) / (
                ref["shape"][1] if r["family"] == "pooling" else 1)
            n_rows = math.prod(r["shape"][:-1])
            scale = r["shape"][-1] / ref["shape"][-1]  # at least linear in the row length
            seconds = per_row * n_rows * scale / 1e3
            took = f"{seconds / 3600:.1f} h" if seconds > 3600 else f"{seconds / 60:.1f} min"
            r["note"] = (f"skipped: {n_rows} cone programs of size {r['shape'][-1]}; "
                         f"≥ {took} at the small shape's rate")


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "—"
    if kind == "ms":
        return f"{v:.3g}"
    if kind == "x":
        return f"{v:.2f}×"
    return f"{v:.1e}"


def format_table(result: dict[str, Any]) -> str:
    lines = []
    for family in ("pooling", "projection"):
        lines += [f"### {family}", "",
                  "| node | path | shape | fwd ms/sample | bwd ms/sample | fwd / mean | bwd / mean "
                  "| max Δ solution | max Δ gradient | note |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in result["rows"]:
            if r["family"] != family:
                continue
            note = r["note"]
            if "first_call_s" in r:
                note = f"first call {r['first_call_s']:.1f} s"
            if "target" in r:
                note = (f"{'✓' if r['target_met'] else '✗'} target {r['target']} "
                        f"(fwd {r['fwd_rel_target_base']:.2f}× {r['target_base']})")
                if "fwd_bwd_rel_target_base" in r:
                    note += f"; fwd+bwd {r['fwd_bwd_rel_target_base']:.2f}× {r['target_base']}"
                if "first_call_s" in r:
                    note += f"; first call {r['first_call_s']:.1f} s"
                if "speedup_vs_ddn_reference" in r:
                    note += f"; {r['speedup_vs_ddn_reference']:.0f}× faster than the DDN reference"
            lines.append(
                f"| {r['node']} | {r['path']} | {tuple(r['shape'])} | {_fmt(r['fwd_ms_per_sample'], 'ms')} "
                f"| {_fmt(r['bwd_ms_per_sample'], 'ms')} | {_fmt(r['fwd_rel_mean'], 'x')} "
                f"| {_fmt(r['bwd_rel_mean'], 'x')} | {_fmt(r['max_solution_diff'], 'e')} "
                f"| {_fmt(r['max_grad_diff'], 'e')} | {note} |")
        lines.append("")
    if result.get("memory"):
        lines += ["### memory (forward + backward, fresh process each)", "",
                  "| node | shape | peak added / input size |", "|---|---|---:|"]
        for r in result["memory"]:
            lines.append(f"| {r['node']} | {tuple(r['shape'])} | {r['peak_over_input']:.2f}× |")
        lines.append("")
    if result.get("workers"):
        lines += ["### ConvexLayer worker processes (forward + backward, float64)", "",
                  "| problem | batch | 1 process s | workers = cores s | speed-up | cores |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in result["workers"]:
            lines.append(f"| {r['problem']} | {r['batch']} | {r['seconds_1_process']:.2f} "
                         f"| {r['seconds_workers']:.2f} | {r['speedup']:.2f}× | {r['cores']} |")
        lines.append("")
    m = result["machine"]
    lines.append("Targets (issue 3) apply at the paper's shape (24, 1024, 2048); the DDN reference "
                 "figures (forward, × mean pooling: quadratic 90, Huber 200, Welsch 400) were "
                 "measured side by side on this kind of machine when the targets were set.")
    lines.append(f"Machine: {m['processor']}, {m['cpu_count']} cores, torch {m['torch']} "
                 f"({m['torch_threads']} threads), device {m['device']}; medians of "
                 f"{result['repeats']} rounds; mean = `x.mean(-1)` of the same tensor.")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullFormatter

    rows = [r for r in result["rows"] if r["fwd_ms_per_sample"] is not None and r["node"] != "sort"]
    # pooling panels first, small shape before large
    shapes = sorted({tuple(r["shape"]) for r in rows}, key=lambda s: (-len(s), math.prod(s)))
    ncols = 2
    nrows = -(-len(shapes) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(12, 4.5 * nrows), squeeze=False)
    colors = {"native": "tab:blue", "cvxpy": "tab:orange", "torch": "tab:gray"}
    for ax in axes.flat[len(shapes):]:
        ax.axis("off")
    for ax, shape in zip(axes.flat, shapes):
        sel = [r for r in rows if tuple(r["shape"]) == shape]
        labels = [f"{r['node']}\n({r['path']})" for r in sel]
        total = [r["fwd_ms_per_sample"] + (r["bwd_ms_per_sample"] or 0.0) for r in sel]
        ax.barh(range(len(sel)), total, color=[colors[r["path"]] for r in sel])
        ax.set_yticks(range(len(sel)), labels, fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.invert_yaxis()
        ax.set_xlabel("forward + backward, ms per sample (log)")
        ax.set_title(f"{sel[0]['family']} {shape}")
    fig.suptitle(f"convexddn bench ({result['machine']['device']}, torch {result['machine']['torch']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False, device: str = "cpu", repeats: int | None = None,
        out: str | None = "results", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Run the benchmark; write bench.json and bench.png under ``out`` (unless None)."""
    from tqdm.auto import tqdm

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .errors import OptionError

        raise OptionError("device 'cuda' was asked for, but torch.cuda.is_available() is False")
    names = ["small"] if quick else ["small", "paper"]
    repeats = repeats or (3 if quick else 5)
    n_ops = (2 + len(POOL_PENALTIES)) + (4 + len(PROJECTIONS))
    total = sum((repeats + 1) * n_ops + (2 * (len(CONVEX_PENALTIES) + len(PROJECTIONS)) if n == "small" else 0)
                for n in names)
    rows: list[dict] = []
    with warnings.catch_warnings(), tqdm(total=total, desc="convexddn bench", unit="op") as progress:
        warnings.simplefilter("ignore")  # solver fallbacks are counted in agreement, not printed
        for name in names:
            pool_shape, proj_shape = SHAPES[name]
            rows += _pool_cases(pool_shape, dev, dtype, name == "small", repeats, progress)
            rows += _proj_cases(proj_shape, dev, dtype, name == "small", repeats, progress)
    _estimate_skipped(rows)
    memory = peak_memory(SHAPES[names[-1]][0]) if dev.type == "cpu" else []
    workers = [] if quick else workers_speedup()
    result = {"machine": machine(dev), "repeats": repeats, "quick": quick, "rows": rows,
              "memory": memory, "workers": workers}
    if out is not None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "bench.json"), "w") as f:
            json.dump(result, f, indent=2)
        plot(result, os.path.join(out, "bench.png"))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small shapes only (smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, quick 3)")
    parser.add_argument("--out", default="results", help="output folder (default results/)")


def main(args: argparse.Namespace) -> int:
    result = run(quick=args.quick, device=args.device, repeats=args.repeats, out=args.out)
    print(format_table(result))
    print(f"\nwrote {os.path.join(args.out, 'bench.json')} and {os.path.join(args.out, 'bench.png')}")
    return 0
