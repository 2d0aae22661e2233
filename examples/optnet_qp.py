"""Learn the constraints of a QP layer from data (OptNet style, Amos & Kolter 2017).

A teacher QP  y = argmin ½‖y‖² − xᵀy  s.t.  G y ≤ h  with hidden (G, h) labels the data;
a student layer from the registry learns G and h by gradient descent through the
solver. Run: python examples/optnet_qp.py
"""
import torch

import convexddn as cddn


def main(steps: int = 40) -> list[float]:
    torch.manual_seed(0)
    n, m = 3, 4
    teacher = cddn.layer("qp", n=n, n_ineq=m, learn="qGh")
    student = cddn.layer("qp", n=n, n_ineq=m, learn="qGh")
    G_true, h_true = torch.randn(m, n), torch.rand(m) * 0.5 + 0.1
    x = torch.randn(48, n)
    with torch.no_grad():
        y_true = teacher(-x, G_true, h_true)        # q = −x
    G = torch.nn.Parameter(torch.randn(m, n))
    h = torch.nn.Parameter(torch.ones(m))
    opt = torch.optim.Adam([G, h], lr=0.05)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = ((student(-x, G, h) - y_true) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.5f}")
    return losses


if __name__ == "__main__":
    main()
