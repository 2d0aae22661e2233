"""Spectral norms inside a DeclarativeNode's objective (convexddn/nodes/_held_estimates.py): in
training mode their power iteration wrote the buffers u, v at every evaluation of the problem
(the first call's check refused it, a ProblemError); now the problem's evaluations read the weight
W / (uᵀ W v) at the u, v the forward's solve left, and never write them.

The node is y = argmin ½‖u − W_sn x‖² = W_sn x, so dL/dx = 1ᵀ W_sn for L = Σ y and, with
s = Σ_b x_b and σ = uᵀ W v (u, v constants, as in torch's own backward),
dL/dW = 1 sᵀ / σ − (1ᵀ W s) / σ² · u vᵀ (closed forms, written out here).
"""
from __future__ import annotations

import pytest
import torch

from convexddn.nodes.declarative import DeclarativeNode


class _Normalised(DeclarativeNode):
    """½‖y − W_sn x‖² through a spectrally normalised Linear (hook or parametrization form)."""

    def __init__(self, form: str, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        lin = torch.nn.Linear(3, 4, bias=False).to(dtype)
        self.form = form
        self.lin = (torch.nn.utils.spectral_norm(lin) if form == "hook"
                    else torch.nn.utils.parametrizations.spectral_norm(lin))

    def parts(self):
        """The weight W, and the buffers u, v."""
        if self.form == "hook":
            return self.lin.weight_orig, self.lin.weight_u, self.lin.weight_v
        sn = self.lin.parametrizations.weight
        return sn.original, sn[0]._u, sn[0]._v

    def objective(self, x, y):
        return 0.5 * ((y - self.lin(x).to(y.dtype)) ** 2).sum(-1)

    def solve(self, x):
        return self.lin(x)  # (training mode: one power-iteration step per forward, as a plain forward)


@pytest.mark.parametrize("form", ["hook", "parametrization"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spectral_norm_in_training_mode_matches_closed_form(form, dtype):
    node = _Normalised(form, dtype)
    W, u, v = node.parts()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for _ in range(2):  # (the first call checks the problem; the second does not)
        u_before = u.detach().clone()
        x = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]], dtype=dtype, requires_grad=True)
        y = node(x)
        assert not torch.equal(u.detach(), u_before)  # (solve refined the estimate, once)
        u_fwd, v_fwd = u.detach().clone(), v.detach().clone()
        versions = (u._version, v._version)
        W.grad = None
        y.sum().backward()
        assert (u._version, v._version) == versions  # (the problem's evaluations wrote neither)
        Wd, ud, vd, xd = (t.detach().double() for t in (W, u_fwd, v_fwd, x))
        sigma = ud @ Wd @ vd
        ones, s = torch.ones(4, dtype=torch.float64), xd.sum(0)
        torch.testing.assert_close(y.detach().double(), xd @ (Wd / sigma).T, **tol)
        torch.testing.assert_close(x.grad.double(), (ones @ (Wd / sigma)).expand(2, 3), **tol)
        expected_W = torch.outer(ones, s) / sigma - (ones @ Wd @ s) / sigma ** 2 * torch.outer(ud, vd)
        torch.testing.assert_close(W.grad.double(), expected_W, **tol)


@pytest.mark.parametrize("form", ["hook", "parametrization"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_two_forwards_before_one_backward_hold_each_calls_estimate(form, dtype):
    """The GAN pattern: the node called twice (each solve steps u, v once, in place), then one
    backward of c_1 Σ y_1 + c_2 Σ y_2. The first call's backward reads u, v, which the second forward
    had changed: an InputError ("['lin.weight_u', 'lin.weight_v'] ... were modified in place between
    the forward and the backward"). Now each call's backward differentiates its own problem, at the
    u_k, v_k its forward left (σ_k = u_kᵀ W v_k): dL/dx_k = c_k 1ᵀ W / σ_k, and dL/dW the sum over
    the calls of c_k (1 s_kᵀ / σ_k − (1ᵀ W s_k) / σ_k² · u_k v_kᵀ) (closed forms)."""
    node = _Normalised(form, dtype)
    W, u, v = node.parts()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    xs = [torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]], dtype=dtype, requires_grad=True),
          torch.tensor([[-0.4, 0.9, 2.0], [1.5, 0.2, 0.6]], dtype=dtype, requires_grad=True)]
    ys, held = [], []
    for x in xs:
        ys.append(node(x))
        held.append((u.detach().double().clone(), v.detach().double().clone()))
    assert not torch.equal(held[0][0], held[1][0])  # (the second forward stepped u: σ_1 ≠ σ_2)
    scales = (1.0, 2.0)
    (scales[0] * ys[0].sum() + scales[1] * ys[1].sum()).backward()
    Wd, ones = W.detach().double(), torch.ones(4, dtype=torch.float64)
    expected_W = torch.zeros_like(Wd)
    for x, y, (uk, vk), c in zip(xs, ys, held, scales):
        sigma, s = uk @ Wd @ vk, x.detach().double().sum(0)
        torch.testing.assert_close(y.detach().double(), x.detach().double() @ (Wd / sigma).T, **tol)
        torch.testing.assert_close(x.grad.double(), (c * ones @ Wd / sigma).expand(2, 3), **tol)
        expected_W += c * (torch.outer(ones, s) / sigma - (ones @ Wd @ s) / sigma ** 2 * torch.outer(uk, vk))
    torch.testing.assert_close(W.grad.double(), expected_W, **tol)
