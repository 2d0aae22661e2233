"""Tests of convexddn.nodes.vector_pool: robust pooling of a set of vectors.

Expected values come from the mean (closed form), scipy minimisers of the objective
written out here, brute force over inlier subsets (truncated quadratic: the global
minimiser is the mean of its own inliers), and finite differences (gradcheck).
"""
from __future__ import annotations

import itertools
import math
import re
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from convexddn.errors import (DoubleBackwardError, DTypeError, GradientWarning, NonFiniteError, OptionError,
                              ProblemError, ShapeError, SolverError, SolverWarning)
from convexddn.nodes.pooling import robust_pool
from convexddn.nodes.vector_pool import RobustVectorPool, robust_vector_pool

D = torch.float64
NAMES = ("quadratic", "pseudo_huber", "huber", "welsch", "trunc_quad")


def phi_ref(name, z, a):
    """Gould et al. Table 1 on a distance z >= 0, written out independently (numpy)."""
    if name == "quadratic":
        return 0.5 * z**2
    if name == "pseudo_huber":
        return a * a * (np.sqrt(1 + (z / a) ** 2) - 1)
    if name == "huber":
        return np.where(z <= a, 0.5 * z**2, a * (z - 0.5 * a))
    if name == "welsch":
        return 1 - np.exp(-(z**2) / (2 * a * a))
    return 0.5 * np.minimum(z**2, a * a)


def objective(name, X, u, a):
    """Σ_i φ(‖u − x_i‖) for X (N, C), u (C,)."""
    return float(phi_ref(name, np.linalg.norm(u[None] - X, axis=1), a).sum())


def clustered(seed, batch=3, c=3, n=12, dtype=D):
    """(batch, c, n) inliers around the origin plus three gross outliers per set."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c, n, generator=g, dtype=dtype)
    x[..., :3] += 8.0
    return x


def kink_margin(x, y, a):
    """min_i | ‖y − x_i‖ − alpha | for x (B, C, N), y (B, C)."""
    return float(((y.unsqueeze(-1) - x).norm(dim=-2) - a).abs().min())


# --------------------------------------------------------------------------- forward


def test_robust_vector_pool_quadratic_is_mean():
    x = clustered(0)
    torch.testing.assert_close(robust_vector_pool(x, "quadratic"), x.mean(-1), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["pseudo_huber", "huber"])
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_robust_vector_pool_convex_global(name, alpha):
    x = clustered(1)
    y = robust_vector_pool(x, name, alpha)
    for b in range(x.shape[0]):
        X = x[b].T.numpy()
        res = minimize(lambda u: objective(name, X, u, alpha), X.mean(0), method="Nelder-Mead",
                       options={"xatol": 1e-11, "fatol": 1e-14, "maxiter": 20000})
        assert abs(objective(name, X, y[b].numpy(), alpha) - res.fun) <= 1e-10 * (1 + abs(res.fun))
        np.testing.assert_allclose(y[b].numpy(), res.x, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_robust_vector_pool_trunc_quad_global_small(seed):
    # Brute force: the global minimiser is the mean of some subset (its own inliers).
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(9, 2, generator=g, dtype=D) * 1.5
    a = 1.2
    y = robust_vector_pool(X.T, "trunc_quad", a, dim=-1, vector_dim=0).numpy()
    Xn = X.numpy()
    best = min(objective("trunc_quad", Xn, Xn[list(S)].mean(0), a)
               for r in range(1, 10) for S in itertools.combinations(range(9), r))
    assert objective("trunc_quad", Xn, y, a) <= best + 1e-12


@pytest.mark.parametrize("name", ["welsch", "trunc_quad"])
def test_robust_vector_pool_beats_mean_and_median_starts(name):
    # A tight cluster of 6 far from a loose cluster of 7: local searches from the mean
    # and from the coordinate median (the reference's two starts) end in the loose one.
    g = torch.Generator().manual_seed(0)
    X = torch.cat([10 + 0.1 * torch.randn(6, 2, generator=g, dtype=D), 1.5 * torch.randn(7, 2, generator=g, dtype=D)])
    Xn = X.numpy()
    local = [minimize(lambda u: objective(name, Xn, u, 1.0), s, method="Nelder-Mead",
                      options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 5000}).fun
             for s in (Xn.mean(0), np.median(Xn, 0))]
    y = robust_vector_pool(X.T.unsqueeze(0), name, 1.0)[0].numpy()
    f = objective(name, Xn, y, 1.0)
    assert f < min(local) - 1.0
    assert np.linalg.norm(y - Xn[:6].mean(0)) < 0.1
    # starts=0 keeps only the reference's two starts (and its worse minimum).
    y0 = robust_vector_pool(X.T.unsqueeze(0), name, 1.0, starts=0)[0].numpy()
    assert objective(name, Xn, y0, 1.0) > f + 1.0


def test_robust_vector_pool_welsch_stationary():
    x = clustered(2)
    y = robust_vector_pool(x, "welsch", 1.0)
    d = y.unsqueeze(-1) - x
    grad = (d * torch.exp(-0.5 * (d * d).sum(-2, keepdim=True))).sum(-1)
    assert grad.abs().max() < 1e-10


def test_robust_vector_pool_dims():
    x = torch.randn(2, 4, 3, 5, dtype=D)
    y = robust_vector_pool(x, "huber", 1.0, dim=(-2, -1), vector_dim=1)
    assert y.shape == (2, 4)
    ref = robust_vector_pool(x.flatten(-2), "huber", 1.0)
    torch.testing.assert_close(y, ref)
    # Vectors last: (B, N, C) pooled over dim 1.
    z = robust_vector_pool(x.flatten(-2).mT, "huber", 1.0, dim=1, vector_dim=2)
    torch.testing.assert_close(z, ref)
    # Batch dims after the vector dim stay in order: (C, B, N) -> (C, B).
    w = robust_vector_pool(x.flatten(-2).permute(1, 0, 2), "huber", 1.0, dim=-1, vector_dim=0)
    torch.testing.assert_close(w, ref.T)
    assert robust_vector_pool(torch.randn(0, 3, 4), "welsch").shape == (0, 3)


def test_robust_vector_pool_float32_matches_float64():
    x = clustered(3)
    for name in NAMES:
        y64 = robust_vector_pool(x, name, 1.0)
        y32 = robust_vector_pool(x.float(), name, 1.0)
        assert y32.dtype == torch.float32
        torch.testing.assert_close(y32.double(), y64, atol=1e-4, rtol=0)


def _irls_from(name, X, u, a):
    """IRLS (direct differences, float64 numpy) from u on X (N, C); returns its objective."""
    for _ in range(300):
        z = np.linalg.norm(u[None] - X, axis=1)
        w = np.exp(-(z**2) / (2 * a * a)) if name == "welsch" else (z <= a).astype(float)
        new = (w[:, None] * X).sum(0) / w.sum()
        if np.abs(new - u).max() <= 1e-12 * (1 + np.abs(u).max()):
            break
        u = new
    return objective(name, X, u, a)


@pytest.mark.parametrize("name", ["welsch", "trunc_quad"])
@pytest.mark.parametrize("dtype, spread", [(torch.float32, 1e4), (torch.float32, 1e3), (torch.float64, 1e10)])
def test_robust_vector_pool_wide_set_keeps_the_best_basin(name, dtype, spread):
    # Sets of two clusters 2·spread·alpha apart, of 6 points and 4 (and a common shift):
    # the 6-point one holds the global minimum. The start phase's Gram-form distances
    # (‖u‖² − 2uᵀx + ‖x‖²) erred by ~eps·spread² there and picked the 4-point cluster in
    # some sets (float32 at 1e4, Welsch: objective 6.48 against 4.29; here 2 of these
    # 256 sets at 1e4 (Welsch), 1 at 1e3 (truncated quadratic), 1 in float64 at 1e10).
    g = torch.Generator().manual_seed(5)
    B = 256
    off = torch.rand(B, 10, 3, generator=g, dtype=D) - 0.5
    side = torch.tensor([1.0] * 6 + [-1.0] * 4, dtype=D)[:, None]
    shift = spread * (torch.rand(B, 1, 3, generator=g, dtype=D) - 0.5)
    X = (off + side * spread * torch.randn(B, 1, 3, generator=g, dtype=D).sign() + shift).to(dtype)
    Xn = X.double().numpy()
    y = robust_vector_pool(X.mT, name, 1.0)
    assert y.dtype == dtype
    for b in range(B):
        f = objective(name, Xn[b], y[b].double().numpy(), 1.0)
        # float32 positions carry rounding eps·spread (1e-3 at 1e4)
        assert f <= _irls_from(name, Xn[b], Xn[b, :6].mean(0), 1.0) + 1e-2, b


# --------------------------------------------------------------------------- backward


@pytest.mark.parametrize("name", NAMES)
def test_robust_vector_pool_grad(name):
    x = clustered(4, batch=2, c=3, n=8)
    y = robust_vector_pool(x, name, 1.0)
    assert name not in ("huber", "trunc_quad") or kink_margin(x, y, 1.0) > 1e-3
    xr = x.clone().requires_grad_()
    alpha = torch.tensor([1.0, 1.0], dtype=D, requires_grad=True)
    # Nonconvex penalties run a multi-start search per call: fast_mode checks random
    # directions (a few solves) instead of one finite difference per entry.
    fast = name in ("welsch", "trunc_quad")
    assert torch.autograd.gradcheck(lambda x, a: robust_vector_pool(x, name, a), (xr, alpha), fast_mode=fast)


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch"])
def test_robust_vector_pool_grad_more_dims_than_points(name):
    # C = 6 > N = 4: the backward solves the Woodbury (N×N) system.
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(5), dtype=D).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: robust_vector_pool(x, name, 2.0), (x,), fast_mode=name == "welsch")


def test_robust_vector_pool_grad_quadratic_closed_form():
    x = clustered(6).requires_grad_()
    g = torch.randn(3, 3, dtype=D)
    (robust_vector_pool(x, "quadratic") * g).sum().backward()
    torch.testing.assert_close(x.grad, (g / 12).unsqueeze(-1).expand(3, 3, 12))


def test_robust_vector_pool_singular_hessian_warns():
    # Huber, two points 10 apart, alpha 1: every point of the segment is a minimiser.
    x = torch.tensor([[[-5.0, 5.0], [0.0, 0.0]]], dtype=D, requires_grad=True)
    y = robust_vector_pool(x, "huber", 1.0)
    with pytest.warns(GradientWarning, match="singular for 1 of 1"):
        y.sum().backward()
    assert bool((x.grad == 0).all())


def test_robust_vector_pool_nearly_singular_hessian_warns():
    # The same degeneracy in general position (and the Woodbury form, more components
    # than points): rounding keeps the Hessian from being exactly singular, and the
    # solve returned a finite, arbitrary gradient without a warning.
    for pts in ([[0.0, 0.0], [3.0, 4.0]], [[0.1, 0.2], [3.3, 4.1]], [[0.1, 0.2, 0.3], [3.3, 4.1, -2.0]]):
        x = torch.tensor(pts, dtype=D).T.unsqueeze(0).requires_grad_()
        with pytest.warns(GradientWarning, match="singular for 1 of 1"):
            robust_vector_pool(x, "huber", 1.0)[0, 0].backward()
        assert bool((x.grad == 0).all())



def test_robust_vector_pool_warnings_name_the_batch_index():
    """The warnings named the set by its row among the flattened batch ("flat indices [5]"
    for set (1, 2) of a (2, 3) batch), which the caller cannot index with; they name (1, 2).
    Backward and forward mode: Huber, two points 10 apart at (1, 2), every point between
    them a minimiser (H singular), close pairs (inliers, H regular) elsewhere. Forward:
    pseudo-Huber, alpha = 1e-8, points 0, 0.1, ..., 0.9 at (1, 2), too flat to resolve
    (test_vector_pool_polish), a single repeated point elsewhere."""
    x = torch.tensor([[0.0, 0.5], [0.0, 0.3]], dtype=D).expand(2, 3, 2, 2).clone()
    x[1, 2] = torch.tensor([[-5.0, 5.0], [0.0, 0.0]], dtype=D)
    named = r"for 1 of 6 batch element\(s\) \(indices \[\(1, 2\)\]\)"
    with pytest.warns(GradientWarning, match="singular " + named):
        robust_vector_pool(x.requires_grad_(), "huber", 1.0).sum().backward()
    with pytest.warns(GradientWarning, match="singular " + named):
        torch.func.jacfwd(lambda t: robust_vector_pool(t, "huber", 1.0))(x.detach())
    flat = torch.zeros(2, 3, 1, 10, dtype=D)
    flat[1, 2, 0] = torch.linspace(0, 1, 11, dtype=D)[:10]
    with pytest.warns(SolverWarning, match=r": 1 of 6 batch element\(s\) \(indices \[\(1, 2\)\]\) cannot be resolved"):
        robust_vector_pool(flat, "pseudo_huber", 1e-8)


# --------------------------------------------------------------------------- module and errors


def test_robust_vector_pool_module():
    alpha = torch.nn.Parameter(torch.tensor(1.0, dtype=D))
    m = RobustVectorPool("welsch", alpha, dim=(-2, -1), vector_dim=1, starts=4)
    assert repr(m).startswith("RobustVectorPool(penalty='welsch', alpha=Parameter(1.0), dim=(-2, -1), vector_dim=1")
    x = torch.randn(2, 3, 4, 4, dtype=D)
    m(x).sum().backward()
    assert alpha.grad is not None and torch.isfinite(alpha.grad)
    assert "alpha" in dict(RobustVectorPool("huber", torch.tensor(2.0)).named_buffers())


def test_robust_vector_pool_module_repr_tensor_alpha():
    """A tensor alpha shows its value (0-d), Parameter(value) (learnable) or its shape."""
    shown = {
        torch.tensor(2.0): "alpha=2.0,",
        torch.nn.Parameter(torch.tensor(0.25, dtype=D)): "alpha=Parameter(0.25),",
        torch.tensor([2.0]): "alpha=tensor([2.0]),",
        torch.ones(2, 5): "alpha=tensor of shape (2, 5),",
    }
    for alpha, expected in shown.items():
        text = repr(RobustVectorPool("huber", alpha))
        assert expected in text and "Tensor" not in text, text
    assert repr(RobustVectorPool("huber", 0.5, starts=3)) == (
        "RobustVectorPool(penalty='huber', alpha=0.5, dim=-1, vector_dim=-2, starts=3)")


# The DDN reference's spellings (ddn/basic/robust_nodes.py) and convexddn's spelled-out
# "truncated-quadratic" (not a string of the reference: ddn/pytorch takes classes).
DDN_NAMES = {"pseudo-huber": "pseudo_huber", "trunc-quad": "trunc_quad", "truncated-quadratic": "trunc_quad"}


@pytest.mark.parametrize("alias", sorted(DDN_NAMES))
def test_robust_vector_pool_ddn_penalty_names(alias):
    name = DDN_NAMES[alias]
    x = clustered(21)
    alpha = torch.tensor([0.5, 1.0, 2.0], dtype=D)
    xa, aa = x.clone().requires_grad_(), alpha.clone().requires_grad_()
    xc, ac = x.clone().requires_grad_(), alpha.clone().requires_grad_()
    ya, yc = robust_vector_pool(xa, alias, aa, starts=4), robust_vector_pool(xc, name, ac, starts=4)
    assert torch.equal(ya, yc)
    ya.sum().backward()
    yc.sum().backward()
    assert torch.equal(xa.grad, xc.grad) and torch.equal(aa.grad, ac.grad)
    pool = RobustVectorPool(alias, 0.7, starts=4)
    assert torch.equal(pool(x), RobustVectorPool(name, 0.7, starts=4)(x))
    assert f"penalty={name!r}" in repr(pool) and alias not in repr(pool)  # canonical name shown


def test_robust_vector_pool_module_repr_after_penalty_reassigned():
    """A name assigned to .penalty (what the constructor takes) broke repr: AttributeError."""
    pool = RobustVectorPool("huber")
    pool.penalty = "pseudo-huber"
    assert repr(pool) == "RobustVectorPool(penalty='pseudo_huber', alpha=1.0, dim=-1, vector_dim=-2)"


def test_robust_vector_pool_ddn_penalty_names_invalid():
    x = clustered(22)
    for bad in ("pseudo huber", "trunc-quadratic", "cauchy"):
        for call, args in ((robust_vector_pool, (x, bad)), (RobustVectorPool, (bad,))):
            with pytest.raises(OptionError) as err:
                call(*args)
            msg = str(err.value)
            assert repr(bad) in msg and all(repr(name) in msg for name in NAMES)
            assert "pseudo-huber" not in msg  # the error lists the canonical names


def test_robust_vector_pool_not_converged_warns():
    with pytest.warns(SolverWarning, match="did not reach"):
        robust_vector_pool(clustered(7), "pseudo_huber", 0.1, max_iter=1)


def test_robust_vector_pool_invalid():
    x = clustered(8)
    with pytest.raises(DTypeError):
        robust_vector_pool(torch.ones(2, 3, 4, dtype=torch.int64))
    with pytest.raises(OptionError, match="penalty"):
        robust_vector_pool(x, "cauchy")
    with pytest.raises(OptionError, match="alpha"):
        robust_vector_pool(x, "huber", 0.0)
    with pytest.raises(OptionError, match="vector_dim"):  # -2 twice: the same dim at every rank
        robust_vector_pool(x, "huber", dim=(-2, -1))
    with pytest.raises(ShapeError, match="vector_dim"):  # 1 and -2: the same dim of a 3-d x only
        robust_vector_pool(x, "huber", dim=1)
    with pytest.raises(ShapeError, match="out of range"):
        robust_vector_pool(x, "huber", dim=3)
    with pytest.raises(ShapeError, match="at least one entry"):
        robust_vector_pool(torch.randn(2, 3, 0), "huber")
    with pytest.raises(ShapeError, match="at least one component"):
        robust_vector_pool(torch.randn(2, 0, 4), "huber")
    # numpy scalars are numbers (np.float32 is not a float subclass; it was refused)
    torch.testing.assert_close(robust_vector_pool(x, "huber", np.float32(0.5)), robust_vector_pool(x, "huber", 0.5))
    with pytest.raises(ShapeError, match="alpha must broadcast"):
        robust_vector_pool(x, "huber", torch.ones(4, dtype=D))
    with pytest.raises(OptionError, match="starts"):
        robust_vector_pool(x, "welsch", starts=-1)
    with pytest.raises(OptionError, match="max_iter"):
        robust_vector_pool(x, "welsch", max_iter=0)
    with pytest.raises(OptionError, match="tol"):
        RobustVectorPool("welsch", tol=-1.0)
    xn = x.clone()
    xn[0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="1 NaN"):
        robust_vector_pool(xn, "huber")


@pytest.mark.parametrize("dim, vector_dim", [(1, 1), ((1, 2), 2), (-1, -1), ((-3, -1), -3)])
def test_robust_vector_pool_dim_clash_is_an_option_error_at_construction(dim, vector_dim):
    """vector_dim among the pooled dims with indices of one sign is invalid for every input,
    but the constructor (which promises OptionError for invalid options) took it and the
    first call raised a ShapeError; a clash that depends on the rank stays a call's ShapeError."""
    msg = rf"vector_dim={vector_dim} must not be one of the pooled dims, dim={re.escape(repr(dim))}"
    with pytest.raises(OptionError, match=msg):
        RobustVectorPool("huber", dim=dim, vector_dim=vector_dim)
    with pytest.raises(OptionError, match=msg):
        robust_vector_pool(torch.randn(2, 3, 4, 5, dtype=D), "huber", dim=dim, vector_dim=vector_dim)
    pool = RobustVectorPool("huber", dim=1, vector_dim=-2)  # distinct at rank 4, the same dim at rank 3
    assert pool(torch.randn(2, 3, 4, 5, dtype=D)).shape == (2, 4, 5)
    with pytest.raises(ShapeError, match="vector_dim=-2 must not be one of the pooled dims"):
        pool(torch.randn(2, 3, 4, dtype=D))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_robust_vector_pool_cuda():
    for name in NAMES:
        x = clustered(9).cuda().requires_grad_()
        y = robust_vector_pool(x, name, 1.0)
        assert y.is_cuda
        y.sum().backward()
        xc = x.detach().cpu().requires_grad_()
        yc = robust_vector_pool(xc, name, 1.0)
        yc.sum().backward()
        torch.testing.assert_close(y.cpu(), yc, atol=1e-9, rtol=0)
        torch.testing.assert_close(x.grad.cpu(), xc.grad, atol=1e-7, rtol=1e-7)


def test_robust_vector_pool_alpha_on_another_device_is_an_input_error(on_other_device):
    # An OptionError before; every other node refuses an option on another device with
    # an InputError naming it and both devices.
    from convexddn.errors import InputError

    other = on_other_device(torch.tensor(0.7, dtype=D))
    with pytest.raises(InputError, match=r"alpha must be on x's device cpu, got cuda:0") as err:
        robust_vector_pool(clustered(0), "huber", other)
    assert not isinstance(err.value, OptionError)
    with pytest.raises(InputError, match=r"alpha must be on x's device cpu, got cuda:0"):
        RobustVectorPool("welsch", torch.nn.Parameter(other))(clustered(0))


def _autocast_case(name, device, autocast):
    """Module output and gradients (x, alpha) of a float32 set, forward and backward both
    under ``autocast`` (None: without)."""
    x = clustered(3, c=2, n=7, dtype=torch.float32).to(device).requires_grad_()
    pool = RobustVectorPool(name, torch.nn.Parameter(torch.tensor(0.7, device=device)))
    with autocast if autocast is not None else torch.autocast(device, enabled=False):
        y = pool(x)
        y.sum().backward()
    return y.detach(), x.grad, pool.alpha.grad


@pytest.mark.parametrize("device, low, tol", [
    ("cpu", torch.bfloat16, 1e-6),
    pytest.param("cuda", torch.float16, 1e-5,
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
@pytest.mark.parametrize("name", NAMES)
def test_robust_vector_pool_autocast(name, device, low, tol):
    # Under mixed precision the solver keeps float32: its matmuls were lowered to
    # bfloat16 (LU: NotImplementedError "lu_cpu" for huber, pseudo_huber, welsch; the
    # truncated quadratic returned float32 off by ~1e-3).
    ref = _autocast_case(name, device, None)
    got = _autocast_case(name, device, torch.autocast(device, dtype=low))
    for g, r in zip(got, ref):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["welsch", "huber", "pseudo_huber", "trunc_quad"])
def test_robust_vector_pool_scale_equivariant(name):
    # y(s x, s alpha) = s y(x, alpha): data and alpha scaled together far from 1 (alpha²
    # underflowed at 1e-20 in float32: Welsch gave NaN; at 1e25 Huber gave the plain mean).
    # (The first set's minimiser is unique: with points (0, 0), (1, 2), (10, 0) Welsch had
    # two mirror-image minima, (0.145, 0.290) and (0.855, 1.710), equal to float32
    # rounding, and which one came back at 1e25 depended on the CPU's kernels.)
    x = torch.tensor([[[0.0, 1.0, 0.5], [0.0, 2.0, 0.2]], [[3.0, -1.0, 0.5], [2.0, 0.0, 1.0]]])
    for dtype, scales in ((torch.float32, (1e-20, 1e25)), (torch.float64, (1e-170, 1e170))):
        xd = x.to(dtype)
        ref = robust_vector_pool(xd, name, 1.0)
        for s in scales:
            for alpha in (s, torch.tensor([s, s], dtype=dtype)):
                y = robust_vector_pool(xd * s, name, alpha) / s
                torch.testing.assert_close(y, ref, rtol=4 * torch.finfo(dtype).eps * 10, atol=0)
    # Gradients are scale-invariant (with respect to x and to alpha).
    grads = []
    for s in (1.0, 1e-170):
        xg = (x.double() * s).requires_grad_()
        a = torch.tensor(s, dtype=torch.float64, requires_grad=True)
        robust_vector_pool(xg, name, a).sum().backward()
        grads.append((xg.grad, a.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype,s,cot", [(torch.float32, 1e20, 1e20), (torch.float32, 1e-25, 1e-25),
                                         (torch.float64, 2.0**-1040, 1.0)])
def test_robust_vector_pool_gradient_in_far_units(name, dtype, s, cot):
    # x and alpha in units of s, the cotangent in units of cot: the gradients (unit-free
    # Jacobians applied to the cotangent) are those at unit scale times cot. The change
    # of units went through autograd, which multiplied the cotangent by s before the
    # Hessian solve and divided after: float32 gave Inf at 1e20 and 0 at 1e-25 (the
    # quadratic's cotangent / N too), float64 lost digits at a subnormal alpha; silently.
    x = torch.tensor([[[1.0, 2.0, 4.0, 8.0, 2.5], [0.5, -1.0, 3.0, 2.0, 0.0]]], dtype=D)
    grads = []
    for scale, c in ((1.0, 1.0), (s, cot)):
        xs = (x * scale).to(dtype).requires_grad_()
        a = torch.tensor(2.0 * scale, dtype=dtype, requires_grad=True)
        y = robust_vector_pool(xs, name, a)
        gy = torch.tensor([[3.0, -2.0]], dtype=dtype) * c
        gx, ga = torch.autograd.grad(y, (xs, a), gy)
        grads.append((gx.double() / c, ga.double() / c))
    rtol = 1e-5 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=rtol, atol=rtol)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=rtol, atol=rtol)
    if name == "quadratic":  # the mean: cotangent / N for every point, nothing for alpha
        torch.testing.assert_close(grads[1][0], torch.tensor([3.0, -2.0], dtype=D).view(1, 2, 1).expand(1, 2, 5) / 5)


def test_robust_vector_pool_far_outlier_float32_and_overflow_error():
    # A float32 set spreading 1e25 alpha: its squared distances overflow float32 (every
    # norm was inf and Welsch stopped at its start); it is solved in float64 instead.
    # Beyond float64's range the call refuses rather than return a wrong point.
    x = torch.tensor([[[0.0, 1.0, 0.2, 1e25], [0.0, 2.0, 0.1, 0.0]]])
    y = robust_vector_pool(x, "welsch", 1.0)
    torch.testing.assert_close(y, robust_vector_pool(x.double(), "welsch", 1.0).float())
    torch.testing.assert_close(y, robust_vector_pool(x[..., :3], "welsch", 1.0), rtol=1e-6, atol=1e-6)
    with pytest.raises(SolverError, match="spread up to 1.0e\\+200 times alpha"):
        robust_vector_pool(torch.tensor([[[0.0, 1.0, 1e200], [0.0, 2.0, 0.0]]], dtype=torch.float64), "huber", 1.0)


@pytest.mark.parametrize("alpha,scale", [(1e-40, 1.0), ("tensor", 1.0), (1e-50, 1.0), (1e39, 1.0),
                                         (1e-9, 1e30), (1e-3, 1e30)])
@pytest.mark.parametrize("name", ["huber", "welsch"])
def test_robust_vector_pool_float32_alpha_or_data_at_the_range_ends(alpha, scale, name):
    """float32 sets spreading ~3 with alpha = 1e-40 (a float32 subnormal) or 1e-50
    (0 in float32), or spreading 3e30 with alpha = 1e-9: spread / alpha is far below the
    documented 2^500, but x3 / 2^round(log2 alpha) overflowed float32 before the range
    check and a SolverError reported a spread of "inf times alpha" ("nan times alpha"
    for alpha = 1e39, Inf in float32, and 1e-50). Reference: the float64 call on the
    same values, and closed forms independent of it (below)."""
    x = torch.randn(3, 2, 9, generator=torch.Generator().manual_seed(3)) * scale
    a = torch.tensor(1e-40) if alpha == "tensor" else alpha
    y = robust_vector_pool(x, name, a)
    want = robust_vector_pool(x.double(), name, a.double() if alpha == "tensor" else alpha)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want.float(), rtol=1e-5, atol=1e-5 * scale)
    # Independent of the float64 path, in units of the data (float64): alpha far above
    # the spread makes every point an inlier of the mean (both penalties); far below the
    # distances, Huber's gradient is alpha times the sum of the unit vectors (u - x_i) /
    # |u - x_i|, which vanishes at the geometric median, and Welsch's every data point
    # ties (the other points cost 1 each), its minimiser is one of them.
    xd, yd = x.double() / scale, y.double() / scale
    if (1e-40 if alpha == "tensor" else alpha) > scale:
        torch.testing.assert_close(yd, xd.mean(-1), rtol=0, atol=1e-6)
    else:
        d = yd.unsqueeze(-1) - xd  # (3 sets, C, N)
        z = d.norm(dim=1)
        if name == "huber":
            assert (z > 1e-3).all()  # off the data points, where the gradient is smooth
            assert ((d / z.unsqueeze(1)).sum(-1).norm(dim=1) < 1e-5).all()
        else:
            assert (z == 0).any(-1).all()


def test_robust_vector_pool_equal_vectors_far_from_zero_with_tiny_alpha():
    """Sets of one repeated vector (spread 0) of 1e30 with alpha = 1e-20: in units of
    alpha the entries overflow float32 (a SolverError reported a spread of "nan times
    alpha"). Float64 sets at 1e300 with alpha = 1e-5 (entries 1e305 alpha: a SolverError
    said they overflow float64 in those units) are solved relative to their midpoint.
    Closed form: the vector itself, for every penalty."""
    x = torch.tensor([1e30, -2e30, 3e29]).view(1, 3, 1).expand(2, 3, 5).contiguous()
    y = robust_vector_pool(x, "huber", 1e-20)
    torch.testing.assert_close(y, x[..., 0], rtol=0, atol=0)
    x = torch.tensor([1e300, -3e299], dtype=D).view(1, 2, 1).expand(2, 2, 3).contiguous()
    for name in NAMES:
        torch.testing.assert_close(robust_vector_pool(x, name, 1e-5), x[..., 0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype,offset,alpha", [(torch.float32, 1e37, 1.0), (torch.float32, -3e38, 1e-30),
                                                (torch.float32, 1e6, 1.0), (D, 1e300, 1e-5), (D, -1e300, 1.0),
                                                (D, 1e20, 1.0)])
@pytest.mark.parametrize("name", NAMES)
def test_robust_vector_pool_sets_far_from_zero(dtype, offset, alpha, name):
    """100 vectors at 1e37 in float32 with a float alpha in [2^-16, 2^16]: the entries'
    range was checked only for rescaled alphas, and their sum overflowed (the review's
    100 identical vectors returned [inf, inf, inf] for every penalty but Welsch); float64
    sets at 1e300 with alpha = 1e-5 raised SolverError; sets offset by 1e6 (float32) or
    1e20 (float64) stopped where the step fell below tol times the offset (Huber: 0.2
    alpha short in r), and identical vectors at -1e300 returned their rounded mean.
    References independent of the vector solver: identical vectors are the answer
    themselves; for vectors (offset, r_i) the first component is the offset and the
    distances are |u_2 - r_i|, so the second component is the scalar pool of r
    (robust_pool), and the gradient is that of the same set moved to (0, r_i)."""
    from convexddn.nodes.pooling import robust_pool

    same = torch.full((1, 3, 100), offset, dtype=dtype)
    torch.testing.assert_close(robust_vector_pool(same, name, alpha), same[..., 0], rtol=0, atol=0)
    r = (3 * alpha) * torch.randn(2, 100, generator=torch.Generator().manual_seed(6), dtype=D)
    x = torch.stack([torch.full_like(r, offset), r], 1).to(dtype)  # (2, C=2, N=100)
    xg = x.clone().requires_grad_()
    y = robust_vector_pool(xg, name, alpha)
    tol = (1e-5 if dtype == torch.float32 else 1e-11) * alpha
    torch.testing.assert_close(y[:, 0], x[:, 0, 0], rtol=0, atol=0)
    torch.testing.assert_close(y[:, 1], robust_pool(x[:, 1], name, alpha), rtol=0, atol=tol)
    x0 = torch.stack([torch.zeros_like(x[:, 0]), x[:, 1]], 1).requires_grad_()
    gy = torch.randn(2, 2, generator=torch.Generator().manual_seed(7), dtype=dtype)
    g, = torch.autograd.grad(y, xg, gy)
    g0, = torch.autograd.grad(robust_vector_pool(x0, name, alpha), x0, gy)
    torch.testing.assert_close(g, g0, rtol=1e-4 if dtype == torch.float32 else 1e-9, atol=1e-6)


@pytest.mark.parametrize("offset", [0.0, 1e6])
@pytest.mark.parametrize("alpha", [1.0, "tensor"])
def test_robust_vector_pool_range_check_reads_the_host_once(offset, alpha, host_reads):
    """The range check (spread, offset, scale and finiteness of x) is one host read,
    whether or not a set is moved to its midpoint or alpha rescaled."""
    from convexddn.nodes._vector_pool_units import in_units as _in_units

    x3 = torch.randn(4, 10, 3, generator=torch.Generator().manual_seed(8)) + offset
    a = torch.full((4,), 0.5, dtype=D) if alpha == "tensor" else torch.tensor(1.0, dtype=D)
    with host_reads.counting():
        _, _, _, anchor = _in_units(x3, x3, a, alpha == "tensor")
    assert host_reads.count == 1
    assert (anchor is None) == (offset == 0.0)


def test_robust_vector_pool_output_is_contiguous():
    """vector_dim before the kept dims: the rows were moved back as a view (strides
    (1, 4) for a (4, 6) result of a contiguous input) and y.view(-1) raised. Closed
    form for the quadratic penalty: the mean over the pooled dim."""
    x = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(4), dtype=D)
    for name in ("quadratic", "huber"):
        y = robust_vector_pool(x, name, 1.0, dim=-1, vector_dim=0)
        assert y.shape == (4, 6) and y.is_contiguous()
        assert y.view(-1).shape == (24,)
    torch.testing.assert_close(robust_vector_pool(x, "quadratic", 1.0, dim=-1, vector_dim=0), x.mean(-1),
                               rtol=1e-14, atol=1e-15)
    x4 = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(5), dtype=D)
    y = robust_vector_pool(x4, "quadratic", 1.0, dim=(0, 3), vector_dim=1)  # (C=3, kept 4): vector first
    assert y.is_contiguous()
    torch.testing.assert_close(y, x4.mean((0, 3)), rtol=1e-14, atol=1e-15)


def test_hessian_solve_fast_path_agrees_with_the_careful_one(host_reads):
    """The backward's C×C Hessian solve takes a Cholesky factorisation where a bound on
    κ (‖H‖_F ‖L⁻¹‖_F², times n for equilibration) clears the singularity threshold for
    every row (one host read, which the backward's verdict reuses), else the equilibrated
    LU with a condition estimate: same solutions on well-conditioned rows, the same
    verdict on a nearly singular one."""
    from convexddn.nodes._vector_pool_solvers import hess_solve_checked
    from convexddn.nodes.dense import checked_solve

    gen = torch.Generator().manual_seed(5)
    n = torch.randn(6, 7, 5, dtype=D, generator=gen)
    c = torch.rand(6, 7, dtype=D, generator=gen) + 0.1
    s = torch.full((6,), 0.5, dtype=D)
    rhs = torch.randn(6, 5, dtype=D, generator=gen)
    H = (n * c.unsqueeze(-1)).mT @ n + 0.5 * torch.eye(5, dtype=D)
    with host_reads.counting():
        v, ok, all_ok, _ = hess_solve_checked(s, n, c, rhs)
    assert host_reads.count == 1
    v_ref, singular, _, _ = checked_solve(H, rhs)
    assert all_ok and ok.all() and not singular.any()
    torch.testing.assert_close(v, torch.linalg.solve(H, rhs), rtol=1e-12, atol=0)
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=0)
    n[2] = torch.randn(1, 5, dtype=D, generator=gen)  # every term along one direction
    s[2] = 1e-15  # rank one, nearly singular
    H = (n * c.unsqueeze(-1)).mT @ n + s.view(-1, 1, 1) * torch.eye(5, dtype=D)
    v, ok, all_ok, _ = hess_solve_checked(s, n, c, rhs)
    _, singular, _, _ = checked_solve(H, rhs)
    assert not all_ok and torch.equal(ok, ~singular) and not ok[2] and ok[[0, 1, 3, 4, 5]].all()


# --------------------------------------------------------------------------- forward mode


def _fwd(fn, primals, tangents):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        return fwAD.unpack_dual(out).tangent


@pytest.mark.parametrize("name", NAMES)
def test_vector_pool_forward_mode_matches_central_differences(name):
    """Forward mode differentiated the solver's own ops: NaN tangents for Welsch on 63
    of 150 small sets (sqrt(0) in the start phase), wrong ones elsewhere."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 2, 7, dtype=D, generator=g)  # (B, C, N)
    x[:, :, -1] += 6.0  # an outlier per set
    alpha = torch.tensor([0.8, 1.0, 1.3], dtype=D)
    tx, ta = torch.randn(x.shape, dtype=D, generator=g), torch.randn(3, dtype=D, generator=g)
    fn = lambda u, a: robust_vector_pool(u, name, a)  # noqa: E731
    dy = _fwd(fn, (x, alpha), (tx, ta))
    h = 1e-6
    fd = (fn(x + h * tx, alpha + h * ta) - fn(x - h * tx, alpha - h * ta)) / (2 * h)
    torch.testing.assert_close(dy, fd, rtol=1e-6, atol=1e-7)
    _, dy_func = torch.func.jvp(fn, (x, alpha), (tx, ta))
    torch.testing.assert_close(dy_func, dy, rtol=1e-12, atol=1e-12)


def test_vector_pool_forward_mode_one_vector_and_gradcheck():
    x = torch.tensor([[[0.7], [-0.2]]], dtype=D)  # one vector: y = x, so ẏ = ẋ
    t = torch.tensor([[[1.0], [0.0]]], dtype=D)
    for name in ("huber", "welsch"):
        torch.testing.assert_close(_fwd(lambda u: robust_vector_pool(u, name, 1.0), (x,), (t,)), t[..., 0])
    z = torch.randn(2, 3, 5, dtype=D, generator=torch.Generator().manual_seed(2))
    assert torch.autograd.gradcheck(lambda u: robust_vector_pool(u, "welsch", 1.0), (z.requires_grad_(),),
                                    check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False)


def _flat_huber(angle):
    """Two points 3.2 apart, Huber at alpha 1: a segment of minimisers (no derivative)."""
    u = torch.tensor([np.cos(angle), np.sin(angle)], dtype=D)
    c = torch.tensor([0.3, -0.7], dtype=D)
    return torch.stack([c - 1.5 * u, c + 1.7 * u], -1).unsqueeze(0)  # (1, C=2, N=2)


@pytest.mark.parametrize("angle", [0.3, np.pi / 2 - 0.013, np.pi / 2 - 0.003])
def test_vector_pool_singular_hessian_is_found_at_any_orientation(angle):
    """Rotated off the axes, the Hessian's flat direction was only nearly singular after
    rounding (λ_min/‖H‖ = 2.2e-16, an equilibrated condition of 6e13 below the 2e14
    threshold): the backward returned ±1 (the solver's own derivative is 0.5), silently.
    Both modes now give zero with a GradientWarning."""
    x = _flat_huber(angle).requires_grad_()
    with pytest.warns(GradientWarning, match="singular"):
        robust_vector_pool(x, "huber", 1.0)[0, 1].backward()
    assert (x.grad == 0).all()
    with pytest.warns(GradientWarning, match="tangent is set to zero"):
        dy = _fwd(lambda u: robust_vector_pool(u, "huber", 1.0), (x.detach(),), (torch.ones_like(x),))
    assert (dy == 0).all()


class _LogCosh:
    convex = True

    def phi(self, z, a):
        return a * a * torch.log(torch.cosh(z / a))

    def dphi(self, z, a):
        return a * torch.tanh(z / a)

    def d2phi(self, z, a):
        return 1 - torch.tanh(z / a) ** 2

    def d2phi_dalpha(self, z, a):
        t = torch.tanh(z / a)
        return t - (z / a) * (1 - t * t)


def test_a_user_penalty_named_like_a_builtin_gets_the_generic_paths():
    """The backward and the vector solver dispatched on the display name: a log-cosh
    penalty named "quadratic" got the mean and dy/dx_i = 1/N (gradcheck failed)."""
    from convexddn.nodes import Penalty
    from convexddn.nodes.pooling import robust_pool

    Named = type("Named", (_LogCosh, Penalty), {"name": "quadratic"})
    x = torch.tensor([[0.0, 0.1, 0.2, 5.0]], dtype=D)
    assert torch.autograd.gradcheck(lambda t: robust_pool(t, Named(), 0.5), (x.clone().requires_grad_(),))
    y = robust_vector_pool(x.unsqueeze(1), Named(), 0.5)
    # The log-cosh minimiser: Σ tanh((y − x_i)/α) = 0, far from the mean 1.325.
    assert abs(float(torch.tanh((y[0, 0] - x) / 0.5).sum())) < 1e-10
    assert abs(float(y) - 1.325) > 1.0


def test_vector_pool_large_well_conditioned_float32_set_is_not_called_singular():
    """The singularity bound took the worst case of summing N + 1 terms: a float32 Welsch
    set of 8192 vectors in 256-D, Hessian condition 1.01, was called singular and its
    gradient zeroed. Translation equivariance gives Σ_i ∂y_0/∂x_0i = 1."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 256, 8192, generator=g) / 16 * 2.0).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (grad,) = torch.autograd.grad(robust_vector_pool(x, "welsch", 1.0)[0, 0], x)
    assert abs(float(grad[0, 0].sum()) - 1.0) < 1e-4


def test_vector_pool_jacfwd_matches_reverse_mode():
    x = torch.randn(1, 2, 5, dtype=D, generator=torch.Generator().manual_seed(4))
    f = lambda u: robust_vector_pool(u, "huber", 1.0)  # noqa: E731
    torch.testing.assert_close(torch.func.jacfwd(f)(x), torch.autograd.functional.jacobian(f, x),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["welsch", "trunc_quad", "huber"])
def test_vector_pool_jacfwd_wrt_a_0d_alpha_of_an_unbatched_set(name):
    """torch.func.jacfwd w.r.t. a 0-d alpha on one (C, N) set: the multi-start search
    (Welsch, truncated quadratic) squeezed a dimension off the 0-d alpha under vmap,
    "Dimension is out of range"; Huber (no search) and a batched set ran. Expected: the
    reverse-mode derivative, one torch.autograd.grad per output entry (the truncated
    quadratic's is 0: its minimiser is the mean of its inliers, fixed while alpha moves
    no point across the boundary)."""
    x = torch.randn(3, 7, dtype=D, generator=torch.Generator().manual_seed(5))
    x[:, -1] += 4.0  # an outlier
    alpha = torch.tensor(0.9, dtype=D)
    jac = torch.func.jacfwd(lambda a: robust_vector_pool(x, name, a))(alpha)
    a = alpha.clone().requires_grad_(True)
    y = robust_vector_pool(x, name, a)
    rev = torch.stack([torch.autograd.grad(y[i], a, retain_graph=True)[0] for i in range(y.shape[0])])
    assert jac.shape == y.shape == (3,)
    torch.testing.assert_close(jac, rev, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- torch.func


def central_jacobian(f, x, h=1e-6):
    """d f(x) / d x by float64 central differences: shape f(x).shape + x.shape."""
    flat = x.detach().reshape(-1)
    cols = []
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = h
        cols.append((f((flat + e).view_as(x)) - f((flat - e).view_as(x))) / (2 * h))
    return torch.stack(cols, -1).reshape(*cols[0].shape, *x.shape)


@pytest.mark.parametrize("name", NAMES)
def test_vector_pool_under_vmap_is_the_call_on_the_stacked_sets(name):
    """torch.func.vmap failed inside torch ("Cannot access data pointer of Tensor that
    doesn't have storage": the solver decides on the host). Now the vmapped sets are
    solved stacked, as the node's own batch: each result is the unbatched call's, over x
    (any in_dims, nested vmaps) and over alpha."""
    x = clustered(20, batch=4)  # (4, 3, 12): 4 vmapped (3, 12) sets
    want = torch.stack([robust_vector_pool(xi, name, 0.8) for xi in x])
    f = lambda v: robust_vector_pool(v, name, 0.8)  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(f)(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(f, in_dims=2, out_dims=1)(x.permute(1, 2, 0)), want.T,
                               rtol=1e-12, atol=1e-12)
    xx = torch.stack([x, clustered(21, batch=4)])  # vmap of vmap
    torch.testing.assert_close(torch.func.vmap(torch.func.vmap(f))(xx),
                               torch.stack([torch.stack([f(v) for v in xi]) for xi in xx]), rtol=1e-12, atol=1e-12)
    alphas = torch.tensor([0.5, 1.0, 3.0], dtype=D)  # alpha vmapped, the (4, 3, 12) sets not
    torch.testing.assert_close(torch.func.vmap(lambda a: robust_vector_pool(x, name, a))(alphas),
                               torch.stack([robust_vector_pool(x, name, a) for a in alphas]), rtol=1e-12, atol=1e-12)
    per_set = torch.rand(2, 4, dtype=D, generator=torch.Generator().manual_seed(22)) + 0.5  # both, alpha per set
    got = torch.func.vmap(lambda v, a: robust_vector_pool(v, name, a))(xx, per_set)
    torch.testing.assert_close(got, torch.stack([robust_vector_pool(v, name, a) for v, a in zip(xx, per_set)]),
                               rtol=1e-12, atol=1e-12)


def test_vector_pool_under_vmap_checks_the_stacked_values():
    """The checks on values ran on the vmapped tensors and failed inside torch (a NaN set:
    "Cannot access data pointer"; a vmapped alpha: "data-dependent control flow"); they
    now run on the stacked sets and raise the library's errors."""
    x = clustered(23, batch=2)
    with pytest.raises(OptionError, match=r"alpha must be finite and > 0, got \[1.0, -1.0\]"):
        torch.func.vmap(lambda a: robust_vector_pool(x[0], "welsch", a))(torch.tensor([1.0, -1.0], dtype=D))
    with pytest.raises(NonFiniteError, match="x must be finite"):
        torch.func.vmap(lambda v: robust_vector_pool(v, "huber"))(torch.full((2, 3, 4), float("nan"), dtype=D))
    with pytest.raises(ShapeError, match=r"batch shape \(2,\).*got shape \(5,\)"):
        torch.func.vmap(lambda a: robust_vector_pool(x, "huber", a))(torch.ones(3, 5, dtype=D))


def test_vector_pool_derivatives_through_vmap_match_central_differences():
    """Through torch.func.vmap: reverse mode (torch.autograd on the vmapped call),
    forward mode (torch.func.jvp) and torch.func.jacfwd, against a float64
    central-difference Jacobian of the unbatched call (Welsch: the multi-start search)."""
    x = torch.randn(2, 2, 5, dtype=D, generator=torch.Generator().manual_seed(24))
    x[..., -1] += 4.0  # an outlier per set
    f = lambda v: robust_vector_pool(v, "welsch", 1.2)  # noqa: E731
    vf = torch.func.vmap(f)
    J = central_jacobian(f, x)  # (2, 2, 2, 2, 5)
    torch.testing.assert_close(torch.func.jacfwd(vf)(x), J, rtol=1e-6, atol=1e-7)
    t = torch.randn(x.shape, dtype=D, generator=torch.Generator().manual_seed(25))
    torch.testing.assert_close(torch.func.jvp(vf, (x,), (t,))[1], (J * t).sum((-3, -2, -1)), rtol=1e-6, atol=1e-7)
    xg = x.clone().requires_grad_(True)
    w = torch.randn(2, 2, dtype=D, generator=torch.Generator().manual_seed(26))
    (grad,) = torch.autograd.grad((vf(xg) * w).sum(), xg)
    torch.testing.assert_close(grad, (J * w[..., None, None, None]).sum((0, 1)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["welsch", "trunc_quad", "huber"])
def test_vector_pool_jacfwd_over_several_sets_matches_central_differences(name):
    """torch.func.jacfwd differentiated the solver's own ops: over two or more Welsch sets
    the multi-start search's NaN tangents (square roots of zero distances) reached the
    Jacobian, NaN between the sets, silently (seeds 28-30: 48 of 96 entries); one set,
    and the other penalties, were right and must stay so."""
    f = lambda v: robust_vector_pool(v, name, 1.0)  # noqa: E731
    for seed in (28, 29, 30):
        x = torch.randn(2, 2, 6, dtype=D, generator=torch.Generator().manual_seed(seed))
        x[..., :2] += 5.0  # outliers
        assert kink_margin(x, f(x), 1.0) > 1e-3  # (the truncated quadratic: no point on its boundary)
        J = central_jacobian(f, x)
        torch.testing.assert_close(torch.func.jacfwd(f)(x), J, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(torch.func.jacfwd(f)(x[0]), J[0, :, 0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("copies", [1, 2])  # N = 2 < C = 3: Woodbury's N×N solve; N = 4: the C×C one
def test_vector_pool_jacfwd_at_a_singular_hessian_is_zero_with_a_warning(copies):
    """torch.func.jacfwd differentiated the solver's own ops (the jvp's singularity test
    read the host, which jacfwd's batched tangents do not allow): at a non-isolated
    minimiser it returned an arbitrary Jacobian, silently (max 0.556 in x, (-0.013,
    0.012, -0.009) in alpha), where reverse mode and torch.func.jvp give zero with a
    GradientWarning. Reference (analytic): points p and 2p, ‖p‖ = 1.345 > 2α (Huber,
    α = 0.5); on the segment from p + n/2 to 2p − n/2 (n = p/‖p‖) both are outliers and
    their pulls α n and −α n cancel, so every point of it is a minimiser and no derivative
    exists. Now jacfwd gives that set zero under one warning naming it (decided on the
    primal's H, once for all directions); the regular set beside it keeps its Jacobian
    (float64 central differences), and nothing crosses between the sets."""
    p = torch.tensor([0.9, -0.8, 0.6], dtype=D)
    flat = torch.stack([p, 2 * p] * copies, -1)  # (C=3, N)
    regular = 0.25 * torch.randn(3, 2 * copies, dtype=D, generator=torch.Generator().manual_seed(40))
    regular[0, -1] += 1.5 * (copies - 1)  # (N = 4: an outlier among three inliers)
    x = torch.stack([regular, flat])  # (2, 3, N)
    alpha = torch.tensor([0.5, 0.5], dtype=D)
    f = lambda t: robust_vector_pool(t, "huber", 0.5)  # noqa: E731
    assert kink_margin(regular[None], f(regular[None]), 0.5) > 1e-3
    match = r"singular for 1 of 2 batch element\(s\) \(indices \[\(1,\)\]\).*their tangent is set to zero"
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        J = torch.func.jacfwd(f)(x)  # (2, 3, 2, 3, N)
        Ja = torch.func.jacfwd(lambda a: robust_vector_pool(x, "huber", a))(alpha)  # (2, 3, 2)
    got = [str(w.message) for w in rec if issubclass(w.category, GradientWarning)]
    assert len(got) == 2 and all(re.search(match, m) for m in got), got
    assert (J[1] == 0).all() and (Ja[1] == 0).all()
    assert (J[0, :, 1] == 0).all() and (Ja[0, :, 1] == 0).all()
    one = lambda t: f(t[None])[0]  # noqa: E731
    torch.testing.assert_close(J[0, :, 0], central_jacobian(one, regular), rtol=1e-6, atol=1e-8)
    h = 1e-6
    da = (robust_vector_pool(regular[None], "huber", 0.5 + h) - robust_vector_pool(regular[None], "huber", 0.5 - h))
    torch.testing.assert_close(Ja[0, :, 0], da[0] / (2 * h), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch", "trunc_quad"])
@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 5, 3)])  # C <= N: the C×C solve; C > N: Woodbury's
def test_vector_pool_jacfwd_agrees_with_reverse_mode_to_rounding(name, shape):
    """torch.func.jacfwd now takes the Function's jvp (the Hessian solved per direction)
    where it differentiated the solver's ops: at regular minimisers its Jacobians in x and
    in a per-set alpha are reverse mode's to rounding (3e-16 seen before and after), match
    float64 central differences, and warn nothing."""
    g = torch.Generator().manual_seed(41)
    x = torch.randn(*shape, dtype=D, generator=g)
    x[..., -1] += 4.0  # an outlier per set
    alpha = torch.tensor([0.9, 1.2], dtype=D)
    f = lambda t: robust_vector_pool(t, name, alpha)  # noqa: E731
    fa = lambda a: robust_vector_pool(x, name, a)  # noqa: E731
    assert kink_margin(x, f(x), 1.2) > 1e-3 and kink_margin(x, f(x), 0.9) > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        J, Ja = torch.func.jacfwd(f)(x), torch.func.jacfwd(fa)(alpha)
    torch.testing.assert_close(J, torch.autograd.functional.jacobian(f, x), rtol=0, atol=1e-13)
    torch.testing.assert_close(Ja, torch.autograd.functional.jacobian(fa, alpha), rtol=0, atol=1e-13)
    torch.testing.assert_close(J, central_jacobian(f, x), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(Ja, central_jacobian(fa, alpha), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape", [(2, 3, 6), (2, 5, 3)])  # C <= N: the C×C solve; C > N: Woodbury's
def test_vector_pool_batched_tangent_nan_stays_in_its_direction_and_set(shape):
    """Tangents batched by a vmap (jacfwd's) are solved against the primal's H, decided
    once: a NaN in one direction's tangent (a fault upstream) propagates to that
    direction's tangent of that set only, as the unbatched jvp gives it, with no warning."""
    from convexddn.errors import ConvexDDNWarning

    x = torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(0))
    T = torch.randn(3, *shape, dtype=D, generator=torch.Generator().manual_seed(1))
    T[1, 0, 0, 0] = math.nan
    f = lambda t: robust_vector_pool(t, "welsch", 1.3)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvexDDNWarning)
        out = torch.func.vmap(lambda t: torch.func.jvp(f, (x,), (t,))[1])(T)
        ref = torch.stack([torch.func.jvp(f, (x,), (t,))[1] for t in T])
    assert torch.isnan(out[1, 0]).all() and not torch.isnan(out[1, 1]).any() and not torch.isnan(out[[0, 2]]).any()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13, equal_nan=True)


def _jacrev(x):
    return torch.func.jacrev(lambda v: robust_vector_pool(v, "welsch"))(x)


def _jacrev_of_the_mean(x):
    return torch.func.jacrev(lambda v: robust_vector_pool(v))(x)


def _grads_batched(x):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(robust_vector_pool(x, "welsch"), x, torch.eye(x.shape[0], dtype=D),
                               is_grads_batched=True)


def _vectorized(strategy):
    return lambda x: torch.autograd.functional.jacobian(lambda v: robust_vector_pool(v, "welsch"), x,
                                                        vectorize=True, strategy=strategy)


def _vmap_of(transform):
    f = lambda v: robust_vector_pool(v, "welsch")  # noqa: E731
    inner = torch.func.grad(lambda v: f(v).sum()) if transform == "grad" else torch.func.jacfwd(f)
    return lambda x: torch.func.vmap(inner)(torch.stack([x, x + 1.0]))


@pytest.mark.parametrize("call", [_jacrev, _jacrev_of_the_mean, _grads_batched, _vectorized("reverse-mode"),
                                  _vectorized("forward-mode")],
                         ids=["jacrev", "jacrev_quadratic", "is_grads_batched", "vectorize_reverse",
                              "vectorize_forward"])
def test_vector_pool_jacrev_and_batched_directions_give_the_jacobian(call):
    """torch.func.jacrev (a vmap over the vjp) failed inside torch ("Attempted to vmap
    over aten::nonzero"; the mean: "must override the setup_context staticmethod"), and
    autograd's batched cotangents and tangents (is_grads_batched=True,
    jacobian(..., vectorize=True), either strategy) with "Batching rule not implemented
    for aten::is_nonzero"; then a ProblemError refused them (until 2026-12-06). The
    Hessian solve decides its rows on the primal alone (as for jacfwd's tangents): the
    row-by-row Jacobian."""
    x = torch.randn(3, 8, dtype=D, generator=torch.Generator().manual_seed(28))
    mean = call is _jacrev_of_the_mean
    f = (lambda v: robust_vector_pool(v)) if mean else (lambda v: robust_vector_pool(v, "welsch"))  # noqa: E731
    want = torch.autograd.functional.jacobian(f, x)
    got = call(x)
    got = got[0].reshape(want.shape) if call is _grads_batched else got  # (the cotangents: y's 3 entries)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("call", [_vmap_of("grad"), _vmap_of("jacfwd")], ids=["vmap_grad", "vmap_jacfwd"])
def test_vector_pool_under_a_transform_inside_vmap_gets_a_problem_error(call):
    """A vmap around another transform failed with "Cannot access data pointer": the
    solver reads the batched values on the host. A ProblemError names what to use."""
    x = torch.randn(3, 8, dtype=D, generator=torch.Generator().manual_seed(28))
    with pytest.raises(ProblemError, match="robust_vector_pool does not run under a torch.func transform inside "
                                           "torch.func.vmap"):
        call(x)


def test_vector_pool_jacobian_one_direction_at_a_time_still_works():
    """What the errors pointed to: jacfwd and the unvectorized jacobian agree, and
    translation equivariance gives Σ_i ∂y_c/∂x_c'i = δ_cc'."""
    x = torch.randn(3, 8, dtype=D, generator=torch.Generator().manual_seed(28))
    f = lambda v: robust_vector_pool(v, "welsch")  # noqa: E731
    J = torch.autograd.functional.jacobian(f, x)
    torch.testing.assert_close(torch.func.jacfwd(f)(x), J, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(J.sum(-1), torch.eye(3, dtype=D), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("penalty, alpha, spread", [("trunc_quad", 1.0, 1.0), ("welsch", 0.5, 5.0)])
def test_robust_vector_pool_does_not_depend_on_memory_layout(penalty, alpha, spread):
    """Exactly tied global minimisers (every data point, on these sets) are chosen the same
    way whatever x's strides: a transposed view of the same values gave another of them
    (2.9 apart for trunc_quad, 7.5 for Welsch), and its gradient with it."""
    x = spread * torch.randn(3, 4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    layouts = [lambda t: t,  # the same values with transposed strides, and every other entry of a wider tensor:
               lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),
               lambda t: torch.stack([t, torch.zeros_like(t)], -1).flatten(-2)[..., ::2]]
    outs = []
    for layout in layouts:
        leaf = x.clone().requires_grad_(True)
        assert torch.equal(layout(leaf), x)
        y = robust_vector_pool(layout(leaf), penalty, alpha, dim=-2, vector_dim=-1)
        outs.append((y.detach(), torch.autograd.grad(y, leaf, g)[0]))
    for y, grad in outs[1:]:
        assert torch.equal(y, outs[0][0])
        assert torch.equal(grad, outs[0][1])


def test_sets_at_the_float64_range_end():
    """Entries above 9e307: the anchor (hi + lo) / 2 overflowed to Inf, the result NaN
    for every penalty; alpha above 2^1023.5: its power-of-two scale rounded to 2^1024 =
    Inf. Three equal vectors pool to themselves; an alpha beyond every distance is the
    quadratic's regime (the mean)."""
    x = torch.full((1, 2, 3), 1e308, dtype=torch.float64)
    for penalty in ("quadratic", "huber", "welsch"):
        assert robust_vector_pool(x, penalty, 1.0).tolist() == [[1e308, 1e308]]
    x = torch.randn(1, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = robust_vector_pool(x, "huber", 1.3e308)
    assert torch.allclose(y, x.mean(-1), rtol=1e-12, atol=1e-15)


def test_hessian_is_refused_with_a_problem_error():
    """torch.func.hessian (jacfwd over jacrev) and jacfwd(grad(f)) vmapped the Function
    around its backward and failed with torch's "does not have vmap support"; jacrev alone
    raised the documented ProblemError, and so do these now."""
    from torch.func import grad, hessian, jacfwd

    z = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f = lambda t: robust_vector_pool(t, "huber", 1.0).pow(2).sum()  # noqa: E731
    for transform in (hessian(f), jacfwd(grad(f))):
        with pytest.raises(ProblemError, match="robust_vector_pool does not run under torch.func.hessian"):
            transform(z)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["trunc_quad", "welsch"])
def test_robust_vector_pool_cluster_beside_a_far_outlier(name, dtype):
    # Three points near (5, 5) and one at 1e20 (-1e20): the global minimiser sits at the
    # cluster (brute force: the truncated quadratic's is its inliers' mean, objective
    # 0.5333 against N alpha² / 2 = 2 with no inlier). The start search centred the sets
    # on their mean, whose ulp (16384 at 5e19) swallowed the cluster: y = (0, 0), no
    # inlier, silently.
    c = 40.0 if name == "welsch" else 5.0  # (Welsch's weights underflowed 40 alphas off)
    x = torch.tensor([[[5.0, 4.9, 5.2, 1e20], [5.0, 5.3, 5.0, -1e20]]], dtype=dtype)
    x[..., :3] += c - 5.0
    y = robust_vector_pool(x, name, 1.0).double()
    cluster = x[0, :, :3].double().T.numpy()
    want = minimize(lambda u: objective(name, cluster, u, 1.0), cluster.mean(0), method="Nelder-Mead",
                    options={"xatol": 1e-12, "fatol": 1e-14}).x
    torch.testing.assert_close(y[0], torch.tensor(want, dtype=D), rtol=0, atol=1e-5)


def test_robust_vector_pool_float32_many_features_far_apart():
    # C = 1024 features: a squared distance sums C squares, so the float32 range holds a
    # spread of 2^64 / √C alpha, not the 2^60 of C <= 256. Eight vectors near 0 and one
    # 8e5 per feature with alpha 1e-12 (spread 8e17 alpha): Huber returned |y| = 2e11.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1024, 9, generator=g) * 1e-12
    x[..., -1] = 8e5
    for name in ("huber", "pseudo_huber"):
        y = robust_vector_pool(x, name, 1e-12)
        torch.testing.assert_close(y, robust_vector_pool(x.double(), name, 1e-12).float(), rtol=1e-4, atol=1e-16)


def test_robust_vector_pool_welsch_alpha_gradient_far_outlier():
    # A point 1e110 alphas away has weight exactly 0: d/dalpha is that of the set without
    # it. r³ overflowed and inf * 0 gave NaN, without a warning.
    x = torch.tensor([[[0.1, -0.2, 0.3, -0.4, 0.0, 1e110], [0.0, 0.1, -0.1, 0.2, -0.3, 0.0]]], dtype=D)
    grads = []
    for xs in (x, x[..., :5]):
        a = torch.tensor(1.0, dtype=D, requires_grad=True)
        robust_vector_pool(xs, "welsch", a).sum().backward()
        grads.append(a.grad)
    assert torch.isfinite(grads[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)


def test_robust_vector_pool_huber_newton_does_not_alternate():
    # Newton steps between two points of equal objective (10.434 and 10.594) alternated
    # until max_iter (SolverWarning, y = 10.434). The minimiser is the mean of the two
    # middle points (Huber's inliers there; closed form).
    x = torch.tensor([[[6.397009078930941, 10.223890467126136, 10.804372064348945, 13.40254213183852]]], dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = robust_vector_pool(x, "huber", 0.3699281314284764)
    torch.testing.assert_close(y, (x[..., 1] + x[..., 2]) / 2, rtol=1e-12, atol=0)


def test_robust_vector_pool_far_outlier_convex_penalties_converge():
    # Three points near (5, 5) and one at (1e20, -1e20): the outlier's term (~1e20) made
    # the Newton acceptance slack ~1e5 wide, and the iterate wandered to (-17360, 17370)
    # (with a SolverWarning). The limit is the minimiser with the outlier's pull fixed
    # at alpha along its direction: the same as with the outlier at 1e8.
    for name in ("huber", "pseudo_huber"):
        far = robust_vector_pool(torch.tensor([[[5.0, 4.9, 5.2, 1e20], [5.0, 5.3, 5.0, -1e20]]], dtype=D),
                                 name, 1.0)
        near = robust_vector_pool(torch.tensor([[[5.0, 4.9, 5.2, 1e8], [5.0, 5.3, 5.0, -1e8]]], dtype=D),
                                  name, 1.0)
        torch.testing.assert_close(far, near, rtol=1e-6, atol=0)


def test_robust_vector_pool_entries_at_the_float_range_end():
    # Entries -1e308 and 1e308 (spread 2e308 overflows, though 2e8 alpha): "spreads inf
    # times alpha" was raised. The mean is exact in halves.
    x = torch.tensor([[[-1e308, 1e308, 1e308]]], dtype=D)
    torch.testing.assert_close(robust_vector_pool(x, "quadratic", 1e300), torch.tensor([[1e308 / 3]], dtype=D))


@pytest.mark.parametrize("name", ["huber", "pseudo_huber"])
def test_robust_vector_pool_convex_start_beside_an_outlier_1e100_away(name):
    # From the mean, 1.7e99 off, IRLS came back about 4-fold per step and stopped at
    # max_iter 2.5e29 off (SolverWarning); the median start is taken where its
    # objective is lower. Reference: the scalar robust_pool (its own solver), C = 1.
    x = torch.tensor([[[0.0, 0.2, 0.41, 0.45, 0.9, 1e100]]], dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = robust_vector_pool(x, name, 1.0)
    torch.testing.assert_close(y, robust_pool(x[0], name, 1.0).unsqueeze(-1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["welsch", "trunc_quad"])
def test_robust_vector_pool_start_search_memory_is_bounded(name, start_distances):
    """The start search's (r, S, N) temporaries (S = 130 starts) are taken a block of rows
    at a time, within the pooling kernels' block budget: all rows at once, (64, 3, 2048)
    float64 sets (3 MB) took 730 MB. Here (8, 3, 512): 4.3 MB per temporary all at once,
    at most 2 MiB (the CPU block) in blocks; the result is still a stationary point."""
    from convexddn.nodes.pooling import kernels
    seen = start_distances
    x = torch.randn(8, 3, 512, dtype=D, generator=torch.Generator().manual_seed(0))
    x[..., :200] = 0.3 * x[..., :200] + 2.0  # an inlier cluster
    y = robust_vector_pool(x, name, 1.0)
    assert seen and max(seen) <= kernels._CPU_BLOCK_BYTES, (max(seen), kernels._CPU_BLOCK_BYTES)
    if name == "welsch":  # the gradient of the objective written out, at y
        d = y.unsqueeze(-1) - x
        grad = (d * torch.exp(-0.5 * (d * d).sum(-2, keepdim=True))).sum(-1)
        assert grad.abs().max() < 1e-10
    else:  # the mean of its own inliers
        inl = ((y.unsqueeze(-1) - x).norm(dim=-2) <= 1.0).to(D)
        torch.testing.assert_close(y, (x * inl.unsqueeze(-2)).sum(-1) / inl.sum(-1, keepdim=True), rtol=0,
                                   atol=1e-12)


@pytest.mark.parametrize("name", ["welsch", "trunc_quad"])
@pytest.mark.parametrize("spread", [1.0, 1e7])  # 1e7: the start search by direct differences, in float64
def test_robust_vector_pool_start_blocks_do_not_change_the_result(name, spread, monkeypatch):
    """One row per block or every row in one: the same iterations, bit for bit. (A budget of one
    row's start-search terms, 130 × 40 float32: the polish's 40 points fit it whole; a budget below
    them takes its sums a chunk of the points at a time, equal to rounding: test_vector_pool_large_set.)"""
    from convexddn.nodes.pooling import kernels
    x = torch.randn(6, 3, 40, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    x[..., :10] *= spread
    outs = []
    for budget in (130 * 40 * 4, 1 << 40):
        monkeypatch.setattr(kernels, "_CPU_BLOCK_BYTES", budget)
        outs.append(robust_vector_pool(x, name, 1.0))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name", ["huber", "pseudo_huber", "welsch", "trunc_quad"])
@pytest.mark.parametrize("shape", [(2, 3, 6), (2, 5, 3)])  # C <= N: the C×C solve; C > N: Woodbury's N×N
def test_robust_vector_pool_nan_incoming_gradient_and_tangent_propagate(name, shape):
    """A NaN in the incoming gradient, or in a tangent (a fault upstream), propagates to that
    pooled set's gradient (and a shared alpha's) or output tangent, as torch does. Both came
    out zero (Welsch's alpha gradient 0.42, finite: the NaN dropped) under a GradientWarning
    that called the Hessian singular. The other set's match central differences."""
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, dtype=D, generator=gen)
    dx = torch.randn(*shape, dtype=D, generator=gen)
    dx[0] = 0.0
    gout = torch.randn(shape[0], shape[1], dtype=D, generator=gen)
    h = 1e-6
    fd = (robust_vector_pool(x + h * dx, name, 1.3) - robust_vector_pool(x - h * dx, name, 1.3)) / (2 * h)
    xr, alpha = x.clone().requires_grad_(), torch.tensor(1.3, dtype=D, requires_grad=True)
    bad_out = gout.clone()
    bad_out[0, 0] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)  # the Hessians are regular: nothing to say
        robust_vector_pool(xr, name, alpha).backward(bad_out)
        bad_t = dx.clone()
        bad_t[0, 0, 0] = math.nan
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(robust_vector_pool(fwAD.make_dual(x, bad_t), name, 1.3)).tangent
    assert torch.isnan(xr.grad[0]).all() and torch.isnan(alpha.grad) and torch.isnan(tangent[0]).all()
    torch.testing.assert_close((xr.grad[1] * dx[1]).sum(), (fd[1] * gout[1]).sum(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(tangent[1], fd[1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 0, 3, 5)])
def test_vector_pool_jacfwd_on_an_empty_batch(shape):
    """torch.func.jacfwd on an empty batch raised torch's RuntimeError "cannot reshape tensor of
    0 elements into shape [0, -1, 5, 3]" (the rows reshaped with -1 beside the tangents' vmap dim
    of size 0). Plain torch gives an empty Jacobian of shape (*y.shape, *x.shape): so now do
    x's and alpha's."""
    x = torch.randn(*shape, dtype=D)
    J = torch.func.jacfwd(lambda x: robust_vector_pool(x, "huber", 1.0))(x)
    assert J.shape == (*shape[:-1], *shape)
    alpha = torch.ones(shape[:-2], dtype=D)
    Ja = torch.func.jacfwd(lambda a: robust_vector_pool(x, "huber", a))(alpha)
    assert Ja.shape == (*shape[:-1], *shape[:-2])


@pytest.mark.parametrize("penalty", ["pseudo_huber", "welsch", "huber"])
def test_vector_pool_gradients_with_an_outlier_near_zero_far_from_the_cluster(penalty):
    """A float32 cluster at 1000 + 0.002 randn (3-D) with one vector at 0, alpha 0.003:
    the set is not moved to its midpoint (its outlier is near 0), y is known to ~1e-2
    alpha, and the terms at that y made dy/dx 9e-3 (pseudo-Huber) to 0.7 (Huber's inlier
    set) off, without a warning. Reference: central differences of float64 solves of
    the same data less 1000 (exact; y(x + t) = y(x) + t), along random directions."""
    g = torch.Generator().manual_seed(5)
    x64 = 1000 + 0.002 * torch.randn(4, 16, 3, generator=g, dtype=torch.float64)
    x64[:, 0] = 0.0
    x = x64.float()
    gy = torch.randn(4, 3, generator=g, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    a = torch.full((4,), 0.003, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        y = robust_vector_pool(xg, penalty, a, dim=-2, vector_dim=-1)
        gx, ga = torch.autograd.grad(y, (xg, a), gy.float())
    xr = x.double() - 1000

    def f(xs, al):
        return robust_vector_pool(xs, penalty, torch.full((4,), al, dtype=torch.float64), dim=-2, vector_dim=-1)

    h = 1e-7
    for _ in range(3):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        fd = ((f(xr + h * v, 0.003) - f(xr - h * v, 0.003)) / (2 * h) * gy).sum(-1)
        assert float(((gx.double() * v).sum((-2, -1)) - fd).abs().max()) < 1e-5 * float(fd.abs().max() + 1)
    fd_a = ((f(xr, 0.003 + h) - f(xr, 0.003 - h)) / (2 * h) * gy).sum(-1)
    assert float((ga.double() - fd_a).abs().max()) < 1e-5 * float(fd_a.abs().max() + 1)


def test_nested_jacfwd_of_an_unbatched_set_refuses_with_double_backward_error():
    """x (C, N), no batch dims: the batch shape handed to the Function was an empty tuple,
    a pytree node the vmap rule torch.func generates could not flatten (torch's
    "flat_bdims must not be None" under jacfwd∘jacfwd); now the node's own refusal."""
    x = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f = lambda v: robust_vector_pool(v, "huber", 1.0).sum()  # noqa: E731
    assert torch.func.jacfwd(lambda v: robust_vector_pool(v, "huber", 1.0))(x).shape == (3, 3, 7)
    with pytest.raises(DoubleBackwardError):
        torch.func.jacfwd(torch.func.jacfwd(f))(x)
