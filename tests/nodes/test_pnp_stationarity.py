"""PnP's implicit derivative at a pose that is not stationary (a loose ``tol``).

The derivative -H⁻¹B differentiates ∇_θf = 0, so at a pose that stopped short of it the
gradient is not the derivative of the pose that the forward returns: a tester's Huber scene
at ``tol=0.1`` gave a directional derivative of -3.46 against 7.58, silently. Expected
values are central finite differences (Richardson, float64) of pnp itself, and, for the
reference pose, scipy's Nelder-Mead on the objective written out here.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.spatial.transform import Rotation

from convexddn.errors import GradientWarning
from convexddn.nodes.pnp import pnp

D = torch.float64
ALPHA = 0.02


def make_scene(seed=1, batch=3, outlier=0.3):
    """``batch`` problems of 20 points, 4 of them outliers (seed 1: the tester's scene)."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(batch, 20, 3, generator=g, dtype=D)
    r = torch.randn(batch, 3, generator=g, dtype=D) * 0.3
    t = torch.tensor([0.1, -0.2, 6.0], dtype=D).expand(batch, 3)
    R = torch.tensor(Rotation.from_rotvec(r.numpy()).as_matrix())
    X = torch.einsum('bij,bnj->bni', R, P) + t[:, None]
    q = X[..., :2] / X[..., 2:] + 0.01 * torch.randn(batch, 20, 2, generator=g, dtype=D)
    q[:, :4] += outlier * torch.randn(batch, 4, 2, generator=g, dtype=D)
    return q, P


def directional_fd(fn, q, d, h=1e-6):
    """Richardson-extrapolated central difference of ``fn`` along ``d``."""
    c1 = (fn(q + h * d) - fn(q - h * d)) / (2 * h)
    c2 = (fn(q + 2 * h * d) - fn(q - 2 * h * d)) / (4 * h)
    return (4 * c1 - c2) / 3


def huber_objective(th, q, p):
    R = Rotation.from_rotvec(th[:3]).as_matrix()
    X = p @ R.T + th[3:]
    d = np.linalg.norm(X[:, :2] / X[:, 2:] - q, axis=1)
    return np.where(d <= ALPHA, 0.5 * d * d, ALPHA * (d - 0.5 * ALPHA)).sum()


def stationarity_warnings(record):
    return [m.message for m in record if issubclass(m.category, GradientWarning) and "not stationary" in str(m.message)]


def test_loose_tol_gradient_warns_naming_the_element_in_the_callers_batch_shape():
    q, P = make_scene()
    q, P = q[1].reshape(1, 1, 20, 2), P[1].reshape(1, 1, 20, 3)  # the tester's problem, batch shape (1, 1)
    v = torch.randn(6, generator=torch.Generator().manual_seed(5), dtype=D)
    d = torch.randn(q.shape, generator=torch.Generator().manual_seed(6), dtype=D)
    tight = lambda x: float((pnp(x, P, penalty="huber", alpha=ALPHA, tol=1e-14) * v).sum())  # noqa: E731
    # The reference pose is the minimiser (scipy, independently of pnp's solver).
    pose = pnp(q, P, penalty="huber", alpha=ALPHA, tol=1e-14).reshape(6).numpy()
    m = minimize(huber_objective, pose, args=(q.reshape(20, 2).numpy(), P.reshape(20, 3).numpy()),
                 method="Nelder-Mead", options=dict(xatol=1e-12, fatol=1e-16, maxiter=40000, maxfev=80000))
    assert np.abs(m.x - pose).max() < 1e-6
    expected = directional_fd(tight, q, d)

    qq = q.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loose = pnp(qq, P, penalty="huber", alpha=ALPHA, tol=0.1)
        (loose * v).sum().backward()
    got = float((qq.grad * d).sum())
    assert abs(got - expected) > 0.5 * abs(expected)  # the situation: the implicit gradient is far off
    said = stationarity_warnings(record)
    assert len(said) == 1, [str(m.message) for m in record]
    assert said[0].elements == [(0, 0)]
    text = str(said[0])
    assert "indices [(0, 0)]" in text and "tol=0.1" in text and "smaller tol" in text
    # By how much: the Newton step's size, within a factor of a few of the pose's distance
    # to the minimiser, relative to the pose's norm.
    size = float(text.split("by up to ")[1].split(" ")[0])
    actual = np.linalg.norm(loose.detach().reshape(6).numpy() - m.x) / np.linalg.norm(m.x)
    assert actual / 10 < size < 10 * actual


def test_loose_tol_forward_mode_warns_too():
    q, P = make_scene()
    d = torch.randn(q.shape, generator=torch.Generator().manual_seed(6), dtype=D)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.func.jvp(lambda x: pnp(x, P, penalty="huber", alpha=ALPHA, tol=0.1), (q,), (d,))
    said = stationarity_warnings(record)
    assert len(said) == 1 and (1,) in said[0].elements


def test_default_tol_batch_is_quiet_and_its_gradient_matches_finite_differences():
    q, P = make_scene(seed=2, outlier=0.05)
    q, P = q.reshape(3, 1, 20, 2), P.reshape(3, 1, 20, 3)  # (several problems, a 2-d batch shape)
    v = torch.randn(3, 1, 6, generator=torch.Generator().manual_seed(5), dtype=D)
    d = torch.randn(q.shape, generator=torch.Generator().manual_seed(6), dtype=D)
    qq = q.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        (pnp(qq, P, penalty="huber", alpha=ALPHA) * v).sum().backward()
    assert not [m for m in record if issubclass(m.category, (GradientWarning, UserWarning))
                and "jit" not in str(m.message)], [str(m.message) for m in record]
    for b in range(3):  # each problem's directional derivative, problems moved one at a time
        mask = torch.zeros(3, 1, 1, 1, dtype=D)
        mask[b] = 1
        fn = lambda x: float((pnp(x, P, penalty="huber", alpha=ALPHA, tol=1e-14) * v).sum())  # noqa: E731
        expected = directional_fd(fn, q, d * mask)
        got = float((qq.grad * d * mask).sum())
        assert abs(got - expected) <= 1e-5 * max(1.0, abs(expected)), (b, got, expected)
