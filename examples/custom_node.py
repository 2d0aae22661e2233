"""Write your own declarative node and check its gradients.

The node projects onto the unit sphere *in a weighted norm*, a nonconvex problem:

    y(x) = argmin_u ½‖u − x‖²   s.t.   Σᵢ wᵢ uᵢ² = 1.

`solve` may use any algorithm (here: bisection on the Lagrange multiplier, no gradients
needed); the backward comes from Prop. 4.5 of Gould et al. automatically.
Run: python examples/custom_node.py
"""
import torch

import convexddn as cddn
from convexddn.testing import check_gradients


class WeightedSphere(cddn.DeclarativeNode):
    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", weights)

    def objective(self, x, y):                      # (B, n), (B, n) -> (B,)
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):           # (B, 1), feasible where 0
        return (self.w * y * y).sum(-1, keepdim=True) - 1.0

    def solve(self, x):
        # Stationarity gives u = x / (1 + λ w); find λ > −1/max(w) with the constraint
        # met, by bisection (the constraint is decreasing in λ there).
        lo = torch.full(x.shape[:-1] + (1,), -1.0 / self.w.max().item() + 1e-12, dtype=x.dtype)
        hi = torch.full_like(lo, 1e6)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            g = (self.w * (x / (1 + mid * self.w)) ** 2).sum(-1, keepdim=True) - 1
            lo, hi = torch.where(g > 0, mid, lo), torch.where(g > 0, hi, mid)
        return x / (1 + 0.5 * (lo + hi) * self.w)


def main():
    torch.manual_seed(0)
    node = WeightedSphere(torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64))
    x = 2 * torch.randn(5, 4, dtype=torch.float64)
    y = node(x)
    print("constraint residual:", (node.w * y * y).sum(-1).sub(1).abs().max().item())
    report = check_gradients(node, x, eps=1e-6)
    print(report)
    return report


if __name__ == "__main__":
    main()
