"""Learn the constraints of a QP layer from data (OptNet style, Amos & Kolter 2017).

A teacher QP  y = argmin ½‖y‖² − xᵀy  s.t.  G y ≤ h  with hidden (G, h) labels the
data (the projection of x onto a polytope). A student built from the registry learns G
and h: ``learn="Gh"`` makes them ``nn.Parameter`` s of the layer (initialised strictly
feasible), ``inputs="q"`` takes q = −x at call time, and L = I stays fixed. The student
trains by gradient descent through the solver; the script reports how close its
predictions and its constraints came to the teacher's. Run: python examples/optnet_qp.py
"""
import torch

import convexddn as cddn


def constraint_match(G: torch.Tensor, h: torch.Tensor, G_true: torch.Tensor, h_true: torch.Tensor) -> torch.Tensor:
    """For each true row gᵀy ≤ h (scaled to ‖g‖ = 1), the distance of (g, h) to the
    nearest learned row, also scaled: 0 when the student found that constraint."""
    def unit(G_, h_):
        scale = G_.norm(dim=1, keepdim=True)
        return torch.cat([G_ / scale, h_.unsqueeze(1) / scale], dim=1)
    return torch.cdist(unit(G_true, h_true), unit(G, h)).min(dim=1).values


def main(steps: int = 60, lr: float = 0.05, verbose: bool = True) -> list[float]:
    torch.manual_seed(0)
    n, m = 3, 4
    G_true, h_true = torch.randn(m, n), torch.rand(m) * 0.5 + 0.1
    teacher = cddn.layer("qp", n=n, n_ineq=m, inputs="q", G=G_true.numpy(), h=h_true.numpy())
    student = cddn.layer("qp", n=n, n_ineq=m, learn="Gh", inputs="q")
    x, x_test = torch.randn(48, n), torch.randn(256, n)
    with torch.no_grad():
        y, y_test = teacher(-x), teacher(q=-x_test)        # q = −x, by position or by name
        error_before = (student(-x_test) - y_test).norm() / y_test.norm()

    opt = torch.optim.Adam(student.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = ((student(-x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if verbose and (step % 10 == 0 or step == steps - 1):
            print(f"step {step:3d}  loss {loss.item():.5f}")

    with torch.no_grad():
        error_after = (student(-x_test) - y_test).norm() / y_test.norm()
        G, h = student.learned["G"], student.learned["h"]
        # A true constraint that no training point touches cannot be learned: say which are.
        active = ((y @ G_true.T - h_true).abs() < 1e-6).any(dim=0)
        match = constraint_match(G, h, G_true, h_true)
    if verbose:
        print(f"held-out relative error of y: {error_before:.3f} at the start, {error_after:.3f} after "
              f"{steps} steps")
        for i in range(m):
            state = "active in the data" if active[i] else "never active (cannot be learned)"
            print(f"true constraint {i}: distance to the nearest learned one {match[i]:.3f} ({state})")
    return losses


if __name__ == "__main__":
    main()
