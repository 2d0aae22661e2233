"""The benchmark harness times full gradients (convexddn/bench/harness.py)."""
from __future__ import annotations

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
    monkeypatch.setattr(bench, "workers_speedup", lambda: [])
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
