"""Every native node under ``torch.autocast`` (mixed-precision training): a float32 input
gives the solution and gradients it gives without autocast, in float32.

Autocast lowers matmuls to bfloat16 (CPU) or float16 (CUDA); a solver that let it do so
lost its own working precision (robust_vector_pool: LU refused bfloat16, the truncated
quadratic's IRLS erred by ~1e-3).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from convexddn.functional import (
    eigen_decomposition,
    entmax,
    least_squares,
    linear_fit,
    pnp,
    project_lp,
    project_simplex,
    robust_pool,
    robust_vector_pool,
    sinkhorn,
    tridiagonal_solve,
    tv_denoise,
)

F32 = torch.float32


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F32)


def _pnp_points():
    g = torch.Generator().manual_seed(0)
    xy = 2 * torch.rand(2, 8, 2, generator=g) - 1
    z = 2 * torch.rand(2, 8, 1, generator=g) + 2
    return xy, torch.cat([z * xy, z], -1) + 0.01 * torch.randn(2, 8, 3, generator=g)


def _spd():
    a = _randn(2, 4, 4, seed=1)
    return a @ a.mT + torch.eye(4)


_P2D, _P3D = _pnp_points()

# (name, inputs, node as a function of them returning one tensor); gradients are taken
# with respect to the first input.
CASES = [
    ("robust_pool welsch", (_randn(3, 7),), lambda x: robust_pool(x, "welsch", 0.7)),
    ("robust_vector_pool quadratic", (_randn(3, 2, 7),), lambda x: robust_vector_pool(x, "quadratic", 0.7)),
    ("robust_vector_pool huber", (_randn(3, 2, 7),), lambda x: robust_vector_pool(x, "huber", 0.7)),
    ("robust_vector_pool pseudo_huber", (_randn(3, 2, 7),), lambda x: robust_vector_pool(x, "pseudo_huber", 0.7)),
    ("robust_vector_pool welsch", (_randn(3, 2, 7),), lambda x: robust_vector_pool(x, "welsch", 0.7)),
    ("robust_vector_pool trunc_quad", (_randn(3, 2, 7),), lambda x: robust_vector_pool(x, "trunc_quad", 0.7)),
    ("robust_vector_pool huber C > N", (_randn(2, 6, 3),), lambda x: robust_vector_pool(x, "huber", 0.7)),
    ("project_lp L1 ball", (3 * _randn(3, 7),), lambda x: project_lp(x, 1, "ball", 0.7)),
    ("project_lp L2 sphere", (_randn(3, 7),), lambda x: project_lp(x, 2, "sphere", 0.7)),
    ("project_simplex", (_randn(3, 7),), lambda x: project_simplex(x, z=1.5)),
    ("entmax", (_randn(3, 7),), lambda x: entmax(x, 1.5)),
    ("sinkhorn", (_randn(2, 4, 5).abs(),), lambda c: sinkhorn(c, eps=0.5)),
    ("eigen_decomposition", (_spd(),), lambda s: eigen_decomposition(s, 2).eigenvectors.abs()),
    ("least_squares", (_randn(3, 6, 2), _randn(3, 6, seed=1)), lambda a, b: least_squares(a, b, ridge=0.1)),
    ("linear_fit", (_randn(3, 2, 6), _randn(3, 6, seed=1)), lambda x, t: linear_fit(x, t, ridge=0.1).coef),
    ("tv_denoise", (_randn(3, 9),), lambda x: tv_denoise(x, 0.3)),
    ("tridiagonal_solve", (4 + _randn(3, 6).abs(), _randn(3, 6, seed=1)),
     lambda d, r: tridiagonal_solve(d, torch.ones_like(d[..., 1:]), -torch.ones_like(d[..., 1:]), r)),
    ("pnp huber", (_P3D, _P2D), lambda p3d, p2d: pnp(p2d, p3d, penalty="huber", alpha=0.5)),
]


def _run(node, inputs, autocast=None, backward_inside=False):
    """Output and gradient, the forward under ``autocast`` and the backward outside it
    (torch's recommended use), or inside it too."""
    x = inputs[0].clone().requires_grad_()
    with autocast if autocast is not None else contextlib.nullcontext():
        y = node(x, *inputs[1:])
        if backward_inside:
            (g,) = torch.autograd.grad((y * torch.linspace(1, 2, y.shape[-1], device=y.device)).sum(), x)
    if not backward_inside:
        (g,) = torch.autograd.grad((y * torch.linspace(1, 2, y.shape[-1], device=y.device)).sum(), x)
    return y.detach(), g


@pytest.mark.parametrize("name,inputs,node", CASES, ids=[c[0] for c in CASES])
def test_autocast_cpu_bfloat16_matches_float32(name, inputs, node):
    y_ref, g_ref = _run(node, inputs)
    y, g = _run(node, inputs, torch.autocast("cpu", dtype=torch.bfloat16))
    assert y.dtype == F32 and g.dtype == F32
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,inputs,node", CASES, ids=[c[0] for c in CASES])
def test_autocast_cpu_bfloat16_backward_inside(name, inputs, node):
    """The whole step under autocast (the backward inside the context too): the
    eigen backward's products were lowered to bfloat16, 1e-3 off."""
    y_ref, g_ref = _run(node, inputs)
    y, g = _run(node, inputs, torch.autocast("cpu", dtype=torch.bfloat16), backward_inside=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g.float(), g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,inputs,node", CASES, ids=[c[0] for c in CASES])
def test_autocast_cuda_float16_matches_float32(name, inputs, node):
    inputs = tuple(t.cuda() for t in inputs)
    y_ref, g_ref = _run(node, inputs)
    y, g = _run(node, inputs, torch.autocast("cuda", dtype=torch.float16))
    assert y.dtype == F32 and g.dtype == F32
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
