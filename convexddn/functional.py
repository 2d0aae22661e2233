"""Stateless functional forms of every native node, like ``torch.nn.functional``.

Each function does the work; the modules (:class:`convexddn.RobustPool`,
:class:`convexddn.LpProjection`, :class:`convexddn.SimplexProjection`, …) only hold
options and call these.
"""
from .nodes.eigen import eigen_decomposition
from .nodes.entmax import entmax
from .nodes.least_squares import least_squares
from .nodes.linear_fit import linear_fit
from .nodes.pnp import pnp
from .nodes.pooling import robust_pool
from .nodes.projection import project_lp, project_simplex
from .nodes.total_variation import tv_denoise
from .nodes.transport import sinkhorn
from .nodes.tridiagonal import tridiagonal_solve
from .nodes.vector_pool import robust_vector_pool

__all__ = ["robust_pool", "project_lp", "project_simplex", "robust_vector_pool", "eigen_decomposition",
           "least_squares", "linear_fit", "pnp", "sinkhorn", "entmax", "tv_denoise",
           "tridiagonal_solve"]
