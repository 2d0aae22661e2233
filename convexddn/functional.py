"""Stateless functional forms of every native node, like ``torch.nn.functional``.

Each function does the work; the modules (:class:`convexddn.RobustPool`,
:class:`convexddn.LpProjection`, :class:`convexddn.SimplexProjection`, …) only hold
options and call these.
"""
from .nodes.pooling import robust_pool
from .nodes.projection import project_lp, project_simplex

__all__ = ["robust_pool", "project_lp", "project_simplex"]
