"""Euclidean projections onto Lp balls and spheres (p = 1, 2, ∞) and the simplex.

- :mod:`.kernels`: the closed-form forwards and their autograd Functions;
- :mod:`.node`: option checks, :func:`project_lp`, :func:`project_simplex` and the modules.
"""
from .node import (
    LpProjection,
    SimplexProjection,
    normalize_p,
    project_lp,
    project_simplex,
)

__all__ = ["LpProjection", "SimplexProjection", "normalize_p", "project_lp", "project_simplex"]
