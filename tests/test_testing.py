"""Tests of convexddn.testing.check_gradients."""
from __future__ import annotations

import pytest
import torch

from convexddn.errors import ConvexDDNError, DTypeError, InputError, NonFiniteError, OptionError
from convexddn import DeclarativeNode
from convexddn.testing import GradientCheckError, GradientReport, check_gradients

DT = torch.float64


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


class SumToOne(DeclarativeNode):
    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def solve(self, x):
        return x - (x.sum(-1, keepdim=True) - 1) / x.shape[-1]

    def equality_constraints(self, x, y):
        return y.sum(-1, keepdim=True) - 1


class ClampForgotConstraints(DeclarativeNode):
    """A user bug: solve clamps to [0, 1] but the box constraints were never declared."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def solve(self, x):
        return x.clamp(0.0, 1.0)


class ScaledSin(torch.autograd.Function):
    """sin with a backward that is 10 % too large: a deliberately wrong gradient."""

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 1.1 * grad * x.cos()


class OneEntryWrong(torch.autograd.Function):
    """Identity whose backward drops the gradient of flat entry 4."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        g = grad.clone()
        g.view(-1)[4] = 0.0
        return g


class SolverNoise(torch.autograd.Function):
    """Identity plus a 1e-8 deterministic wiggle, like an iterative solver's error."""

    @staticmethod
    def forward(x):
        return x + 1e-8 * torch.sin(1e6 * x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_check_gradients_passes_on_declarative_node():
    report = check_gradients(SumToOne(), _x(3, 4))
    assert isinstance(report, GradientReport)
    assert report.ok
    assert report.mode == "jacobian"
    assert report.n_compared == 12 * 12
    assert report.max_abs_error < 1e-8
    assert report.max_rel_error < 1e-8


def test_check_gradients_directional_passes():
    report = check_gradients(SumToOne(), _x(2, 3, 5), n_directions=4)
    assert report.ok and report.mode == "directional" and report.n_compared == 4
    assert report.max_abs_error < 1e-8


def test_check_gradients_plain_callable():
    report = check_gradients(lambda z: torch.nn.functional.normalize(z, dim=-1), _x(4, 3))
    assert report.ok


def test_check_gradients_fails_on_wrong_backward():
    report = check_gradients(ScaledSin.apply, _x(3, 4))
    assert not report.ok
    # The analytic Jacobian is 1.1 times the true one, entrywise.
    assert report.max_rel_error == pytest.approx(0.1, rel=1e-4)
    directional = check_gradients(ScaledSin.apply, _x(3, 4), n_directions=3)
    assert not directional.ok
    assert directional.max_abs_error > 1e-3


def test_check_gradients_fails_on_missing_constraints():
    x = torch.tensor([[1.5, 0.5, -0.7]], dtype=DT)
    report = check_gradients(ClampForgotConstraints(), x)
    assert not report.ok
    # The clipped entries have true derivative 0 but the backward claims 1.
    assert report.max_abs_error == pytest.approx(1.0, abs=1e-6)


def test_check_gradients_reports_worst_entry():
    report = check_gradients(OneEntryWrong.apply, _x(2, 3))
    assert not report.ok
    assert report.worst == (4, 4)
    assert report.max_abs_error == pytest.approx(1.0, abs=1e-6)


def test_check_gradients_solver_noise_needs_larger_eps():
    x = _x(2, 3)
    assert not check_gradients(SolverNoise.apply, x, eps=1e-6).ok
    assert check_gradients(SolverNoise.apply, x, eps=1e-4).ok


def test_check_gradients_raise_on_fail():
    with pytest.raises(GradientCheckError, match="FAILED") as info:
        check_gradients(ScaledSin.apply, _x(2, 2), raise_on_fail=True)
    assert isinstance(info.value, AssertionError)
    assert isinstance(info.value, ConvexDDNError)
    assert not info.value.report.ok
    # A passing check does not raise.
    assert check_gradients(torch.tanh, _x(2, 2), raise_on_fail=True).ok


def test_gradient_report_str():
    text = str(check_gradients(torch.tanh, _x(2, 2)))
    assert text.startswith("gradient check passed")
    assert "max abs error" in text and "max rel error" in text
    text = str(check_gradients(ScaledSin.apply, _x(2, 2)))
    assert text.startswith("gradient check FAILED")


def test_check_gradients_float32_module_copied_to_float64():
    class Quadratic(DeclarativeNode):
        def __init__(self):
            super().__init__()
            self.Q = torch.nn.Parameter(torch.tensor([[2.0, 0.5], [0.5, 1.0]]))

        def objective(self, x, y):
            return 0.5 * ((y @ self.Q) * y).sum(-1) - (x * y).sum(-1)

        def solve(self, x):
            return torch.linalg.solve(self.Q, x.T).T

    node = Quadratic()
    report = check_gradients(node, _x(3, 2).float())
    assert report.ok and report.max_abs_error < 1e-8
    assert node.Q.dtype == torch.float32


def test_check_gradients_invalid_inputs():
    with pytest.raises(DTypeError, match="x"):
        check_gradients(torch.tanh, torch.ones(2, dtype=torch.int64))
    with pytest.raises(NonFiniteError, match="x"):
        check_gradients(torch.tanh, torch.tensor([1.0, float("inf")]))
    with pytest.raises(OptionError, match="eps"):
        check_gradients(torch.tanh, _x(2), eps=0.0)
    with pytest.raises(OptionError, match="n_directions"):
        check_gradients(torch.tanh, _x(2), n_directions=0)
    with pytest.raises(DTypeError, match="node_or_fn"):
        check_gradients(lambda z: z.tolist(), _x(2))
    with pytest.raises(InputError, match="autograd"):
        check_gradients(lambda z: z.detach() * 2, _x(2))
