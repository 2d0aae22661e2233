"""The problem registry: parametrized CVXPY problems built by name.

A catalog module (``convexddn.problems.*``) declares a builder with
:func:`register`; users list the catalog with :func:`names` and build a
:class:`ProblemSpec` with :func:`build`. :func:`convexddn.layer` turns a registry
problem into the fastest exact layer (a native node where one exists, else a
:class:`~convexddn.ConvexLayer`)::

    >>> spec = build("lp_ball", n=512, p=1)

Builders take keyword options only; unknown option names, missing required ones and
bad values raise :class:`~convexddn.errors.OptionError` listing what is valid. Numeric
options are checked by :func:`real_option`, the one validator the catalog uses for them.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import threading
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .._checks import check_number
from ..errors import OptionError, ProblemError

if TYPE_CHECKING:
    import cvxpy as cp

__all__ = ["ProblemSpec", "register", "names", "build", "describe", "option_names", "real_option"]

# The catalog modules imported on first use: importing them registers their problems.
_CATALOG = ("qp", "projection", "pooling", "transport", "sparse")


@dataclasses.dataclass(frozen=True)
class ProblemSpec:
    """A parametrized problem ready for :class:`~convexddn.ConvexLayer`.

    Attributes:
        name: the registry name.
        problem: the DPP ``cvxpy.Problem``, built on first access where its builder
            defers it (see :func:`register`): :func:`convexddn.layer` returns a native
            node without it.
        parameters: its parameters, in the order a :class:`~convexddn.ConvexLayer` takes
            tensors (the learned ones included).
        variables: the variables a layer returns, in order.
        description: one line saying what the problem computes.
        options: the options it was built with (defaults filled in).
        learned: the parameters a layer learns, by name, with their initial values
            (``numpy`` arrays of the parameter's shape); :func:`convexddn.layer` makes
            them ``nn.Parameter`` s of the returned module. Empty when nothing is learned.
        check: the problem's own check of a call's tensors (in :attr:`parameters`
            order), for values its CVXPY form accepts but does not mean (optimal
            transport's marginals of unequal mass), or ``None``. :func:`convexddn.layer`
            passes it to the :class:`~convexddn.ConvexLayer` (its ``check`` option);
            pass ``check=spec.check`` when building one from a spec by hand.
    """

    name: str
    # The cvxpy.Problem, or the builder's zero-argument callable making it (deferred).
    _problem: Any = dataclasses.field(repr=False, compare=False)
    parameters: tuple[cp.Parameter, ...]
    variables: tuple[cp.Variable, ...]
    description: str
    options: dict[str, Any]
    learned: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    check: Callable[[list], None] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def problem(self) -> cp.Problem:
        """The ``cvxpy.Problem``; a deferred one is built here, once.

        Raises:
            OptionError: an option value the CVXPY form cannot represent (the native node
                may still take it, e.g. ``entmax`` with a large ``alpha``).
        """
        import cvxpy as cp

        if not isinstance(self._problem, cp.Problem):
            with _BUILD_LOCK:  # two threads must not build two different problems
                if not isinstance(self._problem, cp.Problem):
                    problem = self._problem()
                    if not isinstance(problem, cp.Problem):  # a catalog bug: name the builder
                        raise ProblemError(f"registry builder {self.name!r} deferred a problem "
                                           f"that is a {type(problem).__name__}, not a cvxpy.Problem")
                    object.__setattr__(self, "_problem", problem)
        return self._problem

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
    check: Callable[[list], None] | None = None


_REGISTRY: dict[str, _Entry] = {}
_loaded = False
_loading = False  # the catalog's own register() calls must not load it again
_CATALOG_LOCK = threading.RLock()
_BUILD_LOCK = threading.RLock()  # re-entrant: a deferred problem may build another


def register(name: str, description: str, *, check: Callable[[list], None] | None = None
             ) -> Callable[[Callable], Callable]:
    """Decorator adding a builder to the registry under ``name``.

    The builder takes keyword options and returns ``(problem, parameters,
    variables)``, or ``(problem, parameters, variables, learned)`` where ``learned``
    maps the names of the parameters a layer should learn to their initial values
    (:attr:`ProblemSpec.learned`). It validates its own options with errors from
    :mod:`convexddn.errors` (numbers with :func:`real_option`). ``problem`` may be a
    zero-argument callable returning the ``cvxpy.Problem``: it is then built on first
    use of :attr:`ProblemSpec.problem`, so that a native node skips it.

    ``check``, where given, becomes :attr:`ProblemSpec.check`: called with a layer
    call's tensors in parameter order, it raises an error of :mod:`convexddn.errors` for
    values outside the problem's domain.

    Raises:
        OptionError: ``name`` or ``description`` is not a non-empty string, ``check`` is
            neither callable nor ``None``, the builder takes ``*args``, ``**kwargs`` or
            positional-only parameters (each option must be named), or ``name`` is
            already registered (the built-in catalog is loaded first, so its names are
            taken from the start).
    """
    # A non-string name would break every later sorted listing of the names.
    for what, value in (("name", name), ("description", description)):
        if not isinstance(value, str) or not value:
            raise OptionError(f"register: {what} must be a non-empty string, got {value!r}")
    if check is not None and not callable(check):
        raise OptionError(f"register({name!r}): check must be a callable or None, got {type(check).__name__}")

    def decorate(builder: Callable[..., tuple]) -> Callable[..., tuple]:
        if not callable(builder):
            raise OptionError(f"register({name!r}) decorates a builder function, got {type(builder).__name__}")
        _check_signature(name, builder)
        # Load the catalog before taking the name: a user's "simplex" registered first
        # would make the catalog's own registration fail on every later load.
        _load_catalog()
        old = _REGISTRY.get(name)
        if old is not None and _definition(old.builder) != _definition(builder):
            raise OptionError(
                f"problem name {name!r} is already registered (by {_origin(old.builder)}); "
                f"register {_origin(builder)} under another name")
        # The same definition run again (a module reloaded) replaces its entry.
        _REGISTRY[name] = _Entry(builder, description, check)
        return builder
    return decorate


# The parameter kinds an option can be: build() passes every option by name.
_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _check_signature(name: str, builder: Callable) -> None:
    """Refuse a builder whose options are not all named parameters.

    Every option is named in the builder's signature: :func:`describe` and
    ``convexddn list`` document them, :func:`build` rejects unknown ones listing the
    valid ones, and :func:`convexddn.layer` tells a problem's options from the
    ConvexLayer's by these names. ``**kwargs`` would take any misspelt option (and a
    layer option such as ``tol``) silently, ``*args`` and positional-only parameters
    cannot be passed by name; ``build`` read them as required options no call could give.
    """
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError) as err:  # a builtin or C callable without a signature
        raise OptionError(f"register({name!r}): the options of builder {_origin(builder)} cannot be read "
                          f"from its signature ({err}); decorate a Python function") from None
    shown = {inspect.Parameter.VAR_POSITIONAL: "*{}", inspect.Parameter.VAR_KEYWORD: "**{}",
             inspect.Parameter.POSITIONAL_ONLY: "{} (positional-only)"}
    unnamed = [shown[p.kind].format(p.name) for p in params if p.kind not in _NAMED]
    if unnamed:
        raise OptionError(
            f"register({name!r}): builder {_origin(builder)} must take each option as a named "
            f"keyword parameter (describe() lists them, build() checks them), got "
            f"{', '.join(unnamed)}; declare each option as a parameter of its own")
    # build(name, **options) and layer(name, backend=..., **options) take these themselves:
    # an option of that name was accepted here and then unusable (a raw TypeError).
    taken = [p.name for p in params if p.name in _RESERVED]
    if taken:
        raise OptionError(f"register({name!r}): builder {_origin(builder)} has option(s) {taken}, names that "
                          f"build() and convexddn.layer() take themselves ({sorted(_RESERVED)}); rename them")


_RESERVED = frozenset({"name", "backend"})


def _origin(builder: Callable) -> str:
    return f"{getattr(builder, '__module__', '?')}.{getattr(builder, '__qualname__', repr(builder))}"


def _definition(builder: Callable) -> tuple:
    """Where ``builder`` is defined: the same for a module's definition run again (a
    reload), different for two lambdas or two functions of one name elsewhere."""
    code = getattr(builder, "__code__", None)
    return (_origin(builder), getattr(code, "co_filename", None), getattr(code, "co_firstlineno", id(builder)))


def _load_catalog() -> None:
    global _loaded, _loading
    if _loaded:
        return
    # Re-entrant: the catalog's own register() calls come back here in this thread
    # (and return at once); another thread waits for the whole catalog.
    with _CATALOG_LOCK:
        if _loaded or _loading:
            return
        _loading = True
        try:
            for module in _CATALOG:
                importlib.import_module(f"convexddn.problems.{module}")
            _loaded = True
        finally:
            _loading = False


def real_option(name: str, value: Any, *, above: float | None = None, at_least: float | None = None,
                hint: str = "") -> float:
    """A numeric registry option as a float: finite and ``> above`` (or ``>= at_least``).

    The one numeric-option validator (:func:`convexddn._checks.check_number`), saying
    why a tensor is refused here: registry options are constants of the CVXPY problem.
    """
    return check_number(name, value, above=above, at_least=at_least, hint=hint,
                        constant_because="registry options are constants of the problem")


def names() -> list[str]:
    """Sorted names of every registered problem."""
    _load_catalog()
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    _load_catalog()
    # A string first: a list raised a raw "unhashable type" from the lookup.
    if not isinstance(name, str):
        raise OptionError(f"name must be a problem name (a str) among {names()}, got {name!r}")
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


def option_names(name: str) -> tuple[str, ...]:
    """The options the builder of problem ``name`` takes, in its order.

    Raises:
        OptionError: unknown name.
    """
    return tuple(inspect.signature(_entry(name).builder).parameters)


def _as_tuple(value: Any) -> tuple | None:
    """``tuple(value)``, or ``None`` where ``value`` is not iterable."""
    try:
        return tuple(value)
    except TypeError:
        return None


def build(name: str, **options: Any) -> ProblemSpec:
    """Build the registered problem ``name`` with the given options.

    Raises:
        OptionError: unknown name (the message lists the registered ones), unknown or
            missing option (lists the valid ones), or an invalid option value.
        NonconvexError: a convex-only builder asked for a nonconvex variant.
        ProblemError: a builder breaking its return contract (not a 3- or 4-tuple, a
            problem that is neither a ``cvxpy.Problem`` nor a callable, ``parameters`` /
            ``variables`` not a sequence of ``cp.Parameter`` / ``cp.Variable``, e.g. a bare
            ``cp.Parameter``), naming the builder.
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
    result = entry.builder(**bound.arguments)
    if not isinstance(result, tuple) or len(result) not in (3, 4) or (len(result) == 4 and not isinstance(result[3], dict)):
        got = f"a {len(result)}-tuple" if isinstance(result, tuple) else f"a {type(result).__name__}"
        raise ProblemError(f"registry builder {name!r} must return (problem, parameters, variables) or "
                           f"(problem, parameters, variables, learned: dict), got {got}")
    problem, parameters, variables, *rest = result
    import cvxpy as cp  # imported by the builder already

    if not (isinstance(problem, cp.Problem) or callable(problem)):
        raise ProblemError(f"registry builder {name!r} returned a {type(problem).__name__} "
                           "as its problem, not a cvxpy.Problem or a callable making one")
    # A bare cp.Parameter as `parameters` was iterated into its entries (x[0], x[1], ...), and
    # the spec listed expressions as parameters: layer() then failed naming neither the
    # builder nor its contract.
    checked = []
    for what, value, kind in (("parameters", parameters, cp.Parameter), ("variables", variables, cp.Variable)):
        items = None if isinstance(value, (cp.Expression, str, dict)) else _as_tuple(value)
        if items is None or not all(isinstance(v, kind) for v in items):
            got = (f"a {type(value).__name__}" if items is None else
                   f"a {type(value).__name__} holding {[type(v).__name__ for v in items]}")
            raise ProblemError(
                f"registry builder {name!r} must return (problem, parameters, variables[, learned]) with "
                f"{what} a list or tuple of cvxpy.{kind.__name__}, got {got} as {what}")
        checked.append(items)
    parameters, variables = checked
    declared = {k: np.asarray(v, dtype=np.float64) for k, v in (rest[0] if rest else {}).items()}
    shapes = {p.name(): tuple(p.shape) for p in parameters}
    for key, value in declared.items():
        # A catalog bug, not a user error: say which builder broke the contract.
        if key not in shapes or value.shape != shapes[key]:
            raise ProblemError(f"registry builder {name!r} declared learned parameter {key!r} with "
                               f"shape {value.shape}; its parameters are {shapes}")
    learned = {k: declared[k] for k in shapes if k in declared}  # in parameter order
    return ProblemSpec(name, problem, tuple(parameters), tuple(variables),
                       entry.description, dict(bound.arguments), learned, entry.check)
