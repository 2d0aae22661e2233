"""Forward mode of DeclarativeNode (:mod:`convexddn.nodes.implicit_jvp`).

Expected tangents are closed forms written out here (the unit sphere, the unit ball, a
quartic's stationarity condition), central finite differences in float64, and the
reverse mode through the dot-product identity ⟨u, J ẋ⟩ = ⟨Jᵀ u, ẋ⟩.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from convexddn.errors import DoubleBackwardError, GradientWarning, InputError, ProblemError
from convexddn.nodes.declarative import DeclarativeNode

sys.path.insert(0, str(Path(__file__).parent))
from test_declarative import Sphere  # noqa: E402  (projection onto the unit sphere)

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _jvp(node, xs, ts):
    with fwAD.dual_level():
        y = node(*(fwAD.make_dual(x, t) for x, t in zip(xs, ts)))
        return fwAD.unpack_dual(y).tangent


class Quartic(DeclarativeNode):
    """½‖y − x‖² + ¼‖y‖⁴: (1 + ‖y‖²) y = x, so ((1 + ‖y‖²) I + 2 y yᵀ) ẏ = ẋ."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1) + 0.25 * (y * y).sum(-1) ** 2

    def solve(self, x):
        y = x.clone()
        for _ in range(200):  # Newton on (1 + ‖y‖²) y - x
            s = (y * y).sum(-1, keepdim=True)
            g = (1 + s) * y - x
            H = (1 + s).unsqueeze(-1) * torch.eye(x.shape[-1], dtype=x.dtype) + 2 * y.unsqueeze(-1) * y.unsqueeze(-2)
            y = y - torch.linalg.solve(H, g)
        return y


class Ball(DeclarativeNode):
    """Projection onto the unit ball: ẏ = ẋ inside, (I − y yᵀ) ẋ / ‖x‖ outside."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - 1.0

    def solve(self, x):
        n = x.norm(dim=-1, keepdim=True)
        return torch.where(n > 1, x / n, x)


class ScaledPlane(DeclarativeNode):
    """min ½‖y − x‖² s.t. aᵀy = b·s, s = exp(log_s) a parameter: two inputs, a parameter,
    an equality whose data move; y = x − a (aᵀx − b s) / ‖a‖²."""

    def __init__(self):
        super().__init__()
        self.log_s = nn.Parameter(torch.tensor(0.3, dtype=DT))

    def objective(self, x, a, b, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, a, b, y):
        return (a * y).sum(-1, keepdim=True) - b * self.log_s.exp()

    def solve(self, x, a, b):
        r = (a * x).sum(-1, keepdim=True) - b * self.log_s.exp()
        return x - a * r / (a * a).sum(-1, keepdim=True)


def _sphere_tangent(x, t):
    y = x / x.norm(dim=-1, keepdim=True)
    return (t - y * (y * t).sum(-1, keepdim=True)) / x.norm(dim=-1, keepdim=True)


def test_unconstrained_matches_the_closed_form():
    x, t = torch.randn(5, 4, dtype=DT, generator=_gen(0)), torch.randn(5, 4, dtype=DT, generator=_gen(1))
    node = Quartic()
    y = node(x)
    s = (y * y).sum(-1, keepdim=True)
    H = (1 + s).unsqueeze(-1) * torch.eye(4, dtype=DT) + 2 * y.unsqueeze(-1) * y.unsqueeze(-2)
    torch.testing.assert_close(_jvp(node, (x,), (t,)), torch.linalg.solve(H, t), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_equality_matches_the_closed_form(solver):
    x, t = torch.randn(6, 3, dtype=DT, generator=_gen(2)), torch.randn(6, 3, dtype=DT, generator=_gen(3))
    tol = 1e-10 if solver == "dense" else 1e-7
    torch.testing.assert_close(_jvp(Sphere(linear_solver=solver), (x,), (t,)), _sphere_tangent(x, t),
                               rtol=tol, atol=tol)


def test_inequality_active_and_inactive_in_one_batch():
    x, t = torch.randn(6, 3, dtype=DT, generator=_gen(4)), torch.randn(6, 3, dtype=DT, generator=_gen(5))
    x[:3] *= 0.2  # inside the ball: y = x
    x[3:] *= 3.0  # outside: projected
    want = torch.cat([t[:3], _sphere_tangent(x[3:], t[3:])])
    torch.testing.assert_close(_jvp(Ball(), (x,), (t,)), want, rtol=1e-10, atol=1e-12)


def test_several_inputs_and_a_parameter_against_finite_differences():
    g = _gen(6)
    x, a, b = torch.randn(4, 3, dtype=DT, generator=g), torch.randn(4, 3, dtype=DT, generator=g), torch.randn(4, 1, dtype=DT, generator=g)
    tx, ta, tb = torch.randn(4, 3, dtype=DT, generator=g), torch.randn(4, 3, dtype=DT, generator=g), torch.randn(4, 1, dtype=DT, generator=g)
    ts = torch.tensor(0.7, dtype=DT)
    node = ScaledPlane()
    s0 = node.log_s.detach().clone()
    with fwAD.dual_level():
        y = torch.func.functional_call(node, {"log_s": fwAD.make_dual(s0, ts)},
                                       (fwAD.make_dual(x, tx), fwAD.make_dual(a, ta), fwAD.make_dual(b, tb)))
        got = fwAD.unpack_dual(y).tangent
    h = 1e-6

    def at(e):
        with torch.no_grad():
            return torch.func.functional_call(node, {"log_s": s0 + e * ts}, (x + e * tx, a + e * ta, b + e * tb))

    torch.testing.assert_close(got, (at(h) - at(-h)) / (2 * h), rtol=1e-7, atol=1e-8)
    # The parameter's tangent alone (a learnable parameter, no input tangents).
    with fwAD.dual_level():
        y = torch.func.functional_call(node, {"log_s": fwAD.make_dual(s0, ts)}, (x, a, b))
        alone = fwAD.unpack_dual(y).tangent
    # y = x − a (aᵀx − b s)/‖a‖², s = exp(log_s): ẏ = a b s ṫ / ‖a‖².
    torch.testing.assert_close(alone, a * b * s0.exp() * ts / (a * a).sum(-1, keepdim=True), rtol=1e-10, atol=1e-12)


def test_forward_and_reverse_mode_agree():
    # ⟨u, J ẋ⟩ = ⟨Jᵀ u, ẋ⟩ on an active/inactive mix: catches a transposed system or product.
    g = _gen(7)
    x, t, u = (torch.randn(8, 5, dtype=DT, generator=g) for _ in range(3))
    x[::2] *= 0.1
    x[1::2] *= 4.0
    node = Ball()
    xg = x.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad(node(xg), xg, u)
    torch.testing.assert_close((u * _jvp(node, (x,), (t,))).sum(), (vjp * t).sum(), rtol=1e-11, atol=1e-12)


def test_gradcheck_forward_mode():
    x = torch.randn(3, 3, dtype=DT, generator=_gen(8)) * 2.0
    assert torch.autograd.gradcheck(Sphere(), (x.requires_grad_(True),), check_forward_ad=True,
                                    check_backward_ad=False, check_undefined_grad=False)


def test_float32_input_gets_a_float32_tangent():
    x, t = torch.randn(4, 3, generator=_gen(9)), torch.randn(4, 3, generator=_gen(10))
    got = _jvp(Sphere(), (x,), (t,))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _sphere_tangent(x.double(), t.double()).float(), rtol=1e-5, atol=1e-6)


def test_a_non_finite_tangent_propagates_as_nan_silently():
    """As torch propagates it (and as ConvexLayer and the native nodes do): the NaN is upstream's."""
    x, t = torch.randn(4, 3, dtype=DT, generator=_gen(11)), torch.randn(4, 3, dtype=DT, generator=_gen(12))
    t[1, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        got = _jvp(Sphere(), (x,), (t,))
    assert got[1].isnan().all()
    keep = torch.tensor([0, 2, 3])
    torch.testing.assert_close(got[keep], _sphere_tangent(x, t)[keep], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "jacrev", "vmap", "grad"])
def test_torch_func_transforms_are_refused_clearly(transform):
    x = torch.randn(2, 3, dtype=DT, generator=_gen(13))
    node = Sphere()
    calls = {"jvp": lambda: torch.func.jvp(node, (x,), (x,)), "jacfwd": lambda: torch.func.jacfwd(node)(x),
             "jacrev": lambda: torch.func.jacrev(node)(x), "vmap": lambda: torch.func.vmap(node)(x),
             "grad": lambda: torch.func.grad(lambda v: node(v).sum())(x)}
    with pytest.raises(ProblemError, match="torch.func transforms"):
        calls[transform]()


def test_autograd_functional_jvp_is_refused_with_advice_that_works():
    """torch.autograd.functional.jvp (the double-vjp trick) is refused as a second derivative; its message said
    "use torch.func.jvp", which this node refuses too (a ProblemError). The advice it gives now, followed,
    gives the product: the unit sphere's closed form."""
    x, t = torch.randn(3, 4, dtype=DT, generator=_gen(19)), torch.randn(3, 4, dtype=DT, generator=_gen(20))
    node = Sphere()
    with pytest.raises(DoubleBackwardError, match="torch.autograd.functional.jvp") as info:
        torch.autograd.functional.jvp(node, (x,), (t,))
    advice = str(info.value).split("use ", 1)[1]
    assert advice.startswith("torch.autograd.forward_ad") and "use torch.func.jvp" not in str(info.value)
    with pytest.raises(ProblemError, match="torch.func transforms"):  # (what it no longer recommends)
        torch.func.jvp(node, (x,), (t,))
    torch.testing.assert_close(_jvp(node, (x,), (t,)), _sphere_tangent(x, t), rtol=1e-10, atol=1e-12)


def test_the_tangent_is_not_differentiated_again():
    x = torch.randn(2, 3, dtype=DT, generator=_gen(14)).requires_grad_(True)
    t = torch.randn(2, 3, dtype=DT, generator=_gen(15))
    with fwAD.dual_level():
        y = Sphere()(fwAD.make_dual(x, t))
        tangent = fwAD.unpack_dual(y).tangent
        # The tangent is first-order exact only: differentiating it must raise, not give 0.
        with pytest.raises(DoubleBackwardError):
            torch.autograd.grad(tangent.sum(), x)


def test_no_tangent_no_work():
    x = torch.randn(2, 3, dtype=DT, generator=_gen(16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fwAD.dual_level():
            y = Sphere()(x)
            assert fwAD.unpack_dual(y).tangent is None


class Tied(DeclarativeNode):
    """½‖y − a x‖² + ½ b ‖y‖² with b tied to a: y = a x / (1 + a), ẏ = x ȧ / (1 + a)²."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7, dtype=DT))
        self.b = self.a

    def objective(self, x, y):
        return 0.5 * ((y - self.a * x) ** 2).sum(-1) + 0.5 * self.b * (y * y).sum(-1)

    def solve(self, x):
        return self.a * x / (1 + self.b)


def test_a_tied_parameter_is_differentiated_through_every_name():
    node = Tied()
    x = torch.randn(3, 2, dtype=DT, generator=_gen(17))
    a0, ta = node.a.detach().clone(), torch.tensor(1.0, dtype=DT)
    with fwAD.dual_level():
        y = torch.func.functional_call(node, {"a": fwAD.make_dual(a0, ta)}, (x,))
        got = fwAD.unpack_dual(y).tangent
    torch.testing.assert_close(got, x / (1 + a0) ** 2, rtol=1e-10, atol=1e-12)


def test_a_dual_parameter_that_does_not_require_grad_leaves_the_backward_intact():
    g = _gen(18)
    x = torch.randn(3, 3, dtype=DT, generator=g).requires_grad_(True)
    a, b = torch.randn(3, 3, dtype=DT, generator=g), torch.randn(3, 1, dtype=DT, generator=g)
    node = ScaledPlane()
    s0 = node.log_s.detach().clone()
    with fwAD.dual_level():
        y = torch.func.functional_call(node, {"log_s": fwAD.make_dual(s0, torch.tensor(1.0, dtype=DT))}, (x, a, b))
        # Inside the level the gradient's tangent is a mixed second derivative, d/ds (dΣy/dx)
        # (0 for this node, not in general), which the first-order backward cannot give: refused
        # (convexddn._first_order.refuse_forward_over_reverse). The graph outlives the level.
        with pytest.raises(DoubleBackwardError, match="ScaledPlane|DeclarativeNode"):
            y.sum().backward(retain_graph=True)
    y.sum().backward()
    # y = x − a (aᵀx − b s)/‖a‖²: the gradient of Σy in x is 1 − a (Σa)/‖a‖² per row.
    want = 1 - a * a.sum(-1, keepdim=True) / (a * a).sum(-1, keepdim=True)
    torch.testing.assert_close(x.grad, want, rtol=1e-10, atol=1e-12)


class ScaledBy(DeclarativeNode):
    """½‖y − s x‖², s a buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("s", torch.tensor(2.0, dtype=DT))

    def objective(self, x, y):
        return 0.5 * ((y - self.s * x) ** 2).sum(-1)

    def solve(self, x):
        return self.s * x


def test_a_buffer_carrying_a_tangent_is_refused():
    x = torch.randn(2, 3, dtype=DT, generator=_gen(19))
    with fwAD.dual_level():
        dual = fwAD.make_dual(torch.tensor(2.0, dtype=DT), torch.tensor(1.0, dtype=DT))
        with pytest.raises(InputError, match=r"buffer\(s\) \['s'\] carry forward-mode tangents"):
            torch.func.functional_call(ScaledBy(), {"s": dual}, (x,))


class AbsFit(DeclarativeNode):
    """½(y − √(x²))²: y = |x|; autograd's mixed derivative of √(x²) is NaN at x = 0."""

    def objective(self, x, y):
        return 0.5 * ((y - (x * x).sqrt()) ** 2).sum(-1)

    def solve(self, x):
        return x.abs()


def test_a_non_finite_mixed_derivative_is_not_blamed_on_the_tangent():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=DT)
    with pytest.warns(GradientWarning, match="mixed second derivatives"):
        got = _jvp(AbsFit(), (x,), (torch.ones_like(x),))
    # The row with x = 0 has no implicit derivative: zero, not NaN; the other is d|x| = 1.
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=DT))
