"""Tests of convexddn.testing.check_gradients."""
from __future__ import annotations

import re

import pytest
import torch

from convexddn import DeclarativeNode
from convexddn.errors import (
    ConvexDDNError,
    DTypeError,
    InputError,
    NonFiniteError,
    OptionError,
    SolverError,
)
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
    report = check_gradients(SumToOne(batch_dims=2), _x(2, 3, 5), n_directions=4)
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
    # The node's own check sees that solve's point is not stationary for the declared
    # problem (y - x != 0 at the clipped entries) and refuses to differentiate.
    with pytest.raises(SolverError, match="not a KKT point"):
        check_gradients(ClampForgotConstraints(), x)
    report = check_gradients(ClampForgotConstraints(check_solution=False), x)
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
            # The objective sees only the symmetric part of Q; so must solve (the
            # parameter check finds the mismatch for a non-symmetric perturbation).
            return torch.linalg.solve(0.5 * (self.Q + self.Q.T), x.T).T

    node = Quadratic()
    report = check_gradients(node, _x(3, 2).float())
    assert report.ok and report.max_abs_error < 1e-8
    assert node.Q.dtype == torch.float32



@pytest.mark.parametrize("eps, why", [(1e-17, "rounds to 0"), (1e308, "overflows")])
def test_check_gradients_refuses_a_step_the_inputs_cannot_take(eps, why):
    """A positive eps below the inputs' spacing (or past the float range) was accepted, and a
    correct gradient (2x: J = 2I) failed as "max abs error nan": the realised step was 0 (or
    inf) and the difference 0/0. An OptionError names eps and why; a step every entry takes passes."""
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(OptionError, match=re.escape(f"eps={eps:g} is no usable finite-difference step: ") + f".*{why}"):
        check_gradients(lambda a: 2 * a, x, eps=eps)
    assert check_gradients(lambda a: 2 * a, x, eps=1e-12).ok  # (above 4.8e-16, the spacing at |x| ~ 2.2)
    # Along a direction: 100 entries of 1e10 lose most of eps * u (each entry gets eps / 10), and a
    # sign-flipped backward passed with error 0 (both sides read no change).
    big = torch.full((100,), 1e10, dtype=torch.float64)
    with pytest.raises(OptionError, match="along direction 0"):
        check_gradients(lambda a: 2 * a, big, n_directions=3)
    # An entry of 0 takes any tiny step: only the entries that lose it count.
    assert check_gradients(lambda a: 2 * a, torch.zeros(3, dtype=torch.float64), eps=1e-17).ok

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


class WeightedMean(DeclarativeNode):
    """argmin_u sum_i w_i (u - p_i)^2 + c (u - q)^2 with learned weights w = exp(logw)."""

    def __init__(self, n: int):
        super().__init__()
        self.logw = torch.nn.Parameter(torch.linspace(-0.5, 0.5, n, dtype=DT))
        self.c = torch.nn.Parameter(torch.tensor(0.7, dtype=DT))

    def objective(self, p, q, *, y):
        w = self.logw.exp()
        return (w * (y - p) ** 2).sum(-1) + self.c * ((y - q) ** 2).sum(-1)

    def solve(self, p, q):
        w = self.logw.exp()
        return ((w * p).sum(-1, keepdim=True) + self.c * q) / (w.sum() + self.c)


def test_check_gradients_two_inputs_and_parameters():
    node = WeightedMean(4)
    report = check_gradients(node, _x(3, 4), _x(3, 1, seed=1))
    assert report.ok and report.max_abs_error < 1e-8
    assert report.wrt == ("input 0", "input 1", "param logw", "param c")
    # 3 outputs x (12 + 3 inputs + 4 + 1 parameters).
    assert report.n_compared == 3 * 20
    # The caller's module is not perturbed (a copy is checked).
    torch.testing.assert_close(node.logw.detach(), torch.linspace(-0.5, 0.5, 4, dtype=DT))
    directional = check_gradients(node, _x(3, 4), _x(3, 1, seed=1), n_directions=3)
    assert directional.ok and directional.n_compared == 3
    assert check_gradients(node, _x(3, 4), _x(3, 1, seed=1), params=False).wrt == (
        "input 0", "input 1")


class WrongParamGrad(torch.autograd.Function):
    """y = a * x, whose backward gives the parameter a gradient twice too large."""

    @staticmethod
    def forward(x, a):
        return a * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        x, a = ctx.saved_tensors
        return grad * a, 2.0 * (grad * x).sum()


class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(1.5))  # float32: checked via a copy

    def forward(self, x):
        return WrongParamGrad.apply(x, self.a)


def test_check_gradients_finds_wrong_parameter_gradient():
    report = check_gradients(Scale(), _x(2, 3))
    assert not report.ok
    assert report.worst_wrt == "param a"
    assert "param a" in str(report)
    assert check_gradients(Scale(), _x(2, 3), params=False).ok


def test_check_gradients_needs_an_input():
    with pytest.raises(InputError, match="at least one input"):
        check_gradients(torch.tanh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_check_gradients_directional_with_parameters_saved_for_backward(dtype):
    # A Linear saves its weight for backward; perturbing it in place for the finite
    # differences between two directional backward products used to raise autograd's
    # "modified by an inplace operation" RuntimeError from the second direction on.
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 2).to(dtype)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    report = check_gradients(lin, _x(3, 4), n_directions=3)
    assert report.ok and report.n_compared == 3 and report.mode == "directional"
    assert report.wrt == ("x", "param weight", "param bias")
    # The caller's module is left as it was: values and dtype.
    for k, v in lin.state_dict().items():
        assert v.dtype == dtype and torch.equal(v, before[k])


def test_check_gradients_directional_finds_wrong_parameter_gradient():
    # WrongParamGrad saves the parameter for backward, as above; a wrong gradient with
    # respect to it must still be found in directional mode.
    report = check_gradients(Scale(), _x(2, 3), n_directions=4)
    assert not report.ok and report.n_compared == 4
    assert check_gradients(Scale(), _x(2, 3), n_directions=4, params=False).ok


@pytest.mark.parametrize("options, error, name", [
    ({"n_directions": 0.5}, OptionError, "n_directions"),   # used to run none: raw RuntimeError
    ({"n_directions": 2.5}, OptionError, "n_directions"),   # used to run 2 silently
    ({"n_directions": True}, OptionError, "n_directions"),
    ({"n_directions": -1}, OptionError, "n_directions"),
    ({"n_directions": 2, "seed": None}, OptionError, "seed"),  # raw RuntimeError from manual_seed
    ({"n_directions": 2, "seed": 1.5}, OptionError, "seed"),
    ({"n_directions": 2, "seed": 2**64}, OptionError, "seed"),  # raw ValueError (overflow)
    ({"seed": "0"}, OptionError, "seed"),  # refused in Jacobian mode too
    ({"params": "yes"}, OptionError, "params"),
    ({"raise_on_fail": 1}, OptionError, "raise_on_fail"),
])
def test_check_gradients_rejects_bad_options(options, error, name):
    with pytest.raises(error, match=name) as info:
        check_gradients(torch.tanh, _x(3), **options)
    assert repr(options[name]) in str(info.value)  # what came is named, too


@pytest.mark.parametrize("n, shown", [(100_001, "100001"), (10**400, "an integer of 401 digits")])
def test_check_gradients_bounds_n_directions(n, shown):
    # Each direction costs a backward and two forwards: 10**400 looped for ever.
    with pytest.raises(OptionError, match=rf"^n_directions must be an integer >= 1 and <= 100000, got {shown}"):
        check_gradients(torch.tanh, _x(3), n_directions=n)


def test_check_gradients_accepts_any_64_bit_seed():
    for seed in (-(2**63), -1, 2**64 - 1):
        assert check_gradients(torch.tanh, _x(3), n_directions=2, seed=seed).ok


def test_check_gradients_needs_a_callable():
    # Used to fail with a raw "'int' object is not callable" TypeError.
    with pytest.raises(DTypeError, match="node_or_fn must be a callable.*got int"):
        check_gradients(3, _x(2))


def test_a_float64_module_is_checked_through_a_copy():
    # The finite differences call the module many times: a float64 BatchNorm checked
    # without its parameters was used as it was, and its running statistics moved.
    bn = torch.nn.BatchNorm1d(3).double()
    check_gradients(bn, torch.randn(4, 3, dtype=torch.float64), params=False)
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(3, dtype=torch.float64))


def test_a_module_that_cannot_be_copied_is_checked_as_it_is():
    # A float64 module holding a lock cannot be deep-copied; checked without its
    # parameters it is used as it is (nothing of it is perturbed), with them it raises.
    import threading

    class Locked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lock = threading.Lock()
            self.w = torch.nn.Parameter(torch.tensor([2.0, -1.0], dtype=torch.float64))

        def forward(self, x):
            return self.w * x**2

    x = torch.randn(2, dtype=torch.float64)
    assert check_gradients(Locked(), x, params=False).ok
    with pytest.raises(InputError, match="cannot be deep-copied"):
        check_gradients(Locked(), x, params=True)


def test_check_gradients_tolerances_are_numbers():
    """A NumPy eps passed the check, then failed inside ('can't assign a numpy.float32 to
    a torch.DoubleTensor'); tensor eps/atol failed with raw errors or broke the report."""
    import numpy as np

    def square(t):
        return t * t

    report = check_gradients(square, _x(2, 3), eps=np.float32(1e-6), atol=np.float64(1e-5))
    assert report.ok and isinstance(report.eps, float)
    for key in ("eps", "atol", "rtol"):
        with pytest.raises(OptionError, match=rf"{key} must be a number \(a Python or NumPy scalar\) > 0, got a "
                                              r"tensor of shape \(2,\): a tolerance is one number"):
            check_gradients(square, _x(2, 3), **{key: torch.tensor([1e-6, 1e-6])})


def test_check_gradients_explains_float32_wrappers_and_uncopyable_modules():
    """A function wrapping a float32 module met float64 inputs ('mat1 and mat2 must have
    the same dtype'); a module that cannot be deep-copied raised pickle's TypeError."""
    import threading

    lin = torch.nn.Linear(3, 3)
    with pytest.raises(DTypeError, match=r"pass the module itself .* or call \.double\(\)"):
        check_gradients(lambda a: lin(a), _x(2, 3).float())
    assert check_gradients(lin, _x(2, 3).float()).ok  # the module itself: a float64 copy

    class Locked(torch.nn.Linear):
        def __init__(self):
            super().__init__(3, 3)
            self.lock = threading.Lock()

    with pytest.raises(InputError, match=r"cannot be deep-copied .*module\.double\(\)"):
        check_gradients(Locked(), _x(2, 3).float())
    assert check_gradients(Locked().double(), _x(2, 3), params=False).ok


def test_check_gradients_takes_tuple_outputs():
    # EigenDecomposition (values, vectors), LeastSquares (solution, residual) and a
    # ConvexLayer of several variables return tuples: they were refused ("must return a
    # floating-point torch.Tensor"), and a lambda picking one output dropped the module's
    # parameter checks. The outputs are checked together (concatenated).
    from convexddn.nodes.eigen import EigenDecomposition
    from convexddn.nodes.linear_fit import LeastSquares

    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, 4, 4, dtype=DT, generator=g)
    assert check_gradients(EigenDecomposition(k=2), X + X.mT).ok
    m = LeastSquares(ridge=torch.nn.Parameter(torch.tensor(0.1, dtype=DT)))
    report = check_gradients(m, torch.randn(2, 3, 8, dtype=DT, generator=g), torch.randn(2, 8, dtype=DT, generator=g))
    assert report.ok and "param ridge" in str(report)
    # A wrong backward in one of the outputs is found.
    bad = check_gradients(lambda z: (z.sin(), ScaledSin.apply(z)), _x(3))
    assert not bad.ok
    with pytest.raises(DTypeError, match="node_or_fn"):
        check_gradients(lambda z: (z, z.long()), _x(2))


def test_gradient_report_truth_value_is_its_verdict():
    """``assert check_gradients(node, x)`` passed on a wrong gradient: the report (a
    dataclass) was always true. Reference: the report's own ``ok``."""
    assert not check_gradients(OneEntryWrong.apply, _x(2, 3))
    assert check_gradients(torch.tanh, _x(2, 2))


def test_an_infinite_finite_difference_fails_the_check():
    """exp at x = 709.7827 (exp(x) = 1.8e308, exp(x + 1e-6) = inf) with a backward of 0:
    the finite difference is inf and the error inf, and inf <= atol + rtol·inf passed the
    wrong gradient."""

    class ZeroGradExp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.exp()

        @staticmethod
        def backward(ctx, g):
            return torch.zeros_like(g)

    report = check_gradients(ZeroGradExp.apply, torch.tensor([709.782712893], dtype=torch.float64),
                             raise_on_fail=False)
    assert not report.ok


def test_a_module_with_a_plain_tensor_attribute_gets_a_dtype_error():
    """A float32 module keeping a tensor as a plain attribute (not cast by the float64 copy):
    a raw RuntimeError from the matrix product, now a DTypeError saying what to register."""

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.A = torch.randn(3, 3)

        def forward(self, x):
            return x @ self.A

    with pytest.raises(DTypeError, match="register its tensors as buffers or parameters"):
        check_gradients(Plain(), torch.randn(2, 3))


class SinOfWeight(torch.nn.Module):
    """y = sin(w) x with a weight w far from 0 (1e7): dy/dw = cos(w) x."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1e7, -3.3e6], dtype=DT))

    def forward(self, x):
        return self.w.sin() * x


@pytest.mark.parametrize("n_directions", [None, 8])
def test_check_gradients_divides_by_the_step_actually_taken(n_directions):
    """At |z| = 1e8 the float64 spacing is 1.5e-8, so z ± 1e-6 rounds and the step taken is
    up to 1.5 % off 2·eps: sin's exact backward (cos, the closed form) FAILED (max abs error
    5.9e-4 against cos(1e8) ≈ 0.42; directional 2.2e-3). Divided by the realised step,
    (z + eps) - (z - eps), the finite difference is off by its truncation (eps²/6·|cos|) and
    the rounding of sin (ulp / eps ≈ 1e-10) only; a 10 % wrong backward still fails there."""
    x = torch.tensor([1e8, -3e7, 5e6, 2.0], dtype=DT)
    report = check_gradients(torch.sin, x, n_directions=n_directions)
    assert report.ok, str(report)
    assert report.max_abs_error < 1e-8
    assert not check_gradients(ScaledSin.apply, x, n_directions=n_directions).ok
    # A parameter far from 0 too (perturbed in place on the module's copy).
    module = check_gradients(SinOfWeight(), _x(2), n_directions=n_directions)
    assert module.ok and module.max_abs_error < 1e-8, str(module)


class ForgetsWeightAlone(torch.autograd.Function):
    """y = w x whose backward forgets w in x's gradient when w needs none (only x does),
    and gives w the gradient 2 x when x needs none: right whenever both need one."""

    @staticmethod
    def forward(x, w):
        return w * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        both = ctx.needs_input_grad[0] and ctx.needs_input_grad[1]
        gx = grad * w if both else grad
        gw = grad * x if both else 2.0 * grad * x
        return (gx if ctx.needs_input_grad[0] else None), (gw if ctx.needs_input_grad[1] else None)


class WeightAloneWrong(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, -1.5, 2.0], dtype=DT))

    def forward(self, x):
        return ForgetsWeightAlone.apply(x, self.w)


@pytest.mark.parametrize("n_directions", [None, 3])
def test_check_gradients_runs_each_input_alone(n_directions):
    """A backward wrong only where some input needs no gradient (training: the data need
    none, the parameters do) passed: every input was made to require grad. Each input and
    parameter is now differentiated alone too; reference: the closed forms dy/dx = w,
    dy/dw = x (the backward gives 1 and 2x there, errors |w - 1| = 1, |x|)."""
    x, w = _x(2, 3), torch.tensor([0.5, -1.5, 2.0], dtype=DT)
    report = check_gradients(ForgetsWeightAlone.apply, x, w, n_directions=n_directions)
    assert not report.ok
    assert report.inconsistent.startswith("with only input") and report.consistency_error > 0.1
    assert "requiring grad" in str(report)
    module = check_gradients(WeightAloneWrong(), x, n_directions=n_directions)
    assert not module.ok and module.inconsistent.startswith("with only")
    # The same maths with a consistent backward passes, alone and together.
    right = check_gradients(lambda a, b: a * b, x, w, n_directions=n_directions)
    assert right.ok and right.consistency_error < 1e-12, str(right)


class AbsIncoming(torch.autograd.Function):
    """y = 2 x whose backward returns 2 |g|: right for every one-hot g, wrong for any g
    with a negative entry (a vector-Jacobian product is linear in g)."""

    @staticmethod
    def forward(x):
        return 2.0 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return 2.0 * grad.abs()


def test_check_gradients_jacobian_mode_finds_a_backward_not_linear_in_its_incoming_gradient():
    """The full-Jacobian mode fed one-hot incoming gradients only, so 2|g| passed as the
    backward of y = 2x (max error 0; torch.autograd.gradcheck passes it too). The rows are
    now also combined with one seeded random w and compared with the backward of w;
    reference: the closed form w^T J = 2 w, which 2|w| misses wherever w < 0."""
    report = check_gradients(AbsIncoming.apply, _x(2, 3))
    assert not report.ok and report.max_abs_error == 0.0
    assert "not linear" in report.inconsistent and report.consistency_error > 0.1
    assert "not linear" in str(report)
    right = check_gradients(lambda a: 2.0 * a, _x(2, 3))
    assert right.ok and right.inconsistent == "" and right.consistency_error < 1e-12


def test_a_failure_at_the_finite_differences_rounding_says_so():
    """y = W x + c at |x| = 1e8 (|y| ~ 1e8): y's own rounding, 2^-53 |y| / 1e-6 ~ 1e-3, is far
    above atol, so the exact backward of an affine map FAILED with nothing saying why. The
    report now gives that floor and, where the error is within 10 times it, says to raise
    eps; an affine map's finite difference is exact at any step, so eps = 1e-2 passes. A
    10 % wrong backward at |x| ~ 1 fails without the hint."""
    lin = torch.nn.Linear(4, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.3, -0.2, 0.5, 0.1], [-0.4, 0.25, 0.2, -0.3]], dtype=DT))
        lin.bias.copy_(torch.tensor([0.1, -0.2], dtype=DT))
    x = torch.tensor([1e8, -3e7, 5e6, 2.0], dtype=DT)
    report = check_gradients(lin, x)
    assert not report.ok and report.max_abs_error <= 10 * report.fd_rounding, str(report)
    assert "rounding alone" in str(report) and "larger eps" in str(report)
    assert check_gradients(lin, x, eps=1e-2).ok
    wrong = check_gradients(ScaledSin.apply, _x(2, 3))
    assert not wrong.ok and wrong.max_abs_error > 1e3 * wrong.fd_rounding
    assert "rounding alone" not in str(wrong)


class ReversedSum(torch.autograd.Function):
    """y = A x whose backward sums A^T g in the reverse order: linear in g, rounded otherwise."""

    @staticmethod
    def forward(A, x):
        return A @ x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.A = inputs[0]

    @staticmethod
    def backward(ctx, g):
        return None, (g.flip(0).unsqueeze(1) * ctx.A.flip(0)).cumsum(0)[-1]


def test_the_linearity_check_allows_for_the_rounding_of_its_sums():
    """A^T w summed in another order than w times the one-hot rows differs by rounding,
    up to m 2^-53 |w|^T |A| each (Higham, Accuracy and Stability, Thm 3.5): with entries of
    1e12 and A^T w cancelling to 1e-3 that was 7.3e-4, and the exact, linear backward was
    called "not linear in w". Reference: an affine map, whose finite difference at eps = 1
    is exact up to y's rounding."""
    m, n = 50, 3
    w = torch.randn((m,), generator=torch.Generator().manual_seed(0), dtype=DT)  # check_gradients' w (seed 0)
    V = torch.randn(m, n, generator=torch.Generator().manual_seed(1), dtype=DT)
    A = 1e12 * (V - torch.outer(w, (w @ V) / (w @ w)))  # columns orthogonal to w: A^T w cancels
    report = check_gradients(lambda x: ReversedSum.apply(A, x), _x(n), eps=1.0)
    assert report.ok and report.inconsistent == "", str(report)
    wrong = check_gradients(AbsIncoming.apply, _x(2, 3))
    assert not wrong.ok and wrong.inconsistent  # still found,
    # and said to be no finite-difference failure (no advice to raise eps: the differences agree).
    assert wrong.fd_ok and "rounding alone" not in str(wrong)
