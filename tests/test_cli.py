"""The `convexddn` command: start-up, list, user mistakes, and the smoke runs of bench and the experiment."""
from __future__ import annotations

import errno
import io
import json
import os
import re
import subprocess
import sys

import pytest

import convexddn
from convexddn import cli, registry
from convexddn.bench.cases import CONVEX_PENALTIES, POOL_PENALTIES, PROJECTIONS

# Modules a command's parser must not import before that command runs.
HEAVY = ("torch", "cvxpy", "torch._dynamo", "convexddn.bench", "convexddn.experiments.pointcloud")


def _run(*code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "\n".join(code)], capture_output=True, text=True)


def _run_cli(*code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter after importing the CLI, with ``HEAVY`` as ``heavy``."""
    return _run("import contextlib, io, json, sys", f"heavy = {HEAVY!r}", "from convexddn import cli", *code)


def _one_line_error(err: str, *expected: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]


# --- start-up -------------------------------------------------------------------------

def test_cli_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"convexddn {convexddn.__version__}"


def test_cli_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("list", "bench", "experiment", "--version"):
        assert command in out


def test_cli_help_imports_nothing_heavy():
    # `convexddn --help` answers in well under a second only if neither importing the
    # package (convexddn/__init__.py runs first) nor building the parser loads torch,
    # cvxpy or a command's module: each command imports what it needs when it runs.
    result = _run_cli(
        "at_import = [m for m in heavy if m in sys.modules]",
        "with contextlib.redirect_stdout(io.StringIO()):",
        "    codes = [cli.main(['--help']), cli.main(['--version']), cli.main(['experiment', '--help']),",
        "             cli.main(['bench', '--help'])]",
        "added = [m for m in heavy if m in sys.modules and m not in at_import]",
        "print(json.dumps({'codes': codes, 'import': at_import, 'help': added}))",
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["codes"] == [0, 0, 0, 0]
    assert got["help"] == [], "the parser imported a command's modules"
    assert got["import"] == [], "importing convexddn loads heavy modules before the CLI runs"


def test_cli_list_imports_neither_torch_nor_cvxpy():
    # `convexddn list` answers in well under a second (it took 4 s when listing imported
    # cvxpy and torch): the catalog modules name them lazily (convexddn._lazy).
    result = _run_cli(
        "out = io.StringIO()",
        "with contextlib.redirect_stdout(out):",
        "    code = cli.main(['list'])",
        "print(json.dumps({'code': code, 'lines': len(out.getvalue().splitlines()),",
        "                  'loaded': [m for m in heavy if m in sys.modules]}))",
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["code"] == 0 and got["lines"] == len(registry.names())
    assert got["loaded"] == [], "listing the registry imported heavy modules"


def test_cli_experiment_options_added_only_when_chosen(capsys):
    from convexddn.experiments import EXPERIMENTS

    assert cli.main(["experiment", "--help"]) == 0
    out = capsys.readouterr().out
    for name, (_module, help_text) in EXPERIMENTS.items():
        assert name in out
    assert "--quick" not in out  # an experiment's own options belong to its own help
    assert cli.main(["experiment", "pointcloud", "--help"]) == 0
    assert "--quick" in capsys.readouterr().out


def test_cli_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "convexddn.cli", "list"], capture_output=True,
                         text=True, check=True).stdout
    assert "robust_pool" in out and "lp_ball" in out


def test_python_m_convexddn_is_the_command():
    """`python -m convexddn` failed ("is a package and cannot be directly executed"): it now
    runs the console script's entry point, convexddn.cli:main, with its exit status."""
    import tomllib
    from pathlib import Path

    config = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert config["project"]["scripts"]["convexddn"] == "convexddn.cli:main"
    done = subprocess.run([sys.executable, "-m", "convexddn", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: convexddn ") and "bench" in done.stdout
    done = subprocess.run([sys.executable, "-m", "convexddn", "bench", "--repeats", "0"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "argument --repeats: must be an integer from 1" in done.stderr


def test_bench_help_names_the_capped_rounds(capsys):
    """--help said "--repeats: timed rounds" while the convex rows took at most 3 of them
    and the DDN reference at the paper's shape at most 2; it names both caps now, with
    the figures the bench uses."""
    from convexddn.bench.cases.common import CVXPY_ROUNDS
    from convexddn.bench.cases.convex import CONVEX_MAX_ROUNDS, CONVEX_ROUNDS
    from convexddn.bench.cases.pooling import DDN_PAPER_ROUNDS

    assert CVXPY_ROUNDS == CONVEX_ROUNDS  # (the help names one cap for both kinds of rows)
    assert cli.main(["bench", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert (f"the convex rows (and the pooling and projection tables' cone-program rows) get at most "
            f"{CONVEX_ROUNDS} (by default the cheap convex ones more, up to {CONVEX_MAX_ROUNDS}) and the DDN "
            f"reference at the paper's shape at most {DDN_PAPER_ROUNDS}") in help_text


@pytest.mark.parametrize("repeats", [1, 2, 7])
def test_cone_program_rows_take_repeats_up_to_their_cap(monkeypatch, repeats):
    """The pooling and projection tables' cone-program rows took 3 rounds whatever --repeats said;
    the cap is applied in one place, measure_cvxpy, which times min(repeats, CVXPY_ROUNDS) calls
    after its untimed first one (counted here through its fwd_bwd) and records that count."""
    import torch

    from convexddn.bench.cases import common
    from convexddn.bench.harness import Timing

    calls = []
    monkeypatch.setattr(common, "fwd_bwd", lambda fn, x, g, device: calls.append(x.shape[0]) or Timing(1.0, 2.0, None))
    monkeypatch.setattr(common, "agreement", lambda native, cvxpy, x: (0.0, 0.0))
    progress = type("Progress", (), {"update": lambda self, *a: None})()
    row, X = {}, torch.zeros(40, 3)
    common.measure_cvxpy(row, [], None, lambda t: t, (X, X, 1.0), 1, 1.0, 1.0, progress, repeats=repeats)
    expected = min(repeats, common.CVXPY_ROUNDS)
    assert len(calls) == 1 + expected and row["rounds"] == expected
    assert f"median of {expected} calls" in row["note"]


@pytest.mark.parametrize("table", ["projection", "pooling"])
def test_cone_program_tables_pass_repeats_on(monkeypatch, table):
    """Both tables hand --repeats to measure_cvxpy, which caps it (test above): neither caps it
    on its own nor drops it."""
    import torch

    from convexddn.bench.cases import pooling, projection

    seen = []
    module = projection if table == "projection" else pooling
    monkeypatch.setattr(module, "measure_cvxpy", lambda *args, repeats, **kw: seen.append(repeats))
    progress = type("Progress", (), {"update": lambda self, *a: None, "set_postfix_str": lambda self, *a: None})()
    if table == "projection":
        projection.projection_cases((4, 8), torch.device("cpu"), torch.float64, True, 7, progress)
    else:
        monkeypatch.setattr(pooling, "layer", lambda *args, **kw: None)  # (no cone program is built)
        pooling.pool_cases((1, 2, 8), torch.device("cpu"), torch.float64, True, 7, progress, quick=True)
    assert seen and set(seen) == {7}


# --- list -----------------------------------------------------------------------------

def test_cli_list_prints_one_line_per_problem(capsys):
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == registry.names()
    for line, name in zip(lines, registry.names()):
        assert line.split(maxsplit=1)[1] == registry.describe(name)


def test_cli_list_shows_options_as_passed(capsys):
    # As a user types them: n=… for a required option, then the defaults.
    assert cli.main(["list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "n=…, p=2, radius=1.0" in lines["lp_ball"]
    assert "n=…, penalty='quadratic', alpha=1.0" in lines["robust_pool"]
    assert "(" not in lines["qp"].split("learn=")[1].split(",")[0]  # a string, not a tuple


# --- user mistakes: one line on stderr, exit status 2 -----------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["frobnicate"], ("convexddn: error:", "invalid choice", "frobnicate")),
    ([], ("convexddn: error:", "COMMAND")),
    # (unrecognized options name the subcommand, whose --help lists its options)
    (["list", "--frob"], ("convexddn list: error: unrecognized arguments: --frob", "'convexddn list --help'")),
    (["bench", "--frob"], ("convexddn bench: error: unrecognized arguments: --frob", "'convexddn bench --help'")),
    (["bench", "--repeats", "x"], ("convexddn bench: error:", "--repeats", "'x'")),
    (["experiment", "nope"], ("convexddn experiment: error:", "invalid choice", "nope")),
    (["experiment", "pointcloud", "--frob"], ("convexddn experiment pointcloud: error: unrecognized arguments: --frob",
                                              "'convexddn experiment pointcloud --help'")),
    # An option before its command's name was "unrecognized" by the command whose --help
    # lists it; the level that rejected it says where it goes (and a stray one is named by
    # the level it stood at).
    (["experiment", "--quick", "pointcloud"], ("convexddn experiment: error: --quick must come after 'pointcloud': "
                                               "it is an option of 'convexddn experiment pointcloud'",)),
    (["--quick", "bench"], ("convexddn: error: --quick must come after 'bench': it is an option of 'convexddn bench'",
                            "(see 'convexddn bench --help')")),
    (["experiment", "--seeds=3", "--qui", "pointcloud"], ("convexddn experiment: error: --seeds=3 --qui must come "
                                                          "after 'pointcloud': they are options",)),
    (["experiment", "--frob", "pointcloud"], ("convexddn experiment: error: unrecognized arguments: --frob",
                                              "(see 'convexddn experiment --help')")),
    (["bench", "bench"], ("convexddn bench: error: unrecognized arguments: bench",)),
    # An option that takes a value, written apart from it: argparse read the value as the
    # command's name and blamed it ("argument COMMAND: invalid choice: '/tmp/x'").
    (["experiment", "--seeds", "2", "pointcloud"], ("convexddn experiment: error: --seeds 2 must come after "
                                                    "'pointcloud': it is an option of 'convexddn experiment "
                                                    "pointcloud' (see 'convexddn experiment pointcloud --help')",)),
    (["--out", "/tmp/x", "bench"], ("convexddn: error: --out /tmp/x must come after 'bench': it is an option of "
                                    "'convexddn bench' (see 'convexddn bench --help')",)),
    (["--device", "cpu", "bench"], ("convexddn: error: --device cpu must come after 'bench'",)),
    (["--seeds", "2", "experiment", "pointcloud"], ("convexddn: error: --seeds 2 must come after 'pointcloud': "
                                                    "it is an option of 'convexddn experiment pointcloud'",)),
    (["experiment", "--quick", "--seeds", "2", "pointcloud"], ("convexddn experiment: error: --quick --seeds 2 "
                                                               "must come after 'pointcloud': they are options",)),
    # (an option no command has keeps argparse's reading: its value is the command's name)
    (["--frob", "x", "bench"], ("convexddn: error: argument COMMAND: invalid choice: 'x'",)),
])
def test_cli_usage_errors(argv, expected, capsys):
    assert cli.main(argv) == 2
    _one_line_error(capsys.readouterr().err, *expected)


@pytest.mark.parametrize("argv, expected", [
    (["bench", "--device", "gpu"], ("convexddn bench: error: --device must be", "'gpu'", "'cpu', 'cuda' or 'cuda:N'")),
    (["bench", "--repeats", "0"], ("convexddn bench: error:", "--repeats", "got 0")),
    (["bench", "--repeats", "-3"], ("--repeats", "got -3")),
    (["experiment", "pointcloud", "--device", "gpu", "--quick"], ("error:", "'gpu'")),
    # An empty list was falsy and meant the full default run (minutes), silently.
    (["experiment", "pointcloud", "--rates", ""], ("error: --rates must name at least one", "got ''")),
    # Percentages in, percentages out: "[0, 1), got 1.5" sent users to --rates 0.5 (0.5 %).
    (["experiment", "pointcloud", "--rates", "0,150"], ("error:", "--rates", "[0, 100)", "got 150")),
    (["experiment", "pointcloud", "--rates", "100"], ("error:", "[0, 100)", "got 100")),
    (["experiment", "pointcloud", "--rates", "0.01"], ("error: --rates: 0.01 % of", "100 / n_points = 0.391 %")),
    (["experiment", "pointcloud", "--poolings", ""], ("error: --poolings must name at least one",)),
    (["experiment", "projection", "--variants", ""], ("error: --variants must name at least one",)),
    # Bounded: an OverflowError, torch's ValueError (set_num_threads) or a derived radius of
    # inf, with tracebacks (exit status 1) and no option named.
    (["experiment", "projection", "--epochs", "9" * 26], ("error: argument --epochs:", "from 1 to 1000000")),
    (["experiment", "projection", "--threads", "9" * 22], ("error: argument --threads:", "from 1 to 4096")),
    (["experiment", "pointcloud", "--threads", "9" * 22], ("error: argument --threads:", "from 1 to 4096")),
    (["experiment", "projection", "--radius-scale", "1e308"], ("error: argument --radius-scale:", "got '1e308'")),
    (["experiment", "projection", "--radius-scale", "nan"], ("error: argument --radius-scale:", "got 'nan'")),
    (["experiment", "pointcloud", "--seed", "9" * 5000], ("error: argument --seed:", "got '9999")),
])
def test_cli_bad_option_values(argv, expected, tmp_path, capsys):
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    _one_line_error(capsys.readouterr().err, *expected)
    assert not any(tmp_path.iterdir())  # rejected before any work


@pytest.mark.parametrize("argv, expected", [
    # The experiments' Config.validate reported these under its field names, in its units:
    # "rates must not repeat, got (0.1, 0.1)" for --rates 10,10 (percent), "rates must name
    # at least one outlier rate, got ()", "train_fraction must lie in (0, 1), got 1.0".
    (["pointcloud", "--rates", "10,10"], "--rates must not repeat a rate, got 10 twice"),
    (["pointcloud", "--rates", "10,10.0"], "--rates must not repeat a rate, got 10 and 10.0"),
    (["pointcloud", "--rates", ","], "--rates must name at least one outlier rate in percent, such as 0,10,50, "
                                     "got ','"),
    (["pointcloud", "--quick", "--rates", "0.5"], "--rates: 0.5 % of a cloud of n_points=64 is no point at all"),
    (["pointcloud", "--poolings", "max,max"], "--poolings must not repeat a name, got max twice"),
    (["pointcloud", "--poolings", "max,median"], "--poolings must be comma-separated names from max,"),
    (["pointcloud", "--device", "gpu"], "--device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    (["projection", "--train-fraction", "1"], "argument --train-fraction: must be a number in (0, 1), got '1'"),
    (["projection", "--train-fraction", "0"], "argument --train-fraction: must be a number in (0, 1), got '0'"),
    (["projection", "--variants", "bn,bn"], "--variants must not repeat a name, got bn twice"),
    (["projection", "--device", "cuda:x"], "--device must be 'cpu', 'cuda' or 'cuda:N', got 'cuda:x'"),
])
def test_cli_option_errors_name_the_option_as_typed(argv, expected, tmp_path, capsys):
    assert cli.main(["experiment", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    _one_line_error(err, f"convexddn experiment {argv[0]}: error: {expected}")
    # No field name of the Config (rates, train_fraction, ...) without the option's dashes.
    rest = re.sub(r"--[\w-]+", "", err)  # (the options, as typed, taken out)
    assert not re.search(r"\b(rates|train_fraction|poolings|variants|device)\b", rest), err
    assert not any(tmp_path.iterdir())


def test_cli_missing_cuda_device(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device exists here")
    for argv in (["bench", "--quick"], ["experiment", "pointcloud", "--quick"]):
        assert cli.main([*argv, "--device", "cuda", "--out", str(tmp_path)]) == 2
        _one_line_error(capsys.readouterr().err, "error:", "cuda", "CUDA device")


@pytest.mark.parametrize("name, argv", [("pointcloud", ["--seeds", "0"]), ("projection", ["--bogus"])])
def test_experiment_module_main_is_the_command(name, argv, capsys):
    # `python -m convexddn.experiments.NAME` had a plain argparse parser of its own: its
    # usage errors printed the whole usage block before argparse's line.
    result = subprocess.run([sys.executable, "-m", f"convexddn.experiments.{name}", *argv],
                            capture_output=True, text=True)
    assert cli.main(["experiment", name, *argv]) == 2
    assert (result.returncode, result.stderr) == (2, capsys.readouterr().err)
    prog = f"convexddn experiment {name}"
    _one_line_error(result.stderr, f"{prog}: error:", f"(see '{prog} --help')")


def test_cli_library_input_errors_exit_2(monkeypatch, capsys):
    # An error of convexddn.errors about the input (a ValueError/TypeError one) is a user
    # mistake: one line, status 2. Any other error keeps its traceback.
    from convexddn.errors import OptionError, SolverError

    def fail_with(err):
        def command(args):
            raise err
        return command

    monkeypatch.setattr(cli, "_list", fail_with(OptionError("n must be positive, got 0")))
    assert cli.main(["list"]) == 2
    _one_line_error(capsys.readouterr().err, "convexddn list: error: n must be positive, got 0")
    monkeypatch.setattr(cli, "_list", fail_with(SolverError("solver failed")))
    with pytest.raises(SolverError):
        cli.main(["list"])


def test_cli_console_script_user_error_has_no_traceback():
    result = subprocess.run([sys.executable, "-m", "convexddn.cli", "bench", "--device", "gpu"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    _one_line_error(result.stderr, "convexddn bench: error:")


def test_cli_output_has_no_tracker_wording(capsys):
    for argv in (["--help"], ["list"], ["bench", "--help"], ["experiment", "--help"],
                 ["experiment", "pointcloud", "--help"]):
        cli.main(argv)
        captured = capsys.readouterr()
        text = captured.out + captured.err
        assert not re.search(r"\bissues?\s*#?\d", text, re.I), (argv, text)


# --- the commands' smoke runs -----------------------------------------------------------

def _no_progress_bars(err: str) -> None:
    # stderr is not a terminal here: progress bars must stay off (no \r redraws in logs).
    assert "\r" not in err, err[:500]


def test_cli_bench_quick_writes_every_row(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "| huber | cvxpy |" in out and "### projection" in out
    _no_progress_bars(captured.err)
    result = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert result["machine"]["torch"] and result["quick"] is True
    rows = {(r["family"], r["node"], r["path"]): r for r in result["rows"]}
    for p in POOL_PENALTIES:
        row = rows[("pooling", p, "native")]
        assert row["fwd_ms_per_sample"] > 0 and row["bwd_ms_per_sample"] > 0
        # The table states the first call's cost over a warm one (what its goal bounds).
        over = row["first_call_over_warm_s"]
        assert f"| {p} | native |" in out and f"({round(over, 3) + 0.0:+.3f} s over a warm call)" in out
    for p in CONVEX_PENALTIES:
        row = rows[("pooling", p, "cvxpy")]
        assert row["fwd_ms_per_sample"] > 0
        # the two paths agree (float64) — the bench measures it, the test bounds it
        assert row["max_solution_diff"] < 1e-6 and row["max_grad_diff"] < 1e-4
    for name, _ in PROJECTIONS:
        assert rows[("projection", name, "native")]["fwd_ms_per_sample"] > 0
        row = rows[("projection", name, "cvxpy")]
        assert row["max_solution_diff"] < 1e-6 and row["max_grad_diff"] < 1e-4
    assert rows[("pooling", "mean", "torch")]["fwd_rel_mean"] == pytest.approx(1.0)


def test_bench_workers_rows_time_both_pools_and_render():
    """The full bench's parallelism rows (not in --quick): ConvexLayer's worker processes
    and cvxpylayers' thread pool, each with 1 and with cpu_count workers, and the table."""
    from convexddn.bench.cases.workers import workers_speedup
    from convexddn.bench.report import format_table

    rows = workers_speedup(batch=4, repeats=1)
    assert {(r["problem"], r["path"]) for r in rows} == {
        (p, path) for p in ("qp (n=50, 40 ≤, 10 =)", "user NNLS (30×20)")
        for path in ("ConvexLayer worker processes", "cvxpylayers thread pool")}
    for r in rows:
        assert r["seconds_1_process"] > 0 and r["seconds_workers"] > 0
        assert r["speedup"] == pytest.approx(r["seconds_1_process"] / r["seconds_workers"])
    machine = {"processor": "x", "cpu_count": 2, "torch": "t", "torch_threads": 2, "device": "cpu"}
    text = format_table({"rows": [], "workers": rows, "machine": machine, "repeats": 1,
                         "rounds": {"convex": 1, "ddn_paper": 1}})
    assert "| user NNLS (30×20) | cvxpylayers thread pool | 4 |" in text
    # The footer gives the rounds the run used (it said "at most 3" and "2" whatever they were),
    # and no DDN rounds at the paper's shape where no row was timed there.
    assert "medians of 1 round (the convex path: at most 1; cone-program rows" in text
    assert all(r["rounds"] == 1 for r in rows)


def test_cli_experiment_runs_through_the_table(monkeypatch, capsys):
    # The command's wiring: EXPERIMENTS -> the module, imported when chosen -> its options
    # -> its main -> its exit status. A stand-in module keeps this instant; each
    # experiment's own run is tested in tests/experiments/.
    import types

    from convexddn import experiments

    calls = []
    fake = types.ModuleType("convexddn.experiments._cli_probe")
    fake.add_arguments = lambda parser: parser.add_argument("--size", type=int, default=3)
    fake.main = lambda args: calls.append(args.size) or 7
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(experiments.EXPERIMENTS, "probe", ("_cli_probe", "a stand-in experiment"))

    assert cli.main(["experiment", "probe", "--size", "5"]) == 7
    assert calls == [5]
    assert cli.main(["experiment", "--help"]) == 0
    assert "a stand-in experiment" in capsys.readouterr().out
    assert cli.main(["experiment", "probe", "--frob"]) == 2
    _one_line_error(capsys.readouterr().err, "unrecognized arguments: --frob")


# --- --out: checked (and created) before any work ---------------------------------------

def _forbid_work(monkeypatch):
    """Make the bench's and the experiments' work fail loudly if it is ever reached."""
    import convexddn.bench as bench
    from convexddn.experiments.pointcloud import runner as pointcloud_runner
    from convexddn.experiments.projection import runner as projection_runner

    def work(*args, **kwargs):
        raise AssertionError("the run started although --out is unusable")

    for name in ("pool_cases", "projection_cases", "convex_cases", "node_cases"):
        monkeypatch.setattr(bench, name, work)
    monkeypatch.setattr(pointcloud_runner, "run", work)
    monkeypatch.setattr(projection_runner, "run", work)


@pytest.mark.parametrize("command", [
    ["bench", "--quick"],
    ["experiment", "pointcloud", "--quick"],
    ["experiment", "projection", "--quick"],
])
@pytest.mark.parametrize("where", ["file", "under a file"])
def test_cli_unusable_out_fails_up_front(command, where, tmp_path, monkeypatch, capsys):
    # Used to fail only after the whole run, with a FileExistsError/NotADirectoryError
    # traceback from os.makedirs and exit status 1.
    _forbid_work(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    out = afile if where == "file" else afile / "sub"
    assert cli.main([*command, "--out", str(out)]) == 2
    _one_line_error(capsys.readouterr().err, "error:", "--out", repr(str(out)))
    assert afile.read_text() == "not a directory"


@pytest.mark.parametrize("command", [
    ["bench", "--quick"],
    ["experiment", "pointcloud", "--quick"],
    ["experiment", "projection", "--quick"],
])
def test_cli_out_where_no_file_can_be_made_fails_up_front(command, tmp_path, monkeypatch, capsys):
    """os.access says yes for root on a folder where no file can be made (/sys, a read-only
    mount): the run completed, then its write failed with a PermissionError traceback. Made
    here by refusing every file creation in that folder (the folder itself passes os.access)."""
    _forbid_work(monkeypatch)
    out = tmp_path / "ro"
    out.mkdir()
    monkeypatch.setattr(os, "open", _refusing_open(os.open, out))
    assert cli.main([*command, "--out", str(out)]) == 2
    _one_line_error(capsys.readouterr().err, "error:", "--out", repr(str(out)))
    assert list(out.iterdir()) == []


def _refusing_open(real, folder):
    """os.open that refuses to create a file in ``folder`` (as /sys does for root)."""
    def opener(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and os.path.dirname(os.path.abspath(path)) == str(folder):
            raise PermissionError(13, "Permission denied", path)
        return real(path, flags, *args, **kwargs)
    return opener


@pytest.mark.parametrize("command, name", [
    (["bench", "--quick"], "bench.json"),
    (["bench", "--quick"], "bench.png"),
    (["experiment", "pointcloud", "--quick"], "pointcloud.png"),
    (["experiment", "pointcloud", "--quick"], "pointcloud.json"),
    (["experiment", "projection", "--quick"], "projection.png"),
])
def test_cli_output_name_taken_by_a_directory_fails_up_front(command, name, tmp_path, monkeypatch, capsys):
    # Only the folder was checked: with a directory named pointcloud.png in it the whole
    # run completed, then crashed with an IsADirectoryError traceback (exit 1, no JSON).
    _forbid_work(monkeypatch)
    (tmp_path / name).mkdir()
    assert cli.main([*command, "--out", str(tmp_path)]) == 2
    _one_line_error(capsys.readouterr().err, "error:", "--out", repr(str(tmp_path)), f"{name} is a directory")
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_write_result_writes_the_json_before_the_plot(tmp_path):
    # The plot was drawn first: a plot that failed lost the raw results too.
    from convexddn.errors import OptionError
    from convexddn.experiments.running import write_result

    def broken_plot(result, path):
        raise RuntimeError("no display")

    with pytest.raises(RuntimeError, match="no display"):
        write_result({"rows": [1, 2]}, str(tmp_path), "probe", broken_plot)
    assert json.loads((tmp_path / "probe.json").read_text())["rows"] == [1, 2]
    (tmp_path / "other.png").mkdir()
    with pytest.raises(OptionError, match="other.png is a directory"):
        write_result({}, str(tmp_path), "other", lambda result, path: None)
    assert not (tmp_path / "other.json").exists()


def test_bench_run_checks_out_before_any_work(tmp_path, monkeypatch):
    import convexddn.bench as bench
    from convexddn.errors import OptionError

    _forbid_work(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(OptionError, match="out must be a directory"):
        bench.run(quick=True, out=str(afile))


@pytest.mark.parametrize("options, expected", [
    # repeats=0 silently meant the default (`repeats or 5`); -1 raised statistics'
    # StatisticsError after the warm-up work, and out had been created.
    (dict(repeats=0), "repeats must be an integer >= 1 and <= 1000000, got 0"),
    (dict(repeats=-1), "got -1"),
    (dict(repeats=10**7), "got 10000000"),
    (dict(repeats=2.5), "got 2.5"),
    (dict(repeats=True), "got True"),
    (dict(quick="no"), "quick must be True or False, got 'no'"),
    (dict(device="gpu"), "'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
])
def test_bench_run_checks_its_options_before_any_work(options, expected, tmp_path, monkeypatch):
    import convexddn.bench as bench
    from convexddn.errors import OptionError

    _forbid_work(monkeypatch)
    out = tmp_path / "never"
    with pytest.raises(OptionError, match=re.escape(expected)):
        bench.run(**{"quick": True, **options}, out=str(out))
    assert not out.exists()


@pytest.mark.parametrize("dtype, shown", [("int64", "torch.int64"), ("complex64", "torch.complex64"),
                                          ("float32", "'float32'")])
def test_bench_run_checks_dtype_before_any_work(dtype, shown, tmp_path, monkeypatch):
    # Not checked: an integer or complex dtype (or its name as a string) failed inside the
    # first timed case with torch's own RuntimeError or TypeError, naming no option.
    import torch

    import convexddn.bench as bench
    from convexddn.errors import OptionError

    _forbid_work(monkeypatch)
    out = tmp_path / "never"
    value = dtype if dtype == "float32" else getattr(torch, dtype)
    with pytest.raises(OptionError, match=re.escape(f"dtype must be one of [torch.float32, torch.float64], "
                                                    f"got {shown}")):
        bench.run(quick=True, dtype=value, out=str(out))
    assert not out.exists()


def test_write_result_refuses_a_file_as_out(tmp_path):
    from convexddn.errors import OptionError
    from convexddn.experiments.running import write_result

    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(OptionError, match="out must be a directory"):
        write_result({}, str(afile), "probe", lambda result, path: None)


@pytest.mark.parametrize("taken", [False, True])
@pytest.mark.parametrize("name", ["pointcloud", "projection"])
def test_experiment_run_checks_out_before_any_work(name, taken, tmp_path, monkeypatch):
    # Called from Python (not the CLI), an unusable out failed only after the whole run:
    # a file for out, or (taken) an out whose <name>.json is a directory.
    import importlib

    from convexddn.errors import OptionError

    runner = importlib.import_module(f"convexddn.experiments.{name}.runner")
    config = importlib.import_module(f"convexddn.experiments.{name}.config")

    def reached(*args, **kwargs):
        raise AssertionError("the run started before out was checked")

    monkeypatch.setattr(runner, "run_seed", reached)
    if taken:
        (tmp_path / f"{name}.json").mkdir()
        out, message = tmp_path, f"out must be a directory where {name}.json can be written"
    else:
        out, message = tmp_path / "afile", "out must be a directory"
        out.write_text("")
    with pytest.raises(OptionError, match=message):
        runner.run(config.Config(out=str(out)))


def test_cli_bench_creates_out_before_the_run(tmp_path, monkeypatch, capsys):
    # A nested --out that does not exist yet is created before the work starts (the stub
    # of the work sees it) and receives bench.json at the end.
    import convexddn.bench as bench

    out = tmp_path / "a" / "b"
    seen = []

    def no_rows(*args, **kwargs):
        seen.append(out.is_dir())
        return []

    for name in ("pool_cases", "projection_cases", "convex_cases", "node_cases", "peak_memory"):
        monkeypatch.setattr(bench, name, no_rows)
    monkeypatch.setattr(bench, "estimate_skipped", lambda rows: None)
    monkeypatch.setattr(bench, "plot", lambda result, path: open(path, "wb").close())
    monkeypatch.setattr(bench, "format_table", lambda result: "")
    assert cli.main(["bench", "--quick", "--repeats", "1", "--out", str(out)]) == 0
    assert seen and all(seen)
    assert json.loads((out / "bench.json").read_text())["quick"] is True


def test_native_nodes_do_not_import_the_compiler():
    # pnp's graph break under torch.compile was a decorator (torch.compiler.disable),
    # which imports torch._dynamo: the first `from convexddn import RobustPool` took
    # 1.3 s instead of 0.06. It is made on the first compiled call now.
    result = _run("import sys, json", "import convexddn",
                  "from convexddn import DeclarativeNode, RobustPool, PnP, functional",
                  "print(json.dumps('torch._dynamo' in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) is False


def test_cli_reader_that_stops_early():
    # `convexddn list | true`: a raw BrokenPipeError traceback and exit status 1 before.
    proc = subprocess.Popen([sys.executable, "-m", "convexddn.cli", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has started: every write fails
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_cli_errors_shown_in_the_docs_are_what_it_prints(tmp_path, capsys, monkeypatch):
    """docs/cli.md's example session: each ``$ convexddn …`` line's error is the one printed
    (it showed a --repeats message that argparse's check made unreachable)."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    pairs = re.findall(r"^\$ convexddn (.+)\n(convexddn .+: error: .+)$", text, flags=re.M)
    assert len(pairs) >= 3
    monkeypatch.chdir(Path(__file__).parents[1])  # (--out README.md names the repository's file)
    for argv, shown in pairs:
        assert cli.main(shlex.split(argv)) == 2
        assert capsys.readouterr().err.strip() == shown, argv


@pytest.mark.parametrize("argv", [["list"], ["experiment", "pointcloud", "--help"]])
def test_cli_on_a_terminal_that_cannot_encode_unicode(argv):
    """An ASCII (or cp1252) stdout: `convexddn list` ("α-entmax", "n=…") and the experiments'
    help ("§7") died with a UnicodeEncodeError traceback and exit status 1. Characters the
    stream cannot encode are now written as backslash escapes (Python's own choice for
    stderr). Reference: the escapes of the registry's descriptions, as Python writes them."""
    import os

    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    out = subprocess.run([sys.executable, "-m", "convexddn.cli", *argv], capture_output=True, text=True,
                         env=env, encoding="ascii")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    if argv == ["list"]:
        expected = registry.describe("entmax").encode("ascii", "backslashreplace").decode("ascii")
        assert expected.startswith("\\u03b1-entmax") and expected in out.stdout
    else:
        assert "\\xa77" in out.stdout


class _FailingStdout(io.StringIO):
    """A stdout whose every write raises ``error`` (a full disk, a closed pipe)."""

    def __init__(self, error: OSError) -> None:
        super().__init__()
        self.error = error

    def write(self, text: str) -> int:
        raise self.error


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("argv", [["list"], ["--version"], ["--help"]])
def test_cli_output_that_cannot_be_written(argv):
    """`convexddn list > /dev/full` ended with an OSError traceback (ENOSPC) and `--version`
    or `--help` there exited 0 (argparse swallows the error): one line and status 1 now."""
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "convexddn.cli", *argv], stdout=full, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    _one_line_error(out.stderr, "convexddn: error: cannot write the output", os.strerror(errno.ENOSPC))


def test_cli_output_error_in_process_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", _FailingStdout(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    assert cli.main(["list"]) == 1
    _one_line_error(capsys.readouterr().err, "cannot write the output", os.strerror(errno.ENOSPC))


def test_cli_reader_that_stops_early_in_process(monkeypatch, capsys):
    """A BrokenPipeError writing stdout: status 0 and nothing on stderr (the old handler's
    ``sys.stdout.fileno()`` raised for a stream without a descriptor)."""
    monkeypatch.setattr(sys, "stdout", _FailingStdout(BrokenPipeError(errno.EPIPE, "Broken pipe")))
    assert cli.main(["list"]) == 0
    assert capsys.readouterr().err == ""


def test_cli_commands_own_oserror_keeps_its_traceback(monkeypatch):
    """Only a failure to write stdout is reported as one line; an OSError of the command's
    own (a file it writes) is a failure whose traceback is kept."""
    def fails(args):
        print("partial output")
        raise OSError(errno.EIO, "results/x.json")

    monkeypatch.setattr(cli, "_list", fails)
    with pytest.raises(OSError, match="results/x.json"):
        cli.main(["list"])


def _print_then(failure):
    """A command that prints, swallows the BrokenPipeError or full disk, carries on and
    then fails with ``failure``."""
    def command(args):
        try:
            print("partial output")
        except OSError:
            pass
        raise failure
    return command


@pytest.mark.parametrize("write_error", [BrokenPipeError(errno.EPIPE, "Broken pipe"),
                                         OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))])
def test_cli_commands_own_oserror_after_a_failed_write_keeps_its_traceback(write_error, monkeypatch):
    """Once a write to stdout had failed, any later OSError (a file the command cannot open)
    was swallowed, with status 0 or 1 and no traceback."""
    monkeypatch.setattr(sys, "stdout", _FailingStdout(write_error))
    monkeypatch.setattr(cli, "_list", _print_then(FileNotFoundError(errno.ENOENT, "no such file", "/nonexistent/x")))
    with pytest.raises(FileNotFoundError, match="/nonexistent/x"):
        cli.main(["list"])


@pytest.mark.parametrize("write_error", [BrokenPipeError(errno.EPIPE, "Broken pipe"),
                                         OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))])
def test_cli_user_error_after_a_failed_write_keeps_status_2(write_error, monkeypatch, capsys):
    """A user mistake's status 2 became 0 (or 1) once a write to stdout had failed."""
    from convexddn.errors import OptionError

    monkeypatch.setattr(sys, "stdout", _FailingStdout(write_error))
    monkeypatch.setattr(cli, "_list", _print_then(OptionError("n must be positive, got 0")))
    assert cli.main(["list"]) == 2
    assert "n must be positive, got 0" in capsys.readouterr().err


def test_cli_oserror_chained_from_a_failed_write_is_the_outputs():
    """An error raised while handling the failed write (or ``from`` it) is the output's."""
    output = cli._Output(_FailingStdout(BrokenPipeError(errno.EPIPE, "Broken pipe")))
    try:
        try:
            output.write("x")
        except OSError as broken:
            raise OSError(errno.EIO, "while reporting") from broken
    except OSError as err:
        assert output.caused(err)
    assert not output.caused(OSError(errno.EIO, "unrelated"))


class _WriteOnlyStdout:
    """A stdout object with ``write()`` and nothing else."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)


def test_cli_write_only_stdout(monkeypatch):
    """main()'s own flush raised AttributeError on a stdout without ``flush()``."""
    out = _WriteOnlyStdout()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["list"]) == 0
    assert sys.stdout is out and "entmax" in out.text


def test_cli_restores_stdout_after_a_commands_exception(monkeypatch):
    from convexddn.errors import SolverError

    def fails(args):
        raise SolverError("solver failed")

    before = sys.stdout
    monkeypatch.setattr(cli, "_list", fails)
    with pytest.raises(SolverError):
        cli.main(["list"])
    assert sys.stdout is before
