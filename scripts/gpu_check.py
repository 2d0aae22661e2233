"""The CUDA figures of the closing notes, in one run on a machine with a GPU.

    python scripts/gpu_check.py OUTDIR [PART ...] [--cpu]

PART: convex, optnet (the n=100 QP alone), pool_f32, nodes, float32, lp, profile,
pool_compiled (default: convex, pool_f32, nodes, float32, lp).

Writes ``OUTDIR/gpu.json`` (every row) and prints the tables of ``convexddn bench``
for: the convex path on CUDA (OptNet setting n=100 / 100 ≤ / batch 128, the n=50 QP at
batch 64 and 4096, sparsemax at batch 1024; agreement with the CPU), robust pooling on
CUDA beside the DDN reference (set ``CONVEXDDN_DDN_REFERENCE``) at the small and the
paper shape in float32 and float64, and the node library on CUDA. Each part is
independent: one that fails is reported and the others still run.

Checks, asserted (rows under ``"checks"`` in gpu.json, printed as a table at the end;
the exit status is 1 when a check fails or a part raises, after every part has run):

- convex, optnet: for each problem and batch timed, ``ConvexLayer`` (auto) on CUDA
  against the batched solver on the CPU (same inputs and upstream gradient): max
  |Δ solution| <= 1e-8 (float64). Gradients are recorded, not asserted. (The timed
  rows' own ``max_solution_diff`` is against the per-element path, another solver:
  ~1e-8 apart, recorded only.) Above batch 1024 the row's reference already is the
  batched path on the CPU, and is reused (its CPU solve takes ~15 s).
- nodes: each timed node, on the same inputs (the bench's seeded ones) and upstream
  gradient, on CUDA against the CPU: output and input gradients within
  ``tol · max(1, max|CPU value|)``, tol 1e-8 in float64 (the nodes are direct or
  converge to ~1e-12) and 1e-4 in float32 (the GPU sums in another order: ~1e-7
  relative per reduction; 1e-4, ~800 float32 ulps at scale 1, is far above that noise
  and far below a wrong result).
- float32: ``BatchedProgram`` in float32 on CUDA, two regressions found on the CPU:
  projection onto the unit ball (a second-order cone) against ``y / max(1, ‖y‖)``,
  and a box projection of inputs with exact zeros against ``clamp(y, -1, 1)``; every
  element solved, max |Δ| <= 1e-5.
- lp: a random LP ``min c·x s.t. Gx <= h, |x| <= 1`` (bounded, strictly feasible),
  float64, ``ConvexLayer`` on CUDA against the batched solver on the CPU: max
  |Δ solution| <= 1e-8.

``--cpu``: run on the CPU (no GPU needed; each check then compares the CPU with
itself, or with its closed form; default parts: float32, lp): a smoke test of the
script, e.g. ``python scripts/gpu_check.py /tmp/gpu-smoke --cpu``. Without it and
without CUDA the script says so and exits with 2.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings

import torch

# pool_f32's cone-program rows: measure_cvxpy (bench/cases/common.py) runs on the CPU.
POOL_CVXPY_NOT_RUN = ("not run by gpu_check: the bench times the cone program on the CPU whatever the "
                      "device (see `convexddn bench`); the convex part times the batched cone path on CUDA")


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


F64 = torch.float64
CPU = torch.device("cpu")
#: Largest |Δ solution| of the convex path (and the LP), CUDA vs CPU, float64.
CONVEX_TOL = 1e-8
#: Nodes: largest |Δ| relative to max(1, max|CPU value|), per dtype (see the docstring).
NODE_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}
#: The float32 programs against their closed forms.
FLOAT32_TOL = 1e-5


def _check(name: str, dev: torch.device, diff: float, tol: float, **extra) -> dict:
    ok = diff <= tol  # (False for NaN)
    row = {"check": name, "device": str(dev), "max_diff": diff, "tol": tol, "ok": ok, **extra}
    print(f"[{'ok' if ok else 'FAILED'}] {name}: max diff {diff:.3g} (tol {tol:g})", flush=True)
    return row


def _guarded(name: str, dev: torch.device, fn) -> list[dict]:
    """The check rows of ``fn()``, or one failed row naming the error it raised."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - one failing check must not hide the others
        traceback.print_exc()
        print(f"[FAILED] {name}: {type(err).__name__}: {str(err)[:200]}", flush=True)
        return [{"check": name, "device": str(dev), "max_diff": None, "tol": None, "ok": False,
                 "error": f"{type(err).__name__}: {str(err)[:200]}"}]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().cpu().double() - b.detach().cpu().double()).abs().max()) if a.numel() else 0.0


def _layer_run(layer, data: list[torch.Tensor], g: torch.Tensor, dev: torch.device):
    """Solution and parameter gradients (upstream ``g``) of a ConvexLayer run on ``dev``
    (returned on the CPU)."""
    args = [d.detach().to(dev).requires_grad_(True) for d in data]
    y = layer(*args)
    grads = torch.autograd.grad(y, args, g.to(device=dev, dtype=y.dtype), allow_unused=True)
    return y.detach().cpu(), [None if t is None else t.cpu() for t in grads]


def _layer_agreement(name: str, prob, params, variables, data, g, dev: torch.device) -> list[dict]:
    """``ConvexLayer`` (auto, the timed path) on ``dev`` vs the batched solver on the CPU."""
    from convexddn.convex.layer import ConvexLayer

    on_dev = ConvexLayer(prob, params, variables)
    on_cpu = ConvexLayer(prob, params, variables, solver="batched")
    y_d, g_d = _layer_run(on_dev, data, g, dev)
    y_c, g_c = _layer_run(on_cpu, data, g, CPU)
    grad_diff = max((_max_diff(a, b) for a, b in zip(g_d, g_c) if a is not None and b is not None), default=0.0)
    solvers = {"device": on_dev.last_solve.solvers, "cpu": on_cpu.last_solve.solvers}
    fallbacks = {k: sum(s != "batched" for s in v) for k, v in solvers.items()}
    return [_check(name, dev, _max_diff(y_d, y_c), CONVEX_TOL, max_grad_diff=grad_diff,
                   scale=float(y_c.abs().max()), reference="ConvexLayer(solver='batched') on the CPU",
                   not_batched=fallbacks)]


def _convex_agreement(problems: list[tuple[str, int]], rows: list[dict], dev: torch.device) -> list[dict]:
    """CUDA vs CPU for each (problem, batch) the convex part timed (see the docstring)."""
    from convexddn.bench.cases.convex import CONVEX_PROBLEMS, PEER_MAX_BATCH

    checks = []
    for name, batch in problems:
        label = f"convex {name} batch {batch}: solution, {dev.type} vs cpu"
        row = next((r for r in rows if r.get("problem") == name and r.get("batch") == batch
                    and r.get("path") == "convexddn batched (auto)" and "max_solution_diff" in r), None)
        if batch > PEER_MAX_BATCH and row is not None:
            checks.append(_check(label, dev, row["max_solution_diff"], CONVEX_TOL,
                                 max_grad_diff=row["max_grad_diff"],
                                 reference="the timed row's: ConvexLayer (auto) on the CPU"))
            continue

        def run(name=name, batch=batch, label=label):
            gen = torch.Generator().manual_seed(0)  # the inputs and upstream gradient convex_cases times
            prob, params, variables, data = CONVEX_PROBLEMS[name][1](batch, gen)
            g = torch.randn((batch,) + tuple(variables[0].shape), dtype=F64, generator=gen)
            return _layer_agreement(label, prob, params, variables, data, g, dev)

        checks += _guarded(label, dev, run)
    return checks


def _convex_part(problems: list[tuple[str, int]], dev: torch.device, checks: list[dict]) -> list[dict]:
    from convexddn.bench.cases.convex import convex_cases

    rows = convex_cases(problems, 3, _Quiet(), dev.type)
    checks += _convex_agreement(problems, rows, dev)
    return rows


def _node_run(fn, inputs: list[torch.Tensor], dev: torch.device, g: torch.Tensor | None):
    args = [t.detach().to(dev).requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*args)
    out = out[0] if isinstance(out, tuple) else out
    if g is None:
        g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, [a for a in args if a.requires_grad], g.to(dev), allow_unused=True)
    return out.detach().cpu(), [None if t is None else t.cpu() for t in grads], g


def _node_agreement(dev: torch.device) -> list[dict]:
    """Each node node_cases times, on its inputs: ``dev`` vs the CPU (see the docstring)."""
    from convexddn.bench.cases.nodes import _cases

    checks = []
    for node, shape, ours, inputs, _ in _cases(torch.Generator().manual_seed(0)):  # node_cases' inputs
        label = f"node {node} {shape}: output and gradients, {dev.type} vs cpu"

        def run(ours=ours, inputs=inputs, label=label):
            out_c, grads_c, g = _node_run(ours, inputs, CPU, None)
            out_d, grads_d, _ = _node_run(ours, inputs, dev, g)
            tol = NODE_TOL[out_c.dtype]

            def rel(a, b):
                return _max_diff(a, b) / max(1.0, float(b.double().abs().max()) if b.numel() else 0.0)

            out_diff = rel(out_d, out_c)
            grad_diff = max((rel(a, b) for a, b in zip(grads_d, grads_c) if a is not None and b is not None),
                            default=0.0)
            return [_check(label, dev, max(out_diff, grad_diff), tol, dtype=str(out_c.dtype),
                           output_diff=out_diff, grad_diff=grad_diff, relative_to="max(1, largest abs CPU value)")]

        checks += _guarded(label, dev, run)
    return checks


def _nodes_part(dev: torch.device, checks: list[dict]) -> list[dict]:
    from convexddn.bench.cases.nodes import node_cases

    rows = node_cases(5, _Quiet(), dev)
    checks += _node_agreement(dev)
    return rows


def _float32_programs(dev: torch.device, info: list[dict]) -> list[dict]:
    """Two float32 regressions of BatchedProgram (found on the CPU), on ``dev``, against
    closed forms: the unit-ball projection (a second-order cone; its row mask was
    float64 and made the iterates float64) and a box projection of inputs with exact
    zeros (a ratio-test floor of 1e-300 is 0 in float32: steps of -inf froze elements).

    Asserted on the inputs of the CPU tests (tests/convex/test_batched.py), which pass
    there: a failure here is the device's. The same programs at batch 256 are recorded
    in ``info`` only: on the CPU too, a few ball elements end as "numerical trouble"
    (accurate values, not certified) and a box element near a bound is certified
    ~1e-4 off (float32's documented accuracy, tol_error >= 1e-4), so 1e-5 is not
    asserted there.
    """
    import cvxpy as cp

    from convexddn.convex.batched import BatchedProgram

    opts = {"dtype": torch.float32, "tol": 1e-6, "tol_accept": 1e-6, "tol_error": 1e-4}

    def ball_program(n):
        x, y = cp.Variable(n), cp.Parameter(n)
        return BatchedProgram(cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [cp.norm(x, 2) <= 1]), [y], [x],
                              **opts)

    def box_program(n):
        x, y = cp.Variable(n), cp.Parameter(n)
        return BatchedProgram(cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [x >= -1, x <= 1]), [y], [x],
                              **opts)

    def ball_inputs(batch, n, inside):
        v = 3 * torch.randn(batch, n, generator=torch.Generator().manual_seed(0))
        v[:inside] = 0.3 * v[:inside] / v[:inside].norm(dim=-1, keepdim=True)  # inside the ball
        return v, v / v.norm(dim=-1, keepdim=True).clamp_min(1.0)

    def box_inputs(batch, n):
        v = torch.randn(batch, n, generator=torch.Generator().manual_seed(0))
        v[:, :3] = 0.0  # exact zeros
        return v, v.clamp(-1, 1)

    def solve(program, v, expected):
        (out,), status = program(v.to(dev))
        err = (out.detach().cpu().double() - expected.double()).abs().amax(-1)
        solved = status.solved.cpu()
        return {"unsolved": int((~solved).sum()), "out_dtype": str(out.dtype),
                "max_diff": float(err.max()), "max_diff_solved": float(err[solved].max()) if solved.any() else None,
                "iterations_min": int(status.iterations.min()), "iterations_max": int(status.iterations.max())}

    def asserted(name, program, v, expected, min_iterations=0):
        r = solve(program, v, expected)
        good = r["unsolved"] == 0 and r["out_dtype"] == "torch.float32" and r["iterations_min"] >= min_iterations
        diff = r.pop("max_diff") if good else float("inf")  # unsolved, float64 or frozen: failed
        r.pop("max_diff_solved")
        return [_check(name, dev, diff, FLOAT32_TOL, **r)]

    checks = []
    checks += _guarded("float32 ball projection", dev, lambda: asserted(
        "float32 ball projection (second-order cone, 6 x 4) vs y / max(1, ‖y‖)", ball_program(4),
        *ball_inputs(6, 4, 1)))
    checks += _guarded("float32 box projection", dev, lambda: asserted(
        "float32 box projection, exact-zero inputs (16 x 8), vs clamp", box_program(8), *box_inputs(16, 8),
        min_iterations=3))  # (frozen elements stopped after 1-2 iterations)
    for name, program, data in (("ball projection 256 x 8", ball_program, lambda: ball_inputs(256, 8, 32)),
                                ("box projection 256 x 8", box_program, lambda: box_inputs(256, 8))):
        try:
            row = {"program": f"float32 {name}", "device": str(dev), **solve(program(8), *data())}
        except Exception as err:  # noqa: BLE001 - recorded, not asserted
            row = {"program": f"float32 {name}", "device": str(dev), "error": f"{type(err).__name__}: {err}"}
        print(f"[recorded] {row}", flush=True)
        info.append(row)
    return checks


def _lp(dev: torch.device) -> list[dict]:
    """``min c·x s.t. Gx <= h, |x| <= 1`` (n = 20, 30 random rows, batch 256): bounded by
    the box, strictly feasible (h = G x0 + slack, |x0| < 1), a unique vertex (random c)."""
    import cvxpy as cp

    n, m, batch = 20, 30, 256
    c, G, h = cp.Parameter(n, name="c"), cp.Parameter((m, n), name="G"), cp.Parameter(m, name="h")
    x = cp.Variable(n, name="x")
    prob = cp.Problem(cp.Minimize(c @ x), [G @ x <= h, x <= 1, x >= -1])
    gen = torch.Generator().manual_seed(0)
    Gd = torch.randn(batch, m, n, dtype=F64, generator=gen)
    x0 = 0.5 * (2 * torch.rand(batch, n, dtype=F64, generator=gen) - 1)
    data = [torch.randn(batch, n, dtype=F64, generator=gen), Gd,
            torch.einsum("bmn,bn->bm", Gd, x0) + torch.rand(batch, m, dtype=F64, generator=gen)]
    g = torch.randn(batch, n, dtype=F64, generator=gen)
    label = f"LP n={n}, {m} + box rows, batch {batch}: solution, {dev.type} vs cpu"
    return _guarded(label, dev, lambda: _layer_agreement(label, prob, [c, G, h], [x], data, g, dev))


def main(out: str, wanted: list[str], cpu: bool = False) -> int:
    from convexddn.bench import CONVEX_CUDA, format_table
    from convexddn.bench.cases import SHAPES, pool_cases

    from convexddn._machine import machine

    if not cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (pass --cpu for a smoke run on the CPU)", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    dev = torch.device("cpu" if cpu else "cuda")
    result = {"machine": machine(dev),
              "repeats": 5, "quick": False, "rows": [], "convex": [], "nodes": [], "memory": [],
              "workers": [], "checks": [], "float32_recorded": []}
    checks = result["checks"]
    parts = {
        "convex": lambda: _convex_part(CONVEX_CUDA, dev, checks),
        "optnet": lambda: _convex_part([("qp100", 128)], dev, checks),
        "pool_f32": lambda: [r for name in ("small", "paper")
                             for r in pool_cases(SHAPES[name][0], dev, torch.float32, False, 5, _Quiet(),
                                                 skipped=POOL_CVXPY_NOT_RUN)],
        "nodes": lambda: _nodes_part(dev, checks),
        "float32": lambda: _float32_programs(dev, result["float32_recorded"]),
        "lp": lambda: _lp(dev),
        "profile": lambda: _profile_optnet(dev),
        "pool_compiled": lambda: _pool_compiled(dev),
    }
    unknown = [key for key in wanted if key not in parts]
    if unknown:
        print(f"gpu_check: unknown part(s) {unknown}; parts: {list(parts)}", file=sys.stderr)
        return 2
    failed_parts = []
    for key in wanted or (["float32", "lp"] if cpu else ["convex", "pool_f32", "nodes", "float32", "lp"]):
        fn = parts[key]
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows = fn()
        except Exception:  # noqa: BLE001 - one failing part must not hide the others
            traceback.print_exc()
            failed_parts.append(key)
            continue
        print(f"[{key}: {time.perf_counter() - t0:.1f} s]", flush=True)
        if key in ("profile", "pool_compiled"):
            result[key] = rows
        elif key in ("float32", "lp"):  # check rows only
            checks += rows
        else:
            result["rows" if key.startswith("pool") else "convex" if key == "optnet" else key] += rows
        with open(os.path.join(out, "gpu.json"), "w") as f:
            json.dump(result, f, indent=2, default=str)
        if key not in ("float32", "lp"):
            print(format_table({**result, "rows": result["rows"]}), flush=True)
    with open(os.path.join(out, "gpu.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(_checks_table(checks), flush=True)
    bad = [c["check"] for c in checks if not c["ok"]]
    if bad or failed_parts:
        print(f"gpu_check: {len(bad)} of {len(checks)} check(s) failed"
              + (f"; part(s) raised: {failed_parts}" if failed_parts else ""), file=sys.stderr, flush=True)
        for name in bad:
            print(f"  FAILED {name}", file=sys.stderr)
        return 1
    print(f"gpu_check: all {len(checks)} check(s) passed", flush=True)
    return 0


def _checks_table(checks: list[dict]) -> str:
    lines = ["### checks (asserted)", "", "| check | device | max diff | tol | result | note |",
             "|---|---|---:|---:|---|---|"]
    for c in checks:
        diff = "—" if c["max_diff"] is None else f"{c['max_diff']:.3g}"
        tol = "—" if c["tol"] is None else f"{c['tol']:g}"
        note = c.get("error") or "; ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()
            if k not in ("check", "device", "max_diff", "tol", "ok"))
        lines.append(f"| {c['check']} | {c['device']} | {diff} | {tol} | {'ok' if c['ok'] else 'FAILED'} | {note} |")
    return "\n".join(lines + [""])


def _parse(argv: list[str]):
    """The command line (``--help`` prints the module docstring; an output folder that
    starts with ``-`` is an unknown option, not a folder named ``--help``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="results-gpu", help="output folder (default: results-gpu)")
    parser.add_argument("parts", nargs="*", metavar="PART", help="parts to run (default: see above)")
    parser.add_argument("--cpu", action="store_true", help="a smoke run on the CPU")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse(sys.argv[1:])
    sys.exit(main(args.out, args.parts, cpu=args.cpu))
