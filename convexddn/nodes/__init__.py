"""The native path: batched torch solvers with hand-written implicit backward passes.

- :mod:`.pooling`: robust pooling with the five penalties of Gould et al. Table 1;
- :mod:`.projection`: Lp-ball/sphere and simplex projections;
- :mod:`.declarative`: :class:`DeclarativeNode`, the base class for users' own nodes;
- :mod:`.implicit`: the generic implicit vector–Jacobian product;
- :mod:`.linear_solvers`: the KKT solvers it uses (dense and CG).
"""
from .declarative import DeclarativeNode
from .pooling import Penalty, RobustPool, robust_pool
from .projection import LpProjection, SimplexProjection, project_lp, project_simplex

__all__ = [
    "DeclarativeNode",
    "Penalty",
    "RobustPool",
    "robust_pool",
    "LpProjection",
    "SimplexProjection",
    "project_lp",
    "project_simplex",
]
