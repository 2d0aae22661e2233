"""Shared fixtures.

``on_other_device`` turns a CPU tensor into one that reports ``cuda:0`` as its device:
it reaches a node's device check without a second device.

``host_reads`` counts the places where torch code reads a tensor's values back to
Python (``bool()``, ``int()``, ``float()``, ``.item()``, ``.tolist()``, ``.nonzero()``,
indexing with a boolean tensor): each is a host synchronisation on CUDA. Counting
them on the CPU checks the "one host read per iteration" promises of the batched
solvers without a GPU.

``exact_solve`` solves a square linear system in exact rationals: the reference for
solutions whose data are float64 numbers (normal equations, stationarity conditions).
"""
from __future__ import annotations

import contextlib
from fractions import Fraction

import pytest
import torch


class HostReads:
    """A counter of host reads; use as ``with host_reads.counting(): ...``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self._monkeypatch = monkeypatch

    def _counted(self, mp: pytest.MonkeyPatch, name: str, owner=torch.Tensor) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        mp.setattr(owner, name, wrapper)

    def _counted_index(self, mp: pytest.MonkeyPatch, name: str) -> None:
        original = getattr(torch.Tensor, name)

        def wrapper(tensor, index, *args):
            keys = index if isinstance(index, tuple) else (index,)
            if any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys):
                self.count += 1  # a boolean mask index is a nonzero(), a sync on CUDA
            return original(tensor, index, *args)

        mp.setattr(torch.Tensor, name, wrapper)

    @contextlib.contextmanager
    def counting(self):
        self.count = 0
        with self._monkeypatch.context() as mp:
            for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero"):
                self._counted(mp, name)
            self._counted(mp, "nonzero", torch)
            self._counted_index(mp, "__getitem__")
            self._counted_index(mp, "__setitem__")
            yield self


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> HostReads:
    return HostReads(monkeypatch)


@pytest.fixture
def step_graphs(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every :class:`~convexddn._step_graphs.StepGraphs` made while the test runs (clear
    the list between solves): their ``site``, ``capture``, ``replays`` and ``reason``."""
    import convexddn._step_graphs as sg

    made: list = []
    init = sg.StepGraphs.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(sg.StepGraphs, "__init__", recording)
    return made


class _OnOtherDevice(torch.Tensor):
    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.fixture
def on_other_device():
    return lambda t: t.as_subclass(_OnOtherDevice)


def _exact_solve(M, rhs) -> torch.Tensor:
    """x with M x = rhs, computed in exact rationals (Gauss–Jordan) and rounded once:
    ``M`` (n, n) and ``rhs`` (n,) of floats (taken exactly) or Fractions."""
    n = len(rhs)
    rows = [[Fraction(v) for v in M[i]] + [Fraction(rhs[i])] for i in range(n)]
    for col in range(n):
        for i in range(n):
            if i != col:
                f = rows[i][col] / rows[col][col]
                rows[i] = [a - f * c for a, c in zip(rows[i], rows[col])]
    return torch.tensor([float(rows[i][n] / rows[i][i]) for i in range(n)], dtype=torch.float64)


def normal_equations(A, b, w=None, ridge=0.0):
    """(AᵀWA + ρI, AᵀWb) of float64 data, exactly, as Fractions."""
    Af = [[Fraction(v) for v in row] for row in A]
    bf = [Fraction(v) for v in b]
    wf = [Fraction(1) if w is None else Fraction(v) for v in (b if w is None else w)]
    m, n = len(Af), len(Af[0])
    H = [[sum(wf[k] * Af[k][i] * Af[k][j] for k in range(m)) + (Fraction(ridge) if i == j else 0)
          for j in range(n)] for i in range(n)]
    return H, [sum(wf[k] * Af[k][i] * bf[k] for k in range(m)) for i in range(n)]


@pytest.fixture
def exact_solve():
    """``(solve, normal_equations)``: see :func:`_exact_solve` and :func:`normal_equations`."""
    return _exact_solve, normal_equations


@contextlib.contextmanager
def _default_device(device: str, how: str = "set"):
    """torch's default device is ``device`` within: set by ``torch.set_default_device`` (as a
    user's CUDA default; ``how="set"``) or by ``with torch.device(device)`` (``"context"``)."""
    if how == "context":
        with torch.device(device):
            yield
        return
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.fixture
def default_device():
    """:func:`_default_device`: ``with default_device("meta"[, how]):`` (meta stands in for CUDA)."""
    return _default_device
