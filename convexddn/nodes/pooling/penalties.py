"""Robust penalties :math:`\\phi(z; \\alpha)` of Gould et al. Table 1: each owns its maths.

A :class:`Penalty` gives :math:`\\phi`, its derivatives (the implicit backward needs
:math:`\\phi''` and :math:`\\partial^2_{z\\alpha}\\phi`), the curvature of its IRLS
majoriser, its CVXPY form when it is convex (the registry's ``robust_pool`` problem is
built from it), and its solver hook :meth:`Penalty.solve`.

The solvers and the backward need *row sums* of these derivatives over the pooled set:
:meth:`Penalty.newton_sums` (convex Newton), :meth:`Penalty.descent_sums` (nonconvex
descent) and :meth:`Penalty.hessian_weights` (backward). Their defaults are derived
from ``phi``, ``dphi``, ``d2phi``, ``d2phi_dalpha`` and ``irls_weight``, so a user's
subclass that defines those runs natively; the five built-in penalties (in
:mod:`.builtin`, re-exported here) override them with the same formulas written as a
few in-place passes over preallocated buffers (no temporaries: the solvers run them on
row blocks that stay in cache). A test checks every override against the derived
default.

This module is the bottom of the pooling package: it imports neither the solvers
(loaded lazily by :meth:`Penalty.solve`) nor anything of the convex path (CVXPY is
imported only by :meth:`Penalty.cvxpy`).

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks",
    IEEE TPAMI 2021 (Table 1: robust penalties and their gradients).
"""
from __future__ import annotations

import abc
import functools
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.nn.functional import threshold_

from ..._checks import check_choice
from ...errors import NonconvexError, OptionError

__all__ = [
    "CONVEX_PENALTIES",
    "PENALTIES",
    "PENALTY_ALIASES",
    "canonical_penalty",
    "format_penalty",
    "Huber",
    "Penalty",
    "PseudoHuber",
    "Quadratic",
    "TruncatedQuadratic",
    "Welsch",
]

#: Rows whose spread exceeds alpha·sqrt(max)/SPREAD_DIVISOR have their residuals clamped
#: or rescaled (first pass, backward), so that (z/alpha)² stays below max/SPREAD_DIVISOR².
SPREAD_DIVISOR = 32.0


def exp_floor(dtype: torch.dtype) -> float:
    """Exponent below which exp is flushed to exactly 0: exp of anything lower would be
    subnormal (~50x slower on x86 CPUs) and below 1e-36 of the largest weight."""
    return -700.0 if dtype == torch.float64 else -85.0


def _flush(t: Tensor, log_base: float = 1.0) -> Tensor:
    """Set exponents below :func:`exp_floor` to twice the floor, whose exp is exactly 0
    (a finite value, so that ``t * exp(t)`` is 0 and not ``-inf * 0``); ``t`` an
    exponent to the base ``exp(log_base)``."""
    floor = exp_floor(t.dtype) / log_base
    return threshold_(t, floor, 2 * floor)


@functools.cache
def exp_log_base(device_type: str) -> float:
    """The natural log of the base in which the hot loops take exponentials on this
    device: ``log 2`` where torch's ``exp2`` is the faster function, else 1 (``exp``).

    On x86 CPUs torch's vectorised ``exp2`` takes a third (AVX-512) to a half (AVX2)
    of ``exp``'s time (float32: 77 against 224 us, AVX2 158 against 309 us on 512 Ki
    entries; float64 about half); without vector kernels it is three times slower.
    CUDA takes ``exp2`` too (not measured there: no device was available)."""
    if device_type == "cpu" and not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        return 1.0
    return math.log(2.0)


def _tensor(alpha: Any, z: Tensor) -> Tensor:
    return alpha if isinstance(alpha, Tensor) else torch.tensor(float(alpha), dtype=z.dtype, device=z.device)


def _rows(t: Tensor) -> Tensor:
    return t.sum(-1, keepdim=True)


class Penalty(abc.ABC):
    """A robust penalty :math:`\\phi(z; \\alpha)` of Gould et al. Table 1.

    Subclasses give the penalty and the two derivatives the implicit backward needs.
    All methods are elementwise on tensors ``z`` (residuals ``u - x``) and ``alpha``
    (a tensor broadcastable against ``z``).

    Resolve a name with :meth:`Penalty.resolve`; the valid names are :data:`PENALTIES`
    (and the DDN reference's spellings in :data:`PENALTY_ALIASES`).
    """

    name: ClassVar[str]
    convex: ClassVar[bool]
    #: Strictly convex: a zero curvature sum can only be underflow, never a flat minimum.
    strict: ClassVar[bool] = False
    #: phi'' is smooth (Lipschitz), so Newton converges quadratically near a minimum and
    #: a row may stop on the error predicted after its last step.
    smooth: ClassVar[bool] = False
    #: g = sum_i phi'(u - x_i) is piecewise linear in u (Huber): a Newton step lands on
    #: the root exactly unless it crosses a kink of some term, which the row sums do not
    #: locate, so a short step is no evidence of a nearby root. The convex solver then
    #: never stops a row on its step: it takes the step and stops at the next point,
    #: where g is within its rounding noise unless a kink was crossed.
    piecewise_linear: ClassVar[bool] = False
    #: A multiple of alpha beyond which phi' is constant and phi'' negligible in floating
    #: point, so that residuals may be clamped there (where their squares would overflow);
    #: None: never clamp.
    saturation: ClassVar[float | None] = None

    @abc.abstractmethod
    def phi(self, z: Tensor, alpha: Tensor) -> Tensor:
        """The penalty :math:`\\phi(z; \\alpha)`."""

    @abc.abstractmethod
    def dphi(self, z: Tensor, alpha: Tensor) -> Tensor:
        """The first derivative :math:`\\partial_z \\phi`."""

    @abc.abstractmethod
    def d2phi(self, z: Tensor, alpha: Tensor) -> Tensor:
        """The second derivative :math:`\\partial^2_{zz} \\phi` (zero off the inliers for
        Huber and truncated quadratic, whose second derivative jumps at :math:`|z| = \\alpha`)."""

    @abc.abstractmethod
    def d2phi_dalpha(self, z: Tensor, alpha: Tensor) -> Tensor:
        """The mixed derivative :math:`\\partial^2_{z\\alpha} \\phi`."""

    def weights(self, z: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(w, w_alpha)``: :meth:`d2phi` and :meth:`d2phi_dalpha` along the last dim,
        both multiplied by one positive factor per row.

        Only the ratios ``w / w.sum(-1)`` and ``w_alpha.sum(-1) / w.sum(-1)`` enter the
        gradient, so a penalty whose weights underflow (Welsch, pseudo-Huber far from
        every point) rescales them here.
        """
        return self.d2phi(z, alpha), self.d2phi_dalpha(z, alpha)

    def weight_sums(self, z: Tensor, alpha: Tensor, need_alpha: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(w, w.sum(-1), w_alpha.sum(-1))`` of :meth:`weights` (row sums ``(R, 1)``;
        the last only with ``need_alpha``). A penalty whose ``w_alpha`` terms cancel in
        the sum overrides it to form that sum without the rounding of each term."""
        w, wa = self.weights(z, alpha)
        return w, w.sum(-1, keepdim=True), (wa.sum(-1, keepdim=True) if need_alpha else None)

    def objective(self, x: Tensor, u: Tensor, alpha: float | Tensor) -> Tensor:
        """:math:`\\sum_i \\phi(u - x_i; \\alpha)` over the last dim of ``x``; ``u`` has one
        entry per row of ``x`` (shape ``x.shape[:-1]``)."""
        alpha = torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
        if alpha.dim() > 0:
            alpha = alpha.unsqueeze(-1)
        return self.phi(u.unsqueeze(-1) - x, alpha).sum(-1)

    def irls_weight(self, z: Tensor, alpha: Tensor) -> Tensor:
        """Curvature :math:`\\phi'(z)/z` of the quadratic majoriser at ``z`` (IRLS weight).

        The default divides :meth:`dphi` by ``z`` (and takes :meth:`d2phi` at ``z = 0``);
        it is a majoriser for the penalties whose :math:`\\phi'(z)/z` is non-increasing in
        :math:`|z|` (all five built-ins, and most robust penalties).
        """
        safe = torch.where(z == 0, torch.ones_like(z), z)
        return torch.where(z == 0, self.d2phi(z, alpha), self.dphi(safe, alpha) / safe)

    # ------------------------------------------------------------- row sums (solvers)

    def dphi_norm(self, h: Tensor, w: Tensor | None, n: int, alpha: float | Tensor,
                  spread: Tensor) -> Tensor | None:
        """An upper bound on :math:`\\sqrt{\\sum_i d_{1,i}^2}`, the norm of the terms ``d1``
        that :meth:`newton_sums` or :meth:`descent_sums` return, from their row sums ``h``
        (and ``W``, from :meth:`descent_sums`) and the rows' spread ``max x - min x``
        (``(R, 1)``, a bound on every ``|z_i|``); ``None`` (the default): the solvers
        measure it from ``d1``. It sets the rounding noise of the gradient sum."""
        return None

    def newton_span(self, h: Tensor, alpha: float | Tensor) -> Tensor | None:
        """How far from the current point the curvature sum ``h = sum_i phi''(z_i)``
        (``(R, 1)``) bounds the slope of ``g`` (within a factor of about 2): a new
        ``(R, 1)`` tensor, or ``None`` (the default) for ``alpha / 2``.

        The convex solver trusts a Newton step, or a gradient's rounding noise over
        ``h``, as the distance to the root only within this span. Half of alpha holds
        for any penalty whose terms vary on the scale alpha; near a data point a
        curvature dominated by that point's ``phi''`` collapses a few alphas away
        (pseudo-Huber's decays as ``|z|^-3``)."""
        return None

    def weight_scale(self, z: Tensor, alpha: Tensor) -> Tensor:
        """The distance over which the derivatives' weights of a term at residual norm
        ``z >= 0`` (``phi'(z)/z`` and ``phi''(z)``) vary, a tensor shaped like ``z``:
        ``alpha`` (the default, right for any penalty whose terms vary on the scale
        alpha). A pooled point known to a small fraction G of its set's smallest such
        scale gives the set's derivatives to about G (robust vector pooling's refinement,
        :mod:`convexddn.nodes._vector_pool_refine`); a penalty whose far terms vary on a
        longer scale may say so, else far points' rounding counts against alpha."""
        return torch.as_tensor(alpha, dtype=z.dtype, device=z.device).expand(z.shape)

    def newton_sums(self, z: Tensor, alpha: float | Tensor, work: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Row sums for a Newton step on :math:`g(u) = \\sum_i \\phi'(u - x_i)`.

        Args:
            z: residuals ``u - x_i``, shape ``(R, N)``; scratch (may be overwritten).
            alpha: a float (one alpha for all rows) or a tensor broadcastable to ``z``.
            work: scratch tensors shaped like ``z`` (at least two).

        Returns:
            ``(g, h, d1)``: :math:`\\sum_i \\phi'`, :math:`\\sum_i \\phi''` (shape ``(R, 1)``)
            and a tensor of the terms :math:`\\phi'(z_i)` (for their rounding noise), all
            three possibly multiplied by one positive factor per row.
        """
        a = _tensor(alpha, z)
        d1 = self.dphi(z, a)
        return _rows(d1), _rows(self.d2phi(z, a)), d1

    def descent_sums(self, z: Tensor, alpha: float | Tensor,
                     work: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Row sums for a descent step of a nonconvex penalty: ``(f, g, h, W, d1)``, the
        objective :math:`\\sum_i \\phi` (up to a constant per row), :math:`\\sum_i \\phi'`,
        :math:`\\sum_i \\phi''`, the IRLS curvature :math:`\\sum_i \\phi'(z_i)/z_i` and the
        terms :math:`\\phi'(z_i)`; ``g``, ``h``, ``W`` and ``d1`` possibly multiplied by one
        positive factor per row. Arguments as for :meth:`newton_sums`."""
        a = _tensor(alpha, z)
        d1 = self.dphi(z, a)
        return (_rows(self.phi(z, a)), _rows(d1), _rows(self.d2phi(z, a)),
                _rows(self.irls_weight(z, a)), d1)

    def hessian_weights(self, z: Tensor, alpha: float | Tensor, work: list[Tensor],
                        need_alpha: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The backward's weights at the solution: ``(w, wa, size)``.

        ``w`` holds :math:`\\phi''(z_i)` and ``wa`` (``(R, 1)``, only with ``need_alpha``)
        the row sums of :math:`\\partial^2_{z\\alpha}\\phi(z_i)`, both multiplied by one
        positive factor per row; ``size`` is None where ``w >= 0``, else an upper bound on
        the row sums of ``|w|`` (same factor): the scale of their rounding noise.
        Arguments as for :meth:`newton_sums`; ``w`` may share memory with ``z`` or ``work``.
        """
        w, wa = self.weights(z, _tensor(alpha, z))
        return w, (_rows(wa) if need_alpha else None), (None if self.convex else _rows(w.abs()))

    # ------------------------------------------------------------------- the rest

    def cvxpy(self, z: Any, alpha: float) -> Any:
        """:math:`\\sum_i \\phi(z_i; \\alpha)` as a CVXPY expression of the vector ``z``.

        Raises:
            NonconvexError: the penalty is not convex (it has no DCP form).
        """
        raise NonconvexError(
            f"penalty {self.name!r} has no CVXPY form"
            + ("" if self.convex else " (it is nonconvex)")
            + f"; use the native node convexddn.RobustPool(penalty={self.name!r})")

    def solve(self, x: Tensor, alpha: Tensor, tol: float, max_iter: int,
              use_compile: bool) -> Tensor:
        """The pooled minimiser of each row: ``x (R, N)``, ``alpha`` ``(R, 1)`` or 0-d ``-> (R,)``.

        The default is the generic solver: a bracketed (safeguarded) Newton iteration on
        :math:`\\sum_i \\phi'(u - x_i)` for a convex penalty, a descent-safeguarded Newton
        iteration from two starts for a nonconvex one (see :mod:`.solvers`).
        """
        from .solvers import convex_solve, nonconvex_solve

        solver = convex_solve if self.convex else nonconvex_solve
        return solver(self, x, alpha, tol, max_iter, use_compile)

    def solve_split(self, x: Tensor, alpha: Tensor, tol: float, max_iter: int,
                    use_compile: bool) -> tuple[Tensor, Tensor | None]:
        """``(y, rem)``: :meth:`solve`'s minimiser ``y (R,)`` and, where the solver knows the
        exact minimiser ``m`` beyond y's rounding, ``rem = m - y`` ``(R,)`` in y's dtype;
        None (the default) where it does not. Rows whose y is coarse against alpha
        (:func:`.rounding.coarse_rows`) take their backward weights at the residuals
        ``y - x_i + rem`` where rem is known, else at residuals refined from y by Newton
        steps (:func:`.rounding.refine_residuals`), which on a nonconvex objective reach
        the local minimum around y, not necessarily the one the solver returned."""
        return self.solve(x, alpha, tol, max_iter, use_compile), None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @staticmethod
    def resolve(penalty: str | Penalty) -> Penalty:
        """Return the :class:`Penalty` for a name in :data:`PENALTIES` or
        :data:`PENALTY_ALIASES` (or the instance itself).

        Raises:
            OptionError: ``penalty`` is neither a valid name nor a :class:`Penalty`.
        """
        if isinstance(penalty, Penalty):
            # A subclass's class attributes are read only deep in the solver (convex) or
            # in the backward (name): a missing one was torch's AttributeError there.
            cls = type(penalty).__name__
            name = getattr(penalty, "name", None)
            if not isinstance(name, str) or not name:
                raise OptionError(f"penalty {cls} must set the class attribute name (a non-empty str), "
                                  f"got {name!r}")
            convex = getattr(penalty, "convex", None)
            if not isinstance(convex, bool):
                raise OptionError(f"penalty {cls} must set the class attribute convex (True or False: "
                                  f"which solver it gets), got {convex!r}")
            _check_formulas(type(penalty))
            return penalty
        if not isinstance(penalty, str):
            raise OptionError(
                f"penalty must be one of {list(PENALTIES)} or a Penalty, got {penalty!r}"
            )
        name = canonical_penalty(penalty)
        check_choice("penalty", name, PENALTIES)  # lists the canonical names only
        return _BUILTIN[name]


# The built-ins subclass Penalty (defined above): imported here, at the bottom.
from .builtin import Huber, PseudoHuber, Quadratic, TruncatedQuadratic, Welsch

_BUILTIN: dict[str, Penalty] = {
    p.name: p for p in (Quadratic(), PseudoHuber(), Huber(), Welsch(), TruncatedQuadratic())
}
_BUILTIN_TYPES = frozenset(type(p) for p in _BUILTIN.values())

#: Valid penalty names, in the order of Gould et al. Table 1.
PENALTIES: tuple[str, ...] = tuple(_BUILTIN)
#: The convex ones: those the registry's CVXPY ``robust_pool`` problem accepts.
CONVEX_PENALTIES: tuple[str, ...] = tuple(p for p in PENALTIES if _BUILTIN[p].convex)
#: Other spellings -> the name in :data:`PENALTIES`: the DDN reference's strings
#: (``ddn/basic/robust_nodes.py``: ``"pseudo-huber"``, ``"trunc-quad"``; ``ddn/pytorch``
#: takes penalty classes, not strings) and ``"truncated-quadratic"``, a spelled-out
#: alias of convexddn's own. :meth:`Penalty.resolve` accepts them; reprs and errors show
#: the canonical names.
PENALTY_ALIASES: Mapping[str, str] = MappingProxyType({
    "pseudo-huber": "pseudo_huber",
    "trunc-quad": "trunc_quad",
    "truncated-quadratic": "trunc_quad",
})


_FORMULAS = ("phi", "dphi", "d2phi", "d2phi_dalpha", "irls_weight")


def _check_formulas(cls: type) -> None:
    """Refuse a subclass of a built-in penalty that redefines one of its formulas: the
    built-in's fused row sums, solver and CVXPY form (and the solvers' tests of its
    type) would run instead of the new formulas (an asymmetric Huber returned Huber's
    answer, silently); a penalty with formulas of its own subclasses Penalty."""
    base = next((c for c in cls.__mro__ if c in _BUILTIN_TYPES), None)
    changed = [] if base in (None, cls) else [m for m in _FORMULAS if getattr(cls, m) is not getattr(base, m)]
    if changed:
        raise OptionError(f"penalty {cls.__name__} subclasses the built-in {base.__name__} and redefines "
                          f"{', '.join(changed)}: the built-in's own fused sums and solver would ignore them; "
                          "subclass convexddn.nodes.Penalty instead")


def canonical_penalty(penalty: Any) -> Any:
    """The name in :data:`PENALTIES` for an alias in :data:`PENALTY_ALIASES`; anything
    else (a canonical or unknown name, a :class:`Penalty`) unchanged."""
    return PENALTY_ALIASES.get(penalty, penalty) if isinstance(penalty, str) else penalty


def format_penalty(penalty: Any) -> str:
    """``penalty`` as a node's ``extra_repr`` shows it: the quoted canonical name of what
    :meth:`Penalty.resolve` makes of it, as the forward resolves it (a node's ``penalty``
    attribute may be reassigned a name or an alias, which the forward takes; reading
    ``.name`` off it raised AttributeError in ``print(model)``). A value that does not
    resolve is shown as given: a repr must not raise, and the forward says what is wrong.
    """
    try:
        return repr(Penalty.resolve(penalty).name)
    except OptionError:
        return repr(penalty)
