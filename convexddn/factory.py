"""``convexddn.layer(name, ...)``: the fastest exact layer for a registry problem.

The registry (:mod:`convexddn.convex.registry`) states each problem in CVXPY. Where a
problem has a native node that computes the same solution exactly (closed form or an
exact batched solver), :func:`layer` returns that node; otherwise it returns the
:class:`~convexddn.ConvexLayer` of the cone program. ``backend="cvxpy"`` forces the cone
program, ``backend="native"`` insists on the node. Both take the same input and give the
same output (tests check that they agree), ``-inf`` scores of ``entmax`` / ``sparsemax``
included (masked entries: ``MaskedScoresLayer`` gives the cone program a finite
stand-in with the same solution). A problem whose solution moves with (``tv1d``,
``robust_pool``) or ignores (``simplex``, ``sparsemax``, ``entmax``; ``birkhoff``'s ``X``, ``ot_lp``'s
and ``ot_entropic``'s ``C``) a constant added to each row of a parameter gets the cone program of
that parameter centred per row (``CentredLayer``, :mod:`convexddn._registry_layers`).

This module sits above both paths: it imports the registry and the nodes, and neither of them imports it.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
from torch import nn

from ._autograd import wrapper_forward
from ._checks import check_choice, check_finite, check_tensor
# (MaskedScoresLayer and ScaledBallLayer lived here: layers pickled then load by this module's names)
from ._registry_layers import SHIFT_SYMMETRY, CentredLayer, MaskedScoresLayer, ScaledBallLayer  # noqa: F401
from .convex import registry
from .convex.layer import ConvexLayer
from .convex.learned import LearnedLayer
from .convex.validation import bind_names, check_values
from .errors import NonFiniteError, OptionError, ShapeError
from .nodes.entmax import Entmax
from .nodes.pooling import CONVEX_PENALTIES, RobustPool
from .nodes.pooling.penalties import canonical_penalty
from .nodes._overflow import option_cast
from .nodes._repr import registry_origin
from .nodes.projection import LpProjection, SimplexProjection
from .nodes.total_variation import TotalVariation1d
from .nodes.transport import OptimalTransport

__all__ = ["layer", "BACKENDS", "NATIVE"]

BACKENDS = ("auto", "native", "cvxpy")

# Keyword arguments that configure the ConvexLayer rather than the problem.
_LAYER_OPTIONS = tuple(
    name for name in inspect.signature(ConvexLayer.__init__).parameters
    if name not in ("self", "problem", "parameters", "variables")
)


def _lp_ball(n: int, p: Any = 2, radius: float = 1.0) -> nn.Module:
    return LpProjection(p=p, mode="ball", radius=radius, dim=-1)


def _simplex(n: int) -> nn.Module:
    return SimplexProjection(dim=-1)


def _robust_pool(n: int, penalty: str = "quadratic", alpha: float = 1.0) -> nn.Module | None:
    # Only the convex penalties are registry problems; the builder rejects the others.
    penalty = canonical_penalty(penalty)
    return RobustPool(penalty=penalty, alpha=alpha, dim=-1) if penalty in CONVEX_PENALTIES else None


def _sparsemax(n: int) -> nn.Module:
    return Entmax(alpha=2.0, dim=-1)


def _entmax(n: int, alpha: float = 1.5) -> nn.Module:
    return Entmax(alpha=alpha, dim=-1)


def _tv1d(n: int, lam: float = 1.0) -> nn.Module:
    return TotalVariation1d(lam=lam, dim=-1)


def _ot_entropic(m: int, n: int, eps: float = 1.0) -> nn.Module:
    return OptimalTransport(eps=eps)


#: Registry problems with an exact native node: name -> builder taking the problem's options.
NATIVE: dict[str, Callable[..., nn.Module | None]] = {
    "lp_ball": _lp_ball,
    "simplex": _simplex,
    "robust_pool": _robust_pool,
    "sparsemax": _sparsemax,
    "entmax": _entmax,
    "tv1d": _tv1d,
    "ot_entropic": _ot_entropic,
}


class RegistryNode(nn.Module):
    """A native node standing for a registry problem: checks the input like the ConvexLayer.

    Shape:
        - Input: ``(*batch, n)``, the problem's parameter ``x`` (by position or by name,
          as the :class:`~convexddn.ConvexLayer` of the same problem takes it).
        - Output: what the registry problem's variable is, with the batch shape in front.
    """

    parameter = "x"  # the registry problem's parameter name (a class default: older pickles)
    finite = False  # whether non-finite x is an error named as the ConvexLayer names it

    def __init__(self, name: str, n: int, node: nn.Module, parameter: str = "x", finite: bool = False) -> None:
        super().__init__()
        self.name, self.n, self.node, self.parameter, self.finite = name, n, node, parameter, finite

    @wrapper_forward(lambda self: f"layer({self.name!r})")
    def forward(self, *values: torch.Tensor, **named: torch.Tensor) -> torch.Tensor:
        """Solve the problem for every row of ``x``: ``(*batch, n) -> (*batch, ...)``.

        Raises:
            ShapeError: not exactly one tensor (a surplus one, an unknown name) or one
                whose trailing dimension is not ``n``, as the cone program's layer says.
            NonFiniteError: NaN or Inf in ``x`` (except the masked ``-inf`` scores of
                ``entmax`` / ``sparsemax``), named as the cone program's layer names it.
        """
        # The ConvexLayer's binding and its errors: a surplus tensor was a raw TypeError.
        (x,) = bind_names(values, named, [self.parameter])
        label = f"parameter 0 ({self.parameter})"
        check_tensor(label, x)
        if x.dim() < 1 or x.shape[-1] != self.n:
            raise ShapeError(
                f"{label} must have shape (*batch, {self.n}) i.e. trailing shape "
                f"({self.n},), got {tuple(x.shape)}")
        try:
            return self.node(x)
        except NonFiniteError:
            # Each node checks x where it must (on failure only: no extra pass or host sync here);
            # named again with the ConvexLayer's label and the caller's shape (the node saw its rows).
            if self.finite:
                try:
                    check_finite(label, x)
                except NonFiniteError as named:
                    raise named from None  # (not shown beside the node's own message)
            raise

    def extra_repr(self) -> str:
        return f"name={self.name!r}, n={self.n}"


class TransportNode(nn.Module):
    """The native node of ``ot_entropic`` (:class:`~convexddn.OptimalTransport`), taking
    ``(C, a, b)`` as its :class:`~convexddn.ConvexLayer` does, with the registry's gradient.

    The plan is defined where :math:`\\sum a = \\sum b` only, so a gradient with respect to
    the marginals is unique along mass-preserving directions only. The registry's problem
    states the last column sum as implied, :math:`b_n = \\sum_i a_i - \\sum_{j<n} b_j`, so its
    gradient has :math:`\\partial L/\\partial b_n = 0` and carries that entry's effect on
    ``a`` and the other entries of ``b``. The node alone rescales ``b`` to ``a``'s mass (a
    gradient orthogonal to ``b``); here ``b_n`` is replaced by ``b_n + (d - d.detach())``,
    :math:`d = \\sum a - \\sum b`: the same values (so the plan is the node's), the registry's
    derivative. Both backends of ``convexddn.layer("ot_entropic")`` then agree.

    Shape:
        - Input: ``C (*, m, n)``, ``a (*, m)``, ``b (*, n)`` (batch shapes broadcast), by
          position or by name; checked as the cone program's layer checks them (finite,
          ``a, b >= 0``, equal masses: :attr:`~convexddn.ProblemSpec.check`).
        - Output: ``P (*, m, n)``, in the inputs' promoted dtype (as the cone program's).
    """

    def __init__(self, name: str, node: nn.Module, parameters: tuple, check: Callable | None) -> None:
        super().__init__()
        self.name, self.node, self.parameters_, self.check = name, node, tuple(parameters), check

    @wrapper_forward(lambda self: f"layer({self.name!r})", tangents=False, jacrev=False)  # (as sinkhorn's)
    def forward(self, *values: torch.Tensor, **named: torch.Tensor) -> torch.Tensor:
        """The plan for every batch element: see the class docstring."""
        (C, a, b), _ = check_values(values, named, self.parameters_, self.check)
        dtype = torch.promote_types(torch.promote_types(C.dtype, a.dtype), b.dtype)  # (the cone program's)
        C, a, b = (option_cast("ot_entropic", k, v, dtype) for k, v in (("C", C), ("a", a), ("b", b)))  # (checked)
        d = a.sum(-1, keepdim=True) - b.sum(-1, keepdim=True)
        last = torch.arange(b.shape[-1], device=b.device) == b.shape[-1] - 1
        # (d - d.detach()) is exactly 0: the values stay b's, the derivative is b_n's as implied.
        return self.node(C, a, b + (d - d.detach()) * last)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


# The registry problems whose native node (Entmax) masks -inf scores, and their alpha.
_MASKING = {"sparsemax": lambda options: 2.0, "entmax": lambda options: options["alpha"]}


def _valid_options(name: str, backend: str, declared: tuple[str, ...]) -> str:
    """The options layer(name, backend=backend) takes, in words, for its messages."""
    # check is the registry's own (ProblemSpec.check); a declared name is the problem's.
    own = [k for k in _LAYER_OPTIONS if k != "check" and k not in declared]
    problem = f"the problem's {list(declared)}"
    if backend == "native":
        return f"{problem} (ConvexLayer's options {own} configure the cone program: not with backend='native')"
    if backend == "auto" and name in NATIVE:
        return (f"{problem} and, with backend='cvxpy' (the cone program; 'auto' picks the native "
                f"node, which takes none of them), ConvexLayer's {own}")
    return f"{problem} and ConvexLayer's {own}"


def layer(name: str, *, backend: str = "auto", **options: Any) -> nn.Module:
    """The fastest exact layer for the registry problem ``name``.

    Args:
        name: a registry name (:func:`convexddn.registry.names`).
        backend: ``"auto"`` (default: the native node where the problem has one, else the
            :class:`~convexddn.ConvexLayer`), ``"native"`` (the node, or an ``OptionError``) or ``"cvxpy"``.
        **options: the problem's options (e.g. ``n=512, p=1``) and, for the cone
            program, :class:`~convexddn.ConvexLayer`'s options (``solver``, ``tol``, …);
            a name the problem's builder declares goes to the builder.

    Returns:
        An ``nn.Module`` taking the problem's parameters (``(*batch, *param.shape)``)
        and returning its variables. Where the problem learns some of its parameters
        (:attr:`~convexddn.ProblemSpec.learned`, e.g. ``layer("qp", n=10, n_ineq=5,
        learn="Gh", inputs="q")``), a :class:`~convexddn.convex.learned.LearnedLayer`
        holding them as ``nn.Parameter`` s and taking the other parameters. Either
        backend takes the parameters by position or by name, and ``entmax`` /
        ``sparsemax`` take ``-inf`` scores (masked) on both (``MaskedScoresLayer``).
        ``ot_entropic``'s native node is :class:`TransportNode` (the registry's gradient
        with respect to the marginals); ``lp_ball``'s cone program is a
        :class:`ScaledBallLayer` (solved at a radius in [1, 2) on ``x / s``, s a power of two).

    Raises:
        OptionError: unknown name, backend or option; ``backend="native"`` for a
            problem without a native node; ConvexLayer options with a native node;
            ``check``, which the registry problem sets itself.
        NonconvexError: ``robust_pool`` with a nonconvex penalty (``"welsch"``,
            ``"trunc_quad"``): use :class:`~convexddn.RobustPool`.

    Example::

        >>> proj = layer("lp_ball", n=512, p=1)        # native: sort-based, exact
        >>> cone = layer("lp_ball", n=512, p=1, backend="cvxpy")   # the cone program
    """
    check_choice("backend", backend, BACKENDS)
    # A user's builder may declare an option of a layer option's name (tol, say): it
    # belongs to the problem, and the layer cannot take it too.
    declared = registry.option_names(name)
    layer_opts = {k: options.pop(k) for k in list(options) if k in _LAYER_OPTIONS and k not in declared}
    unknown = [k for k in options if k not in declared]
    if unknown:
        # Checked here, not left to build(): its message lists the problem's options
        # only, and layer() takes ConvexLayer's too.
        raise OptionError(f"unknown option(s) {unknown} for layer({name!r}); valid options are "
                          f"{_valid_options(name, backend, declared)}")
    spec = registry.build(name, **options)  # validates the problem's options
    if backend != "cvxpy" and name in NATIVE and not spec.learned:
        node = NATIVE[name](**spec.options)
        if node is not None:
            if layer_opts:
                raise OptionError(
                    f"options {sorted(layer_opts)} configure the cone program, but problem "
                    f"{name!r} is solved by its native node; pass backend='cvxpy' to use them")
            if name == "ot_entropic":
                return TransportNode(name, node, spec.parameters, spec.check)
            # (entmax and sparsemax take -inf scores: masked, not refused)
            return RegistryNode(name, spec.options["n"], node, spec.parameters[0].name(), name not in _MASKING)
    if backend == "native":
        raise OptionError(
            f"problem {name!r} with options {spec.options} has no native node; the native "
            f"problems are {sorted(NATIVE)} (robust_pool with {list(CONVEX_PENALTIES)})")
    if "check" in layer_opts:
        own = getattr(spec.check, "__name__", spec.check)
        raise OptionError(f"check is set by the registry (ProblemSpec.check, here {own!r} for "
                          f"problem {name!r}); it cannot be passed to layer()")
    # (origin: the options asked for, lp_ball's radius before it is rescaled)
    cls, origin = ConvexLayer, registry_origin(name, spec.options)
    if name in SHIFT_SYMMETRY:  # solved on one parameter less a per-row constant (CentredLayer)
        layer_opts.update(symmetry=SHIFT_SYMMETRY[name].symmetry, centred=SHIFT_SYMMETRY[name].parameter)
        cls = CentredLayer
    if name in _MASKING:  # the native node's -inf masking, for the cone program too
        layer_opts["alpha"] = _MASKING[name](spec.options)
        cls = MaskedScoresLayer
    elif name == "lp_ball":  # solved at radius r / s in [1, 2), s a power of two (ScaledBallLayer)
        radius = spec.options["radius"]
        # r = m 2^e, m in [1/2, 1): s = 2^(e - 1), finite up to float64's largest r (2^e is not)
        scale = math.ldexp(1.0, math.frexp(radius)[1] - 1)
        layer_opts.update(scale=scale, radius=radius, p=float(spec.options["p"]))  # (1, 2, inf; "inf" too)
        spec = registry.build(name, **{**options, "radius": radius / scale})
        cls = ScaledBallLayer
    convex = cls(spec.problem, list(spec.parameters), list(spec.variables), check=spec.check, **layer_opts)
    convex.origin = origin  # (repr: which registry problem, with which options)
    # Parameters the problem learns (e.g. qp's learn="Gh") become nn.Parameters of the module.
    return LearnedLayer(convex, spec.learned) if spec.learned else convex
