"""Timing of the native Lp / simplex projections beside plain-torch references.

Run: ``python benchmarks/bench_projection.py [--shape 256 512] [--repeats 200]``.
Prints a markdown table: forward and backward median times of each projection on the
same tensor, in the same run, beside the plain closed forms where they exist
(``x / x.norm(dim=-1, keepdim=True) * r`` and ``x.clamp(-r, r)``) and one
``x.sort(-1)``. The ratio columns divide by the reference named in the last column.
``--threads`` defaults to 1 for stable numbers on a shared machine.
Targets (issue 3): not slower than the plain closed forms; L1 within 2x of one sort.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Callable

import torch

from convexddn.projection import project_lp, project_simplex


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd_once(
    op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, g: torch.Tensor
) -> tuple[float, float]:
    """One forward (x requires grad, as in training) and one backward, timed apart."""
    _sync(x.device)
    t0 = time.perf_counter()
    y = op(x)
    _sync(x.device)
    t1 = time.perf_counter()
    torch.autograd.grad(y, x, g)
    _sync(x.device)
    return t1 - t0, time.perf_counter() - t1


def _bench(
    ops: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], str]],
    x0: torch.Tensor,
    repeats: int,
) -> dict[str, tuple[float, float]]:
    """Median forward/backward µs per op.

    Ops interleave, so drifts in machine load hit all alike, in a fresh random order
    each round, so no op always runs right after the cache-flushing sort.
    """
    x = x0.clone().requires_grad_(True)
    g = torch.randn_like(x0)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in ops}
    warmup = max(3, repeats // 10)
    order = list(ops)
    rng = random.Random(0)
    for i in range(warmup + repeats):
        rng.shuffle(order)
        for name, fn, _ in order:
            t = _fwd_bwd_once(fn, x, g)
            if i >= warmup:
                times[name].append(t)
    return {
        name: (
            statistics.median(f for f, _ in ts) * 1e6,
            statistics.median(b for _, b in ts) * 1e6,
        )
        for name, ts in times.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: stable on a shared machine; 0 keeps torch's)",
    )
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    x0 = torch.randn(*args.shape, device=device, dtype=dtype)
    # Radii below the typical row norms, so the ball projections are active on most rows.
    # For L1, r = 100 keeps ~all entries as sort keys (max|x| − r < 0: nothing pruned);
    # r = 1 lets the sort skip entries at or below max|x| − r (see projection._l1_forward).
    r2, r1, r1_small, rinf = 8.0, 100.0, 1.0, 1.5

    def sort_values(x: torch.Tensor) -> torch.Tensor:
        return x.sort(-1).values

    ops: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], str]] = [
        (
            "torch: x / x.norm(dim=-1, keepdim=True) * r",
            lambda x: x / x.norm(dim=-1, keepdim=True) * r2,
            "",
        ),
        ("torch: x.clamp(-r, r)", lambda x: x.clamp(-rinf, rinf), ""),
        ("torch: x.sort(-1)", sort_values, ""),
        ("project_lp p=2 sphere", lambda x: project_lp(x, 2, "sphere", r2), "x / norm * r"),
        ("project_lp p=2 ball", lambda x: project_lp(x, 2, "ball", r2), "x / norm * r"),
        ("project_lp p=inf ball", lambda x: project_lp(x, "inf", "ball", rinf), "clamp"),
        ("project_lp p=inf sphere", lambda x: project_lp(x, "inf", "sphere", rinf), "clamp"),
        ("project_lp p=1 ball r=100", lambda x: project_lp(x, 1, "ball", r1), "sort"),
        ("project_lp p=1 sphere r=100", lambda x: project_lp(x, 1, "sphere", r1), "sort"),
        ("project_lp p=1 ball r=1", lambda x: project_lp(x, 1, "ball", r1_small), "sort"),
        ("project_simplex", lambda x: project_simplex(x), "sort"),
    ]
    results = _bench(ops, x0, args.repeats)
    refs = {
        "x / norm * r": results[ops[0][0]],
        "clamp": results[ops[1][0]],
        "sort": results[ops[2][0]],
    }

    print(
        f"Projections on x {tuple(x0.shape)} {args.dtype} {device.type}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} interleaved, shuffled runs (µs)\n"
    )
    print("| op | forward | backward | fwd / ref | bwd / ref | (fwd+bwd) / ref | ref |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, _, ref in ops:
        fwd, bwd = results[name]
        if ref:
            rf, rb = refs[ref]
            ratio = f"{fwd / rf:.2f} | {bwd / rb:.2f} | {(fwd + bwd) / (rf + rb):.2f} | {ref}"
        else:
            ratio = "– | – | – | –"
        print(f"| {name} | {fwd:.0f} | {bwd:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
