"""Caches that grew with every call of a long run: each of these kept what the user
made per call (a penalty, a DeclarativeNode class) alive for the rest of the process."""
from __future__ import annotations

import dataclasses
import gc
import weakref

import torch

from convexddn.functional import robust_pool
from convexddn.nodes.declarative import DeclarativeNode
from convexddn.nodes.pooling import Penalty, kernels

F64 = torch.float64


class _Scaled(Penalty):
    """Huber of z / scale times scale²: a user's penalty with state of its own."""

    name = "scaled_huber"
    convex = True

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def phi(self, z, alpha):
        r, a = (z / self.scale).abs(), alpha / self.scale
        return self.scale**2 * torch.where(r <= a, 0.5 * r * r, a * (r - 0.5 * a))

    def dphi(self, z, alpha):
        return self.scale * torch.maximum(torch.minimum(z / self.scale, alpha / self.scale), -alpha / self.scale)

    def d2phi(self, z, alpha):
        return ((z / self.scale).abs() <= alpha / self.scale).to(z.dtype)

    def d2phi_dalpha(self, z, alpha):
        return torch.where((z / self.scale).abs() <= alpha / self.scale, torch.zeros_like(z), torch.sign(z))

    def irls_weight(self, z, alpha):
        return torch.where(z.abs() <= alpha, torch.ones_like(z), alpha / z.abs().clamp_min(1e-300))


@dataclasses.dataclass
class _Frozen(_Scaled):
    """A dataclass penalty: compares by value, so it is unhashable."""

    scale: float = 1.0


def test_compiled_pooling_kernels_do_not_keep_per_call_penalties(monkeypatch):
    """compile=True kept a fused kernel per penalty instance in functools.cache and in a
    dict: a penalty made per call was never freed (nor its compiled kernel)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the cache, not the compiler
    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels, "_COMPILED_MAX", 8, raising=False)
    x = torch.randn(3, 12, dtype=F64, generator=torch.Generator().manual_seed(0))
    first = _Scaled()
    ref = weakref.ref(first)
    expected = robust_pool(x, first, 0.5, compile=False)
    torch.testing.assert_close(robust_pool(x, first, 0.5, compile=True), expected)
    del first
    for _ in range(12):
        robust_pool(x, _Scaled(), 0.5, compile=True)
    gc.collect()
    assert ref() is None
    assert len(kernels._COMPILED) <= 8


def test_compiled_pooling_with_an_unhashable_penalty(monkeypatch):
    """The kernels were keyed by the penalty itself: a dataclass penalty raised TypeError."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    monkeypatch.setattr(kernels, "_COMPILED", {})
    x = torch.randn(3, 12, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(robust_pool(x, _Frozen(2.0), 0.5, compile=True),
                               robust_pool(x, _Frozen(2.0), 0.5, compile=False))


def test_declarative_classes_made_per_call_are_freed():
    """A DeclarativeNode subclass defined in a function called per step: the signature
    cache (functools.cache) kept every class."""
    refs = []
    x = torch.randn(2, 3)
    for _ in range(400):
        class Mean(DeclarativeNode):
            def objective(self, x, y):
                return ((y - x) ** 2).sum(-1)

            def solve(self, x):
                return x.clone()

        with torch.no_grad():
            Mean()(x)
        refs.append(weakref.ref(Mean))
    del Mean
    gc.collect()
    assert refs[0]() is None


def test_declarative_classes_made_per_call_free_what_they_capture():
    """Not only the 400th class back: none of them may stay. A bounded cache (lru_cache
    keyed by the class) still kept the last ~340 classes and every tensor their methods
    closed over (4 MiB each in the report: 1.3 GB)."""
    refs = []
    x = torch.randn(2, 3)
    for _ in range(20):
        big = torch.zeros(256)

        class Shifted(DeclarativeNode):
            def objective(self, x, y, big=big):
                return ((y - x - big[0]) ** 2).sum(-1)

            def solve(self, x, big=big):
                return x + big[0]

        with torch.no_grad():
            Shifted()(x)
        refs.append(weakref.ref(big))
    del Shifted, big
    gc.collect()
    assert sum(r() is not None for r in refs) == 0


def test_pooling_sample_positions_do_not_grow_with_row_lengths():
    """Welsch starts rows longer than 512 from a sample at positions cached per row
    length: a dict kept one index tensor for every length ever seen (point clouds of a
    new size in every batch grew it without bound). Now the most recent few."""
    from convexddn.nodes.pooling import solvers

    gen = torch.Generator().manual_seed(0)
    for n in range(513, 513 + 100):
        robust_pool(torch.randn(1, n, generator=gen), "welsch", 1.0)
    # (no module-level dict keeps them: the old one held all 100)
    sizes = [len(v) for k, v in vars(solvers).items() if isinstance(v, dict) and not k.startswith("__")]
    assert max(sizes, default=0) < 100
    info = solvers._positions.cache_info()
    assert info.misses >= 64 and info.currsize <= 64  # (used, and bounded)
