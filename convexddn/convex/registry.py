"""The problem registry: parametrized CVXPY problems built by name.

A catalog module (``convexddn.problems.*``) declares a builder with
:func:`register`; users list the catalog with :func:`names` and build a
:class:`ProblemSpec` with :func:`build`. :func:`convexddn.layer` turns a registry
problem into the fastest exact layer (a native node where one exists, else a
:class:`~convexddn.ConvexLayer`)::

    >>> spec = build("lp_ball", n=512, p=1)

Builders take keyword options only; unknown option names, missing required ones and
bad values raise :class:`~convexddn.errors.OptionError` listing what is valid.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import OptionError, ProblemError

if TYPE_CHECKING:
    import cvxpy as cp

__all__ = ["ProblemSpec", "register", "names", "build", "describe"]

# The catalog modules imported on first use: importing them registers their problems.
_CATALOG = ("qp", "projection", "pooling", "transport", "sparse")


@dataclasses.dataclass(frozen=True)
class ProblemSpec:
    """A parametrized problem ready for :class:`~convexddn.ConvexLayer`.

    Attributes:
        name: the registry name.
        problem: the DPP ``cvxpy.Problem``.
        parameters: its parameters, in the order a :class:`~convexddn.ConvexLayer` takes
            tensors (the learned ones included).
        variables: the variables a layer returns, in order.
        description: one line saying what the problem computes.
        options: the options it was built with (defaults filled in).
        learned: the parameters a layer learns, by name, with their initial values
            (``numpy`` arrays of the parameter's shape); :func:`convexddn.layer` makes
            them ``nn.Parameter`` s of the returned module. Empty when nothing is learned.
    """

    name: str
    problem: cp.Problem
    parameters: tuple[cp.Parameter, ...]
    variables: tuple[cp.Variable, ...]
    description: str
    options: dict[str, Any]
    learned: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def inputs(self) -> tuple[cp.Parameter, ...]:
        """The parameters passed at call time: :attr:`parameters` less the learned ones."""
        return tuple(p for p in self.parameters if p.name() not in self.learned)

    @property
    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each parameter (one batch element), by parameter name."""
        return {p.name(): tuple(p.shape) for p in self.parameters}

    @property
    def variable_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each returned variable (one batch element), by variable name."""
        return {v.name(): tuple(v.shape) for v in self.variables}


@dataclasses.dataclass(frozen=True)
class _Entry:
    builder: Callable[..., tuple]
    description: str


_REGISTRY: dict[str, _Entry] = {}
_loaded = False


def register(name: str, description: str) -> Callable[[Callable], Callable]:
    """Decorator adding a builder to the registry under ``name``.

    The builder takes keyword options and returns ``(problem, parameters,
    variables)``, or ``(problem, parameters, variables, learned)`` where ``learned``
    maps the names of the parameters a layer should learn to their initial values
    (:attr:`ProblemSpec.learned`). It validates its own options with errors from
    :mod:`convexddn.errors`.

    Raises:
        OptionError: ``name`` is already registered.
    """
    def decorate(builder: Callable[..., tuple]) -> Callable[..., tuple]:
        if name in _REGISTRY and _REGISTRY[name].builder is not builder:
            raise OptionError(f"problem name {name!r} is already registered")
        _REGISTRY[name] = _Entry(builder, description)
        return builder
    return decorate


def _load_catalog() -> None:
    global _loaded
    if not _loaded:
        for module in _CATALOG:
            importlib.import_module(f"convexddn.problems.{module}")
        _loaded = True


def names() -> list[str]:
    """Sorted names of every registered problem."""
    _load_catalog()
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    _load_catalog()
    if name not in _REGISTRY:
        raise OptionError(f"unknown problem {name!r}; registered problems are {names()}")
    return _REGISTRY[name]


def describe(name: str) -> str:
    """One line: the problem's description and its options with their defaults."""
    entry = _entry(name)
    opts = []
    for p in inspect.signature(entry.builder).parameters.values():
        opts.append(f"{p.name}=…" if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}")
    return f"{entry.description} [options: {', '.join(opts)}]"


def build(name: str, **options: Any) -> ProblemSpec:
    """Build the registered problem ``name`` with the given options.

    Raises:
        OptionError: unknown name (the message lists the registered ones), unknown or
            missing option (lists the valid ones), or an invalid option value.
        NonconvexError: a convex-only builder asked for a nonconvex variant.
    """
    entry = _entry(name)
    sig = inspect.signature(entry.builder)
    valid = list(sig.parameters)
    unknown = [k for k in options if k not in sig.parameters]
    if unknown:
        raise OptionError(f"unknown option(s) {unknown} for problem {name!r}; valid options are {valid}")
    missing = [p.name for p in sig.parameters.values()
               if p.default is inspect.Parameter.empty and p.name not in options]
    if missing:
        raise OptionError(f"problem {name!r} needs option(s) {missing}; valid options are {valid}")
    bound = sig.bind(**options)
    bound.apply_defaults()
    problem, parameters, variables, *rest = entry.builder(**bound.arguments)
    declared = {k: np.asarray(v, dtype=np.float64) for k, v in (rest[0] if rest else {}).items()}
    shapes = {p.name(): tuple(p.shape) for p in parameters}
    for key, value in declared.items():
        # A catalog bug, not a user error: say which builder broke the contract.
        if key not in shapes or value.shape != shapes[key]:
            raise ProblemError(f"registry builder {name!r} declared learned parameter {key!r} with "
                               f"shape {value.shape}; its parameters are {shapes}")
    learned = {k: declared[k] for k in shapes if k in declared}  # in parameter order
    return ProblemSpec(name, problem, tuple(parameters), tuple(variables),
                       entry.description, dict(bound.arguments), learned)
