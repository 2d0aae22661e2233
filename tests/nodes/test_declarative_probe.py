"""The first-call probe of a DeclarativeNode (convexddn/nodes/declarative_probe.py)."""
from __future__ import annotations

import contextlib
import threading

import torch

import convexddn.nodes.declarative_probe as dp
from convexddn.nodes.declarative import DeclarativeNode

DT = torch.float64


class _FrozenWeighted(DeclarativeNode):
    """y = argmin_u Σ_i w_i (u − x_i)² with a frozen parameter w; the probe of thread ``pause``
    stops inside its objective (its stand-ins swapped in) until ``go`` is set."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 1.0, 1.0], dtype=DT), requires_grad=False)
        self.pause, self.inside, self.go = None, threading.Event(), threading.Event()

    def objective(self, x, y):
        if threading.current_thread() is self.pause:
            self.inside.set()
            self.go.wait(10.0)
        return (self.w * (y - x) ** 2).sum(-1)

    def solve(self, x):
        return (self.w * x).sum(-1, keepdim=True) / self.w.sum()


def test_another_threads_probe_swapped_in_is_no_false_unread_parameter(monkeypatch):
    """The probe named the parameters that require grad from the node after leaving its swap
    guard, where another thread's probe may have its stand-ins (which require grad) swapped in:
    the frozen w was said to "require grad but neither the objective nor the constraints depend
    on them" (4 of 30 runs of 4 threads). Here the other thread's probe is held inside its swap
    exactly then. (Frozen w, nothing requires grad: no warning is right.)"""
    node = _FrozenWeighted()
    x = torch.tensor([[0.0, 1.0, 2.0, 4.0]], dtype=DT)
    y = node.solve(x)
    warned, real = [], dp.guarded
    monkeypatch.setattr(dp, "warn", lambda message, category, **kw: warned.append(message))
    other = threading.Thread(target=dp.probe, args=(node, (x,), y))
    node.pause = other

    @contextlib.contextmanager
    def then_the_other(module, swap):
        with real(module, swap):
            yield
        if threading.current_thread() is threading.main_thread() and not other.is_alive():
            other.start()  # (its probe swaps in its stand-ins and waits inside the objective)
            assert node.inside.wait(10.0)

    monkeypatch.setattr(dp, "guarded", then_the_other)
    try:
        dp.probe(node, (x,), y)
    finally:
        node.go.set()
        other.join(10.0)
    assert warned == []
    assert not node.w.requires_grad
