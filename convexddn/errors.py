"""Errors and warnings raised by convexddn.

One small hierarchy, so callers can catch everything from the library with
``except ConvexDDNError`` or one kind of failure precisely. Each error that is
about user input also derives from the matching builtin (``ValueError`` or
``TypeError``), so code written against plain PyTorch keeps working.

Messages name the argument, what was expected and what came.
"""
from __future__ import annotations

from typing import Sequence

__all__ = [
    "ConvexDDNError",
    "InputError",
    "ShapeError",
    "NonFiniteError",
    "DTypeError",
    "OptionError",
    "ProblemError",
    "NotDPPError",
    "NonconvexError",
    "DoubleBackwardError",
    "SolverError",
    "InfeasibleError",
    "UnboundedError",
    "WorkerError",
    "GradientCheckError",
    "ConvexDDNWarning",
    "GradientWarning",
    "SolverWarning",
]


class ConvexDDNError(Exception):
    """Base class of every error raised by convexddn."""


class InputError(ConvexDDNError, ValueError):
    """A tensor passed to a layer or node is not acceptable."""


class ShapeError(InputError):
    """A tensor has the wrong shape, or batch shapes do not broadcast."""


class NonFiniteError(InputError):
    """A tensor contains NaN or Inf values."""


class DTypeError(ConvexDDNError, TypeError):
    """A tensor has a dtype the operation cannot use (e.g. an integer dtype)."""


class OptionError(ConvexDDNError, ValueError):
    """An option (penalty name, p, alpha, radius, solver, problem name …) is invalid."""


class ProblemError(ConvexDDNError, ValueError):
    """A declared optimization problem cannot be used as a layer."""


class NotDPPError(ProblemError):
    """The CVXPY problem does not follow the disciplined parametrized programming rules."""


class NonconvexError(ProblemError):
    """A convex-only path was asked for a nonconvex problem."""


class DoubleBackwardError(ProblemError, NotImplementedError):
    """A second differentiation through a node that has a first-order implicit backward
    only (also a ``NotImplementedError``, what torch raises for a missing derivative)."""


class SolverError(ConvexDDNError, RuntimeError):
    """A solve failed for one or more batch elements.

    Attributes:
        indices: the failing batch indices, as tuples into the caller's batch shape
            (empty tuples for an unbatched call).
        statuses: the solver status reported for each failing index.
    """

    def __init__(
        self,
        message: str,
        indices: Sequence[tuple[int, ...]] = (),
        statuses: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.indices = list(indices)
        self.statuses = list(statuses)


class InfeasibleError(SolverError):
    """The problem has no feasible point for some batch elements."""


class UnboundedError(SolverError):
    """The objective is unbounded below for some batch elements."""


class WorkerError(SolverError):
    """A worker process of ``ConvexLayer(workers=k)`` died, in the forward or the backward; or
    the layer was called in a spawned process still importing the main module (a script without
    the ``if __name__ == "__main__":`` guard, re-run by each worker)."""


class GradientCheckError(ConvexDDNError, AssertionError):
    """Raised by :func:`convexddn.testing.check_gradients` with ``raise_on_fail=True``.

    Attributes:
        report: the :class:`~convexddn.testing.GradientReport` of the failed check.
    """

    def __init__(self, report: object) -> None:
        super().__init__(str(report))
        self.report = report


class ConvexDDNWarning(UserWarning):
    """Base class of convexddn warnings."""


class GradientWarning(ConvexDDNWarning):
    """A gradient was replaced (zero or least-squares) because the exact one does not exist.

    A ``ConvexLayer``'s warning names the first 20 batch elements in its message; its
    ``elements`` attribute lists all of them (index tuples in the caller's batch shape;
    caught with ``warnings.catch_warnings(record=True)``, as ``w.message.elements``).
    """


class SolverWarning(ConvexDDNWarning):
    """A solve needed a fallback (another solver, looser tolerance) to succeed."""
