"""The ``convexddn`` command.

    convexddn list                              the problem registry, one line each
    convexddn bench [--quick] [--device cuda]   speed and agreement tables (make bench)
    convexddn experiment NAME [--quick]         the paper's experiments (``experiment --help``)
    convexddn --version

Start-up stays short: ``--help``, ``--version`` and the table of commands import neither
torch nor cvxpy. A command's options are added to the parser only once that command is
chosen on the command line, and its module is imported then (the experiments through
:data:`convexddn.experiments.EXPERIMENTS`).

Exit status: 0 on success; 2 for a user mistake — an unknown command or option, a bad
option value (``--device gpu``, a CUDA device that is not there, ``--repeats 0``, a count
or scale beyond its bounds such as ``--epochs 10**26``, an
``--out`` that is a file or cannot be created, checked before the run), or an
error from :mod:`convexddn.errors` that is about the input (those deriving from
``ValueError`` or ``TypeError``) — reported as one line on stderr, without a traceback.
Other failures (a solver that fails, a bug) keep their traceback. Output that cannot be
written (``convexddn list > /dev/full``) is one line on stderr and exit status 1; a reader
that stops early (``convexddn list | head -1``) ends the command quietly, with status 0;
a command's own non-zero status (2 for a user mistake) is kept, and an error of its own
after a write failed (a file it cannot open) keeps its traceback.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
from typing import Any, Callable, Sequence

from . import __version__
from .cli_parser import LazyCommands, Parser, unrecognized

__all__ = ["add_bench_arguments", "build_parser", "main"]

PROG = "convexddn"


# Bounds of the commands' numeric options: values beyond them only failed deep in the run
# (an OverflowError from --epochs 10**26, torch's ValueError from --threads 10**22, a
# radius of inf from --radius-scale 1e308), with a traceback and no option named.
MAX_COUNT = 10**6  # epochs, timed batches, rounds (threads: experiments.running.MAX_THREADS)
MAX_SEED = 2**31 - 1


def int_option(minimum: int, maximum: int) -> Callable[[str], int]:
    """An argparse type: an integer in ``[minimum, maximum]`` (argparse names the option
    in its error, exit status 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # (a 5000-digit string too: int's own digit limit)
            raise argparse.ArgumentTypeError(
                f"must be an integer from {minimum} to {maximum}, got {text!r}") from None
        if not minimum <= value <= maximum:
            shown = value if abs(value) < 10**30 else f"an integer of {len(str(abs(value)))} digits"
            raise argparse.ArgumentTypeError(f"must be an integer from {minimum} to {maximum}, got {shown}")
        return value
    return parse


def float_option(low: float, high: float, exclusive: bool = False) -> Callable[[str], float]:
    """An argparse type: a number in ``[low, high]``, or ``(low, high)`` if ``exclusive``
    (NaN and infinities refused)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (low < value < high if exclusive else low <= value <= high):
            bounds = f"in ({low:g}, {high:g})" if exclusive else f"from {low:g} to {high:g}"
            raise argparse.ArgumentTypeError(f"must be a number {bounds}, got {text!r}")
        return value
    return parse


# --- list ---------------------------------------------------------------------------------

def _setup_list(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    from . import registry

    names = registry.names()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {registry.describe(name)}")
    return 0


# --- bench --------------------------------------------------------------------------------

def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``convexddn bench`` (here, not in :mod:`convexddn.bench`, whose import
    loads torch: ``bench --help`` took 5 s)."""
    parser.add_argument("--quick", action="store_true", help="small shapes only (smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    # 3, 15 and 2: bench's CONVEX_ROUNDS, CONVEX_MAX_ROUNDS and DDN_PAPER_ROUNDS, written out
    # (importing them loads torch); tests/test_cli.py checks that they agree.
    parser.add_argument("--repeats", type=int_option(1, MAX_COUNT), default=None,
                        help="timed rounds of every case (default 5, quick 3), except two capped "
                             "where a round is slow: the convex rows (and the pooling and "
                             "projection tables' cone-program rows) get at most 3 (by "
                             "default the cheap convex ones more, up to 15) and the DDN reference at "
                             "the paper's shape at most 2")
    parser.add_argument("--out", default="results", help="output folder (default results/)")


def _setup_bench(parser: argparse.ArgumentParser) -> None:
    add_bench_arguments(parser)
    parser.set_defaults(func=_bench)


def _check_bench_options(args: argparse.Namespace) -> None:
    """Reject a device that is not there, and create ``--out``: the results are written
    after the whole run, too late to fail. (``--repeats`` is checked by its argparse type,
    and by :func:`convexddn.bench.run` for callers from Python.)"""
    from .experiments.running import output_files, prepare_out_dir, resolve_device

    resolve_device(args.device, "--device")
    prepare_out_dir(args.out, files=output_files("bench"))


def _bench(args: argparse.Namespace) -> int:
    _check_bench_options(args)
    from . import bench

    return bench.main(args)


# --- experiment ---------------------------------------------------------------------------

def _setup_experiments(parser: argparse.ArgumentParser) -> None:
    from .experiments import EXPERIMENTS

    names = parser.add_subparsers(dest="experiment", required=True, metavar="NAME",
                                  action=LazyCommands, title="experiments")
    for name, (module, help_text) in EXPERIMENTS.items():
        names.add_lazy_parser(name, _experiment_setup(module), help=help_text,
                              description=help_text)


def _experiment_setup(module: str) -> Callable[[argparse.ArgumentParser], None]:
    def setup(parser: argparse.ArgumentParser) -> None:
        import importlib

        experiment = importlib.import_module(f".experiments.{module}", __package__)
        experiment.add_arguments(parser)
        parser.set_defaults(func=experiment.main)
    return setup


# --- the command --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``convexddn`` parser. Commands' own options are added when a command is parsed."""
    parser = Parser(prog=PROG, description="Deep declarative networks in PyTorch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     action=LazyCommands, title="commands")
    commands.add_lazy_parser("list", _setup_list, help="list the problem registry and its options",
                             description="List the problem registry: name, what it computes, options.")
    commands.add_lazy_parser("bench", _setup_bench, help="time and compare the convex and native paths",
                             description="Time forward and backward of the convex (cone program) "
                                         "and native paths, and measure how far they agree.")
    commands.add_lazy_parser("experiment", _setup_experiments, help="run one of the paper's experiments",
                             description="Run one of the paper's experiments.")
    return parser


def _is_user_error(err: BaseException) -> bool:
    # convexddn.errors: the errors about the caller's input also derive from ValueError or
    # TypeError; SolverError (RuntimeError) and GradientCheckError (AssertionError) do not.
    from .errors import ConvexDDNError

    return isinstance(err, ConvexDDNError) and isinstance(err, (ValueError, TypeError))


class _Output:
    """``sys.stdout`` while a command runs: the stream itself, keeping the first error a
    write or flush raised (``failed``). main() tells by it a failure to write the output (a
    full disk, a reader that stopped: BrokenPipeError) from a command's own OSError, and
    sees one that a caller swallowed (argparse ignores an OSError printing --help)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._raised: list[OSError] = []  # every error a write or flush raised, in order

    @property
    def failed(self) -> OSError | None:
        """The first error a write or flush raised, or None."""
        return self._raised[0] if self._raised else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    def _guarded(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.stream, method)(*args)
        except OSError as err:
            self._raised.append(err)
            raise

    def caused(self, err: BaseException) -> bool:
        """Whether ``err`` is an error a write or flush raised, or chained from one
        (``__cause__``, ``__context__``): a failure of the output, not the command's own."""
        pending, seen = [err], set()
        while pending:
            e = pending.pop()
            if e is None or id(e) in seen:
                continue
            if any(e is r for r in self._raised):
                return True
            seen.add(id(e))
            pending += [e.__cause__, e.__context__]
        return False

    def write(self, text: str) -> int:
        return self._guarded("write", text)

    def writelines(self, lines: Any) -> None:
        self._guarded("writelines", lines)

    def flush(self) -> None:
        self._guarded("flush")


def _output_failed(err: OSError) -> int:
    """The exit status once writing the output failed: 0, quietly, for a reader that stopped
    early (``convexddn list | head -1``: what it read is all it wanted); else 1, with one
    line on stderr (``convexddn list > /dev/full``). Either way stdout then points at
    devnull, so that the interpreter's own flush at exit does not fail again (Python's docs,
    "Note on SIGPIPE")."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # a stream without a file descriptor (io.UnsupportedOperation)
        pass
    if isinstance(err, BrokenPipeError):
        return 0
    print(f"{PROG}: error: cannot write the output: {err.strerror or err}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit status (0; 2 for a user mistake; 1 when the output
    cannot be written).

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    # A stream that cannot encode a character (an ASCII or cp1252 terminal: "α-entmax", "§7")
    # writes its backslash escape instead of ending the command with a UnicodeEncodeError
    # traceback: Python's own handling of stderr, for stdout too.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")
    if sys.stdout is None:  # (pythonw: print writes nowhere)
        return _command(argv)
    output = sys.stdout = _Output(sys.stdout)
    status = None
    try:
        status = _command(argv)
        # Flushed here, where a failure is caught, not at the interpreter's exit (a stream
        # with only write() has nothing to flush).
        if callable(getattr(output.stream, "flush", None)):
            output.flush()
    except OSError as err:
        # The command's own (a file it writes, even after a write to stdout failed and the
        # command carried on): its traceback.
        if not output.caused(err):
            raise
    finally:
        sys.stdout = output.stream
    if output.failed is None:
        return status
    failed = _output_failed(output.failed)
    return status or failed  # (a command's own non-zero status, such as 2, is kept)


def _command(argv: Sequence[str] | None) -> int:
    """main() less the output's guard: parse ``argv``, run the command, report a user mistake."""
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # (argparse would name the top-level program, whatever level rejected them)
            parser.exit(2, unrecognized(argv, parser, args, extra) + "\n")
    except SystemExit as done:  # --help, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    try:
        return args.func(args)
    except Exception as err:
        if not _is_user_error(err):
            raise
        # (the innermost command chosen: the one whose run failed)
        print(f"{args.command_chain[-1][1].prog}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
