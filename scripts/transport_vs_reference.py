"""Entropic optimal transport beside the DDN reference's ``OptimalTransportLayer``.

    CONVEXDDN_DDN_REFERENCE=/path/to/ddn python scripts/transport_vs_reference.py [SEED]

The transport figure of docs/migrating-from-ddn.md: float64 costs ``M`` of shapes
``(4, 10, 10)`` and ``(2, 100, 100)``, standard normal (``randn``) and uniform
(``rand``), drawn in that order from ``torch.manual_seed(SEED)`` (default 0); uniform
marginals; entropy weight ε = 0.1, i.e. the reference's ``gamma = 10``.
``OptimalTransport(eps=0.1)`` (its defaults otherwise) against the reference twice: with
its defaults (stopping tolerance ``eps=1e-6`` on the column sums, ``maxiters=1000``) and
converged (``eps=1e-12``, ``maxiters=100000``). Prints the largest plan differences and
each plan's largest marginal error against the uniform ``1/n``, ``1/m`` (a check neither
code computes for the other): where the two differ, the one whose marginals are right is.
"""
from __future__ import annotations

import sys

import torch

from convexddn import OptimalTransport
from convexddn.bench.reference import load_reference_file


def marginal_error(plan: torch.Tensor) -> float:
    """Largest ``|P 1 − 1/n|`` or ``|Pᵀ 1 − 1/m|`` over the batch."""
    n, m = plan.shape[-2:]
    return max((plan.sum(-1) - 1 / n).abs().max().item(), (plan.sum(-2) - 1 / m).abs().max().item())


def main(seed: int) -> None:
    ref, note = load_reference_file("optimal_transport.py")
    if ref is None:
        sys.exit(note)
    print(note)
    torch.manual_seed(seed)
    for shape, draw in (((4, 10, 10), torch.randn), ((4, 10, 10), torch.rand), ((2, 100, 100), torch.randn),
                        ((2, 100, 100), torch.rand)):
        cost = draw(*shape, dtype=torch.float64)
        ours = OptimalTransport(eps=0.1)(cost)
        defaults = ref.OptimalTransportLayer(gamma=10.0)(cost)
        converged = ref.OptimalTransportLayer(gamma=10.0, eps=1e-12, maxiters=100000)(cost)
        print(f"{str(shape):>14} {draw.__name__:>5}: max |P - P_ref| {(ours - defaults).abs().max().item():.1e} "
              f"(reference's defaults), {(ours - converged).abs().max().item():.1e} (converged); "
              f"marginal errors: convexddn {marginal_error(ours):.1e}, reference {marginal_error(defaults):.1e} "
              f"(defaults), {marginal_error(converged):.1e} (converged)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
