"""Robust pooling (Gould et al. Table 1): penalties, kernels, solvers and the node.

- :mod:`.penalties`: :class:`Penalty` and the five built-in penalties, each owning its
  maths, its CVXPY form (convex ones) and its solver hook;
- :mod:`.kernels`: row blocks, scratch buffers and the solvers' fused row sums;
- :mod:`.chunks`: rows longer than a block, in column chunks (the row sums and the
  backward's weights of a block, scratch bounded by a chunk);
- :mod:`.backward`: the closed-form backward (Table 1) over the same blocks;
- :mod:`.rounding`: the rounding model (u's grid, the sums' noise) and the backward's
  refinement of rows whose y is coarse against alpha;
- :mod:`.solvers`: iteration drivers (safeguarded Newton, Welsch);
- :mod:`.trunc_quad`: the exact truncated-quadratic minimiser (sorted rows, candidate runs);
- :mod:`.node`: the autograd Function, :func:`robust_pool` and :class:`RobustPool`.
"""
from .node import RobustPool, robust_pool
from .penalties import (
    CONVEX_PENALTIES,
    PENALTIES,
    PENALTY_ALIASES,
    Huber,
    Penalty,
    PseudoHuber,
    Quadratic,
    TruncatedQuadratic,
    Welsch,
)

__all__ = [
    "CONVEX_PENALTIES",
    "PENALTIES",
    "PENALTY_ALIASES",
    "Huber",
    "Penalty",
    "PseudoHuber",
    "Quadratic",
    "RobustPool",
    "TruncatedQuadratic",
    "Welsch",
    "robust_pool",
]
