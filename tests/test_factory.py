"""``convexddn.layer``'s two backends of one registry problem take the same calls:
the same binding of the input (and its errors)."""
from __future__ import annotations

import pytest
import torch

import convexddn as cddn
from convexddn.errors import ShapeError

F64 = torch.float64


@pytest.mark.parametrize("backend", ["auto", "cvxpy"])
def test_registry_layer_binds_its_input_like_the_cone_layer(backend):
    # The native node (RegistryNode) raised a raw TypeError ("forward() takes 2
    # positional arguments but 3 were given") where the ConvexLayer names its parameters.
    layer = cddn.layer("lp_ball", n=3, backend=backend)
    x = torch.tensor([3.0, 0.0, 4.0], dtype=F64)
    with pytest.raises(ShapeError, match=r"^expected 1 tensor\(s\), one per parameter \['x'\], got 2$"):
        layer(x, x)
    with pytest.raises(ShapeError, match=r"got 0; missing \['x'\]"):
        layer()
    with pytest.raises(ShapeError, match=r"unknown parameter name 'y'; the parameters are \['x'\]"):
        layer(y=x)
    with pytest.raises(ShapeError, match=r"parameter 'x' was given both by position \(0\) and by name"):
        layer(x, x=x)
    # By position or by name: the projection onto the unit ball, x / ‖x‖ = (0.6, 0, 0.8).
    want = torch.tensor([0.6, 0.0, 0.8], dtype=F64)
    assert torch.allclose(layer(x), want, atol=1e-7) and torch.allclose(layer(x=x), want, atol=1e-7)
