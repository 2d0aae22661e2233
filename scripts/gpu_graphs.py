"""CUDA graphs on and off (``CONVEXDDN_CUDA_GRAPHS=1`` / ``0``; on, kept across calls or
captured on each), side by side: same
process, same inputs, interleaved rounds, medians of forward and backward. The batched
convex path (largest differences of the two solutions and gradients, graph replays per
solve, then one profiled OptNet forward) and robust pooling (float32, the bench's inputs,
with the DDN reference in the same rounds where ``CONVEXDDN_DDN_REFERENCE`` names a
checkout). Writes ``$OUT/graphs.json`` and ``$OUT/profile.txt`` (``OUT`` defaults to
``gpu-out``).

python scripts/gpu_graphs.py cuda          on a GPU, from the repository root
python scripts/gpu_graphs.py cuda convex   the convex rows only
python scripts/gpu_graphs.py cpu quick     a quick check of the script itself
"""
import json
import os
import statistics
import sys
import time
import traceback
import warnings

import torch

import convexddn
import convexddn._step_graphs as sg
from convexddn.bench.cases.convex import CONVEX_PROBLEMS
from convexddn.bench.harness import round_order
from convexddn.bench.harness import sync as _sync

DEV = sys.argv[1] if len(sys.argv) > 1 else "cuda"
QUICK = "quick" in sys.argv
OUT = os.environ.get("OUT") or "gpu-out"
os.makedirs(OUT, exist_ok=True)
warnings.simplefilter("ignore")

made = []
counter = {"replays": 0}
MODES = ("kept", "fresh", "eager")  # graphs kept across calls, captured on each call, none
kept_store, fresh_store = sg.StepGraphs._kept, sg.OrderedDict()
_init, _capture = sg.StepGraphs.__init__, sg.StepGraphs._capture
_replay = torch.cuda.CUDAGraph.replay


def replay(self):
    counter["replays"] += 1
    return _replay(self)


torch.cuda.CUDAGraph.replay = replay
stats = {"captures": 0, "capture_s": 0.0, "failed": []}


def init(self, capture, *a, **k):
    _init(self, capture, *a, **k)
    made.append(self)


def capture(self, body):
    t0 = time.perf_counter()
    g = _capture(self, body)
    stats["captures"] += 1
    stats["capture_s"] += time.perf_counter() - t0
    if g is None:
        stats["failed"].append(self.reason)
    return g


sg.StepGraphs.__init__, sg.StepGraphs._capture = init, capture


def sync():
    _sync(torch.device(DEV))


sys.path.insert(0, "tests/convex")
from test_batched import ball_cut_data, ball_cut_problem  # noqa: E402

CONVEX_PROBLEMS = dict(CONVEX_PROBLEMS)
CONVEX_PROBLEMS["ballcut"] = ("ball ∩ halfspace projection, n = 20", lambda B, gen: (
    *ball_cut_problem(20), ball_cut_data(B, 20)))
CASES = [("qp50", 4), ("ballcut", 8)] if QUICK else [
    ("qp100", 128), ("qp50", 64), ("qp50", 1), ("sparsemax16", 1024), ("ballcut", 256), ("qp50", 1024),
    ("qp50", 4096), ("qp100", 1)]
R = 2 if QUICK else 5
rows = []
for name, B in CASES:
    try:
        prob, params, variables, data = CONVEX_PROBLEMS[name][1](B, torch.Generator().manual_seed(0))
        layer = convexddn.ConvexLayer(prob, parameters=params, variables=variables)
        data = [t.to(DEV) for t in data]
        g = None

        def run(mode):
            global g
            os.environ["CONVEXDDN_CUDA_GRAPHS"] = "0" if mode == "eager" else "1"
            # "fresh": an empty store that keeps nothing, beside the kept one (not evicted)
            sg.StepGraphs._kept = fresh_store if mode == "fresh" else kept_store
            sg.KEEP = 0 if mode == "fresh" else 4
            args = [t.detach().requires_grad_(True) for t in data]
            counter["replays"] = 0
            caps = stats["captures"]
            sync()
            t0 = time.perf_counter()
            y = layer(*args)
            y = y[0] if isinstance(y, (tuple, list)) else y
            sync()
            t1 = time.perf_counter()
            if g is None:
                g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1)).to(DEV)
            gr = torch.autograd.grad(y, args, g, allow_unused=True)
            sync()
            t2 = time.perf_counter()
            return t1 - t0, t2 - t1, y.detach(), gr, (counter["replays"], stats["captures"] - caps)

        for mode in MODES:
            run(mode)
        T = {m: [] for m in MODES}
        out = {}
        for r in range(R if B < 4096 else 3):
            for mode in round_order(MODES, r):
                tf, tb, y, gr, reps = run(mode)
                T[mode].append((tf, tb, reps))
                out[mode] = (y, gr)
        diff = {}
        for mode in ("kept", "fresh"):
            dy = (out[mode][0] - out["eager"][0]).abs().max().item()
            dg = max(((a - b).abs().max().item() for a, b in zip(out[mode][1], out["eager"][1]) if a is not None),
                     default=0.0)
            diff[mode] = (dy, dg)
        med = {m: [1e3 * statistics.median(v[i] for v in T[m]) for i in range(2)] + [T[m][-1][2]] for m in T}
        row = {"problem": name, "batch": B, **{f"{m}_ms": med[m] for m in MODES}, "diff_vs_eager": diff,
               "ymax": out["eager"][0].abs().max().item(), "captures_total": stats["captures"],
               "capture_s_total": stats["capture_s"], "failed": stats["failed"][:2]}
        print(json.dumps(row), flush=True)
        print(f"{name} B{B}: " + ", ".join(f"{m} {med[m][0]:.1f}+{med[m][1]:.1f} ms (replays, captures {med[m][2]})"
                                           for m in MODES)
              + f"; fwd eager/kept {med['eager'][0] / med['kept'][0]:.2f}x, eager/fresh "
              f"{med['eager'][0] / med['fresh'][0]:.2f}x; diff kept {diff['kept'][0]:.1e}/{diff['kept'][1]:.1e}",
              flush=True)
        rows.append(row)
    except Exception:  # noqa: BLE001
        print(traceback.format_exc()[-3000:], flush=True)
        rows.append({"problem": name, "batch": B, "error": traceback.format_exc()[-3000:]})
    with open(os.path.join(OUT, "graphs.json"), "w") as fh:
        json.dump({"rows": rows, "stats": stats, "torch": torch.__version__}, fh, indent=1)


def pooling():
    from convexddn.bench.cases.pooling import _inputs
    from convexddn.bench.harness import fwd_bwd
    from convexddn.bench.reference import load_reference, reference_pool
    from convexddn.nodes.pooling import robust_pool

    # load_reference, not load_reference_file: it also checks the names reference_pool calls.
    ref, why = load_reference()
    print("DDN reference:", "loaded" if ref is not None else why, flush=True)
    out = []
    for shape in ([(4, 256, 1024)] if QUICK else [(4, 256, 1024), (24, 1024, 2048)]):
        x, g = _inputs(shape, DEV, torch.float32)
        for pen in ("pseudo_huber", "huber", "welsch"):
            def ours(flag, pen=pen):
                os.environ["CONVEXDDN_CUDA_GRAPHS"] = flag
                made.clear()
                t = fwd_bwd(lambda v: robust_pool(v, pen, 1.0), x, g, torch.device(DEV))
                return t.fwd, t.bwd, sum(m.replays for m in made)
            paths = {"graphs": lambda: ours("1"), "eager": lambda: ours("0")}
            if ref is not None:
                rp = reference_pool(ref, pen, 1.0)
                paths["ddn"] = lambda rp=rp: (*fwd_bwd(rp, x, g, torch.device(DEV))[:2], 0)
            for f in paths.values():
                f()
            T = {k: [] for k in paths}
            for r in range(R if shape[0] < 24 else 3):
                for k in round_order(paths, r):
                    T[k].append(paths[k]())
            med = {k: (statistics.median(v[0] for v in T[k]), statistics.median(v[1] for v in T[k]), T[k][-1][2])
                   for k in T}
            B = shape[0]
            row = {"shape": shape, "penalty": pen, **{f"{k}_ms_per_sample": (1e3 * m[0] / B, 1e3 * m[1] / B)
                                                      for k, m in med.items()}, "replays": med["graphs"][2]}
            out.append(row)
            line = (f"{pen} {shape}: graphs {1e3 * med['graphs'][0] / B:.3f}+{1e3 * med['graphs'][1] / B:.3f} "
                    f"ms/sample, eager {1e3 * med['eager'][0] / B:.3f}+{1e3 * med['eager'][1] / B:.3f}, "
                    f"fwd {med['eager'][0] / med['graphs'][0]:.2f}x, replays {med['graphs'][2]}")
            if "ddn" in med:
                line += (f"; DDN {1e3 * med['ddn'][0] / B:.3f}+{1e3 * med['ddn'][1] / B:.3f}: ours/DDN fwd "
                         f"{med['ddn'][0] / med['graphs'][0]:.2f}x (eager {med['ddn'][0] / med['eager'][0]:.2f}x)")
            print(line, flush=True)
    return out


try:
    pool_rows = [] if "convex" in sys.argv else pooling()
except Exception:  # noqa: BLE001
    print(traceback.format_exc()[-3000:], flush=True)
    pool_rows = [{"error": traceback.format_exc()[-3000:]}]
with open(os.path.join(OUT, "graphs.json"), "w") as fh:
    json.dump({"rows": rows, "pooling": pool_rows, "stats": stats, "torch": torch.__version__}, fh, indent=1)

# Where the remaining forward time goes: one profiled OptNet forward with graphs.
if DEV == "cuda" and not QUICK and "convex" not in sys.argv:
    try:
        prob, params, variables, data = CONVEX_PROBLEMS["qp100"][1](128, torch.Generator().manual_seed(0))
        layer = convexddn.ConvexLayer(prob, parameters=params, variables=variables)
        data = [t.to(DEV) for t in data]
        os.environ["CONVEXDDN_CUDA_GRAPHS"] = "1"
        with torch.no_grad():
            layer(*data)
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                layer(*data)
                torch.cuda.synchronize()
        tab = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
        print(tab[-6000:], flush=True)
        tab2 = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
        print(tab2[-4000:], flush=True)
        with open(os.path.join(OUT, "profile.txt"), "w") as fh:
            fh.write(tab + "\n\n" + tab2)
    except Exception:  # noqa: BLE001
        print(traceback.format_exc()[-2000:], flush=True)
