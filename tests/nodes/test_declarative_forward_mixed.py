"""Forward mode of a DeclarativeNode whose objective or constraints apply a once-differentiable
operation (a native node) to the inputs alone: the mixed derivative B·ẋ falls back to forward
mode over one reverse product, where torch refuses the second reverse product."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import convexddn as cd
import convexddn.functional as F
from convexddn.errors import ProblemError


def _pooled(x):
    return F.robust_pool(x, "pseudo-huber", keepdim=True)  # (B, 1), once differentiable in reverse mode


class _Pooled(cd.DeclarativeNode):
    """argmin_y ½(y − m(x))² + ¼y⁴ with m = robust_pool(x): y + y³ = m."""

    def objective(self, x, y):
        return 0.5 * ((y - _pooled(x)) ** 2).sum(-1) + 0.25 * (y ** 4).sum(-1)

    def solve(self, x):
        t = _pooled(x)
        y = t.clone()
        for _ in range(60):
            y = y - (y - t + y ** 3) / (1 + 3 * y ** 2)
        return y


class _Shifted(cd.DeclarativeNode):
    """argmin_y ½‖y − x‖² s.t. Σ y = m(x): y = x + (m − Σx)/n (the constraint reads the native node)."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return y.sum(-1, keepdim=True) - _pooled(x)

    def solve(self, x):
        return x + (_pooled(x) - x.sum(-1, keepdim=True)) / x.shape[-1]


def _forward(node, x, v):
    with fwAD.dual_level():
        return fwAD.unpack_dual(node(fwAD.make_dual(x, v))).tangent


def _central(node, x, v, eps=1e-6):
    with torch.no_grad():
        return (node(x + eps * v) - node(x - eps * v)) / (2 * eps)


@pytest.mark.parametrize("node", [_Pooled(), _Shifted()], ids=["objective", "constraint"])
def test_forward_mode_through_a_native_node_on_the_inputs(node):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, generator=gen)
    v = torch.randn(3, 5, dtype=torch.float64, generator=gen)
    tangent = _forward(node, x, v)  # refused with a ProblemError before
    assert tangent is not None
    torch.testing.assert_close(tangent, _central(node, x, v), atol=1e-8, rtol=1e-7)
    # and the same as reverse mode's ⟨v, Jᵀu⟩
    u = torch.randn_like(tangent)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(node(xr), xr, u)
    torch.testing.assert_close((tangent * u).sum(), (g * v).sum(), atol=1e-10, rtol=1e-9)


class _NoDerivatives(torch.autograd.Function):
    """2x with a first-order backward and no forward derivative."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return 2 * g


class _WithJvp(_NoDerivatives):
    """The same with a forward derivative."""

    @staticmethod
    def jvp(ctx, t):
        return 2 * t


class _NoGraph(torch.autograd.Function):
    """2x whose backward runs under no_grad (not marked), with a forward derivative."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        with torch.no_grad():
            return 2 * g

    @staticmethod
    def jvp(ctx, t):
        return 2 * t


class _Doubled(cd.DeclarativeNode):
    """argmin ½‖y − 2x‖² with 2x computed by ``fn``: ẏ = 2ẋ."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def objective(self, x, y):
        return 0.5 * ((y - self.fn.apply(x)) ** 2).sum(-1)

    def solve(self, x):
        return 2 * x


@pytest.mark.parametrize("fn", [_WithJvp, _NoGraph], ids=["once_differentiable", "backward_under_no_grad"])
def test_a_first_order_backward_with_a_forward_derivative_gives_the_tangent(fn):
    # The second reverse product's graph was lost (torch's once_differentiable marker returned
    # no gradient where it should raise; a no_grad backward carries none): the tangent came
    # back 0 for 2ẋ, silently.
    x = torch.randn(2, 3, dtype=torch.float64)
    v = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(_forward(_Doubled(fn), x, v), 2 * v)


def test_an_operation_with_neither_derivative_is_refused_by_name():
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ProblemError, match=r"_Doubled.*not itself differentiable.*no forward derivative"):
        _forward(_Doubled(_NoDerivatives), x, torch.ones_like(x))
    # reverse mode differentiates it once
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(_Doubled(_NoDerivatives)(xr).sum(), xr)
    torch.testing.assert_close(g, torch.full_like(x, 2.0))


class _NoJvp(torch.autograd.Function):
    """2x with a backward that is itself differentiable, and no forward derivative."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class _ReverseOnly(cd.DeclarativeNode):
    def objective(self, x, y):
        return 0.5 * ((y - _NoJvp.apply(x)) ** 2).sum(-1)

    def solve(self, x):
        return 2 * x


def test_an_operation_without_a_forward_derivative_is_differentiated_by_reverse_products():
    # The check for tangents read from outside the node evaluated the problem with the
    # dual inputs, and _NoJvp raised torch's NotImplementedError there (a regression:
    # the reverse products before it need no forward derivative).
    x = torch.randn(2, 3, dtype=torch.float64)
    v = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(_forward(_ReverseOnly(), x, v), 2 * v)


class _Signed(cd.DeclarativeNode):
    """argmin ½‖y − x‖² + yᵀ(w + sign(v)): y = x − w − sign(v), whose derivative in v is 0."""

    def __init__(self):
        super().__init__()
        self.v = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 4.0], dtype=torch.float64))
        self.w = torch.nn.Parameter(torch.tensor([0.5, -0.3, 0.2, 0.1], dtype=torch.float64))

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1) + (y * (self.w + torch.sign(self.v))).sum(-1)

    def solve(self, x):
        return x - (self.w + torch.sign(self.v))


def test_a_parameter_read_through_a_zero_derivative_gets_a_zero_tangent():
    """sign(v)'s reverse product carries no graph, as a true zero: a parameter's tangent there
    was refused with a ProblemError blaming a once-differentiable operation; it is 0 (and w's
    tangent −ẇ, by the closed form)."""
    node, x = _Signed(), torch.randn(3, 4, dtype=torch.float64)
    node(x.clone().requires_grad_())  # (the first call's probe)
    with fwAD.dual_level():
        v = fwAD.make_dual(node.v.detach(), torch.ones(4, dtype=torch.float64))
        w = fwAD.make_dual(node.w.detach(), torch.full((4,), 2.0, dtype=torch.float64))
        tv = fwAD.unpack_dual(torch.func.functional_call(node, {"v": v}, (x,))).tangent
        tw = fwAD.unpack_dual(torch.func.functional_call(node, {"w": w}, (x,))).tangent
    torch.testing.assert_close(tv, torch.zeros_like(x))
    torch.testing.assert_close(tw, torch.full_like(x, -2.0))
