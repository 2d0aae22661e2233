"""convexddn._step_graphs: the bookkeeping of kept graphs (the captures themselves need
CUDA: tests/convex/test_batched.py)."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import convexddn._step_graphs as sg
from convexddn.errors import ConvexDDNWarning


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


class _NotCapturable:
    """A CUDA graph whose capture fails, as an op that cannot be captured makes it."""

    def capture_begin(self, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    def capture_end(self):
        pass


class _Stream:
    def __init__(self, *args):
        pass

    def wait_stream(self, other):
        pass


def test_a_failed_capture_is_not_marked_by_a_call_its_warning_failed(monkeypatch):
    """Where warnings are errors the capture-failure warning raises and the call fails; the
    site was marked failed before the warning, so its later loops ran eagerly and nothing
    said so (a failed call changed the process's state). Now the site is marked only once the
    warning returned: the next loop tries again and raises again. (CUDA's graph and streams
    are stand-ins: the bookkeeping runs on CPU.)"""
    monkeypatch.setattr(sg.StepGraphs, "_failed", {})
    monkeypatch.setattr(sg.torch.cuda, "CUDAGraph", _NotCapturable)
    monkeypatch.setattr(sg.torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(sg.torch.cuda, "current_stream", _Stream)
    monkeypatch.setattr(sg.torch.cuda, "stream", lambda s: contextlib.nullcontext())

    def attempt() -> sg.StepGraphs:
        graphs = sg.StepGraphs(True, "ipm")
        assert graphs.capture  # (a site marked failed is not tried: capture False)
        graphs._buffers = [torch.zeros(2)]
        assert graphs._capture(lambda u: (u + 1,)) is None
        return graphs

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvexDDNWarning)
        for _ in range(2):
            with pytest.raises(ConvexDDNWarning, match="could not be captured as a CUDA graph"):
                attempt()
            assert sg.StepGraphs._failed == {}
    with pytest.warns(ConvexDDNWarning, match="could not be captured as a CUDA graph"):
        attempt()
    assert sg.StepGraphs._failed == {"ipm": "RuntimeError: operation not permitted when stream is capturing"}
    assert not sg.StepGraphs(True, "ipm").capture
