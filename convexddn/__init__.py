"""convexddn: deep declarative networks in PyTorch.

Layers defined by *what* they compute — the solution of an optimization problem,
``y(x) ∈ argmin_{u ∈ C(x)} f(x, u)`` — and differentiated implicitly (Gould, Hartley
& Campbell, "Deep Declarative Networks", TPAMI 2021):

- :class:`ConvexLayer` (:mod:`convexddn.convex`): a convex problem in CVXPY syntax as
  a torch module;
- :mod:`convexddn.registry` and :func:`layer`: problems built by name, as the fastest
  exact layer (a native node where one exists);
- :class:`RobustPool`, :class:`LpProjection`, :class:`SimplexProjection`: native,
  batched nodes with closed-form backward passes (:mod:`convexddn.nodes`,
  :mod:`convexddn.functional`);
- :class:`DeclarativeNode`: write ``objective`` and ``solve``, get the backward.
"""
from . import errors, functional
from .convex import ConvexLayer, ProblemSpec, registry
from .convex.compat import CvxpyLayer
from .factory import layer
from .nodes import DeclarativeNode, LpProjection, RobustPool, SimplexProjection

__version__ = "0.1.0"

__all__ = [
    "ConvexLayer",
    "CvxpyLayer",
    "DeclarativeNode",
    "LpProjection",
    "ProblemSpec",
    "RobustPool",
    "SimplexProjection",
    "errors",
    "functional",
    "layer",
    "registry",
    "__version__",
]
