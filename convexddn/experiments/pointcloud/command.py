"""``convexddn experiment pointcloud``: options, and the printed report."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from ...cli import MAX_COUNT, MAX_SEED, int_option
from ...errors import OptionError
from ..pointnet import POOLINGS
from ..running import MAX_THREADS, names_option, output_files, prepare_out_dir, resolve_device, run_command
from .config import (DEFAULT_POOLINGS, DISPLAY_NAMES, QUICK_RATES, QUICK_TABLE3_RATES, TABLE3_RATES, Config,
                     check_outlier_count)

__all__ = ["add_arguments", "config_from_args", "main"]

PROG = "convexddn experiment pointcloud"


def _percent(rates) -> str:
    return ",".join(f"{100 * r:g}" for r in rates)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``convexddn experiment pointcloud`` to ``parser``."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke-test configuration (seconds on 2 CPU cores)")
    parser.add_argument("--train-outliers", action="store_true",
                        help="same outlier rate in training and testing (paper's Table 3); one model "
                             "per pooling, rate and seed; default rates "
                             + _percent(TABLE3_RATES) + " (--quick: " + _percent(QUICK_TABLE3_RATES) + ")")
    parser.add_argument("--device", default="cpu", help="'cpu' (default), 'cuda' or 'cuda:N'")
    parser.add_argument("--out", default="results",
                        help="directory for pointcloud.json and pointcloud.png (default: results)")
    parser.add_argument("--seeds", type=int_option(1, 1000), default=None,
                        help="independent repetitions, reported as mean ± std (default 3, quick 2)")
    parser.add_argument("--seed", type=int_option(0, MAX_SEED), default=None, help="first seed (default 0)")
    parser.add_argument("--epochs", type=int_option(1, MAX_COUNT), default=None,
                        help="training epochs (default 4, quick 2)")
    parser.add_argument("--rates", default=None,
                        help="comma-separated outlier rates in percent (default: 0,10,...,90; --quick: "
                             + _percent(QUICK_RATES) + ")")
    parser.add_argument("--threads", type=int_option(1, MAX_THREADS), default=None,
                        help="torch CPU threads for the run (default: torch's own choice)")
    parser.add_argument("--poolings", default=None,
                        help="comma-separated poolings (default: " + ",".join(DEFAULT_POOLINGS)
                             + f"; choices: {','.join(POOLINGS)})")
    parser.add_argument("--timing-batches", type=int_option(0, MAX_COUNT), default=None,
                        help="timed training steps per pooling, rate and seed for the runtime table "
                             "(default 4, quick 1; 0 skips it)")


def _rates(text: str, n_points: int) -> tuple[float, ...]:
    """``--rates``, percentages as typed, checked in that unit and turned into fractions.

    All of Config.validate's checks of ``rates`` are made here first: it speaks of
    ``rates`` in fractions (its "[0, 1)" sent users to --rates 0.5, which runs at 0.5 %,
    not 50 %; "got (0.1, 0.1)" answered --rates 10,10).
    """
    typed = [r.strip() for r in text.split(",") if r.strip()]
    # (an empty value was falsy and silently meant the full default run)
    if not typed:
        raise OptionError(f"--rates must name at least one outlier rate in percent, such as 0,10,50, got {text!r}")
    try:
        percents = [float(r) for r in typed]
    except ValueError:
        raise OptionError(f"--rates must be comma-separated percentages such as 0,10,50, got {text!r}") from None
    for i, (r, shown) in enumerate(zip(percents, typed)):
        if not 0.0 <= r < 100.0:
            raise OptionError(f"--rates must be percentages in [0, 100), got {r:g}")
        if r in percents[:i]:
            first = typed[percents.index(r)]
            raise OptionError(f"--rates must not repeat a rate, got {shown} twice" if first == shown
                              else f"--rates must not repeat a rate, got {first} and {shown}")
    # + 0.0 turns -0 (accepted, as it equals 0) into 0: it was labelled "-0 %".
    rates = tuple(r / 100 + 0.0 for r in percents)
    for rate, shown in zip(rates, typed):
        try:
            check_outlier_count(rate, n_points)
        except OptionError:  # (its message speaks the fraction; the option's, percent as typed)
            raise OptionError(f"--rates: {shown} % of a cloud of n_points={n_points} is no point at all "
                              f"(it would run as a clean cloud); use 0, or a rate of at least "
                              f"100 / n_points = {100 / n_points:.3g} %") from None
    return rates


def config_from_args(args: argparse.Namespace) -> Config:
    """Build a :class:`Config` from parsed :func:`add_arguments` options.

    The options that Config.validate would report under its field names, in its units
    (``--rates``, ``--poolings``, ``--device``), are checked here first, as they were typed.

    Raises:
        OptionError: naming the option, for a malformed ``--rates`` or ``--poolings``, or
            a ``--device`` that is not there.
    """
    device = getattr(args, "device", "cpu")  # (not `or "cpu"`: an empty --device is refused, not the CPU)
    resolve_device(device, "--device")
    overrides: dict[str, Any] = {"device": device, "out": getattr(args, "out", "results")}
    if getattr(args, "train_outliers", False):
        overrides["train_outliers"] = True
    for name in ("seed", "seeds", "epochs", "threads", "timing_batches"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if getattr(args, "poolings", None) is not None:
        overrides["poolings"] = names_option("--poolings", args.poolings, POOLINGS)
    cfg = (Config.quick if getattr(args, "quick", False) else Config.default)(**overrides)
    # `is not None`: '' is refused, not the default. (After the preset: whether a rate
    # replaces a point depends on its n_points.)
    if getattr(args, "rates", None) is not None:
        cfg = dataclasses.replace(cfg, rates=_rates(args.rates, cfg.n_points))
    return cfg


def _prepare(args: argparse.Namespace) -> Config:
    cfg = config_from_args(args)
    cfg.validate()
    # Before the run, not after it (results are written last).
    prepare_out_dir(cfg.out, files=output_files("pointcloud"))
    return cfg


def _execute(cfg: Config) -> int:
    from .report import format_comparisons, format_runtime_table, format_table
    from .runner import run

    result = run(cfg)
    print(format_table(result))
    print()
    print(format_comparisons(result))
    runtime = format_runtime_table(result)
    if runtime:
        print()
        print(runtime)
    m = result["machine"]
    print(f"\nwall time {result['wall_seconds']:.1f} s on {m['device']} "
          f"({m['torch_threads']} torch thread{'s' if m['torch_threads'] != 1 else ''}, "
          f"{m['cpu_count']} CPUs, torch {m['torch']})")
    for model in result["models"]:
        if model["warnings"]:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(model["warnings"].items()))
            rate = f" (train rate {100 * model['train_rate']:g} %)" if cfg.train_outliers else ""
            print(f"note: seed {model['seed']} {DISPLAY_NAMES[model['pooling']]}{rate}: {counts}",
                  file=sys.stderr)
    for path in result.get("files", {}).values():
        print(f"wrote {path}", file=sys.stderr)
    return 0


def main(args: argparse.Namespace) -> int:
    """Run from parsed arguments and print the tables: exit status 0, or 2 for a bad option."""
    return run_command(PROG, lambda: _prepare(args), _execute)
