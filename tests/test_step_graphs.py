"""convexddn._step_graphs: the bookkeeping of kept graphs (the captures themselves need
CUDA: tests/convex/test_batched.py)."""
from __future__ import annotations

import convexddn._step_graphs as sg


def test_graphs_kept_at_a_site_whose_capture_failed_since_are_dropped(monkeypatch):
    """A failed capture makes a site's later loops run eagerly, but graphs kept there
    before the failure were still handed out: they replayed on, captured their other
    variants and warned again."""
    monkeypatch.setattr(sg.StepGraphs, "_failed", {})
    monkeypatch.setattr(sg.StepGraphs, "_kept", sg.OrderedDict())
    earlier, other = sg.StepGraphs(False, "ipm"), sg.StepGraphs(False, "pool")
    sg.StepGraphs._kept[("ipm", 1)] = earlier
    sg.StepGraphs._kept[("ipm", 2)] = sg.StepGraphs(False, "ipm")
    sg.StepGraphs._kept[("pool", 1)] = other
    # Before a failure the kept graphs come back.
    assert sg.StepGraphs.kept("ipm", 1) is earlier
    sg.StepGraphs._kept[("ipm", 1)] = earlier
    sg.StepGraphs._failed["ipm"] = "TypeError: capture failed"
    got = sg.StepGraphs.kept("ipm", 1)
    assert got is not earlier and not got.capture and got.reason == "TypeError: capture failed"
    assert list(sg.StepGraphs._kept) == [("pool", 1)]  # the site's others dropped, other sites kept
    assert sg.StepGraphs.kept("pool", 1) is other
