"""The convex path: a CVXPY problem -> its cone program -> a checked solve -> the adjoint.

- :mod:`.layer`: :class:`ConvexLayer`, the batching adapter (a torch module);
- :mod:`.registry`: parametrized CVXPY problems built by name;
- :mod:`.cone`: cone-program maths shared by the backends (KKT residual, residual map);
- :mod:`.per_element`: the per-element backend (Clarabel/SCS/ECOS + Newton polish).
"""
from . import registry
from .layer import ConvexLayer
from .registry import ProblemSpec

__all__ = ["ConvexLayer", "ProblemSpec", "registry"]
