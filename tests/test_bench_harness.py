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
