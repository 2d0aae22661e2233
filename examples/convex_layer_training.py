"""Declare a convex layer in CVXPY syntax and train it inside a torch model.

A small regression network ends in a non-negative least-squares layer whose matrix A is
learned:  z(b) = argmin_{z ≥ 0} ‖A z − b‖² + ε‖z‖².  Run: python examples/convex_layer_training.py
"""
import cvxpy as cp
import torch
from torch import nn

import convexddn as cddn


def make_layer(m: int, n: int) -> cddn.ConvexLayer:
    A = cp.Parameter((m, n), name="A")
    b = cp.Parameter(m, name="b")
    z = cp.Variable(n, name="z")
    objective = cp.Minimize(cp.sum_squares(A @ z - b) + 1e-3 * cp.sum_squares(z))
    return cddn.ConvexLayer(cp.Problem(objective, [z >= 0]), parameters=[A, b], variables=[z])


class NNLSNet(nn.Module):
    def __init__(self, d_in: int = 3, m: int = 6, n: int = 4) -> None:
        super().__init__()
        self.encode = nn.Linear(d_in, m)
        self.A = nn.Parameter(torch.randn(m, n))   # shared by the whole batch
        self.nnls = make_layer(m, n)
        self.head = nn.Linear(n, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.nnls(self.A, self.encode(x))      # (B, m) -> (B, n), z >= 0
        return self.head(z)


def main(steps: int = 30) -> list[float]:
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    target = x.abs().sum(-1, keepdim=True)
    model = NNLSNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    return losses


if __name__ == "__main__":
    main()
