"""``import convexddn.registry`` and ``from convexddn.registry import build``: the module
:mod:`convexddn.convex.registry` itself under the name its documentation uses (this
file puts that module in its own place in ``sys.modules``, so both names are one
module: one table of problems). The names are imported here too, so that tools reading
the source (the API docs) find them."""
import sys

from .convex import registry as _registry
from .convex.registry import (  # noqa: F401 (re-exported)
    ProblemSpec,
    build,
    describe,
    names,
    option_names,
    real_option,
    register,
)

__all__ = ["ProblemSpec", "register", "names", "build", "describe", "option_names", "real_option"]

sys.modules[__name__] = _registry
