"""robust_vector_pool on one float32 set of many points: the Hessian's sums over the N
points must be accumulated wider than float32 (an sgemm reduction over N erred like
N eps), so the gradient keeps float32 accuracy however large the set."""
from __future__ import annotations

import torch

import convexddn.functional as F
from convexddn.nodes._vector_pool_solvers import _hessian

N = 1_000_000


def test_hessian_float32_long_set_is_float64_accurate() -> None:
    torch.manual_seed(0)
    d = torch.randn(1, N, 3, dtype=torch.float32)
    n = d / d.norm(dim=-1, keepdim=True)
    c = -torch.rand(1, N, dtype=torch.float32)
    s = torch.tensor([float(N)], dtype=torch.float32)
    H = _hessian(s, n, c)
    exact = (n.double() * c.double().unsqueeze(-1)).mT @ n.double() + N * torch.eye(3, dtype=torch.float64)
    assert H.dtype == torch.float32
    assert ((H.double() - exact).abs().max() / exact.abs().max()).item() < 4 * torch.finfo(torch.float32).eps


def test_pseudo_huber_float32_long_set_gradient() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, N, dtype=torch.float32, requires_grad=True)
    u = F.robust_vector_pool(x, "pseudo_huber")
    g = torch.tensor([[1.0, 2.0, 3.0]])
    (u * g).sum().backward()
    # Closed form K_i H⁻¹ g in float64 at the returned u: K_i = I/s_i − d_i d_iᵀ/s_i³, H = Σ K_i.
    xd, ud, gd = x.detach().double()[0], u.detach().double()[0], g.double()[0]
    d = ud[:, None] - xd
    s = torch.sqrt(1 + (d * d).sum(0))
    H = torch.eye(3, dtype=torch.float64) * (1 / s).sum() - (d / s ** 1.5) @ (d / s ** 1.5).T
    lam = torch.linalg.solve(H, gd)
    expected = lam[:, None] / s - d * ((d * lam[:, None]).sum(0) / s ** 3)
    got = x.grad.double()[0]
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 3e-6
    # Translation equivariance: Σ_i dL/dx_i = g.
    assert ((got.sum(-1) - gd).abs().max() / gd.abs().max()).item() < 1e-6
