"""A DeclarativeNode converted (``.half()``, ``.bfloat16()``, ``.double()``, ``.float()``) between a
forward and its backward: the backward differentiates the problem the forward solved, at the
parameters as they were then. ``nn.Module._apply`` points each parameter at a converted copy
(``param.data = ...``, no version bump); the backward read the rounded values: after ``.half()``
every row's dL/dx was 6e-5 off (float32 accuracy: 1e-6), silently but for a GradientWarning that
blamed ``solve`` for one row. ``nn.Linear`` keeps the forward's values in the same scenario.

Expected values: the closed form of the weighted mean ``y = Σ w_i x_i / Σ w_i``, ``w = exp(log_w)``,
in float64 at the forward's parameters:
``dL/dx_bi = G_b w_i / Σw``, ``dL/dlog_w_i = w_i Σ_b G_b (x_bi − y_b) / Σw``.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import convexddn as cddn
from convexddn.errors import InputError

F64 = torch.float64


class WeightedMean(cddn.DeclarativeNode):
    """y = argmin_u Σ_i s w_i (u − x_i)², w = exp(log_w): the weighted mean (``s > 0`` a frozen scale)."""

    def __init__(self, n: int, dtype: torch.dtype, frozen: bool = False):
        super().__init__()
        log_w = torch.linspace(-0.5, 0.5, n, dtype=dtype) + 0.0123  # (not exact in float16 / bfloat16)
        self.log_w = nn.Parameter(log_w, requires_grad=not frozen)
        self.scale = nn.Parameter(torch.tensor(1.0, dtype=dtype) / 3, requires_grad=False)

    def objective(self, x, y):
        return (self.scale * self.log_w.exp() * (y - x) ** 2).sum(-1)

    def solve(self, x):
        w = self.log_w.exp()
        return (w * x).sum(-1, keepdim=True) / w.sum()


def _closed_form(log_w: torch.Tensor, x: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dlog_w) of L = Σ_b G_b y_b, in float64."""
    w, x, G = log_w.to(F64).exp(), x.to(F64), G.to(F64)
    y = (w * x).sum(-1, keepdim=True) / w.sum()
    return G * w / w.sum(), w * (G * (x - y)).sum(0) / w.sum()


def _data(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 6, generator=g).to(dtype).requires_grad_(), torch.randn(8, 1, generator=g).to(dtype)


def _linear_grad_dtype(dtype: torch.dtype, convert: str) -> torch.dtype:
    """The dtype of ``weight.grad`` that torch gives ``nn.Linear`` in the same scenario."""
    lin = nn.Linear(3, 2, dtype=dtype)
    out = lin(torch.randn(4, 3, dtype=dtype)).sum()
    getattr(lin, convert)()
    out.backward()
    return lin.weight.grad.dtype


# (forward's dtype, the conversion between forward and backward, the tolerance of the forward's dtype)
CASES = [(torch.float32, "half", 2e-6), (torch.float32, "bfloat16", 2e-6), (torch.float32, "double", 2e-6),
         (F64, "float", 1e-12), (F64, "half", 1e-12)]


@pytest.mark.parametrize("dtype,convert,rtol", CASES)
def test_backward_after_conversion_is_the_forwards(dtype, convert, rtol):
    """The inputs' and the parameter's gradients are those at the forward's parameters (before: 6.2e-5 off after
    .half(), 4.6e-4 after .bfloat16(), 9.9e-9 float64 -> .float()); no warning; the parameter's ``.grad`` in the
    dtype torch gives nn.Linear's weight in the same scenario (the forward's)."""
    node = WeightedMean(6, dtype)
    log_w0 = node.log_w.detach().clone()
    x, G = _data(dtype)
    y = node(x)
    getattr(node, convert)()
    assert node.log_w.dtype != log_w0.dtype  # (the conversion happened)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (y * G).sum().backward()
    want_x, want_w = _closed_form(log_w0, x.detach(), G)
    torch.testing.assert_close(x.grad.to(F64), want_x, rtol=rtol, atol=0)
    assert node.log_w.grad.dtype == _linear_grad_dtype(dtype, convert)
    torch.testing.assert_close(node.log_w.grad.to(F64), want_w, rtol=rtol, atol=rtol * float(want_w.abs().max()))


@pytest.mark.parametrize("convert", ["half", "double"])
def test_frozen_parameter_keeps_the_forwards_value(convert):
    """A parameter that does not require grad (a constant of the problem) is read at its forward value too."""
    node = WeightedMean(6, torch.float32, frozen=True)
    log_w0 = node.log_w.detach().clone()
    x, G = _data(torch.float32)
    y = node(x)
    getattr(node, convert)()
    (y * G).sum().backward()
    torch.testing.assert_close(x.grad.to(F64), _closed_form(log_w0, x.detach(), G)[0], rtol=2e-6, atol=0)
    assert node.log_w.grad is None


def test_to_same_device_changes_nothing(monkeypatch):
    """``.to(device="cpu")`` on a CPU node between forward and backward: the parameter itself is
    differentiated (its storage did not move: no held copy read), and the gradients are bit for bit those
    of a backward without it."""
    from convexddn.nodes import declarative_function

    seen = []
    real = declarative_function.backward_targets
    monkeypatch.setattr(declarative_function, "backward_targets", lambda *a: seen.append(real(*a)) or seen[-1])
    grads = []
    for move in (False, True):
        node = WeightedMean(6, torch.float32)
        x, G = _data(torch.float32)
        y = node(x)
        if move:
            node.to(device="cpu")
        (y * G).sum().backward()
        grads.append((x.grad, node.log_w.grad))
        targets, _, owners = seen[-1]
        assert len(targets) == 1 and targets[0] is node.log_w and owners == [(0,)]
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_in_place_change_still_raises():
    """An in-place change between forward and backward still raises: autograd's error for a parameter that
    requires grad (as nn.Linear's), the node's InputError for a frozen one; after a conversion too."""
    for convert in (None, "half"):
        node = WeightedMean(6, torch.float32)
        x, _ = _data(torch.float32)
        y = node(x)
        if convert:
            getattr(node, convert)()
        with torch.no_grad():
            node.log_w.add_(0.1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
    node = WeightedMean(6, torch.float32)
    x, _ = _data(torch.float32)
    y = node(x)
    with torch.no_grad():
        node.scale.mul_(2.0)
    with pytest.raises(InputError, match=r"\['scale'\].*modified in place"):
        y.sum().backward()


class TiedMean(cddn.DeclarativeNode):
    """The weighted mean with its log-weights held by two submodules (tied): ``a.weight is b.weight``."""

    def __init__(self, n: int):
        super().__init__()
        self.a = nn.Linear(n, 1, bias=False)
        self.b = nn.Linear(n, 1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.linspace(-0.5, 0.5, n) + 0.0123)
        self.b.weight = self.a.weight

    def objective(self, x, y):
        half_a, half_b = 0.5 * self.a.weight[0].exp(), 0.5 * self.b.weight[0].exp()  # (w, read through both names)
        return (half_a * (y - x) ** 2).sum(-1) + (half_b * (y - x) ** 2).sum(-1)

    def solve(self, x):
        w = self.a.weight[0].exp()
        return (w * x).sum(-1, keepdim=True) / w.sum()


def test_tied_parameter_after_half():
    """A parameter held under two names gets the whole gradient, at the forward's value, after .half()."""
    node = TiedMean(6)
    log_w0 = node.a.weight.detach()[0].clone()
    x, G = _data(torch.float32)
    y = node(x)
    node.half()
    (y * G).sum().backward()
    want_x, want_w = _closed_form(log_w0, x.detach(), G)
    torch.testing.assert_close(x.grad.to(F64), want_x, rtol=2e-6, atol=0)
    torch.testing.assert_close(node.a.weight.grad[0].to(F64), want_w, rtol=2e-6, atol=2e-6 * float(want_w.abs().max()))



class Ball(cddn.DeclarativeNode):
    """y = argmin_{‖u‖ <= r} ½‖u − x‖² (x scaled onto the ball), the radius ``r = Σ e^{s} + 1`` an attribute that
    ``solve`` computes with its graph from the parameter ``s`` (4-d: it has a channels-last layout): the
    constraint reads the parameter only through that graph, which reaches the parameter object itself."""

    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(-1.3, -1.1, 8, dtype=F64).reshape(1, 2, 2, 2) + shift)

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - self.r ** 2

    def solve(self, x):
        with torch.enable_grad():
            self.r = self.s.exp().sum() + 1.0
        return x * torch.clamp(self.r.detach() / x.norm(dim=-1, keepdim=True), max=1.0)


_X = torch.tensor([[3.0, -1.0, 2.0], [0.5, 0.2, -0.3], [-1.0, 4.0, 0.5]], dtype=F64)  # (rows 0, 2 outside)
_C = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1], [2.0, 1.0, -0.4]], dtype=F64)


def test_graph_from_the_parameter_after_a_new_layout():
    """``.to(memory_format=torch.channels_last)`` between forward and backward gives the parameter a new storage
    (same dtype: torch keeps its gradient accumulator): the graph built from it in ``solve`` still carries its
    gradient, against a central finite difference in float64 of the sum over its entries."""
    node = Ball()
    y = node(_X)
    node.to(memory_format=torch.channels_last)
    assert not node.s.is_contiguous()  # (the layout changed)
    (y * _C).sum().backward()
    h, values = 1e-6, []
    with torch.no_grad():
        for step in (h, -h):
            values.append(float((Ball(step)(_X) * _C).sum()))
    fd = (values[0] - values[1]) / (2 * h)
    assert abs(fd) > 0.1  # (the radius matters)
    assert abs(float(node.s.grad.sum()) - fd) <= 1e-7 * abs(fd), (float(node.s.grad.sum()), fd)


def test_graph_from_the_parameter_after_conversion_raises():
    """After ``.float()`` torch gives the parameter a new gradient accumulator, which the graph built at the
    forward does not reach: the part of the gradient through it was 0, silently; now the node's InputError."""
    node = Ball()
    y = node(_X)
    node.float()
    with pytest.raises(InputError, match="inequality_constraints reads a tensor of shape"):
        (y * _C).sum().backward()
