"""Robust penalties :math:`\\phi(z; \\alpha)` of Gould et al. Table 1: each owns its maths.

A :class:`Penalty` gives :math:`\\phi`, its derivatives (the implicit backward needs
:math:`\\phi''` and :math:`\\partial^2_{z\\alpha}\\phi`), the curvature of its IRLS
majoriser, its CVXPY form when it is convex (the registry's ``robust_pool`` problem is
built from it), and its solver hook :meth:`Penalty.solve`. The built-in penalties
register fused solvers there; a user's subclass that defines ``phi``, ``dphi``,
``d2phi`` and ``d2phi_dalpha`` runs on the generic safeguarded Newton/IRLS solver.

This module is the bottom of the pooling package: it imports neither the solvers
(loaded lazily by :meth:`Penalty.solve`) nor anything of the convex path (CVXPY is
imported only by :meth:`Penalty.cvxpy`).

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks",
    IEEE TPAMI 2021 (Table 1: robust penalties and their gradients).
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

from ..._checks import check_choice
from ...errors import NonconvexError, OptionError

__all__ = [
    "Penalty",
    "Quadratic",
    "PseudoHuber",
    "Huber",
    "Welsch",
    "TruncatedQuadratic",
    "PENALTIES",
    "CONVEX_PENALTIES",
]


def exp_floor(dtype: torch.dtype) -> float:
    """Smallest exponent whose exp is still a normal number: exp of anything lower is
    clamped to it, because subnormal arithmetic is ~50x slower on x86 CPUs and the
    clamped weights (< 1e-35 of the largest) change no sum in a representable digit."""
    return -700.0 if dtype == torch.float64 else -80.0


class Penalty(abc.ABC):
    """A robust penalty :math:`\\phi(z; \\alpha)` of Gould et al. Table 1.

    Subclasses give the penalty and the two derivatives the implicit backward needs.
    All methods are elementwise on tensors ``z`` (residuals ``u - x``) and ``alpha``
    (a tensor broadcastable against ``z``).

    Resolve a name with :meth:`Penalty.resolve`; the valid names are :data:`PENALTIES`.
    """

    name: ClassVar[str]
    convex: ClassVar[bool]

    @abc.abstractmethod
    def phi(self, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The penalty :math:`\\phi(z; \\alpha)`."""

    @abc.abstractmethod
    def dphi(self, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The first derivative :math:`\\partial_z \\phi`."""

    @abc.abstractmethod
    def d2phi(self, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The second derivative :math:`\\partial^2_{zz} \\phi` (zero off the inliers for
        Huber and truncated quadratic, whose second derivative jumps at :math:`|z| = \\alpha`)."""

    @abc.abstractmethod
    def d2phi_dalpha(self, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The mixed derivative :math:`\\partial^2_{z\\alpha} \\phi`."""

    def weights(self, z: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(w, w_alpha)``: :meth:`d2phi` and :meth:`d2phi_dalpha` along the last dim,
        both multiplied by one positive factor per row.

        Only the ratios ``w / w.sum(-1)`` and ``w_alpha.sum(-1) / w.sum(-1)`` enter the
        gradient, so a penalty whose weights underflow (Welsch, pseudo-Huber far from
        every point) rescales them here.
        """
        return self.d2phi(z, alpha), self.d2phi_dalpha(z, alpha)

    def objective(self, x: torch.Tensor, u: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
        """:math:`\\sum_i \\phi(u - x_i; \\alpha)` over the last dim of ``x``; ``u`` has one
        entry per row of ``x`` (shape ``x.shape[:-1]``)."""
        alpha = torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
        if alpha.dim() > 0:
            alpha = alpha.unsqueeze(-1)
        return self.phi(u.unsqueeze(-1) - x, alpha).sum(-1)

    def irls_weight(self, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Curvature :math:`\\phi'(z)/z` of the quadratic majoriser at ``z`` (IRLS weight).

        The default divides :meth:`dphi` by ``z`` (and takes :meth:`d2phi` at ``z = 0``);
        it is a majoriser for the penalties whose :math:`\\phi'(z)/z` is non-increasing in
        :math:`|z|` (all five built-ins, and most robust penalties).
        """
        safe = torch.where(z == 0, torch.ones_like(z), z)
        return torch.where(z == 0, self.d2phi(z, alpha), self.dphi(safe, alpha) / safe)

    def cvxpy(self, z: Any, alpha: float) -> Any:
        """:math:`\\sum_i \\phi(z_i; \\alpha)` as a CVXPY expression of the vector ``z``.

        Raises:
            NonconvexError: the penalty is not convex (it has no DCP form).
        """
        raise NonconvexError(
            f"penalty {self.name!r} has no CVXPY form"
            + ("" if self.convex else " (it is nonconvex)")
            + f"; use the native node convexddn.RobustPool(penalty={self.name!r})")

    def solve(self, x: torch.Tensor, alpha: torch.Tensor, tol: float, max_iter: int,
              use_compile: bool) -> torch.Tensor:
        """The pooled minimiser of each row: ``x (R, N)``, ``alpha`` ``(R, 1)`` or 0-d ``-> (R,)``.

        The default is the generic solver: a bracketed (safeguarded) Newton iteration on
        :math:`\\sum_i \\phi'(u - x_i)` for a convex penalty, a descent-safeguarded
        Newton/IRLS iteration from the mean and a median for a nonconvex one. Built-in
        penalties override it with fused kernels.
        """
        from .solvers import generic_solve

        return generic_solve(self, x, alpha, tol, max_iter, use_compile)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @staticmethod
    def resolve(penalty: "str | Penalty") -> "Penalty":
        """Return the :class:`Penalty` for a name in :data:`PENALTIES` (or the instance itself).

        Raises:
            OptionError: ``penalty`` is neither a valid name nor a :class:`Penalty`.
        """
        if isinstance(penalty, Penalty):
            return penalty
        if not isinstance(penalty, str):
            raise OptionError(
                f"penalty must be one of {list(PENALTIES)} or a Penalty, got {penalty!r}"
            )
        check_choice("penalty", penalty, PENALTIES)
        return _BUILTIN[penalty]


class Quadratic(Penalty):
    """:math:`\\phi(z) = \\tfrac12 z^2`; the minimiser is the mean, ``alpha`` plays no role."""

    name = "quadratic"
    convex = True

    def phi(self, z, alpha):
        return 0.5 * z * z

    def dphi(self, z, alpha):
        return z

    def d2phi(self, z, alpha):
        return torch.ones_like(z)

    def d2phi_dalpha(self, z, alpha):
        return torch.zeros_like(z)

    def irls_weight(self, z, alpha):
        return torch.ones_like(z)

    def cvxpy(self, z, alpha):
        import cvxpy as cp

        return 0.5 * cp.sum_squares(z)

    def solve(self, x, alpha, tol, max_iter, use_compile):
        from .solvers import check_rows_finite

        y = x.mean(-1)
        check_rows_finite(x, y)
        return y


class PseudoHuber(Penalty):
    """:math:`\\phi(z) = \\alpha^2 (\\sqrt{1 + (z/\\alpha)^2} - 1)`: smooth and convex."""

    name = "pseudo_huber"
    convex = True

    def phi(self, z, alpha):
        r = z / alpha
        return alpha * alpha * (torch.sqrt(1 + r * r) - 1)

    def dphi(self, z, alpha):
        r = z / alpha
        return z * torch.rsqrt(1 + r * r)

    def d2phi(self, z, alpha):
        r = z / alpha
        return torch.rsqrt(1 + r * r) ** 3

    def d2phi_dalpha(self, z, alpha):
        r = z / alpha
        return (r * torch.rsqrt(1 + r * r)) ** 3

    def weights(self, z, alpha):
        # Scale by (1 + r_min^2)^{3/2}, r_min the residual nearest zero in the row, so the
        # largest weight is 1 however far every point lies from y.
        r = z / alpha
        q = 1 + r * r
        q_min = q.amin(-1, keepdim=True)
        ratio = torch.sqrt(q_min / q)
        w = ratio ** 3
        return w, (r * ratio) ** 3

    def irls_weight(self, z, alpha):
        r = z / alpha
        return torch.rsqrt(1 + r * r)

    def cvxpy(self, z, alpha):
        # alpha^2 (sqrt(1 + (z/alpha)^2) - 1) = alpha ||(alpha, z_i)||_2 - alpha^2, an SOC.
        import cvxpy as cp
        import numpy as np

        n = z.shape[0]
        stacked = cp.vstack([np.full(n, alpha), z])  # columns (alpha, z_i)
        return alpha * cp.sum(cp.norm(stacked, 2, axis=0)) - n * alpha ** 2

    def solve(self, x, alpha, tol, max_iter, use_compile):
        from .solvers import newton_solve

        return newton_solve(self, x, alpha, tol, max_iter, use_compile)


class Huber(Penalty):
    """:math:`\\phi(z) = \\tfrac12 z^2` for :math:`|z| \\le \\alpha`, else
    :math:`\\alpha (|z| - \\tfrac12 \\alpha)`: convex, with a kink in :math:`\\phi''` at
    :math:`|z| = \\alpha` (the inlier side is used there)."""

    name = "huber"
    convex = True

    def phi(self, z, alpha):
        a = z.abs()
        return torch.where(a <= alpha, 0.5 * z * z, alpha * (a - 0.5 * alpha))

    def dphi(self, z, alpha):
        return torch.maximum(torch.minimum(z, alpha), -alpha)

    def d2phi(self, z, alpha):
        return (z.abs() <= alpha).to(z.dtype)

    def d2phi_dalpha(self, z, alpha):
        return torch.where(z.abs() <= alpha, torch.zeros_like(z), torch.sign(z))

    def irls_weight(self, z, alpha):
        return alpha / torch.maximum(z.abs(), alpha)

    def cvxpy(self, z, alpha):
        import cvxpy as cp

        return 0.5 * cp.sum(cp.huber(z, alpha))  # cvxpy's huber is twice Table 1's

    def solve(self, x, alpha, tol, max_iter, use_compile):
        from .solvers import newton_solve

        return newton_solve(self, x, alpha, tol, max_iter, use_compile)


class Welsch(Penalty):
    """:math:`\\phi(z) = 1 - \\exp(-z^2 / (2\\alpha^2))`: smooth, bounded and nonconvex."""

    name = "welsch"
    convex = False

    def phi(self, z, alpha):
        r = z / alpha
        return -torch.expm1(-0.5 * r * r)

    def dphi(self, z, alpha):
        r = z / alpha
        return r / alpha * torch.exp(-0.5 * r * r)

    def d2phi(self, z, alpha):
        r = z / alpha
        return (1 - r * r) * torch.exp(-0.5 * r * r) / (alpha * alpha)

    def d2phi_dalpha(self, z, alpha):
        r = z / alpha
        return r * (r * r - 2) * torch.exp(-0.5 * r * r) / (alpha * alpha)

    def weights(self, z, alpha):
        # exp(-r^2/2) underflows to 0 for every point once |y - x_i| > ~13 alpha (float32):
        # shift the exponent by the row's smallest r^2, and drop the common 1/alpha^2.
        r = z / alpha
        r2 = r * r
        e = torch.exp(torch.clamp(-0.5 * (r2 - r2.amin(-1, keepdim=True)), min=exp_floor(z.dtype)))
        return (1 - r2) * e, r * (r2 - 2) * e

    def irls_weight(self, z, alpha):
        r = z / alpha
        return torch.exp(-0.5 * r * r) / (alpha * alpha)

    def solve(self, x, alpha, tol, max_iter, use_compile):
        from .solvers import welsch_solve

        return welsch_solve(x, alpha, tol, max_iter, use_compile)


class TruncatedQuadratic(Penalty):
    """:math:`\\phi(z) = \\tfrac12 z^2` for :math:`|z| \\le \\alpha`, else
    :math:`\\tfrac12 \\alpha^2`: nonconvex and non-smooth at :math:`|z| = \\alpha`."""

    name = "trunc_quad"
    convex = False

    def phi(self, z, alpha):
        return 0.5 * torch.minimum(z * z, alpha * alpha)

    def dphi(self, z, alpha):
        return torch.where(z.abs() <= alpha, z, torch.zeros_like(z))

    def d2phi(self, z, alpha):
        return (z.abs() <= alpha).to(z.dtype)

    def d2phi_dalpha(self, z, alpha):
        return torch.zeros_like(z)

    def solve(self, x, alpha, tol, max_iter, use_compile):
        from .solvers import trunc_quad_solve

        return trunc_quad_solve(x, alpha, use_compile)


_BUILTIN: dict[str, Penalty] = {
    p.name: p for p in (Quadratic(), PseudoHuber(), Huber(), Welsch(), TruncatedQuadratic())
}

#: Valid penalty names, in the order of Gould et al. Table 1.
PENALTIES: tuple[str, ...] = tuple(_BUILTIN)
#: The convex ones: those the registry's CVXPY ``robust_pool`` problem accepts.
CONVEX_PENALTIES: tuple[str, ...] = tuple(p for p in PENALTIES if _BUILTIN[p].convex)

