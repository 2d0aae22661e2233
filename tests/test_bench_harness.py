"""The benchmark harness times full gradients (convexddn/bench/harness.py)."""
from __future__ import annotations

import pytest
import torch

from convexddn.bench import harness
from convexddn.functional import robust_pool


def test_timed_backward_materialises_a_stride_zero_gradient(monkeypatch):
    """Quadratic pooling's backward returns the expanded view of gy/N (stride 0, nothing
    written): the bench timed it as free (0.004× mean's backward) where accumulating it
    into .grad, as a training step does, writes the full gradient."""
    x = torch.randn(3, 4, 16)
    g = torch.randn(3, 4)
    (raw,) = torch.autograd.grad(robust_pool(x.requires_grad_(), "quadratic", 1.0), x, g)
    assert raw.stride()[-1] == 0
    (full,) = harness.materialised([raw])
    assert full.is_contiguous() and torch.equal(full, raw)
    seen = []
    real = harness.materialised
    monkeypatch.setattr(harness, "materialised", lambda grads: seen.append(grads) or real(grads))
    harness.fwd_bwd(lambda t: robust_pool(t, "quadratic", 1.0), x, g, torch.device("cpu"))
    assert len(seen) == 1 and seen[0][0].stride()[-1] == 0


def test_report_says_why_the_reference_comparison_is_missing():
    """Without the DDN reference the comparison table vanished without a word (the
    reason was only in the JSON)."""
    from convexddn.bench.report import _ddn_table

    rows = [{"family": "pooling", "node": "huber", "path": "native",
             "ddn_reference": "the DDN reference is not importable here"}]
    assert "Not measured: the DDN reference is not importable here." in _ddn_table(rows)


def test_cheap_convex_rows_get_more_interleaved_rounds(monkeypatch):
    """Three interleaved rounds left the medians of the fast convex rows (a QP at batch 64:
    ~1.5 s a round) at the mercy of a shared machine's drift; cheap pairs now get as many
    rounds as fit in the budget (at most CONVEX_MAX_ROUNDS), slow ones the minimum, and
    each row and the report say how many."""
    from convexddn.bench.cases import convex as cases
    from convexddn.bench.report import format_table

    monkeypatch.setattr(cases, "moreau_available", lambda: False)
    timings = iter([0.01] * 1000)
    monkeypatch.setattr(cases, "_fwd_bwd", lambda fn, data, g, dev: (
        next(timings), 0.0, torch.zeros(2, 16, dtype=torch.float64), [torch.zeros(2, 16, dtype=torch.float64)]))

    class Bar:
        def update(self, k):
            pass

    fast = cases.convex_cases([("sparsemax16", 2)], 3, Bar(), budget_s=0.5)
    assert {r["rounds"] for r in fast if "fwd_s" in r} == {min(cases.CONVEX_MAX_ROUNDS, int(0.5 / 0.03))}
    slow = cases.convex_cases([("sparsemax16", 2)], 3, Bar(), budget_s=0.0)
    assert {r["rounds"] for r in slow if "fwd_s" in r} == {3}
    table = format_table({"machine": {"processor": "x", "cpu_count": 2, "torch": "t", "torch_threads": 2,
                                      "device": "cpu"}, "repeats": 5, "rows": [], "convex": fast + slow})
    assert "the convex path: 3–15 interleaved rounds by cost" in table


def test_given_repeats_are_not_extended_for_cheap_convex_rows(monkeypatch):
    """--repeats 1 still ran up to 15 convex rounds: the extra rounds are the default's
    only (a given --repeats, or --quick, gets no budget)."""
    import convexddn.bench as bench

    seen = []
    for name in ("pool_cases", "projection_cases", "node_cases"):
        monkeypatch.setattr(bench, name, lambda *a, **k: [])
    monkeypatch.setattr(bench, "convex_cases", lambda problems, repeats, progress, device, budget_s:
                        seen.append((repeats, budget_s)) or [])
    monkeypatch.setattr(bench, "peak_memory", lambda *a: [])
    monkeypatch.setattr(bench, "workers_speedup", lambda **k: [])
    bench.run(repeats=1, out=None)
    bench.run(out=None)
    bench.run(quick=True, out=None)
    assert seen == [(1, 0.0), (3, bench.CONVEX_ROUND_BUDGET_S), (3, 0.0)]


def test_interleaved_rounds_alternate_their_order():
    """An op timed right after another pays for the state that one left: two pooling
    implementations timed in a fixed order came out 4-9 % apart, 0.2-0.7 % with the
    order alternated. Every interleaved loop reverses its order in odd rounds."""
    assert harness.round_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert harness.round_order(["a", "b", "c"], 1) == ["c", "b", "a"]
    seen = []

    class Bar:
        def update(self, k):
            pass

    ops = {name: (lambda name=name: seen.append(name) or (0.0, 0.0)) for name in ("a", "b")}
    harness.median_times(ops, 2, Bar())
    assert seen == ["a", "b", "a", "b", "b", "a"]  # warm-ups, round 0, round 1


def test_backward_page_faults_are_counted_outside_the_timed_phases(monkeypatch):
    """The same op's backward at (24, 1024, 2048) took 0 page faults in some rounds of one
    bench process and 49,153 (a fresh gradient, ~2 ms/sample) in others: a backward
    ratio to the mean's means nothing without the counts. fwd_bwd reports them, and
    median_times keeps each op's median."""
    # A clock that ticks once per reading and a fault counter, both logging their reads:
    # the order of the reads shows where the counts are taken.
    log = []
    ticks = iter(range(100))
    counts = iter([100, 4196])

    class Clock:
        @staticmethod
        def perf_counter():
            log.append("t")
            return float(next(ticks))

    def faults():
        log.append("f")
        return next(counts)

    monkeypatch.setattr(harness, "time", Clock)
    monkeypatch.setattr(harness, "_minor_faults", faults)
    x, g = torch.randn(2, 8), torch.randn(2)
    t = harness.fwd_bwd(lambda v: v.mean(-1), x, g, torch.device("cpu"))
    assert isinstance(t, harness.Timing) and t.bwd_faults == 4096
    # forward between the first two ticks, backward between the last two; each count is
    # read between the timed windows, never inside one
    assert log == ["t", "t", "f", "t", "t", "f"]
    assert (t.fwd, t.bwd) == (1.0, 1.0)
    monkeypatch.undo()

    class Bar:
        def update(self, k):
            pass

    seq = {"a": iter([harness.Timing(1.0, 2.0, f) for f in (9, 0, 49153, 49153)]),
           "b": iter([(1.0, 2.0)] * 4)}  # (a sort: no backward, no count)
    out: dict = {}
    times = harness.median_times({k: (lambda v=v: next(v)) for k, v in seq.items()}, 3, Bar(), None, out)
    assert times == {"a": (1.0, 2.0), "b": (1.0, 2.0)}
    assert out == {"a": 49153, "b": None}  # the warm-up's 9 is not counted


def test_report_prints_backward_page_faults_where_some_are_many():
    """Where some backward at a shape took thousands of page faults, every row of that
    shape shows its count (and a note says what they mean); elsewhere nothing."""
    from convexddn.bench.report import format_table

    machine = {"processor": "x", "cpu_count": 2, "torch": "t", "torch_threads": 2, "device": "cpu"}

    def row(node, shape, faults):
        return {"family": "pooling", "node": node, "path": "native", "shape": list(shape), "dtype": "float32",
                "device": "cpu", "fwd_ms_per_sample": 1.0, "bwd_ms_per_sample": 1.0, "fwd_rel_mean": 1.0,
                "bwd_rel_mean": 1.0, "max_solution_diff": None, "max_grad_diff": None, "note": "",
                "bwd_page_faults": faults}

    rows = [row("mean", (2, 4, 8), 0), row("huber", (2, 4, 8), 3),
            row("mean", (24, 1024, 2048), 0), row("huber", (24, 1024, 2048), 49153)]
    table = format_table({"machine": machine, "repeats": 1, "rows": rows})
    lines = {(ln.split("|")[1].strip(), ln.split("|")[3].strip()): ln for ln in table.splitlines()
             if ln.startswith("| mean") or ln.startswith("| huber")}
    assert "backward 49,153 page faults/call" in lines[("huber", "(24, 1024, 2048)")]
    assert "backward 0 page faults/call" in lines[("mean", "(24, 1024, 2048)")]
    assert "page faults" not in lines[("huber", "(2, 4, 8)")] + lines[("mean", "(2, 4, 8)")]
    assert "Page faults: the median count" in table
    assert "Page faults" not in format_table({"machine": machine, "repeats": 1, "rows": rows[:2]})


# ------------------------------------------------------------------ the DDN reference

# Stand-ins for files of the DDN reference (github.com/anucvml/ddn, ddn/pytorch), with
# its call conventions: BasicLeastSquaresFcn.apply(A (B, M, N), b (B, M, 1)) -> (B, N, 1);
# RobustVectorPool2dFcn.apply(x (B, C, *), penalty class, alpha) -> (B, C);
# EuclideanProjectionFn.apply(x, set class, radius tensor) with set.project(v, z) ->
# (projection, is_outside).
_FAKE_REFERENCE = {
    "leastsquares.py": """
import pytest
import torch
class BasicLeastSquaresFcn:
    @staticmethod
    def apply(A, b, cache_decomposition=True):
        assert b.shape == (*A.shape[:2], 1)
        return torch.linalg.lstsq(A, b).solution
""",
    "robust_vec_pool.py": """
import torch
class Huber:
    pass
class RobustVectorPool2dFcn:
    @staticmethod
    def apply(x, penalty, alpha=1.0, restarts=0):
        # Huber vector pooling by iteratively reweighted means (weights 1 within alpha,
        # alpha / r beyond), independent of convexddn's solver.
        assert penalty is Huber and x.dim() >= 3
        X = x.flatten(2)
        u = X.mean(-1)
        for _ in range(3000):
            r = (u.unsqueeze(-1) - X).norm(dim=1)
            w = torch.where(r <= alpha, torch.ones_like(r), alpha / r)
            u = (X * w.unsqueeze(1)).sum(-1) / w.sum(-1, keepdim=True)
        return u
""",
    "projections.py": """
import torch
def _simplex(v, z):  # Duchi et al. 2008, by one sort
    u = v.sort(-1, descending=True).values
    css = u.cumsum(-1) - z
    k = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    rho = ((u - css / k) > 0).sum(-1, keepdim=True)
    return (v - css.gather(-1, rho - 1) / rho).clamp(min=0)
def _l1(v, z):
    inside = v.abs().sum(-1, keepdim=True) <= z
    return torch.where(inside, v, v.sign() * _simplex(v.abs(), z))
def _l2(v, z):
    return v * (z / v.norm(dim=-1, keepdim=True)).clamp(max=1)
def _set(fn):
    return type("Set", (), {"project": staticmethod(lambda v, z=1.0: (fn(v, z), None))})
L1Ball = _set(_l1)
L2Ball = _set(_l2)
LInfBall = _set(lambda v, z: v.clamp(-z, z))
Simplex = _set(_simplex)
class EuclideanProjectionFn:
    @staticmethod
    def apply(x, method, radius):
        return method.project(x, radius.item())[0]
""",
    "optimal_transport.py": "raise RuntimeError('this reference file is broken')\n",
}


def _fake_reference(tmp_path, monkeypatch, files):
    from convexddn.bench import reference

    folder = tmp_path / "ddn-checkout"
    (folder / "ddn" / "pytorch").mkdir(parents=True)
    for name in files:
        (folder / "ddn" / "pytorch" / name).write_text(_FAKE_REFERENCE[name])
    monkeypatch.setenv(reference.ENV_VAR, str(folder))
    monkeypatch.setattr(reference, "_CACHE", {})
    return folder


def test_node_rows_time_every_node_the_reference_has(tmp_path, monkeypatch):
    """Least squares and robust vector pooling said 'no DDN reference for this node' (a
    rule on the node's name) though the reference has both, and the projections had no
    row; a row's note now comes from whether the reference's file has the node."""
    from convexddn.bench.cases import nodes

    _fake_reference(tmp_path, monkeypatch, ["leastsquares.py", "robust_vec_pool.py", "projections.py",
                                            "optimal_transport.py"])
    monkeypatch.setattr(nodes, "_time", lambda fn, inputs, gen, device: (1e-3, 2e-3))

    class Bar:
        def update(self, k=1):
            pass

    rows = {r["node"]: r for r in nodes.node_cases(1, Bar())}
    timed = ["least squares", "robust vector pool (huber)"] + [
        f"projection onto the {s} (radius 1)" for s in ("L1 ball", "L2 ball", "L∞ ball", "simplex")]
    for name in timed:
        assert rows[name].get("speedup_fwd") == 1.0 and "note" not in rows[name], name
    for name in ("entmax (alpha=1.5)", "total variation 1-D (lam=0.5)"):
        assert rows[name]["note"] == nodes.NO_REFERENCE_NODE
    assert "holds no ddn/pytorch/eigen_decomposition.py" in rows["eigen decomposition (all)"]["note"]
    ot = rows["entropic OT (eps=0.1, rand costs)"]["note"]
    assert "failed to import" in ot and "RuntimeError: this reference file is broken" in ot
    # The adapters pass the bench's inputs in the reference's layout and return ours: the
    # stand-in files compute each node independently (lstsq, reweighted means, Duchi's
    # sort, closed forms), so layout and values are both checked; agreement with the real
    # reference is the next test's (with the env var set).
    for node, _, ours, inputs, spec in nodes._cases(torch.Generator().manual_seed(0)):
        if node in timed:
            ref, _ = nodes._reference(spec)
            torch.testing.assert_close(ref(*inputs), ours(*inputs), msg=node)


def test_node_references_agree_with_ours_on_the_real_reference():
    """With CONVEXDDN_DDN_REFERENCE set: the call conventions hold for the real files."""
    import os

    from convexddn.bench import reference
    from convexddn.bench.cases import nodes

    if not os.environ.get(reference.ENV_VAR):
        pytest.skip(f"{reference.ENV_VAR} not set")
    for node, _, ours, inputs, spec in nodes._cases(torch.Generator().manual_seed(0)):
        if spec is None or spec.file not in ("leastsquares.py", "robust_vec_pool.py", "projections.py",
                                             "tridiagsolve.py"):
            continue
        ref, note = nodes._reference(spec)
        assert ref is not None, note
        # The reference's vector pool stops L-BFGS at a gradient of 1e-5.
        tol = 1e-5 if spec.file == "robust_vec_pool.py" else 1e-10
        torch.testing.assert_close(ref(*inputs), ours(*inputs), atol=tol, rtol=tol, msg=node)


def test_a_reference_that_fails_to_import_is_a_note(tmp_path, monkeypatch):
    """A robustpool.py that raised on import crashed the whole bench; it is a note now,
    with the error, and the comparison is skipped."""
    from convexddn.bench import reference
    from convexddn.bench.cases import pooling

    folder = tmp_path / "ddn-checkout"
    (folder / "ddn" / "pytorch").mkdir(parents=True)
    (folder / "ddn" / "pytorch" / "robustpool.py").write_text("import torch\nraise ValueError('half a file')\n")
    monkeypatch.setenv(reference.ENV_VAR, str(folder))
    monkeypatch.setattr(reference, "_CACHE", {})
    module, note = reference.load_reference()
    assert module is None and "failed to import" in note and "ValueError: half a file" in note
    x, g = pooling._inputs((2, 4, 16), torch.device("cpu"), torch.float32)
    assert pooling.ddn_comparison(x, g, torch.device("cpu"), 1, None) == ({}, note)


def test_no_ratio_to_the_reference_without_the_reference(tmp_path, monkeypatch):
    """Without the reference, the pooling rows carried a 'speed-up vs the DDN reference'
    made of figures measured once in another run (DDN_REFERENCE_FWD) over this run's
    times: a ratio between two runs. Now the rows carry only why it was not measured."""
    from convexddn.bench import reference
    from convexddn.bench.cases import pooling

    monkeypatch.setenv(reference.ENV_VAR, str(tmp_path))  # holds no reference
    monkeypatch.setattr(reference, "_CACHE", {})

    class Bar:
        def update(self, k=1):
            pass

    rows = pooling.pool_cases((2, 4, 16), torch.device("cpu"), torch.float32, False, 1, Bar())
    native = [r for r in rows if r["path"] == "native"]
    assert native and all("holds no ddn/pytorch/robustpool.py" in r["ddn_reference"] for r in native)
    assert not [k for r in rows for k in r if "ddn" in k and k != "ddn_reference"]
    assert not hasattr(pooling, "DDN_REFERENCE_FWD")


def test_gpu_check_says_why_it_leaves_out_the_cone_program(tmp_path, monkeypatch):
    """gpu_check's pooling rows said the cone program was 'too slow at this size', also at
    the small shape where the CPU bench times it: the bench times it on the CPU whatever
    the device, which is why a GPU check leaves it out."""
    import importlib.util
    import json
    from pathlib import Path

    from convexddn.bench import cases

    real = cases.pool_cases
    monkeypatch.setattr(cases, "pool_cases", lambda shape, *a, **k: real((2, 4, 16), *a, **k))
    spec = importlib.util.spec_from_file_location(
        "gpu_check", Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(str(tmp_path), ["pool_f32"], cpu=True) == 0
    rows = [r for r in json.loads((tmp_path / "gpu.json").read_text())["rows"] if r["path"] == "cvxpy"]
    assert rows and not [r["note"] for r in rows if "too slow" in r["note"]]
    assert all(r["note"] == gpu_check.POOL_CVXPY_NOT_RUN for r in rows)
    assert "on the CPU" in gpu_check.POOL_CVXPY_NOT_RUN


def test_gpu_check_command_line(capsys):
    """``gpu_check.py --help`` said "no CUDA device here" and, with --cpu, wrote its
    results into a folder named ``--help``."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "gpu_check", Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    with pytest.raises(SystemExit) as exit_:
        gpu_check._parse(["--help", "--cpu"])
    assert exit_.value.code == 0 and "CUDA figures" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        gpu_check._parse(["--hlep"])
    assert exit_.value.code == 2
    args = gpu_check._parse(["out", "lp", "float32", "--cpu"])
    assert (args.out, args.parts, args.cpu) == ("out", ["lp", "float32"], True)
    args = gpu_check._parse([])
    assert (args.out, args.parts, args.cpu) == ("results-gpu", [], False)


# ------------------------------------------------------------------------- memory


def test_memory_probe_counts_the_materialised_gradient():
    """Quadratic pooling's gradient is a stride-0 view: the probe, which did not
    materialise it, showed 0.00× the input, below the 1× floor of any node."""
    (row,) = harness.peak_memory((8, 512, 1024), ("quadratic",))
    if row.get("peak_method") == "sampled":
        pytest.skip("no /proc/self/clear_refs here: the sampler's figure is not asserted")
    assert 0.95 <= row["peak_over_input"] <= 1.5


def test_memory_peak_is_the_high_water_mark_not_a_sample(monkeypatch):
    """Sampling every 0.5 ms missed short peaks (mean pooling 0.02× one run, 0.80× the
    next); the kernel's high-water mark misses none. Without clear_refs the sampler
    runs, labelled so."""
    import mmap

    from convexddn.bench import memory_probe

    size = 64 << 20

    def spike():
        # 64 MiB of fresh pages, touched, then unmapped at once. (Not a torch tensor: once
        # this process has run the bench, glibc may serve one from freed memory it kept
        # inside its heap -- 208 MiB of it after the quick bench -- adding no page to the
        # resident set: the probe then rightly saw 0 added, and this test failed after
        # test_cli's quick bench. An anonymous mapping is always fresh.)
        with mmap.mmap(-1, size) as m:
            for i in range(0, size, mmap.PAGESIZE):
                m[i] = 1

    added, method = memory_probe.peak_added(spike)
    if method == memory_probe.HWM:
        assert added >= 0.95 * size
    monkeypatch.setattr(memory_probe, "_reset_high_water_mark", lambda: False)
    _, method = memory_probe.peak_added(spike)
    assert method == memory_probe.SAMPLED


@pytest.mark.parametrize("argv, expected", [
    ([], "the following arguments are required: B,C,N, PENALTY"),
    (["2,8,16"], "the following arguments are required: PENALTY"),
    (["a,b,c", "huber"], "argument B,C,N: must be comma-separated positive integers such as 24,1024,2048, got 'a,b,c'"),
    (["2,0,16", "huber"], "got '2,0,16'"),
    (["2,8,16", "bogus"], "argument PENALTY: invalid choice: 'bogus'"),
])
def test_memory_probe_usage_mistakes_are_one_line(argv, expected, capsys):
    """README tells users to run the probe by hand; without argument handling a missing
    penalty or a malformed shape ended in an IndexError or ValueError traceback (exit
    status 1), an unknown penalty in an OptionError one."""
    from convexddn.bench import memory_probe

    with pytest.raises(SystemExit) as done:
        memory_probe.main(argv)
    assert done.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    prog = "python -m convexddn.bench.memory_probe"
    assert line.startswith(f"{prog}: error: ") and line.endswith(f"(see '{prog} --help')"), line
    assert expected in line, line


def test_memory_probe_help(capsys):
    from convexddn.bench import memory_probe

    with pytest.raises(SystemExit) as done:
        memory_probe.main(["--help"])
    assert done.value.code == 0
    assert "B,C,N PENALTY" in capsys.readouterr().out


def test_report_flags_memory_below_the_floor():
    """A peak below 1× the input was printed as a figure (0.00×, 0.02×) with nothing to
    say it was a missed measurement."""
    from convexddn.bench.report import format_table

    machine = {"processor": "x", "cpu_count": 2, "torch": "t", "torch_threads": 2, "device": "cpu"}
    memory = [{"node": "quadratic", "shape": [4, 64, 256], "peak_over_input": 0.02, "peak_method": "hwm"},
              {"node": "huber", "shape": [4, 64, 256], "peak_over_input": 1.03, "peak_method": "hwm"},
              {"node": "mean", "shape": [4, 64, 256], "peak_over_input": 0.9991, "peak_method": "hwm"}]
    table = format_table({"machine": machine, "repeats": 1, "rows": [], "memory": memory})
    assert "| quadratic | (4, 64, 256) | 0.02× (below the 1× floor: unreliable) |" in table
    assert "| huber | (4, 64, 256) | 1.03× |" in table
    assert "| mean | (4, 64, 256) | 1.00× |" in table  # within the printed precision
    assert "high-water mark" in table and "A figure below 1× is no saving" in table


def test_report_notes_use_units_and_precision_that_show_the_figure():
    """The committed bench.md printed a skipped row's estimate of 2 s as "about 0.0 min",
    a first call as "0.0 s (+0.01 s over a warm call)" (tenths beside hundredths) and one
    thread as "(1 threads)". Notes are rendered from the rows' figures, so a JSON written
    with the old note prints the new one."""
    from convexddn.bench.report import estimate_skipped, format_table

    machine = {"processor": "x", "cpu_count": 2, "torch": "t", "torch_threads": 1, "device": "cpu"}

    def row(node, path, shape, fwd=None, bwd=None, note="", **extra):
        return {"family": "projection", "node": node, "path": path, "shape": list(shape), "dtype": "float32",
                "device": "cpu", "fwd_ms_per_sample": fwd, "bwd_ms_per_sample": bwd, "fwd_rel_mean": None,
                "bwd_rel_mean": None, "max_solution_diff": None, "max_grad_diff": None, "note": note, **extra}

    # 1.2 ms per row of 64 at the small shape: 1.2 ms * rows * (512 / 64) for the others,
    # 2.4576 s, 39.3216 s and 629.1456 s (10.49 min).
    rows = [row("simplex", "cvxpy", (8, 64), 1.0, 0.2),
            row("simplex", "cvxpy", (256, 512), note="skipped: ...; about 0.0 min at the small shape's rate"),
            row("simplex", "cvxpy", (4096, 512)), row("simplex", "cvxpy", (65536, 512)),
            row("simplex", "native", (8, 64), 0.1, 0.1, first_call_s=0.0071, first_call_over_warm_s=0.0066),
            row("simplex", "native", (256, 512), 0.1, 0.1, first_call_s=2.6962, first_call_over_warm_s=-0.0002)]
    table = format_table({"machine": machine, "repeats": 1, "rows": rows})
    assert "skipped: 256 cone programs of size 512; about 2.5 s at the small shape's rate" in table
    assert "about 39 s at" in table and "about 10.5 min at" in table and "0.0 min" not in table
    assert "first call at this shape 0.007 s (+0.007 s over a warm call)" in table
    assert "first call at this shape 2.696 s (+0.000 s over a warm call)" in table
    assert "(1 thread)" in table and "threads)" not in table
    estimate_skipped(rows)
    assert rows[1]["note"] == "skipped: 256 cone programs of size 512; about 2.5 s at the small shape's rate"


# ------------------------------------------------ the DDN reference: unusable or failing


class _Bar:
    def update(self, k=1):
        pass


def _write_reference(tmp_path, monkeypatch, files: dict[str, str]):
    from convexddn.bench import reference

    folder = tmp_path / "ddn-checkout"
    (folder / "ddn" / "pytorch").mkdir(parents=True)
    for name, text in files.items():
        (folder / "ddn" / "pytorch" / name).write_text(text)
    monkeypatch.setenv(reference.ENV_VAR, str(folder))
    monkeypatch.setattr(reference, "_CACHE", {})


def test_a_reference_without_the_pooling_names_is_a_note(tmp_path, monkeypatch):
    """A robustpool.py that imported but lacked the names the bench calls (a Huber class
    only) crashed `convexddn bench` with an AttributeError; the node rows' check of the
    names (load_reference_names) now covers the pooling comparison too."""
    from convexddn.bench.cases import pooling
    from convexddn.bench.report import _ddn_table

    _write_reference(tmp_path, monkeypatch, {"robustpool.py": "import torch\nclass Huber:\n    pass\n"})
    expected = ("the DDN reference's ddn/pytorch/robustpool.py has no RobustGlobalPool2dFn, Quadratic, "
                "PseudoHuber, Welsch, TruncatedQuadratic")
    x, g = pooling._inputs((2, 4, 16), torch.device("cpu"), torch.float32)
    assert pooling.ddn_comparison(x, g, torch.device("cpu"), 1, _Bar()) == ({}, expected)
    rows = pooling.pool_cases((2, 4, 16), torch.device("cpu"), torch.float32, False, 1, _Bar())
    native = [r for r in rows if r["path"] == "native"]
    assert native and all(r["ddn_reference"] == expected for r in native)
    assert f"Not measured: {expected}." in _ddn_table(rows)


# Every name the bench calls; the pooling function raises for Welsch alone (a bug of this
# reference), else pools by the mean over the last two dims (differentiable).
_RAISING_POOL = """
import torch
class Quadratic: pass
class PseudoHuber: pass
class Huber: pass
class Welsch: pass
class TruncatedQuadratic: pass
class RobustGlobalPool2dFn:
    @staticmethod
    def apply(x, method, alpha):
        if method is Welsch:
            raise ValueError("no welsch here")
        return x.mean(dim=(-2, -1))
"""


def test_a_reference_call_that_raises_is_a_note_for_its_row(tmp_path, monkeypatch):
    """An exception the reference's own call raised during the comparison ended the whole
    bench; now that penalty's row says what was raised and the others are measured."""
    from convexddn.bench.cases import pooling
    from convexddn.bench.report import _ddn_table

    _write_reference(tmp_path, monkeypatch, {"robustpool.py": _RAISING_POOL})
    why = "the DDN reference raised ValueError: no welsch here"
    x, g = pooling._inputs((2, 4, 16), torch.device("cpu"), torch.float32)
    figures, _ = pooling.ddn_comparison(x, g, torch.device("cpu"), 2, _Bar())
    assert figures["welsch"] == {"ddn_error": why}
    assert all(figures[p]["ddn_rounds"] == 2 for p in pooling.POOL_PENALTIES if p != "welsch")
    rows = pooling.pool_cases((2, 4, 16), torch.device("cpu"), torch.float32, False, 1, _Bar())
    native = {r["node"]: r for r in rows if r["path"] == "native"}
    assert native["welsch"]["ddn_error"] == why and "speedup_vs_ddn_reference" not in native["welsch"]
    assert native["welsch"]["ddn_float64"] == {"ddn_error": why}
    assert "fwd_speedup_vs_ddn" in native["huber"] and "fwd_speedup_vs_ddn" in native["huber"]["ddn_float64"]
    table = _ddn_table(rows)
    assert f"Not measured for welsch at (2, 4, 16), float32: {why}." in table
    assert f"Not measured for welsch at (2, 4, 16), float64: {why}." in table
    assert not [ln for ln in table if ln.startswith("| welsch")]
    assert [ln for ln in table if ln.startswith("| huber | (2, 4, 16) |")]


def test_a_goal_is_not_met_by_one_dtype_where_the_other_raised():
    """A row whose float32 reference call raised and whose float64 figures meet the goal
    showed ✓, from the figures present alone; it is not measured in float32: "—"."""
    from convexddn.bench.report import _ddn_table

    good = {"fwd_speedup_vs_ddn": 12.0, "bwd_speedup_vs_ddn": 2.0, "ddn_goal_met": True}
    row = {"family": "pooling", "node": "welsch", "shape": [2, 4, 16], "dtype": "float32",
           "ddn_error": "the DDN reference raised ValueError: x", "ddn_float64": good}
    both = {"family": "pooling", "node": "huber", "shape": [2, 4, 16], "dtype": "float32", **good,
            "ddn_float64": good}
    table = _ddn_table([row, both])
    assert [ln for ln in table if ln.startswith("| welsch |") and ln.endswith("| — |")], table
    assert [ln for ln in table if ln.startswith("| huber |") and ln.endswith("| ✓ |")], table


def test_a_node_reference_call_that_raises_is_a_note(tmp_path, monkeypatch):
    """Likewise in the node library: the reference's call raising is that row's note."""
    from convexddn.bench.cases import nodes

    _write_reference(tmp_path, monkeypatch, {"tridiagsolve.py": (
        "class TriDiagSolveFcn:\n    @staticmethod\n    def apply(*args):\n"
        "        raise RuntimeError('cyclic reduction went astray')\n")})
    ref = nodes._Ref("tridiagsolve.py", ("TriDiagSolveFcn",), lambda m: (lambda x: m.TriDiagSolveFcn.apply(x)))
    x = torch.randn(4, 8, dtype=torch.float64)
    monkeypatch.setattr(nodes, "_cases", lambda gen: [("doubling", "(4, 8)", lambda t: 2 * t, [x], ref)])
    (row,) = nodes.node_cases(3, _Bar())
    assert row["note"] == "the DDN reference raised RuntimeError: cyclic reduction went astray"
    assert row["fwd_ms"] > 0 and row["rounds"] == 3 and "speedup_fwd" not in row


# ------------------------------------------------------------ rounds and the report


def test_repeats_reach_the_worker_rows(monkeypatch):
    """run() called workers_speedup() without --repeats: the worker rows ran their own 3
    rounds whatever was asked, under a footnote giving the run's count."""
    import convexddn.bench as bench

    seen = []
    for name in ("pool_cases", "projection_cases", "node_cases", "convex_cases"):
        monkeypatch.setattr(bench, name, lambda *a, **k: [])
    monkeypatch.setattr(bench, "peak_memory", lambda *a: [])
    monkeypatch.setattr(bench, "workers_speedup", lambda **k: seen.append(k.get("repeats")) or [])
    bench.run(repeats=7, out=None)
    bench.run(out=None)
    assert seen == [7, 5]


def test_worker_rows_warm_up_the_backward_and_record_their_rounds(monkeypatch):
    """The warm-up ran each path's forward only: its first backward fell into timed round
    0. And the rows did not say how many rounds their medians are of."""
    from convexddn.bench.cases import workers

    log = []

    class Hook(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, tag):
            ctx.tag = tag
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            log.append((ctx.tag, "bwd"))
            return g, None

    paths = iter(range(100))

    def fake(*_a, **_k):  # a path (layer, NNLS layer, cvxpylayers' pool) with its own tag
        tag = next(paths)

        def call(*args):
            log.append((tag, "fwd"))
            return Hook.apply(args[0], tag)
        return call

    class Clock:
        @staticmethod
        def perf_counter():
            log.append((None, "clock"))
            return float(len(log))

    monkeypatch.setattr(workers, "layer", fake)
    monkeypatch.setattr(workers, "_nnls_layer", fake)
    monkeypatch.setattr(workers, "_cvxpylayers_jobs", fake)
    monkeypatch.setattr(workers, "time", Clock)
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 2)
    rows = workers.workers_speedup(batch=2, repeats=2)
    assert rows and all(r["rounds"] == 2 for r in rows)
    tags = {t for t, _ in log if t is not None}
    assert len(tags) == 8  # 2 problems x 2 paths x {1, 2 cores} workers
    for t in tags:
        # Each path's first backward comes before the clock first starts after its first
        # forward: in the warm-up, not in a timed round.
        first_fwd = log.index((t, "fwd"))
        first_clock = next(i for i in range(first_fwd, len(log)) if log[i] == (None, "clock"))
        assert log.index((t, "bwd")) < first_clock, t


def test_ddn_table_labels_its_columns_with_the_rows_dtype():
    """The header said `fwd float32 | bwd float32 | fwd float64 | bwd float64` whatever the
    dtypes: a float64 run's ratios appeared under "float32"."""
    from convexddn.bench.report import _ddn_table

    fig = {"fwd_speedup_vs_ddn": 12.0, "bwd_speedup_vs_ddn": 2.0, "ddn_goal_met": True}
    row = {"family": "pooling", "node": "huber", "path": "native", "shape": [2, 4, 16], "dtype": "float64", **fig}
    table = _ddn_table([row])
    assert "| penalty | shape | fwd float64 | bwd float64 | goal fwd ≥ 10×, bwd ≥ 1.5× |" in table
    assert "| huber | (2, 4, 16) | 12× | 2× | ✓ |" in table
    both = _ddn_table([{**row, "dtype": "float32", "ddn_float64": {**fig, "fwd_speedup_vs_ddn": 9.0,
                                                                   "ddn_goal_met": False}}])
    assert "| penalty | shape | fwd float32 | bwd float32 | fwd float64 | bwd float64 |" in both[2]
    assert "| huber | (2, 4, 16) | 12× | 2× | 9× | 2× | ✗ |" in both


def _footnote(**result) -> str:
    from convexddn.bench.report import format_table

    machine = {"processor": "x", "cpu_count": 2, "torch": "t", "torch_threads": 2, "device": "cpu"}
    table = format_table({"machine": machine, "rows": [], **result})
    return next(ln for ln in table.splitlines() if ln.startswith("Machine:"))


def test_footnote_claims_only_the_rounds_that_ran():
    """The footnote gave "the DDN reference at the paper's shape: 1, its own interleaved
    rounds" with no DDN row at that shape (--quick, or no reference), said "1 rounds",
    and named no cap for the convex rows nor the worker rows' own 3 rounds."""
    quick = _footnote(repeats=1, rounds={"convex": 1, "ddn_paper": 1})
    assert "medians of 1 round (the convex path: at most 1; cone-program rows" in quick
    assert "DDN reference" not in quick

    def paper(node, ddn_rounds):
        from convexddn.bench.cases.common import row_record

        row = row_record("pooling", node, "native", (24, 1024, 2048), torch.float32, "cpu", 1.0, 1.0, 1.0, 1.0, 5)
        return {**row, "ddn_rounds": ddn_rounds}

    convex = [{"family": "convex", "problem": "qp50", "path": "p", "rounds": 3}]
    workers = [{"problem": "qp", "path": "p", "batch": 4, "cores": 2, "seconds_1_process": 1.0,
                "seconds_workers": 1.0, "speedup": 1.0}]  # written before rows had rounds: 3
    full = _footnote(repeats=10, rounds={"convex": 3, "ddn_paper": 2}, convex=convex, workers=workers,
                     rows=[paper("huber", 2), paper("welsch", 2)])
    assert ("medians of 10 rounds (the convex path: 3, of --repeats at most 3: a round of its slow rows "
            "takes minutes; the DDN reference at the paper's shape: 2 (of --repeats at most 2: its forward "
            "takes seconds there), its own interleaved rounds; the worker-process rows: 3; cone-program rows"
            ) in full
    same = _footnote(repeats=2, rounds={"convex": 2, "ddn_paper": 2}, rows=[paper("huber", 2)],
                     workers=[{**workers[0], "rounds": 2}])
    assert "the DDN reference at the paper's shape: 2, its own interleaved rounds;" in same
    assert "worker-process" not in same and "of --repeats" not in same
    # A default run: the cheap convex rows got more than --repeats, the slow ones the cap (it said "3–15 …,
    # of --repeats at most 3", both at once).
    spread = _footnote(repeats=5, rounds={"convex": 3, "ddn_paper": 2}, convex=[{**convex[0], "rounds": 15}, *convex])
    assert ("the convex path: 3–15 interleaved rounds by cost, each row's in bench.json, its slow rows at most 3 "
            "of the 5: a round of them takes minutes;") in spread
    assert "at most 3:" not in spread
