"""``convexddn experiment projection``: options, and the printed report."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ...cli import MAX_COUNT, MAX_SEED, float_option, int_option
from ..running import MAX_THREADS, names_option, output_files, prepare_out_dir, resolve_device, run_command
from .config import DISPLAY_NAMES, VARIANTS, Config
from .data import require_sklearn

__all__ = ["add_arguments", "config_from_args", "main"]

PROG = "convexddn experiment projection"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``convexddn experiment projection`` to ``parser``."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke-test configuration (seconds on 2 CPU cores)")
    parser.add_argument("--device", default="cpu", help="'cpu' (default), 'cuda' or 'cuda:N'")
    parser.add_argument("--out", default="results",
                        help="directory for projection.json and projection.png (default: results)")
    parser.add_argument("--seeds", type=int_option(1, 1000), default=None,
                        help="independent repetitions, reported as mean ± std (default 3, quick 2)")
    parser.add_argument("--seed", type=int_option(0, MAX_SEED), default=None, help="first seed (default 0)")
    parser.add_argument("--epochs", type=int_option(1, MAX_COUNT), default=None,
                        help="training epochs (default 20, quick 3)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated heads (default: all; choices: " + ",".join(VARIANTS) + ")")
    parser.add_argument("--train-fraction", type=float_option(0, 1, exclusive=True), default=None,
                        help="fraction of each class used for training (default 0.1)")
    parser.add_argument("--radius-scale", type=float_option(1e-6, 1e6), default=None,
                        help="projection radius as a multiple of the median feature norm (default 1)")
    parser.add_argument("--threads", type=int_option(1, MAX_THREADS), default=None,
                        help="torch CPU threads for the run (default: torch's own choice)")
    parser.add_argument("--timing-batches", type=int_option(0, MAX_COUNT), default=None,
                        help="timed training steps per variant and seed (default 8, quick 1; 0 skips)")


def config_from_args(args: argparse.Namespace) -> Config:
    """Build a :class:`Config` from parsed :func:`add_arguments` options.

    The options that Config.validate would report under its field names (``--variants``,
    ``--device``) are checked here first, as they were typed; the others by their
    argparse types.

    Raises:
        OptionError: naming the option, for a malformed ``--variants`` or a ``--device``
            that is not there.
    """
    device = getattr(args, "device", "cpu")  # (not `or "cpu"`: an empty --device is refused, not the CPU)
    resolve_device(device, "--device")
    overrides: dict[str, Any] = {"device": device, "out": getattr(args, "out", "results")}
    for name in ("seed", "seeds", "epochs", "train_fraction", "radius_scale", "threads", "timing_batches"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if getattr(args, "variants", None) is not None:  # ('' is refused, not the default)
        overrides["variants"] = names_option("--variants", args.variants, VARIANTS)
    preset = Config.quick if getattr(args, "quick", False) else Config.default
    return preset(**overrides)


def _prepare(args: argparse.Namespace) -> Config:
    cfg = config_from_args(args)
    cfg.validate()
    require_sklearn()  # first: a missing dependency must not leave an empty out directory
    # Before the run, not after it (results are written last).
    prepare_out_dir(cfg.out, files=output_files("projection"))
    return cfg


def _execute(cfg: Config) -> int:
    from .report import format_comparisons, format_runtime_table, format_table
    from .runner import run

    result = run(cfg)
    blocks = [format_table(result), format_comparisons(result, "baseline"),
              format_comparisons(result, "bn"), format_runtime_table(result)]
    # Each block once: with one seed both comparisons are the same "One seed: ..." line.
    print("\n\n".join(dict.fromkeys(b for b in blocks if b)))
    m = result["machine"]
    print(f"\nwall time {result['wall_seconds']:.1f} s on {m['device']} "
          f"({m['torch_threads']} torch thread{'s' if m['torch_threads'] != 1 else ''}, "
          f"{m['cpu_count']} CPUs, torch {m['torch']})")
    for row in result["rows"]:
        if row["warnings"]:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(row["warnings"].items()))
            print(f"note: {DISPLAY_NAMES[row['variant']]}: {counts}", file=sys.stderr)
    for path in result.get("files", {}).values():
        print(f"wrote {path}", file=sys.stderr)
    return 0


def main(args: argparse.Namespace) -> int:
    """Run from parsed arguments and print the tables: exit status 0, or 2 for a bad option."""
    return run_command(PROG, lambda: _prepare(args), _execute)
