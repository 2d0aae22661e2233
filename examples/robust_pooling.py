"""Robust pooling vs mean and max pooling on data with outliers.

Each row holds 200 samples of a value (its true location is 1.0) plus noise, and a
growing fraction of outliers drawn far away. Mean and max pooling follow the outliers;
the robust penalties (Gould et al., Table 1) stay near the truth, the nonconvex ones
(Welsch, truncated quadratic) best. Run: python examples/robust_pooling.py
"""
import torch

import convexddn as cddn

PENALTIES = ("quadratic", "pseudo_huber", "huber", "welsch", "trunc_quad")


def pooled_errors(rate: float, n: int = 200, rows: int = 256, seed: int = 0) -> dict[str, float]:
    """Mean |pooled − 1| over rows, for each pooling, at an outlier rate."""
    g = torch.Generator().manual_seed(seed)
    x = 1.0 + 0.3 * torch.randn(rows, n, generator=g)
    n_out = int(rate * n)
    x[:, :n_out] = 6.0 + 2.0 * torch.rand(rows, n_out, generator=g)   # outliers, one side
    errors = {"max": (x.max(-1).values - 1).abs().mean().item()}
    for penalty in PENALTIES:
        y = cddn.functional.robust_pool(x, penalty=penalty, alpha=1.0, dim=-1)
        errors[penalty] = (y - 1).abs().mean().item()
    return errors


def main() -> dict[float, dict[str, float]]:
    table = {rate: pooled_errors(rate) for rate in (0.0, 0.1, 0.2, 0.3, 0.4)}
    names = ["max", *PENALTIES]
    print("outliers | " + " | ".join(f"{n:>12}" for n in names))
    for rate, errs in table.items():
        print(f"{rate:8.0%} | " + " | ".join(f"{errs[n]:12.3f}" for n in names))
    # The module form holds the options; its backward is Table 1's closed form.
    pool = cddn.RobustPool(penalty="welsch", alpha=1.0, dim=-1)
    x = torch.randn(2, 8, 100, requires_grad=True)
    pool(x).sum().backward()
    print(pool, "gradient rows sum to", x.grad.sum(-1)[0, :3].tolist())
    return table


if __name__ == "__main__":
    main()
