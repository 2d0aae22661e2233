"""The CUDA figures of the closing notes, in one run on a machine with a GPU.

    python scripts/gpu_check.py OUTDIR [PART ...]

PART: convex, optnet (the n=100 QP alone), pool_f32, nodes (default: convex, pool_f32, nodes).

Writes ``OUTDIR/gpu.json`` (every row) and prints the tables of ``convexddn bench``
for: the convex path on CUDA (OptNet setting n=100 / 100 ≤ / batch 128, the n=50 QP at
batch 64 and 4096, sparsemax at batch 1024; agreement with the CPU), robust pooling on
CUDA beside the DDN reference (set ``CONVEXDDN_DDN_REFERENCE``) at the small and the
paper shape in float32 and float64, and the node library on CUDA. Each part is
independent: one that fails is reported and the others still run.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings

import torch


class _Quiet:
    def update(self, n: int = 1) -> None:
        pass


def _profile_optnet(dev: torch.device) -> list[dict]:
    """Where the OptNet setting's forward spends its time on the GPU: iterations, and the
    profiler's top operators by host (launch) and device time."""
    from torch.profiler import ProfilerActivity, profile

    from convexddn.bench.cases.convex import CONVEX_PROBLEMS
    from convexddn.convex.batched import BatchedProgram

    gen = torch.Generator().manual_seed(0)
    prob, params, variables, data = CONVEX_PROBLEMS["qp100"][1](128, gen)
    bp = BatchedProgram(prob, params, variables)
    args = [d.to(dev) for d in data]
    bp(*args)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    _, info = bp(*args)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        bp(*args)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    table_dev = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10)
    print(table, table_dev, sep="\n", flush=True)
    events = prof.key_averages()
    return [{"forward_s": wall, "iterations_max": int(info.iterations.max()),
             "iterations_median": float(info.iterations.float().median()),
             "launches": int(sum(e.count for e in events if e.key.startswith("cudaLaunchKernel"))),
             "syncs": int(sum(e.count for e in events if "Synchronize" in e.key or "MemcpyAsync" in e.key))}]


def _pool_compiled(dev: torch.device) -> list[dict]:
    """Robust pooling on CUDA with compile=True (fused Triton kernels) against eager, at
    the paper's shape, float32: forward and backward medians after the compile call."""
    from convexddn.bench.harness import fwd_bwd, median_times
    from convexddn.nodes.pooling import robust_pool

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1024, 2048, generator=gen).to(dev)
    g = torch.ones(24, 1024, device=dev)
    out = []
    for pen in ("pseudo_huber", "huber", "welsch", "trunc_quad"):
        row = {"penalty": pen}
        for mode in (False, True):
            warm: dict[str, float] = {}
            (f, b), = median_times(
                {"op": lambda: fwd_bwd(lambda t: robust_pool(t, pen, 1.0, compile=mode), x, g, dev)},
                5, _Quiet(), warm).values()
            row[f"first_call_s_compile_{mode}"] = warm["op"]
            row[f"fwd_ms_compile_{mode}"] = 1e3 * f
            row[f"bwd_ms_compile_{mode}"] = 1e3 * b
        print(row, flush=True)
        out.append(row)
    return out


def main(out: str, wanted: list[str]) -> int:
    from convexddn.bench import CONVEX_CUDA, format_table
    from convexddn.bench.cases import SHAPES, pool_cases
    from convexddn.bench.cases.convex import convex_cases
    from convexddn.bench.cases.nodes import node_cases

    from convexddn._machine import machine

    os.makedirs(out, exist_ok=True)
    dev = torch.device("cuda")
    result = {"machine": machine(dev),
              "repeats": 5, "quick": False, "rows": [], "convex": [], "nodes": [], "memory": [],
              "workers": []}
    parts = {
        "convex": lambda: convex_cases(CONVEX_CUDA, 3, _Quiet(), "cuda"),
        "optnet": lambda: convex_cases([("qp100", 128)], 3, _Quiet(), "cuda"),
        "pool_f32": lambda: [r for name in ("small", "paper")
                             for r in pool_cases(SHAPES[name][0], dev, torch.float32, False, 5, _Quiet())],
        "nodes": lambda: node_cases(5, _Quiet(), dev),
        "profile": lambda: _profile_optnet(dev),
        "pool_compiled": lambda: _pool_compiled(dev),
    }
    for key in wanted or ["convex", "pool_f32", "nodes"]:
        fn = parts[key]
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows = fn()
        except Exception:  # noqa: BLE001 - one failing part must not hide the others
            traceback.print_exc()
            continue
        print(f"[{key}: {time.perf_counter() - t0:.1f} s]", flush=True)
        if key in ("profile", "pool_compiled"):
            result[key] = rows
        else:
            result["rows" if key.startswith("pool") else "convex" if key == "optnet" else key] += rows
        with open(os.path.join(out, "gpu.json"), "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(format_table({**result, "rows": result["rows"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "results-gpu", sys.argv[2:]))
