"""Write your own declarative node (two inputs, a learned parameter) and check its gradients.

The node projects x onto a sphere of radius ρ *in a learned weighted norm*, a nonconvex
problem with two inputs (x and ρ) and one parameter (the log-weights):

    y(x, ρ) = argmin_u ½‖u − x‖²   s.t.   Σᵢ wᵢ uᵢ² = ρ²,   w = exp(log_w).

`solve` may use any algorithm (here: bisection on the Lagrange multiplier, no gradients
needed); the backward comes from Prop. 4.5 of Gould et al. automatically, for x, ρ and
log_w, and `check_gradients` compares all three with finite differences.
Run: python examples/custom_node.py
"""
import torch
from torch import nn

import convexddn as cddn
from convexddn.testing import check_gradients


class WeightedSphere(cddn.DeclarativeNode):
    def __init__(self, n: int) -> None:
        super().__init__()                          # options: linear_solver=, batch_dims=, ...
        self.log_w = nn.Parameter(torch.linspace(-0.5, 0.5, n, dtype=torch.float64))

    def objective(self, x, rho, y):                 # (B, n), (B, 1), (B, n) -> (B,)
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, rho, y):      # (B, 1), feasible where 0
        return (self.log_w.exp() * y * y).sum(-1, keepdim=True) - rho**2

    def solve(self, x, rho):                        # runs without autograd
        # Stationarity gives u = x / (1 + λ w); find λ > −1/max(w) with the constraint
        # met, by bisection (the constraint is decreasing in λ there).
        w = self.log_w.exp()
        lo = torch.full_like(rho, -1.0 / w.max().item() + 1e-12)
        hi = torch.full_like(rho, 1e6)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            g = (w * (x / (1 + mid * w)) ** 2).sum(-1, keepdim=True) - rho**2
            lo, hi = torch.where(g > 0, mid, lo), torch.where(g > 0, hi, mid)
        return x / (1 + 0.5 * (lo + hi) * w)


def main():
    torch.manual_seed(0)
    node = WeightedSphere(4)
    x = 2 * torch.randn(5, 4, dtype=torch.float64)
    rho = 0.5 + torch.rand(5, 1, dtype=torch.float64)
    y = node(x, rho)
    residual = (node.log_w.exp() * y * y).sum(-1) - rho.squeeze(-1) ** 2
    print("constraint residual:", residual.abs().max().item())
    y.sum().backward()                              # gradients reach log_w too
    print("d(sum y)/d(log_w):", node.log_w.grad)
    report = check_gradients(node, x, rho, eps=1e-6)  # x, rho and log_w
    print(report)
    return report


if __name__ == "__main__":
    main()
