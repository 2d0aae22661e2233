"""The warnings of a degenerate implicit derivative, one text per degeneracy, on every
path (:mod:`.linear_solvers`' dense and CG solves, the native nodes' own backward passes):
a singular KKT system, dependent active constraints, an ill-conditioned system; and how
they name batch elements (:func:`shown_indices`, in the caller's batch shape within
:func:`naming_batch`) and the node (:func:`naming`)."""
from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from .._generic import generic_vector
from .._warn import warn
from ..errors import GradientWarning
from .constraint_rows import independent_rows
from .dense import default_rcond
from .multipliers import unit_rows
from .._context import bound

__all__ = ["DependenceCheck", "dependent_to_warn", "failed_indices", "in_saved_batch", "named_batch", "naming",
           "naming_batch", "shown_indices", "unravel", "warn_curved", "warn_degenerate"]

Tensor = torch.Tensor
_MAX_INDICES_SHOWN = 8
# The node whose KKT system is being solved: the linear solvers warn about it without
# knowing it (their signature is a user-facing protocol), and without the name a model
# with several nodes left "the KKT system ... is ill-conditioned" unattributed, beside
# the node's other warnings ("Mean: ...", "Nonneg.solve ..."). Per thread and task.
_NODE: contextvars.ContextVar[str] = contextvars.ContextVar("convexddn_node_name", default="")
# The caller's batch shape of the rows a node works on: nodes flatten the leading batch
# dims into rows (B, ...), and their helpers (and user-facing hooks such as
# Penalty.solve and the linear solvers, whose signatures cannot carry it) warn about
# rows; within naming_batch they name them as the caller indexes them. Per thread and task.
_BATCH: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar("convexddn_batch_shape",
                                                                                default=None)


def naming(name: str) -> AbstractContextManager[None]:
    """Within: :func:`warn_degenerate` names the node ``name`` ("" names none)."""
    return bound(_NODE, name)


def naming_batch(batch: Sequence[int] | None) -> AbstractContextManager[None]:
    """Within: the rows being worked on are the caller's batch ``batch`` flattened (row-major),
    and :func:`shown_indices` names them as index tuples into it (``None``: as flat indices)."""
    return bound(_BATCH, None if batch is None else tuple(batch))


def named_batch(n: int, batch: Sequence[int] | None = None) -> tuple[int, ...] | None:
    """The batch shape that names ``n`` flattened rows: ``batch``, else the one
    :func:`naming_batch` bound; ``None`` (flat indices) where that has not ``n`` elements
    (a hook may be handed some rows only)."""
    batch = _BATCH.get() if batch is None else tuple(batch)
    return batch if batch is not None and math.prod(batch) == n else None


def in_saved_batch(fn: Callable) -> Callable:
    """``fn(ctx, ...)``, an autograd Function's ``backward`` or ``jvp``, run within
    :func:`naming_batch` of ``ctx.named_batch`` (saved by its ``setup_context``, e.g. as
    :func:`named_batch` of its rows; none: flat indices): torch runs the backward after the
    call, outside the forward's context."""
    @functools.wraps(fn)
    def wrapper(ctx, *args):
        with naming_batch(getattr(ctx, "named_batch", None)):
            return fn(ctx, *args)
    return wrapper


def shown_indices(mask: Tensor, batch: Sequence[int] | None = None) -> str:
    """The first few batch elements where ``mask`` is true, for messages (one host sync):
    as index tuples into ``batch``, the caller's batch shape, where it is given, else into
    the one :func:`naming_batch` bound (``mask``, flat or in that shape, covers it in
    row-major order: a node that works on flattened rows names the elements as its caller
    indexes them), else (or where that shape does not cover ``mask``) as flat indices."""
    batch = named_batch(mask.numel(), batch)
    idx = torch.nonzero(mask.reshape(-1)).squeeze(-1)  # (a mask in the batch shape: its row-major order)
    head = idx[:_MAX_INDICES_SHOWN].tolist()
    more = ", ..." if idx.numel() > _MAX_INDICES_SHOWN else ""
    count = f"{idx.numel()} of {mask.numel()} batch element(s)"
    if batch is None:
        return f"{count} (flat indices {head}{more})"
    return f"{count} (indices {[unravel(i, batch) for i in head]}{more})"


def failed_indices(mask: Tensor, batch: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Every element where ``mask`` holds, as index tuples into ``batch`` or the batch
    :func:`naming_batch` bound (flat ``(i,)`` where neither covers ``mask``): a
    :class:`~convexddn.errors.SolverError`'s ``indices``, as :func:`shown_indices` names them."""
    shape = named_batch(mask.numel(), batch)
    rows = torch.nonzero(mask.reshape(-1)).squeeze(-1).tolist()
    return [(i,) if shape is None else unravel(i, shape) for i in rows]


def unravel(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    """The index tuple of the row-major ``flat`` position in ``shape`` (``()`` for an empty
    shape), on the host: the few shown need no device op."""
    out = []
    for size in reversed(tuple(shape)):
        flat, i = divmod(flat, size)
        out.append(i)
    return tuple(reversed(out))


def warn_degenerate(
    singular: Tensor,
    dependent: Tensor | None,
    ill: Tensor,
    cond: Tensor | None,
    not_minimum: Tensor | None = None,
) -> None:
    """The one warning text per degeneracy of the KKT system, on every path (and, where
    the KKT matrix's inertia is known, ``not_minimum``: a stationary point that is not
    a minimiser), prefixed with the node's name within :func:`naming`."""
    name = _NODE.get()
    prefix, who = (f"{name}.", f"{name}: ") if name else ("", "")
    if not_minimum is not None and bool(not_minimum.any()):
        warn(
            f"{prefix}solve returned a stationary point that is not a minimiser for "
            f"{shown_indices(not_minimum)}: the Hessian of the Lagrangian has negative "
            "curvature along the active constraints' tangent space (a saddle point or a "
            "maximiser), so the gradient is this point's, not that of the argmin the node "
            "declares; check solve (or the objective's sign)",
            GradientWarning,
        )
    if bool(singular.any()):
        warn(
            f"{who}the KKT system of the implicit derivative is singular for "
            f"{shown_indices(singular)}: the solution is not locally unique (a flat "
            "objective, a symmetry, or a Hessian singular on the constraints' tangent "
            "space), so its derivative does not exist; the gradient uses the "
            "minimum-norm least-squares (pseudo-inverse) solution (Gould et al. 2021, "
            "§4.7.4)",
            GradientWarning,
        )
    if dependent is not None:
        dependent = dependent & ~singular
        if bool(dependent.any()):
            warn(
                f"{who}the active constraints are linearly dependent for "
                f"{shown_indices(dependent)}: the KKT system is singular and the "
                "multipliers are not unique, so the derivative with respect to data "
                "that enters only the constraints is not unique either; the gradient "
                "uses the minimum-norm multipliers (drop redundant constraints to "
                "silence this)",
                GradientWarning,
            )
    ill = ill & ~singular
    if bool(ill.any()):
        worst = "" if cond is None else (
            f" (condition number up to {float(torch.where(ill, cond, 0).amax()):.1e})"
        )
        warn(
            f"{who}the KKT system of the implicit derivative is ill-conditioned{worst} for "
            f"{shown_indices(ill)}: the solution is close to non-unique and the gradient "
            "is very sensitive to the data and to the accuracy of solve",
            GradientWarning,
        )


class DependenceCheck:
    """Where the non-unique multipliers of dependent active constraints reach the gradient.

    The multipliers are unique only up to ν with Aᵀν = 0 (a combination of the active
    constraints whose y-gradients cancel: the null rows of
    :func:`~.constraint_rows.independent_rows`, a zero row of ``A`` among them). Such a ν reaches
    the derivative in two ways:

    - through the constraints' values, νᵀ ∂c/∂θ (the adjoint multipliers μ are as free as
      λ): 0 where the redundancy holds for every θ (h and 2h: the gradient is unique, and
      a warning said it was not). Calling the check, ``dependent (B,) -> (B,)``, keeps the
      elements where it is not (a ``warn_dependent`` for the linear solvers; only with
      ``first_order``, data entering the constraints);
    - through their curvature (:meth:`curvature_reaches`): the split of λ among them moves
      ∇_y L by t ∇_y(νᵀc), whose derivatives in y and in the data are those of a
      *different* Lagrangian unless they vanish along the solve's direction. Where they do
      not, LICQ fails with curved constraints (a bound tangent to a ball, two touching
      disks, ‖y‖² = r² at r = 0), and the minimum-norm split gives the derivative of
      another problem.

    ``c`` ``(B, r)`` are the active constraints built from the leaf ``y`` ``(B, m)`` and the
    data leaves ``inputs`` (per element) and ``params`` (shared); ``A`` ``(B, r, m)`` their
    Jacobian, inactive rows zero. Nothing runs unless a solve found dependent elements.
    """

    def __init__(self, c: Tensor, A: Tensor, inactive: Tensor, y: Tensor, inputs: tuple[Tensor, ...],
                 params: tuple[Tensor, ...], first_order: bool = True) -> None:
        self.c, self.A, self.inactive, self.y = c, A, inactive, y
        self.inputs, self.params, self.first_order = inputs, params, first_order
        self.found: Tensor | None = None  # the dependent elements of the last solve
        self._null = None

    def _null_space(self):
        """``(null (B, r), N (B, r, r), rows (B, r, m))``: the free directions ν (columns of
        ``N`` where ``null``) and the active rows' orthonormal basis."""
        if self._null is None:
            A, inactive = self.A, self.inactive
            A2, pin, T, _ = independent_rows(A, inactive, default_rcond(A.shape[-1] + A.shape[1], A.dtype))
            null = pin.diagonal(dim1=-2, dim2=-1) > 0  # (B, r) the null columns of T
            # An inactive row's multiplier is pinned to 0: no free direction there (its unit
            # vector shares the null space, and eigh may mix it in).
            N = T * (~inactive).unsqueeze(-1).to(T.dtype)
            # A shared parameter's vjp sums over the batch: generic weights per element keep
            # one element's component from cancelling another's (deterministic: no RNG use).
            N = N * (1.0 + 0.5 * generic_vector(A.shape[0], A.dtype, A.device)).view(-1, 1, 1)
            self._null = null, N, unit_rows(A2)[0]
        return self._null

    def _size(self, grads, n_batched: int) -> Tensor:
        """(B,) the largest entry of per-element gradients (the first ``n_batched``) and of
        the summed ones (a shared parameter's)."""
        batch = self.A.shape[0]
        norm = self.A.new_zeros(batch)
        for i, g in enumerate(grads):
            if g is not None:  # (NaN: an element not twice differentiable, reported as such)
                g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
                part = g.reshape(batch, -1).abs().amax(-1) if i < n_batched else g.abs().amax().expand(batch)
                norm = torch.maximum(norm, part)
        return norm

    @staticmethod
    def _significant(null: Tensor, norms: list[Tensor]) -> Tensor:
        # (against the largest column's: the null columns carry the eigenvectors' rounding
        # of the others)
        norms = torch.stack(norms, -1)  # (B, r)
        return (null & (norms > 1e-8 * norms.amax(-1, keepdim=True))).any(-1)

    def __call__(self, dependent: Tensor) -> Tensor:
        self.found = dependent
        if not self.first_order or not self.c.requires_grad:
            return torch.zeros_like(dependent)
        null, N, _ = self._null_space()
        data = self.inputs + self.params
        norms = [self._size(torch.autograd.grad(self.c, data, N[..., j], retain_graph=True, allow_unused=True),
                            len(self.inputs)) for j in range(N.shape[-1])]
        return dependent & self._significant(null, norms)

    def curvature_reaches(self, a: Tensor, dirs: list[tuple[Tensor, Tensor]] | None = None,
                          asked: Sequence[bool] | None = None) -> Tensor | None:
        """``(B,)`` dependent elements whose derivative the split of λ reaches through the
        constraints' curvature (``None`` where none was dependent or none is reached).

        Moving λ by t ν changes the Hessian H by t H_ν and the mixed derivative B by
        t B_ν (those of νᵀc). Reverse mode (``dirs`` ``None``): ``a`` is the KKT solve's w
        (tangent to the active constraints); w solves the changed system too, and the
        gradient −(wᵀB + μᵀC) does not move, exactly where P H_ν w = 0 (P the projection
        onto the tangent space) and B_νᵀ w = 0. Forward mode: ``a`` is the tangent ẏ and
        ``dirs`` the (leaf, tangent ẋ) pairs; ẏ solves the changed system exactly where
        P (H_ν ẏ + B_ν ẋ) = 0. Both from one double backward per constraint row:
        ∇(∇_y(νᵀc)·ẏ + ∇_x(νᵀc)·ẋ) (mixed partials commute). ``asked`` (reverse mode): the
        inputs whose gradient is wanted (all where None): B_ν's part in the others reaches
        nothing asked (a zero row ``E[1] y = 0`` warned with only ``x`` requiring grad).
        """
        if self.found is None or not bool(self.found.any()) or not self.c.requires_grad:
            return None
        null, N, rows = self._null_space()
        # (a non-finite tangent is an upstream fault, reported as such)
        y, a = self.y, torch.nan_to_num(a.detach(), nan=0.0, posinf=0.0, neginf=0.0)
        dirs = None if dirs is None else [(leaf, torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0))
                                          for leaf, t in dirs]
        leaves = [] if dirs is None else [leaf for leaf, _ in dirs]
        inputs = self.inputs if asked is None else tuple(x for x, a in zip(self.inputs, asked) if a)
        wrt = (y,) if dirs is not None else (y,) + inputs + self.params
        norms = []
        for j in range(N.shape[-1]):
            first = torch.autograd.grad(self.c, [y] + leaves, N[..., j], retain_graph=True, create_graph=True,
                                        allow_unused=True)
            terms = [(g * t).sum() for g, t in zip(first, [a] + [t for _, t in dirs or ()])
                     if g is not None and g.requires_grad]
            if not terms:
                norms.append(self.A.new_zeros(self.A.shape[0]))
                continue
            hy, *hx = torch.autograd.grad(sum(terms), wrt, retain_graph=True, allow_unused=True)
            if hy is not None:  # only its tangent part moves the solution
                hy = hy - (rows.transpose(1, 2) @ (rows @ hy.unsqueeze(-1))).squeeze(-1)
            norms.append(self._size([hy] + hx, 1 + len(inputs)))
        reached = self.found & self._significant(null, norms)
        return reached if bool(reached.any()) else None


def warn_curved(who: str, reached: Tensor | None, what: str = "gradient") -> None:
    """The warning of :meth:`DependenceCheck.curvature_reaches`'s elements."""
    if reached is None:
        return
    warn(
        f"{who}the active constraints are linearly dependent (LICQ fails) and curved for "
        f"{shown_indices(reached)}: a combination of them whose gradient in y vanishes at the solution "
        "has second derivatives that reach this derivative (a constraint tangent to another there, "
        "e.g. a redundant bound touching a ball or two touching disks, or an equality whose gradient "
        "vanishes there, e.g. y0² = 0 or ‖y‖² = r² at r = 0), so the split of the multipliers among "
        "them, which is not unique, enters the Hessian of the Lagrangian and the "
        f"{what} can be wrong for every input (where the feasible set shrinks to a point, the true "
        "derivative is 0); it uses the minimum-norm multipliers (drop the redundant constraint, or "
        "write y0 = 0 for y0² = 0)",
        GradientWarning,
    )


def dependent_to_warn(dependent: Tensor | None, warn_dependent) -> Tensor | None:
    """The dependent-constraints mask to warn about: none (``warn_dependent`` False), all,
    or, for a callable (a :class:`DependenceCheck`), those it keeps (called only
    where some element is dependent)."""
    if dependent is None or not warn_dependent:
        return None
    if callable(warn_dependent) and bool(dependent.any()):
        return warn_dependent(dependent)
    return dependent
