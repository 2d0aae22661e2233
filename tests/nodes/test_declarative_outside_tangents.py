"""Forward mode and tensors a DeclarativeNode's problem reads from outside the node
(:func:`convexddn.nodes._read_guard.check_outside_tangents`): ``y = (x + c) / 2`` with ``c``
closed over (a dict entry) or a plain attribute, carrying a tangent. The node differentiates its
inputs and parameters only: the tangent of ``c`` was dropped, silently (``ẋ/2`` for ``(ẋ + ċ)/2``;
None where only ``c`` was dual), while reverse mode refuses such a tensor that requires grad.
Forward mode now refuses it the same way; passed as an input, it is differentiated."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import convexddn as cddn
from convexddn.errors import InputError

F64 = torch.float64
OUTSIDE: dict = {}


class Closed(cddn.DeclarativeNode):
    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1) + 0.5 * ((y - OUTSIDE["c"]) ** 2).sum(-1)

    def solve(self, x):
        return (x + OUTSIDE["c"]) / 2


class Attribute(Closed):
    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1) + 0.5 * ((y - self.c) ** 2).sum(-1)

    def solve(self, x):
        return (x + self.c) / 2


class AsInput(cddn.DeclarativeNode):
    def objective(self, x, c, y):
        return 0.5 * ((y - x) ** 2).sum(-1) + 0.5 * ((y - c) ** 2).sum(-1)

    def solve(self, x, c):
        return (x + c) / 2


def _data():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 5, dtype=F64, generator=g), torch.randn(5, dtype=F64, generator=g),
            torch.randn(3, 5, dtype=F64, generator=g), torch.randn(5, dtype=F64, generator=g))


@pytest.mark.parametrize("x_dual", [False, True])
@pytest.mark.parametrize("kind", ["closed over", "attribute"])
def test_a_dual_tensor_read_from_outside_is_refused(kind, x_dual):
    x, c, vx, vc = _data()
    node = Closed() if kind == "closed over" else Attribute()
    with fwAD.dual_level():
        dual = fwAD.make_dual(c, vc)
        OUTSIDE["c"], node.c = dual, dual
        with pytest.raises(InputError, match="forward-mode tangent"):
            node(fwAD.make_dual(x, vx) if x_dual else x)


def test_the_same_tensor_as_an_input_is_differentiated():
    x, c, vx, vc = _data()
    with fwAD.dual_level():
        t = fwAD.unpack_dual(AsInput()(fwAD.make_dual(x, vx), fwAD.make_dual(c.expand(3, 5), vc.expand(3, 5)))).tangent
    torch.testing.assert_close(t, (vx + vc) / 2, rtol=1e-12, atol=1e-12)


def test_a_plain_outside_tensor_is_read_as_a_constant():
    # (no tangent on it: the input's tangent alone, as before)
    x, c, vx, _ = _data()
    OUTSIDE["c"] = c
    with fwAD.dual_level():
        t = fwAD.unpack_dual(Closed()(fwAD.make_dual(x, vx))).tangent
    torch.testing.assert_close(t, vx / 2, rtol=1e-12, atol=1e-12)
