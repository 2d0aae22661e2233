"""Every warning of the library names the caller's line (convexddn/_warn.py).

The native nodes warned with fixed ``stacklevel`` values, which count frames: a node
called through its ``nn.Module`` (two more frames: ``Module.__call__``) or a warning
raised in a backward (the autograd engine's frames, the library's autograd wrapper) named
a line of the library or of torch instead, so the printed location and module-specific
warning filters missed the user's code. Each case below warned from the wrong file before.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from convexddn.errors import ConvexDDNWarning
from convexddn.functional import robust_pool
from convexddn.nodes.declarative import DeclarativeNode
from convexddn.nodes.eigen import EigenDecomposition, eigen_decomposition
from convexddn.nodes.pooling import RobustPool
from convexddn.nodes.transport import OptimalTransport, sinkhorn

DT = torch.float64


class _Ball(DeclarativeNode):
    """Projection onto ‖y‖² ≤ 1 with a redundant box y ≤ 1: at x = (3, 0, 0) the face y₀ ≤ 1
    touches the ball at the solution, both active with parallel gradients (LICQ fails), so the
    backward warns."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return torch.cat([(y * y).sum(-1, keepdim=True) - 1, y - 1], -1)

    def solve(self, x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1.0)


def _outliers() -> torch.Tensor:
    x = torch.randn(4, 50, dtype=DT, generator=torch.Generator().manual_seed(0))
    x[:, :5] += 8.0
    return x


def _costs() -> torch.Tensor:
    return torch.randn(2, 20, 20, dtype=DT, generator=torch.Generator().manual_seed(1))


def _degenerate_backward(eig) -> None:
    X = torch.eye(4, dtype=DT).repeat(2, 1, 1).requires_grad_()
    V = eig(X)
    (V * torch.linspace(-1, 1, V.numel(), dtype=DT).view_as(V)).sum().backward()


def _dependent_backward() -> None:
    x = torch.tensor([[3.0, 0.0, 0.0]], dtype=DT, requires_grad=True)
    _Ball()(x).backward(torch.tensor([[0.0, 1.0, 0.0]], dtype=DT))


CASES = {
    # forward, function and Module: a SolverWarning (iterations stopped by max_iter)
    "robust_pool": lambda: robust_pool(_outliers(), "welsch", 1.0, max_iter=1),
    "RobustPool": lambda: RobustPool("welsch", 1.0, max_iter=1)(_outliers()),
    "sinkhorn": lambda: sinkhorn(_costs(), eps=0.01, max_iter=2),
    "OptimalTransport": lambda: OptimalTransport(eps=0.01, max_iter=2)(_costs()),
    # backward: a GradientWarning (repeated eigenvalues; dependent constraints)
    "eigen_decomposition backward": lambda: _degenerate_backward(lambda X: eigen_decomposition(X)[1]),
    "EigenDecomposition backward": lambda: _degenerate_backward(lambda X: EigenDecomposition()(X)[1]),
    "DeclarativeNode backward": _dependent_backward,
}


@pytest.mark.parametrize("case", list(CASES))
def test_node_warnings_name_the_callers_line(case):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CASES[case]()
    ours = [w for w in caught if issubclass(w.category, ConvexDDNWarning)]
    assert ours, f"{case}: no warning raised (the case no longer exercises a warning)"
    assert all(w.filename == __file__ for w in ours), [(w.category.__name__, w.filename, w.lineno) for w in ours]


def test_a_module_filter_on_the_callers_module_silences_node_warnings():
    """``warnings.filterwarnings(..., module=...)`` matches the module the warning is
    attributed to: the caller's, now, for a Module call too."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=ConvexDDNWarning, module=__name__)
        RobustPool("welsch", 1.0, max_iter=1)(_outliers())
    assert not [w for w in caught if issubclass(w.category, ConvexDDNWarning)]


def test_suppressed_holds_this_threads_library_warnings_only():
    """A warnings filter is process-wide: held in one thread, it dropped every other
    thread's warnings, and two threads inside at once left it installed."""
    import threading

    from convexddn._warn import suppressed, warn

    inside, done = threading.Event(), threading.Event()

    def other() -> None:
        inside.wait(5)
        warn("another thread's", ConvexDDNWarning)
        done.set()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        t = threading.Thread(target=other)
        t.start()
        with suppressed():
            warn("held", ConvexDDNWarning)
            inside.set()
            done.wait(5)
            warnings.warn("not the library's", UserWarning)
            assert warnings.filters == filters
        warn("after", ConvexDDNWarning)
        t.join()
    assert [str(w.message) for w in caught] == ["another thread's", "not the library's", "after"]
