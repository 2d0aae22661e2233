"""The ``convexddn`` command.

    convexddn list                              the problem registry, one line each
    convexddn bench [--quick] [--device cuda]   speed and agreement tables (make bench)
    convexddn experiment pointcloud [--quick]   robustness of pooling to outliers
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _list(args: argparse.Namespace) -> int:
    from . import registry

    names = registry.names()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {registry.describe(name)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.main(args)


def _experiment_module(name: str):
    import importlib

    from .experiments import EXPERIMENTS

    return importlib.import_module(f".experiments.{EXPERIMENTS[name][0]}", __package__)


def _experiment(args: argparse.Namespace) -> int:
    return _experiment_module(args.experiment).main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convexddn", description="Deep declarative networks in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list the problem registry")
    p_list.set_defaults(func=_list)
    p_bench = sub.add_parser("bench", help="time and compare the convex and native paths")
    from .bench import add_arguments as bench_args

    bench_args(p_bench)
    p_bench.set_defaults(func=_bench)
    p_exp = sub.add_parser("experiment", help="run an experiment")
    exp_sub = p_exp.add_subparsers(dest="experiment", required=True)
    from .experiments import EXPERIMENTS

    for name, (_module, help_text) in EXPERIMENTS.items():
        p_exp_one = exp_sub.add_parser(name, help=help_text)
        _experiment_module(name).add_arguments(p_exp_one)
        p_exp_one.set_defaults(func=_experiment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
