"""The native path: batched torch solvers with hand-written implicit backward passes.

- :mod:`.pooling`: robust pooling with the five penalties of Gould et al. Table 1;
- :mod:`.projection`: Lp-ball/sphere and simplex projections;
- :mod:`.declarative`: :class:`DeclarativeNode`, the base class for users' own nodes
  (:mod:`.declarative_function`: its autograd Function; :mod:`.graph`: the checks of the
  user's autograd graph; :mod:`.optimality`: the check that ``solve`` returned a KKT point);
- :mod:`.implicit`: the generic implicit vector–Jacobian product (:mod:`.implicit_jvp`: its
  forward-mode twin);
- :mod:`.linear_solvers`: the KKT solvers it uses (:mod:`.dense`, :mod:`.krylov`);
- :mod:`.eigen`, :mod:`.least_squares` / :mod:`.linear_fit`, :mod:`.vector_pool`,
  :mod:`.pnp`: eigen decomposition, (weighted) least squares, robust vector pooling,
  perspective-n-point; :mod:`.transport` (entropic optimal transport), :mod:`.entmax`
  (sparse attention), :mod:`.total_variation` (1-D TV denoising), :mod:`.tridiagonal`
  (batched tridiagonal linear systems).

The functions ``entmax``, ``least_squares``, ``linear_fit`` and ``pnp`` are exported
here under their modules' names, so the attributes ``convexddn.nodes.entmax`` etc. are
the functions: reach those modules with ``from convexddn.nodes.pnp import …`` (which
always imports the module), not ``import convexddn.nodes.pnp as m``.
"""
from .declarative import DeclarativeNode
from .eigen import EigenDecomposition, EigenResult, eigen_decomposition
from .entmax import Entmax, entmax
from .least_squares import least_squares
from .linear_fit import LeastSquares, LinearFit, WeightedLeastSquares, linear_fit
from .pnp import PnP, pnp
from .vector_pool import RobustVectorPool, robust_vector_pool
from .pooling import Penalty, RobustPool, robust_pool
from .projection import LpProjection, SimplexProjection, project_lp, project_simplex
from .total_variation import TotalVariation1d, tv_denoise
from .transport import OptimalTransport, sinkhorn
from .tridiagonal import TridiagonalSolve, tridiagonal_solve

__all__ = [
    "DeclarativeNode",
    "EigenDecomposition",
    "EigenResult",
    "Entmax",
    "entmax",
    "OptimalTransport",
    "sinkhorn",
    "TotalVariation1d",
    "tv_denoise",
    "TridiagonalSolve",
    "tridiagonal_solve",
    "eigen_decomposition",
    "least_squares",
    "LeastSquares",
    "LinearFit",
    "WeightedLeastSquares",
    "linear_fit",
    "PnP",
    "pnp",
    "RobustVectorPool",
    "robust_vector_pool",
    "Penalty",
    "RobustPool",
    "robust_pool",
    "LpProjection",
    "SimplexProjection",
    "project_lp",
    "project_simplex",
]
