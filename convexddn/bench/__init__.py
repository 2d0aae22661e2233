"""``convexddn bench``: speed and agreement of the convex (cone program) and native paths.

For every robust pooling penalty (at three shapes, up to the paper's) and every Lp-ball
projection (p = 1, 2, ∞) plus the simplex, the benchmark times forward and backward of
each path that supports the node, per sample, beside mean pooling timed in the same run,
and measures how far the paths' solutions and gradients are apart (float64, same
upstream gradient). It also times the convex path's batched solver against the
per-element path, cvxpylayers and (when installed) cvxpylayers + Moreau on the same
problems, the other native nodes against the DDN reference's (where importable), the
peak memory of forward + backward, and (not with ``--quick``) ``ConvexLayer``'s worker
processes.

Outputs (under ``--out``, default ``results/``): a markdown table on stdout,
``bench.json`` with every figure and the machine, ``bench.png`` (log-scale bars).

The package: :mod:`.harness` (timing and memory, no case in it), :mod:`.cases` (what is
measured), :mod:`.report` (markdown, JSON, plot).
"""
from __future__ import annotations

import argparse
import os
import warnings
from typing import Any

import torch

from .._checks import check_bool, check_choice, check_int
from .._machine import machine
from ..cli import MAX_COUNT
from ..experiments.running import output_files, prepare_out_dir, resolve_device, write_json
from .cases import (
    CONVEX_PENALTIES,
    POOL_PENALTIES,
    PROJECTIONS,
    SHAPES,
    pool_cases,
    projection_cases,
    workers_speedup,
)
from .cases.convex import CONVEX_ROUND_BUDGET_S, CONVEX_ROUNDS, LSMR_ROWS, convex_cases
from .cases.pooling import DDN_PAPER_ROUNDS
from .cases.nodes import node_case_count, node_cases
from .harness import peak_memory
from .report import estimate_skipped, format_table, plot

__all__ = ["run", "add_arguments", "main", "format_table"]

# (problem, batch) pairs of the convex-path comparison: the names of
# convexddn.bench.cases.convex.CONVEX_PROBLEMS.
CONVEX_QUICK = [("qp50", 16), ("sparsemax16", 64)]
CONVEX_FULL = [("qp50", 1), ("qp50", 64), ("qp50", 1024), ("qp100", 128), ("mpc30", 1), ("mpc30", 8),
               ("sparsemax16", 1024), ("l1ball512", 128), ("logreg60", 1)]
# On a GPU: the OptNet setting and a batch too large for the CPU-bound peers.
CONVEX_CUDA = [("qp100", 128), ("qp50", 64), ("qp50", 4096), ("sparsemax16", 1024)]


def run(quick: bool = False, device: str = "cpu", repeats: int | None = None,
        out: str | None = "results", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Run the benchmark; write bench.json and bench.png under ``out`` (unless None).

    Args:
        repeats: timed rounds, an int from 1 to 1,000,000 (``--repeats``' bounds);
            ``None``: 5, or 3 with ``quick``. The convex rows (and the pooling and
            projection tables' cone-program rows) get at most
            :data:`~.cases.convex.CONVEX_ROUNDS` of them and the DDN reference at the
            paper's shape at most :data:`~.cases.pooling.DDN_PAPER_ROUNDS` (a round
            takes minutes there); ``result["rounds"]`` and every row record the rounds.
        dtype: the dtype of the timed inputs, ``torch.float32`` or ``torch.float64``
            (the agreement is measured in float64 either way).

    Raises:
        OptionError: for a ``repeats``, ``quick`` or ``dtype`` of the wrong kind, a device that is
            not 'cpu', 'cuda' or 'cuda:N' or is not there, or an ``out`` that is not a
            directory where bench.json and bench.png can be written (all checked before
            any work).
    """
    from tqdm.auto import tqdm

    # Checked here as the CLI's --repeats is: 0 silently meant the default (`repeats or
    # default`), and -1 raised statistics.StatisticsError after the warm-up work.
    if repeats is not None:
        repeats = check_int("repeats", repeats, minimum=1, maximum=MAX_COUNT)
    check_bool("quick", quick)
    # An integer, complex or string dtype failed only inside the first timed case, with
    # torch's own error naming no option ("Sort does not support complex").
    check_choice("dtype", dtype, (torch.float32, torch.float64))
    dev = resolve_device(device)
    # The results are written only after minutes of timing: a bad out must fail now.
    prepare_out_dir(out, "out", output_files("bench"))
    names = ["small"] if quick else ["small", "issue", "paper"]
    # Cheap convex rows get extra rounds only by default: --repeats is what it says.
    convex_budget = 0.0 if quick or repeats is not None else CONVEX_ROUND_BUDGET_S
    if repeats is None:
        repeats = 3 if quick else 5
    total = sum((repeats + 1) * ((2 + len(POOL_PENALTIES)) + (4 + len(PROJECTIONS) if SHAPES[n][1] else 0))
                + (2 * (len(CONVEX_PENALTIES) + len(PROJECTIONS)) if n == "small" else 0)
                for n in names)
    # The convex rows take minutes per round; the DDN reference at the paper's shape too:
    # both are capped (CONVEX_ROUNDS, DDN_PAPER_ROUNDS), and the footnote and --help say so.
    # Every other case, the worker-process rows included (a few seconds a round), gets
    # --repeats as given; each row records its rounds.
    rounds = {"convex": min(repeats, CONVEX_ROUNDS), "ddn_paper": min(repeats, DDN_PAPER_ROUNDS)}
    convex_list = CONVEX_QUICK if quick else CONVEX_FULL
    total += ((rounds["convex"] + 1) * sum(5 + (p in LSMR_ROWS) for p, _ in convex_list)
              + node_case_count() * repeats)
    rows: list[dict] = []
    with warnings.catch_warnings(), tqdm(total=total, desc="convexddn bench", unit="op", disable=None) as progress:
        warnings.simplefilter("ignore")  # solver fallbacks are counted in agreement, not printed
        for name in names:
            pool_shape, proj_shape = SHAPES[name]
            rows += pool_cases(pool_shape, dev, dtype, name == "small", repeats, progress, quick=quick)
            if proj_shape is not None:
                rows += projection_cases(proj_shape, dev, dtype, name == "small", repeats, progress)
        convex_problems = CONVEX_QUICK if quick else CONVEX_CUDA if dev.type == "cuda" else CONVEX_FULL
        convex = convex_cases(convex_problems, rounds["convex"], progress, device, budget_s=convex_budget)
        nodes = node_cases(repeats, progress, dev)
    estimate_skipped(rows)
    memory = peak_memory(SHAPES[names[-1]][0], ("mean",) + POOL_PENALTIES) if dev.type == "cpu" else []
    # (Called without it, the worker rows ran their own default of 3 rounds whatever
    # --repeats said, and the footnote claimed the run's count for them too.)
    workers = [] if quick else workers_speedup(repeats=repeats)
    result = {"machine": machine(dev), "repeats": repeats, "rounds": rounds, "quick": quick, "rows": rows,
              "convex": convex, "nodes": nodes, "memory": memory, "workers": workers}
    if out is not None:
        prepare_out_dir(out, "out", output_files("bench"))  # again: it may have changed during the run
        write_json(os.path.join(out, "bench.json"), result)
        plot(result, os.path.join(out, "bench.png"))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options (defined in :mod:`convexddn.cli`, which adds them without
    importing this package: ``convexddn bench --help`` answers at once)."""
    from ..cli import add_bench_arguments

    add_bench_arguments(parser)


def main(args: argparse.Namespace) -> int:
    result = run(quick=args.quick, device=args.device, repeats=args.repeats, out=args.out)
    print(format_table(result))
    print(f"\nwrote {os.path.join(args.out, 'bench.json')} and {os.path.join(args.out, 'bench.png')}")
    return 0
