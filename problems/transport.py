"""Optimal transport between two discrete marginals, as CVXPY problems.

.. math:: P(C, a, b) = \\operatorname*{argmin}_{P \\ge 0,\\ P1 = a,\\ P^T1 = b} \\langle C, P\\rangle - \\varepsilon H(P)

``ot_lp`` is the unregularised linear program (ε = 0); ``ot_entropic`` the entropic
problem that the native node :func:`convexddn.nodes.transport.sinkhorn` solves (the
exponential cone makes it slow; the native node is exact and thousands of times faster).
Both need marginals of equal mass: one column constraint is left out as redundant (as the
native node's backward does), so ``b``'s last entry is implied by ``Σa − Σ_{j<n} b_j``.
Marginals of unequal mass would still be feasible — with a plan whose last column does
not sum to ``b``'s last entry — so :func:`equal_mass` refuses them at call time (the
layer's ``check``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from convexddn._checks import check_size
from convexddn._lazy import cvxpy as cp
from convexddn.convex.registry import real_option, register
from convexddn.errors import InputError

if TYPE_CHECKING:
    import torch

# Relative mass difference always accepted: the layer's default tolerance (the last
# column's sum is then off by at most as much as the solve's own error).
_MASS_RTOL = 1e-6


def equal_mass(values: Sequence[torch.Tensor]) -> None:
    """Raise :class:`~convexddn.errors.InputError` where ``Σa ≠ Σb``.

    ``values`` are ``(C, a, b)`` with ``a (*batch, m)`` and ``b (*batch, n)``. The masses
    (summed in float64) may differ by the inputs' rounding: ``max(1e-6, 4 eps)``
    relative to the larger (``eps`` of the less precise marginal's dtype; marginals
    normalised in float32 sum to within ~2 eps of 1; a float16 ``a`` beside a float64 ``b``
    rounded in float16, which the wider dtype's eps refused). The whole difference would
    land in the last column of the plan.
    """
    import torch  # imported already: the values are tensors (the catalog itself does not need it)

    C, a, b = values
    eps = max(torch.finfo(a.dtype).eps, torch.finfo(b.dtype).eps)
    # (Detached: the check reads values; float() of a tensor that requires grad warned.)
    sa, sb = a.detach().to(torch.float64).sum(-1), b.detach().to(torch.float64).sum(-1)
    rtol = max(_MASS_RTOL, 4 * eps)
    bad = (sa - sb).abs() > rtol * torch.maximum(sa.abs(), sb.abs())
    if bool(bad.any()):
        # Counted over the call's batch shape (the costs' too), not the marginals' alone.
        shape = torch.broadcast_shapes(() if C is None else C.shape[:-2], sa.shape, sb.shape)
        sa, sb, bad = (t.expand(shape) for t in (sa, sb, bad))
        where = torch.nonzero(bad)
        first = tuple(int(i) for i in where[0])
        raise InputError(
            f"the marginals a and b must have equal mass (Σa = Σb): {where.shape[0]} of {bad.numel()} "
            f"batch element(s) differ by more than {rtol:.1e} relative (first at batch index {first}: "
            f"Σa = {float(sa[first]):.9g}, Σb = {float(sb[first]):.9g}); the problem states one column "
            f"sum as implied by the others, so unequal masses would give a plan whose last column does "
            f"not sum to b's last entry: normalise both to the same mass")


def _transport(m: int, n: int) -> tuple[cp.Parameter, cp.Parameter, cp.Parameter, cp.Variable, list]:
    m = check_size("m", m, minimum=1)
    # n = 1 leaves no column constraint (the one column is implied), so b would not be a
    # parameter of the problem at all; its plan is the column a.
    n = check_size("n", n, minimum=2)
    C = cp.Parameter((m, n), name="C")
    a = cp.Parameter(m, name="a", nonneg=True)
    b = cp.Parameter(n, name="b", nonneg=True)
    P = cp.Variable((m, n), name="P")
    # The last column sum follows from the others when Σa = Σb; stating it too would
    # leave a redundant equality and a rank-deficient derivative system.
    constraints = [P >= 0, cp.sum(P, axis=1) == a, cp.sum(P[:, : n - 1], axis=0) == b[: n - 1]]
    return C, a, b, P, constraints


@register("ot_lp", "optimal transport LP: argmin_P <C, P> s.t. P ≥ 0, P1 = a, Pᵀ1 = b", check=equal_mass)
def ot_lp(m: int, n: int):
    """.. math:: P = \\operatorname*{argmin}_{P \\ge 0,\\ P1 = a,\\ P^T1 = b} \\langle C, P\\rangle

    Parameters: ``C`` ``(m, n)``, ``a`` ``(m,)``, ``b`` ``(n,)`` (nonnegative, equal
    sums: :func:`equal_mass` checks each call). Variable: ``P`` ``(m, n)``. The solution
    is a vertex (generically unique); its derivative with respect to ``C`` is zero
    wherever it is unique.
    """
    C, a, b, P, constraints = _transport(m, n)
    problem = cp.Problem(cp.Minimize(cp.sum(cp.multiply(C, P))), constraints)
    return problem, [C, a, b], [P]


@register("ot_entropic", "entropic optimal transport: argmin_P <C, P> − ε H(P) s.t. P1 = a, Pᵀ1 = b",
          check=equal_mass)
def ot_entropic(m: int, n: int, eps: float = 1.0):
    """.. math:: P = \\operatorname*{argmin}_{P1 = a,\\ P^T1 = b} \\langle C, P\\rangle + \\varepsilon \\sum_{ij} P_{ij} \\log P_{ij}

    (``-ε Σ entr(P)``; the ``+ε ΣP`` term of the entropy is constant on the feasible
    set.) Parameters: ``C`` ``(m, n)``, ``a`` ``(m,)``, ``b`` ``(n,)`` (positive,
    equal sums: :func:`equal_mass` checks each call). Variable: ``P`` ``(m, n)``. Native node:
    :class:`convexddn.OptimalTransport` with the same ``eps`` (what :func:`convexddn.layer`
    returns; the problem is built on first use of ``spec.problem``). Gradient with respect to
    the marginals, on both backends: ``b``'s last entry is implied (``Σa − Σ_{j<n} b_j``), so
    its gradient is 0 and ``a`` and the other entries of ``b`` carry its effect (see
    :class:`convexddn.factory.TransportNode`); along mass-preserving directions it is the
    unique derivative.
    """
    eps = real_option("eps", eps, above=0)
    C, a, b, P, constraints = _transport(m, n)

    def problem():  # deferred: the native node (OptimalTransport) does not need it
        objective = cp.sum(cp.multiply(C, P)) - eps * cp.sum(cp.entr(P))
        return cp.Problem(cp.Minimize(objective), constraints)
    return problem, [C, a, b], [P]
