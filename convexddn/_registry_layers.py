"""The cone-program layers of registry problems that need more than a plain :class:`~convexddn.ConvexLayer`.

:func:`convexddn.layer` (``backend="cvxpy"``, or a problem without a native node) builds them:

- :class:`CentredLayer`: a problem whose solution is equivariant or invariant to a constant
  shift of a parameter along its last dimension (per row of a matrix: :data:`SHIFT_SYMMETRY`)
  is solved on that parameter less a per-row constant, so the cone program's accuracy
  (relative to the solution's size) is that of the offset-free problem;
- :class:`MaskedScoresLayer`: ``entmax`` / ``sparsemax``, centred too, taking ``-inf`` scores;
- :class:`ScaledBallLayer`: ``lp_ball``, solved at a radius in [1, 2).
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch

from ._autograd import wrapper_forward
from ._checks import check_finite, check_tensor
from ._warn import warn
from .convex.declarations import parameter_label
from .convex.layer import ConvexLayer
from .convex.status import element_list, name_elements
from .convex.validation import bind_names
from .convex.widen import narrowed, widened
from .errors import InputError, SolverWarning
from .nodes._overflow import narrowed as checked_cast

__all__ = ["SHIFT_SYMMETRY", "EQUIVARIANT", "INVARIANT", "Shift", "row_centre", "CentredLayer", "MaskedScoresLayer",
           "ScaledBallLayer"]

EQUIVARIANT = "equivariant"  # y(x + c1) = y(x) + c (c1 for a vector y, c for a scalar one)
INVARIANT = "invariant"  # y(x + c1) = y(x)


class Shift(NamedTuple):
    """A registry problem's shift symmetry: its solution is ``symmetry`` (:data:`EQUIVARIANT` or
    :data:`INVARIANT`) under adding a constant to each row (along the last dimension) of its
    parameter number ``parameter`` (a vector ``(n,)``: one row; a matrix ``(m, n)``: m rows, a
    constant each), the other parameters fixed."""

    symmetry: str
    parameter: int = 0


#: The registry problems whose solution has a symmetry under a row shift of one parameter
#: (:class:`Shift`), x -> x + c1 or X -> X + u1ᵀ. tv1d and robust_pool (convex penalties of u − x_i)
#: move with x; the simplex projection, sparsemax and entmax (pᵀx with 1ᵀp = 1) do not see the
#: shift; nor do the Birkhoff projection (⟨P, u1ᵀ⟩ = uᵀP1 = Σu_i on the feasible set P1 = 1) and
#: optimal transport (⟨P, u1ᵀ⟩ = uᵀa with P1 = a fixed; the entropy does not involve C).
SHIFT_SYMMETRY: dict[str, Shift] = {
    "tv1d": Shift(EQUIVARIANT),
    "robust_pool": Shift(EQUIVARIANT),
    "simplex": Shift(INVARIANT),
    "sparsemax": Shift(INVARIANT),
    "entmax": Shift(INVARIANT),
    "birkhoff": Shift(INVARIANT),
    "ot_lp": Shift(INVARIANT),
    "ot_entropic": Shift(INVARIANT),
}


def row_centre(w: torch.Tensor) -> torch.Tensor:
    """The midrange :math:`c = \\max_i w_i / 2 + \\min_i w_i / 2` of each row, detached: the
    constant that minimises :math:`\\max_i |w_i - c|`. Halved before the sum, so rows near
    float64's largest values do not overflow (halving a normal float is exact).

    Shape: ``(..., n) -> (..., 1)`` (a row: a vector's batch element, or one row of a matrix).
    """
    d = w.detach()
    return d.amax(dim=-1, keepdim=True) / 2 + d.amin(dim=-1, keepdim=True) / 2


class CentredLayer(ConvexLayer):
    """The :class:`~convexddn.ConvexLayer` of a shift-symmetric registry problem
    (:data:`SHIFT_SYMMETRY`), solved on each row of its parameter ``x`` number ``centred`` (a
    vector ``(n,)`` or a matrix ``(m, n)``) less the row's midrange ``c`` (:func:`row_centre`);
    the other parameters go to the cone program as given.

    The cone program's accuracy is relative to the size of its solution: for ``tv1d`` at
    x = [0.6, 0.25, 1.3, 0] + 3e7 (λ = 0.3), 2e-8 relative was within its tolerance and
    the denoising (0.6 = 2λ) was lost, reported solved; ``birkhoff`` at X = randn + 1e9 was
    off by 7e-8, ``ot_entropic`` (3 × 3) at C = rand + 1e8 by 5e-10 (1e-16 offset-free).
    Here the problem is solved in float64 at :math:`W = X - c\\mathbf 1^T` and the output is
    :math:`Y(W) + c` (equivariant) or :math:`Y(W)` (invariant): the same solution, at the
    accuracy of the offset-free problem.

    ``c`` is detached, which is exact for the derivative. With :math:`Y(X) = F(X - c(X)\\mathbf 1^T)`
    (+ :math:`c(X)` broadcast over the variable's last dimension, equivariant), :math:`J = DF` and
    any tangent :math:`\\dot X`, :math:`\\dot Y = J[\\dot X] - J[\\dot c\\,\\mathbf 1^T]` (:math:`+ \\dot c`);
    invariance, :math:`F(X + u\\mathbf 1^T) = F(X)` for every :math:`u`, gives
    :math:`J[u\\mathbf 1^T] = 0`, equivariance :math:`J[u\\mathbf 1^T] = u`, so in either case
    :math:`\\dot Y = J[\\dot X]` (a vector x is one row, :math:`u` a scalar). The other parameters'
    derivatives are those of the cone program at ``W``, which has the same solution for all of them.
    The output is in the parameters' promoted dtype (the checked cast of
    :func:`~convexddn.convex.widen.narrowed`).
    Input the layer refuses (a non-finite ``x``, a wrong shape) goes to it as given, so that its
    errors name the caller's values; an empty ``x`` too.

    Shape: as the ConvexLayer's: ``(*batch, *x.shape)`` and the other parameters
    (batch shapes broadcast) ``-> (*batch, *variable.shape)`` (``(*batch,)`` for ``robust_pool``'s scalar).
    """

    # (class defaults: layers pickled before these were attributes)
    symmetry = INVARIANT
    centred = 0

    def __init__(self, *args: Any, symmetry: str, centred: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.symmetry, self.centred = symmetry, int(centred)

    def _fits(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is a non-empty ``(*batch, *shape)`` of the centred parameter's
        ``shape`` (read from its shape only)."""
        shape = tuple(self.parameters_[self.centred].shape)
        return x.dim() >= len(shape) and x.numel() > 0 and tuple(x.shape[x.dim() - len(shape):]) == shape

    def _admits(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is centred (one host read): a non-empty ``(*batch, *shape)`` of finite values."""
        return self._fits(x) and bool(torch.isfinite(x).all())

    def _stand_in(self, w: torch.Tensor, label: str) -> torch.Tensor:
        """The values the cone program gets for the float64 ``w`` (before centring): ``w`` (an
        invariant problem's may be shifted per row too)."""
        return w

    @wrapper_forward(lambda self: "ConvexLayer", jacrev=False, constants=False)  # (ConvexLayer's)
    def forward(self, *values: torch.Tensor, solver_args: dict[str, Any] | None = None,
                **named: torch.Tensor) -> torch.Tensor:
        """Solve every element with ``x``'s rows centred: see the class docstring."""
        values = bind_names(values, named, [p.name() for p in self.parameters_])
        k = self.centred
        x = values[k]
        # The layer's tensor check first: centring reads x (a meta or sparse tensor raised torch's own errors).
        label = parameter_label(k, self.parameters_[k])
        check_tensor(label, x)
        if not self._admits(x):
            return super().forward(*values, solver_args=solver_args)
        w = self._stand_in(widened(x, label), label)
        c = row_centre(w)
        y = super().forward(*values[:k], w - c, *values[k + 1:], solver_args=solver_args)
        if self.symmetry == EQUIVARIANT:  # c per row of x, against the variable's trailing shape
            # (the variable's shape is x's leading ones (m,), then its own: robust_pool's (), tv1d's (n,))
            tail = len(self.variables_[0].shape) - (len(self.parameters_[k].shape) - 1)
            y = y + c.reshape(c.shape[:-1] + (1,) * tail)
        # (the cone program's dtype for the caller's values; all tensors: the cone program checked them)
        dtype = functools.reduce(torch.promote_types, [v.dtype for v in values])
        return self._finish(narrowed(y, dtype), x)

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The output for the caller's ``x`` from the solution ``y`` in its dtype: ``y``."""
        return y


class MaskedScoresLayer(CentredLayer):
    """The :class:`CentredLayer` of ``entmax`` / ``sparsemax``, taking ``-inf``
    scores as the native :class:`~convexddn.nodes.entmax.Entmax` does (masked: p_i = 0).

    A CVXPY parameter must be finite, so each ``-inf`` becomes a finite stand-in with the
    same solution: :math:`p_i = [(\\alpha-1)x_i - \\tau]_+^{1/(\\alpha-1)}` with
    :math:`p_i \\le 1`, so :math:`\\tau \\ge (\\alpha-1)\\max_j x_j - 1` and every
    :math:`x_i < \\max_j x_j - 1/(\\alpha-1)` has :math:`p_i = 0`. Each row is floored (in
    float64) at :math:`\\max_j x_j - 2/(\\alpha-1)` (over the finite entries; margin 1 in units
    of :math:`(\\alpha-1)x`; formed after the shift by that maximum, so it does not round away at
    any size): a ``-inf`` takes that value, and so does a finite score further
    below (its probability is 0 too, and stays 0 under any small change: no gradient, as in
    Entmax). The floored row spans at most :math:`2/(\\alpha-1)`, so centred (the map is shift
    invariant) the cone program sees values of at most :math:`1/(\\alpha-1)` whatever the
    scores' size and dtype. A masked entry's probability is returned as exactly 0. A row
    entirely ``-inf`` is an ``InputError``; NaN and +inf stay the layer's errors.
    """

    def __init__(self, *args: Any, alpha: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.alpha = float(alpha)

    def _admits(self, x: torch.Tensor) -> bool:
        """As the CentredLayer's, ``-inf`` allowed (masked)."""
        return self._fits(x) and not bool((torch.isnan(x) | torch.isposinf(x)).any())

    def _stand_in(self, w: torch.Tensor, label: str) -> torch.Tensor:
        """``w`` less each row's largest finite score (detached), floored at ``-2/(alpha - 1)``.

        Shifted first (the map is invariant): a floor ``top - 2/(alpha - 1)`` formed at the
        scores' size rounded back to ``top`` (float32 scores of 3.3e38, float64 ulp 4e22)."""
        top = w.detach().amax(dim=-1, keepdim=True)  # the largest finite score (-inf: none)
        empty = int(torch.isneginf(top).sum())
        if empty:
            raise InputError(f"{label} has {empty} row(s) whose "
                             "entries are all -inf (masked); at least one entry per row must be finite")
        # (w - top overflows to -inf for scores ~2e308 below the top: floored too, p = 0 there)
        u, floor = w - top, -2.0 / (self.alpha - 1.0)
        return torch.where(u < floor, floor, u)  # (no gradient to a floored score: its p is 0)

    def _finish(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Masked entries' probabilities exactly 0, not the solver's 1e-21."""
        return p.masked_fill(torch.isneginf(x), 0.0)


class ScaledBallLayer(ConvexLayer):
    """The :class:`~convexddn.ConvexLayer` of ``lp_ball``, solved at radius :math:`r / s \\in [1, 2)`,
    :math:`s = 2^{\\lfloor \\log_2 r \\rfloor}` (a power of two: never 2^1024, which overflows):
    :math:`\\Pi_{\\|\\cdot\\| \\le r}(x) = s\\, \\Pi_{\\|\\cdot\\| \\le r/s}(x / s)` (any norm),
    so the value and the Jacobian (:math:`J_{r/s}(x/s)`) are exact (dividing by 2^k rounds nothing).

    The solvers work at the data's scale: at radius 1e-10 |x| the solution (of norm r) lost
    all relative accuracy (errors of 0.2 to 0.9 r, a p = 2 gradient of 0 for 4.1e-11), and
    from radius 1e160 the cone program's r² overflows (Clarabel: KKT residual 1.0 for x
    inside the ball). Scaled, the radius is O(1) at every r. The solvers' error is absolute
    (about 1e-48 at radius O(1), so s 1e-48 scaled back: x = 0 gave -1.18e-48 r, -inf in float32),
    so a row with :math:`\\|x\\|_p < r` is decided exactly and returned as x (Jacobian I), its cone
    program fed 0 instead (on the sphere: the cone program's one-sided derivative and its warning);
    a row outside has :math:`r \\le n \\|x\\|_\\infty`, so that error is relative to |x| too.
    What scaling cannot remove is the ratio :math:`R = \\|x\\|_\\infty / r` of a row outside the
    ball where the projection cancels: the p = 1 solution :math:`x_i - \\tau` does, so float64
    fixes it to about :math:`\\epsilon R` of r only, and the cone program's gradients go astray
    there (the p = 2 Jacobian 2.4 times off at R = 2e12). Where that bound exceeds ``tol``, a
    ``SolverWarning`` names those rows (``elements``). The p = ∞ projection is a clamp (nothing
    cancels: exact at any R) and rows inside are returned exactly: neither warns. Where
    :math:`x / s` overflows, an ``InputError``. The input is scaled in float64 (a float32 x / r
    may overflow where x does not) and the output returned in its dtype by the checked cast
    (a ``SolverWarning`` where an entry overflows it).

    Shape: as the ConvexLayer's: ``(*batch, n) -> (*batch, n)``.
    """

    def __init__(self, *args: Any, scale: float, radius: float, p: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scale, self.radius, self.p = float(scale), float(radius), p

    @wrapper_forward(lambda self: "ConvexLayer", jacrev=False, constants=False)  # (ConvexLayer's)
    def forward(self, *values: torch.Tensor, solver_args: dict[str, Any] | None = None,
                **named: torch.Tensor) -> torch.Tensor:
        (x,) = bind_names(values, named, [p.name() for p in self.parameters_])
        label = parameter_label(0, self.parameters_[0])
        check_tensor(label, x)
        check_finite(label, x)  # the caller's values named, not the scaled ones
        w = widened(x, label)
        top = float(w.detach().abs().amax()) if w.numel() else 0.0  # (one host read)
        scaled = top / self.scale
        if not math.isfinite(scaled):
            raise InputError(f"{label} / radius overflows float64 (radius {self.radius:g}, largest |x| "
                             f"{top:.3g}); scale x and radius down together")
        v = w / self.scale  # (a norm that under/overflows here is inside/outside: the decision holds)
        inside = torch.linalg.vector_norm(v.detach(), ord=self.p, dim=-1, keepdim=True) < self.radius / self.scale
        if not math.isinf(self.p) and torch.finfo(torch.float64).eps * top / self.radius > self.tol:
            _warn_cancelling(w.detach(), inside, self.radius, self.tol, self.p)  # (rows read only past the bound)
        y = super().forward(v.masked_fill(inside, 0.0), solver_args=solver_args) * self.scale
        return checked_cast(torch.where(inside, w, y), x.dtype, "lp_ball (backend='cvxpy')", "the projection", 1)

    def extra_repr(self) -> str:  # (the radius asked for: in the origin where layer() built it)
        return f"{super().extra_repr()}{'' if self.origin else f', radius={self.radius:g}'}, scale={self.scale:g}"


def _warn_cancelling(w: torch.Tensor, inside: torch.Tensor, radius: float, tol: float, p: float) -> None:
    """A ``SolverWarning`` naming the rows of ``w`` (``(*batch, n)``, float64) outside the ball
    (``inside``: ``(*batch, 1)``) whose ratio :math:`R = \\|w\\|_\\infty / r` leaves float64 an
    accuracy :math:`\\epsilon R` of r above ``tol``; nothing where none does (one host read)."""
    eps = torch.finfo(torch.float64).eps
    ratio = w.abs().amax(dim=-1) / radius
    far = (eps * ratio > tol) & ~inside.squeeze(-1)
    idx = far.flatten().nonzero().flatten().tolist()
    if not idx:
        return
    batch = tuple(w.shape[:-1])
    where = (range(math.prod(batch)), batch)
    worst = float(ratio[far].amax())
    warn(f"lp_ball (backend='cvxpy', p = {p:g}): {len(idx)} batch element(s) ({name_elements(where, idx)}) lie outside "
         f"the ball at up to {worst:.3g} times the radius, where the projection cancels, so float64 fixes it to "
         f"about {eps * worst:.1e} of the radius only (> tol = {tol:g}), and the cone program's solution and "
         "gradient are not accurate to tol there; the native node (backend='auto') is exact to rounding",
         SolverWarning, elements=element_list(where, idx))
