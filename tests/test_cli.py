"""The `convexddn` command: list, and the smoke runs of bench and the experiment."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from convexddn import cli, registry
from convexddn.bench.cases import CONVEX_PENALTIES, POOL_PENALTIES, PROJECTIONS


def test_cli_list_prints_one_line_per_problem(capsys):
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == registry.names()
    assert all("options:" in line for line in lines)


def test_cli_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "convexddn.cli", "list"], capture_output=True,
                         text=True, check=True).stdout
    assert "robust_pool" in out and "lp_ball" in out


def test_cli_invalid_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])
    assert "invalid choice" in capsys.readouterr().err


def test_cli_bench_quick_writes_every_row(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| huber | cvxpy |" in out and "### projection" in out
    result = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert result["machine"]["torch"] and result["quick"] is True
    rows = {(r["family"], r["node"], r["path"]): r for r in result["rows"]}
    for p in POOL_PENALTIES:
        row = rows[("pooling", p, "native")]
        assert row["fwd_ms_per_sample"] > 0 and row["bwd_ms_per_sample"] > 0
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


def test_cli_bench_invalid_device(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device exists here")
    from convexddn.errors import OptionError

    with pytest.raises(OptionError, match="device 'cuda'"):
        cli.main(["bench", "--quick", "--device", "cuda", "--out", str(tmp_path)])


def test_cli_experiment_quick_writes_every_row(tmp_path, capsys):
    from convexddn.experiments.pointcloud import DEFAULT_POOLINGS, Config

    assert cli.main(["experiment", "pointcloud", "--quick", "--out", str(tmp_path)]) == 0
    assert "| outliers |" in capsys.readouterr().out
    result = json.loads((tmp_path / "pointcloud.json").read_text())
    assert (tmp_path / "pointcloud.png").stat().st_size > 10_000
    rates = Config.quick().rates
    got = {(r["pooling"], round(r["rate"], 6)) for r in result["rows"]}
    assert got == {(p, round(rate, 6)) for p in DEFAULT_POOLINGS for rate in rates}
    for row in result["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["map"] <= 1.0
