"""Declared attributes of parameters (convexddn.convex.declarations): bounds=[lo, hi]."""
from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from convexddn import ConvexLayer, CvxpyLayer
from convexddn.convex.declarations import check_parameter_attributes
from convexddn.errors import InputError

F64 = torch.float64


def test_check_parameter_attributes_bounds():
    """A value outside bounds=[lo, hi] is refused, as CVXPY refuses it (the reference),
    naming the parameter, the bounds and the first offending entry; a bound rounded to
    float32 passes; ±inf sides and array bounds are read entry by entry."""
    x = cp.Parameter(3, bounds=[-1, 1], name="x")
    with pytest.raises(ValueError, match="in bounds"):
        x.value = np.array([0.0, 1.5, 0.0])  # CVXPY's own verdict on the value
    bad = torch.tensor([[0.0, 0.5, 1.0], [0.0, 1.5, -3.0]], dtype=F64)
    with pytest.raises(InputError, match=r"^parameter 0 \(x\) is declared bounds=\[-1, 1\], got 2 entries outside "
                                         r"them \(shape \(2, 3\); the first, at index \(1, 1\), is 1.5, outside "
                                         r"\[-1, 1\]\)"):
        check_parameter_attributes([bad], [x])
    check_parameter_attributes([bad.clamp(-1, 1)], [x])  # the bounds themselves are in
    lo = np.array([0.1, -np.inf, 0.0])
    z = cp.Parameter(3, bounds=[lo, np.inf], name="z")
    check_parameter_attributes([torch.tensor([0.1, -1e30, 5.0], dtype=torch.float32)], [z])  # float32 0.1 > 0.1
    with pytest.raises(InputError, match=r"bounds=\[an array of shape \(3,\), inf\].*index \(2,\), is -1e-06, "
                                         r"outside \[0, inf\]"):
        check_parameter_attributes([torch.tensor([0.2, -7.0, -1e-6], dtype=F64)], [z])


def test_layers_refuse_values_outside_parameter_bounds():
    x = cp.Parameter(3, bounds=[-1, 1], name="x")
    y = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [cp.sum(y) <= 0.5])
    for layer in (ConvexLayer(prob, [x], [y]), CvxpyLayer(prob, parameters=[x], variables=[y])):
        with pytest.raises(InputError, match=r"parameter 0 \(x\) is declared bounds=\[-1, 1\], got 3 entries"):
            layer(torch.full((3,), 5.0, dtype=F64))


@pytest.mark.parametrize("first", [torch.float32, F64], ids=["float32_first", "float64_first"])
def test_bounds_are_kept_per_dtype(first):
    """The bound tensors are built once per (device, dtype), the widening by the dtype's
    rounding included: the same layer called in float32 then float64 (and the other way
    round) enforces each dtype's own bounds. float32's next value above 1 passes (a rounded
    bound); float64's 1 + 1e-9 is refused (float32's widening, 1.2e-7, would pass it)."""
    x = cp.Parameter(3, bounds=[-1, 1], name="x")
    y = cp.Variable(3)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [cp.sum(y) <= 0.5]), [x], [y])
    up32 = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))  # 1 + 2**-23, float32
    calls = {torch.float32: lambda: layer(torch.stack([up32, torch.tensor(0.0), torch.tensor(0.0)])),
             F64: lambda: layer(torch.tensor([1.0, 0.0, 0.0], dtype=F64))}
    second = F64 if first == torch.float32 else torch.float32
    calls[first]()
    calls[second]()  # in bounds for its dtype
    with pytest.raises(InputError, match=r"bounds=\[-1, 1\], got 1 entries outside them"):
        layer(torch.tensor([1.0 + 1e-9, 0.0, 0.0], dtype=F64))
    with pytest.raises(InputError, match=r"bounds=\[-1, 1\], got 1 entries outside them"):
        layer(torch.tensor([-1.0, 0.0, 1.0 + 2.5e-7], dtype=torch.float32))
