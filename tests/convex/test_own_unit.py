"""Per-element cone programs solved again in their own unit (convexddn/convex/own_unit.py).

The projection onto the PSD cone, argmin_X ‖X − M‖ s.t. X ⪰ 0, is the eigenvalue clip of M
(homogeneous in M): expected values and derivatives come from numpy's eigh, the derivatives by
central differences in float64 (independent of the layer). Before: SolverError at 1e-6 (norm
form) and 1e6 (squared form), and at 1e8 the norm form passed 8e-8 off with a gradient off by 2.6.
"""
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.errors import InfeasibleError, SolverError


def _clip(M: np.ndarray) -> np.ndarray:
    lam, V = np.linalg.eigh(M)
    return (V * np.maximum(lam, 0.0)) @ V.T


_RNG = np.random.default_rng(11)
_B = _RNG.standard_normal((3, 3))
_B = (_B + _B.T) / 2  # eigenvalues of both signs: the clip is active
_W = _RNG.standard_normal((3, 3))  # the loss's weights
_D = _RNG.standard_normal((3, 3))
_D = (_D + _D.T) / 2  # a symmetric direction for the derivative


def _layer(form: str) -> cddn.ConvexLayer:
    M = cp.Parameter((3, 3), symmetric=True, name="M")
    X = cp.Variable((3, 3), symmetric=True)
    obj = cp.norm(X - M, "fro") if form == "norm" else cp.sum_squares(X - M)
    return cddn.ConvexLayer(cp.Problem(cp.Minimize(obj), [X >> 0]), [M], [X])


def _check(layer: cddn.ConvexLayer, scale: float) -> None:
    M = torch.tensor(_B * scale, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        X = layer(M)
        (X * torch.tensor(_W)).sum().backward()
    want = _clip(_B * scale)
    assert np.abs(X.detach().numpy() - want).max() <= 1e-9 * np.abs(want).max()
    h = 1e-6 * scale
    fd = float(((_clip(_B * scale + h * _D) - _clip(_B * scale - h * _D)) * _W).sum() / (2 * h))
    got = float((M.grad.numpy() * _D).sum())
    assert abs(got - fd) <= 1e-6 * abs(fd)


@pytest.mark.parametrize("scale", [1e-8, 1e-6, 1e-4, 1.0, 1e4, 1e6, 1e8])
def test_norm_form_every_scale(scale):
    _check(_layer("norm"), scale)


@pytest.mark.parametrize("scale", [1e-8, 1e-6, 1e-4, 1.0, 1e4, 1e6])
def test_squared_form_every_scale(scale):
    _check(_layer("sq"), scale)


def test_squared_form_beyond_float64_fails_loudly():
    # At 1e8 the epigraph ‖(2(X − M), t − 1)‖ <= t + 1 needs t ~ 1e16 beside its constants 1, past
    # 2^53: no float64 point holds the solution. It must raise, saying why, not return a wrong X.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            X = _layer("sq")(torch.tensor(_B * 1e8)).numpy()
        except SolverError as err:
            assert "badly scaled" in str(err)
        else:
            want = _clip(_B * 1e8)
            assert np.abs(X - want).max() <= 1e-9 * np.abs(want).max()


def test_infeasible_sdp_still_raises_naming_its_element():
    # X ⪰ 0 with trace(X) <= −s: infeasible at every scale s > 0 (a verified certificate, no retry).
    M = cp.Parameter((3, 3), symmetric=True, name="M")
    s = cp.Parameter(nonneg=True, name="s")
    X = cp.Variable((3, 3), symmetric=True)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.norm(X - M, "fro")), [X >> 0, cp.trace(X) <= -s]),
                             [M, s], [X])
    Ms = torch.tensor(np.stack([_B * 1e-6, _B * 1e-6]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InfeasibleError) as info:
            layer(Ms, torch.tensor([0.0, 1e-6]))
    assert info.value.indices == [(1,)]


def test_batch_of_scales_in_one_call():
    # One call, elements of 1e-6, 1 and 1e6: each solved in its own unit (or none), each exact.
    layer = _layer("norm")
    scales = np.array([1e-6, 1.0, 1e6])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        X = layer(torch.tensor(_B[None] * scales[:, None, None])).numpy()
    for k, sc in enumerate(scales):
        want = _clip(_B * sc)
        assert np.abs(X[k] - want).max() <= 1e-9 * np.abs(want).max()
