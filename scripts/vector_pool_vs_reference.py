"""Robust vector pooling beside the DDN reference's ``RobustVectorPool2dFcn``, side by side.

    CONVEXDDN_DDN_REFERENCE=/path/to/ddn python scripts/vector_pool_vs_reference.py [SEED ...]

The comparison quoted in docs/nodes-eigen-lstsq-vector-pool.md ("Against the reference"):
float64, α = 1, ``x (16, 8, 6, 6)`` (16 sets of 36 vectors in R⁸) standard normal, with a
random fifth of each set's vectors (7 of 36) shifted by 6 times one standard normal vector
(a cluster of outliers); seeds 0, 1, 2 by default. Both objectives are evaluated by the
reference's own penalty (its ``phi``, equal to ours at α = 1), so neither side's
bookkeeping decides.
Prints, per penalty and seed, how many of the 16 sets end at a higher objective on each
side (beyond 1e-9 relative) and by how much at most, and whether the reference's
backward runs there.
"""
from __future__ import annotations

import sys

import torch

from convexddn.bench.reference import load_reference_file
from convexddn.nodes.vector_pool import robust_vector_pool

PENALTIES = {"pseudo_huber": "PseudoHuber", "huber": "Huber", "welsch": "Welsch", "trunc_quad": "TruncQuad"}


def sets(seed: int) -> torch.Tensor:
    """``(16, 8, 6, 6)`` float64: standard normal, 7 of each set's 36 vectors shifted by one 6·N(0, I)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 8, 36, dtype=torch.float64, generator=gen)
    for b in range(16):
        out = torch.randperm(36, generator=gen)[:7]
        x[b, :, out] += 6.0 * torch.randn(8, 1, dtype=torch.float64, generator=gen)
    return x.view(16, 8, 6, 6)


def objective(phi, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(B,)`` Σ_i φ(‖y − x_i‖; 1) with the reference's φ."""
    return phi((y[:, :, None] - x.flatten(2)).norm(dim=1), 1.0).sum(-1)


def main(seeds: list[int]) -> int:
    ref, note = load_reference_file("robust_vec_pool.py")
    if ref is None:
        print(note)
        return 1
    print(note)
    print(f"{'penalty':<13}{'seed':>5}{'ref higher':>12}{'by up to':>10}{'ours higher':>13}{'by up to':>10}"
          f"{'ref backward':>14}")
    for name, cls in PENALTIES.items():
        penalty = getattr(ref, cls)
        for seed in seeds:
            x = sets(seed)
            ours = robust_vector_pool(x, name, 1.0, dim=(-2, -1), vector_dim=1)
            xr = x.clone().requires_grad_(True)
            theirs = ref.RobustVectorPool2dFcn.apply(xr, penalty, 1.0)
            fo, fr = objective(penalty.phi, x, ours), objective(penalty.phi, x, theirs.detach())
            tol = 1e-9 * fo.abs().clamp_min(1.0)
            ref_high, our_high = fr - fo > tol, fo - fr > tol
            try:
                (g,) = torch.autograd.grad(theirs.sum(), xr)
                backward = "ok" if bool(torch.isfinite(g).all()) else "non-finite"
            except Exception as err:  # noqa: BLE001 - the reference's failure is a result here
                backward = f"fails ({type(err).__name__})"
            gap = lambda mask, d: f"{float(d[mask].max()):.3g}" if bool(mask.any()) else "-"  # noqa: E731
            print(f"{name:<13}{seed:>5}{int(ref_high.sum()):>9}/16{gap(ref_high, fr - fo):>10}"
                  f"{int(our_high.sum()):>10}/16{gap(our_high, fo - fr):>10}{backward:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main([int(s) for s in sys.argv[1:]] or [0, 1, 2]))
