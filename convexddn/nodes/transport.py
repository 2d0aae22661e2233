r"""Entropic optimal transport (Sinkhorn) as a declarative node.

.. math::

    P(C, a, b) = \operatorname*{argmin}_{P \ge 0,\ P\mathbf 1 = a,\ P^\top \mathbf 1 = b}
    \langle C, P\rangle - \varepsilon H(P), \qquad
    H(P) = -\sum_{ij} P_{ij} (\log P_{ij} - 1)

The minimiser is :math:`P_{ij} = \exp(\alpha_i + \beta_j - C_{ij}/\varepsilon)` for dual
potentials :math:`\alpha, \beta` fixed by the two marginal constraints. For each batch
element whose rows spread over 50ε at most, plain Sinkhorn on the kernel
:math:`e^{(\min_j C_{ij} - C)/\varepsilon}` (entries in :math:`[e^{-50}, 1]`: nothing
underflows) finds them; for the others, and where it converges slowly, the forward pass works
in the log domain (no kernel formed, so a small :math:`\varepsilon` neither underflows
nor loses the tiny entries of the plan): Sinkhorn's alternating row and column updates
and Newton steps on the reduced dual, which converge quadratically, with ε-scaling when
ε is small against the spread of the costs (see :mod:`convexddn.nodes._sinkhorn`).

The backward pass differentiates the optimality conditions
:math:`P\mathbf 1 = a,\ P^\top \mathbf 1 = b` implicitly (Gould, Hartley & Campbell,
TPAMI 2021, Prop. 4.5). Their Jacobian in :math:`(\alpha, \beta)` is
:math:`K = \begin{bmatrix} \operatorname{diag}(P\mathbf 1) & P \\ P^\top &
\operatorname{diag}(P^\top \mathbf 1)\end{bmatrix}`, singular along
:math:`(\mathbf 1, -\mathbf 1)` because one marginal constraint is implied by the others;
the heaviest column's constraint is dropped (its :math:`\beta_j` held fixed: a light one
would leave the others' common offset against it to rounding) and the rest solved
exactly through the Schur complement
:math:`S = \operatorname{diag}(P^\top \mathbf 1) - P^\top \operatorname{diag}(P\mathbf 1)^{-1} P`
of the smaller side, by Cholesky. For an incoming gradient :math:`V = \partial L/\partial P`,
with :math:`Q = V \circ P` and :math:`(\lambda, \mu)` solving
:math:`K (\lambda, \mu) = (Q\mathbf 1, Q^\top \mathbf 1)`:

.. math::

    \frac{\partial L}{\partial C} = \frac{1}{\varepsilon} P \circ
    (\lambda \mathbf 1^\top + \mathbf 1 \mu^\top - V), \qquad
    \frac{\partial L}{\partial a} = \lambda, \qquad \frac{\partial L}{\partial b} = \mu.

The same matrix :math:`S` (negated) is the Hessian of the reduced dual, which is why the
forward's Newton steps and the backward share one solver.

Zero marginal entries mark padding: a row with :math:`a_i = 0` (:math:`\alpha_i = -\infty`)
or a column with :math:`b_j = 0` of the plan is exactly 0, the rest is the plan without
them, and the constraint held fixed is the heaviest live column's. On a dead row the
gradient with respect to :math:`a_i` is the one-sided limit
:math:`\lambda_i = \sum_j \pi_{ij}(V_{ij} - \mu_j)`, :math:`\pi_i` the row's Gibbs
distribution :math:`\operatorname{softmax}_j(\beta_j - C_{ij}/\varepsilon)`; dead columns
likewise (see :mod:`convexddn.nodes._sinkhorn_padding`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._autograd import refuse_vmap
from .._checks import check_count, check_number, check_tensor, check_tolerance
from ..errors import ShapeError
from ._overflow import narrowed, widened
from ._sinkhorn_function import ACCURACY
from ._sinkhorn_plan import _solve_plan
from ._sinkhorn_padding import check_marginal, marginal_parts

__all__ = ["OptimalTransport", "sinkhorn"]

#: The default ``tol`` of :func:`sinkhorn` (the solve runs in float64 for every dtype).
DEFAULT_TOL = 1e-12


# --------------------------------------------------------------------------- public API


def _check_options(eps: Any, max_iter: Any, tol: Any) -> None:
    # The shared check of a constant option: a tensor got "must be a positive number, got tensor(0.5)".
    check_number("eps", eps, above=0, constant_because="eps is a constant of the node")
    check_count("max_iter", max_iter)
    if tol is not None:
        check_tolerance("tol", tol)  # a relative column error >= 1 accepts any plan


def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float = 1.0,
    max_iter: int = 1000,
    tol: float | None = None,
) -> torch.Tensor:
    r"""Entropy-regularised optimal transport plan, batched, with an implicit backward.

    .. math::

        P = \operatorname*{argmin}_{P \ge 0,\ P\mathbf 1 = a,\ P^\top\mathbf 1 = b}
        \langle C, P\rangle - \varepsilon H(P), \qquad
        H(P) = -\sum_{ij} P_{ij}(\log P_{ij} - 1),

    i.e. :math:`P_{ij} = e^{\alpha_i + \beta_j - C_{ij}/\varepsilon}`. Solved in float64
    (whatever the input dtype): by plain Sinkhorn on the kernel when no row of ``cost``
    spreads over more than 50·``eps`` (its entries then lie in :math:`[e^{-50}, 1]`),
    otherwise (and where that converges slowly) in the log domain: Sinkhorn iterations
    and Newton steps on the dual, which converge quadratically, with ε-scaling when
    ``eps`` is below 1/50 of the costs' spread within a row. There no kernel is formed,
    so small ``eps`` neither underflows nor loses the tiny entries of the plan (at
    ``eps=0.05`` on costs of range 4 they reach 1e-31 and below; entries below 6e-308
    are 0). Rows sum to ``a`` exactly and columns to ``b`` within ``tol``. An entry far
    below that is accurate against the plan's largest, not against itself: the marginals
    barely see it, so the dual is resolved along its direction only to their rounding
    (a 2 × 2 cost ``[[0, 1], [2, 0.5]]`` at ``eps=0.05``: off-diagonal entries of 7e-12,
    equal in exact arithmetic, came out 0.6 % apart and the cost's gradient 3e-5 off
    relative; at ``eps=0.01`` entries of 3e-55 came out 2e-44 and 4e-66).
    Past a spread of about 1000·``eps`` the plan's support is disconnected in float64
    and ``tol`` may not be reached in ``max_iter`` (a ``SolverWarning`` says so); about 1 %
    of small dense randn costs fail so from a spread of ~250·``eps`` already (a 7 × 7
    one: plan entries down to 1e-98, column error 1e-6), their plans accurate to ~1e-9. The
    gradient with respect to ``cost``, ``a`` and ``b`` is implicit (no unrolling): see
    the module docstring for the formula and :math:`O(MN\min(M,N) + \min(M,N)^3)` cost.

    Marginals: ``a`` defaults to uniform :math:`1/M`, ``b`` to uniform :math:`1/N`. The
    problem is feasible only for equal masses, so ``b`` is rescaled to the mass of ``a``:
    the result is :math:`(\sum_i a_i)\, P(C, a/\textstyle\sum a, b/\sum b)`, whose
    columns sum to :math:`b \sum_i a_i / \sum_j b_j`. Gradients include these
    normalisations (a gradient with respect to ``b`` is orthogonal to ``b`` itself); along
    mass-preserving directions, the only ones where the marginals' gradient is unique, it
    agrees with the registry's ``ot_entropic`` (``convexddn.layer``), whose gradient gives
    ``b``'s last entry 0 instead (that entry implied by the others). Pass
    ``a = b = 1`` (square cost) for a doubly-stochastic matrix.

    Padding: zero entries of ``a`` or ``b`` mark rows or columns that do not exist, so
    sets of different sizes share one batch (each element its own pattern). Those rows
    and columns of the plan are exactly 0 and the rest is the plan of the problem with
    them removed (the padded costs may hold any finite values). The gradient with
    respect to ``cost`` is 0 there; with respect to a zero :math:`a_i` it is the
    one-sided derivative (:math:`a_i \to 0^+`, exact): in the module docstring's terms
    :math:`\lambda_i = \sum_j \pi_{ij}(V_{ij} - \mu_j)` with the row's Gibbs
    distribution :math:`\pi_i = \operatorname{softmax}_j(\beta_j - C_{ij}/\varepsilon)`
    over the live columns, then the normalisation's chain rule (``b`` likewise).

    As attention: for scores :math:`S = QK^\top/\sqrt d`, ``sinkhorn(-S, ones, ones,
    eps=1)`` is a doubly-stochastic attention matrix (Sinkformer); its first row
    normalisation alone is ``softmax(S, -1)``.

    Args:
        cost: costs :math:`C`, floating point.
        a: row marginal, entries >= 0 (0: a padded row) with a positive sum,
            broadcastable over the batch. Default: uniform 1/M.
        b: column marginal, entries >= 0 (0: a padded column) with a positive sum,
            broadcastable over the batch. Default: uniform.
        eps: entropic regularisation :math:`\varepsilon > 0` (the reference
            implementation's ``1/gamma``). Default: 1.0.
        max_iter: most Sinkhorn iterations plus Newton steps. Default: 1000.
        tol: largest accepted relative column error, in (0, 1),
            :math:`\|P^\top\mathbf 1 - b\|_1 / \|b\|_1`. Default: ``None`` (1e-12).

    Shape:
        - cost: :math:`(*, M, N)`; a: :math:`(*, M)`; b: :math:`(*, N)` (batch shapes
          broadcast).
        - Output: :math:`(*, M, N)` in the broadcast batch shape, cost's dtype and device.

    Raises:
        DTypeError: a tensor is not floating point.
        ShapeError: cost has fewer than 2 dims or an empty side; a marginal's last dim
            does not match; batch shapes do not broadcast.
        NonFiniteError: NaN or Inf in cost, a or b.
        InputError: a marginal has an entry < 0, no entry > 0, or a positive entry
            below 1e-290 of its sum, or lives on another device; a row of ``cost`` spans
            more than float64's range, or its span over ``eps`` does.
        OptionError: eps not a positive number; tol not a number in (0, 1); max_iter not an
            integer >= 1.

    Warns:
        SolverWarning: ``tol`` not reached in ``max_iter`` (names the batch indices);
            the implicit gradient then assumes a solution that was not reached. Also a
            plan that does not fit the cost's dtype: entries beyond its range (Inf
            there; marginals of huge mass) or rows or columns that round to all zeros
            (marginals of tiny mass).
        GradientWarning: in the backward, where the plan's support is disconnected and
            the marginal gradients are not unique (least-norm ones are returned), or
            nearly so (clusters far apart against ``eps``): the marginals' gradients
            and tangents then hang on the tiny cross-cluster mass, which the plan's
            relative marginal error η moves by up to η/λ_min (λ_min: the smallest
            eigenvalue of the Schur complement scaled by the column masses, bounded
            from below; a light marginal entry alone does not make it small). Where
            that exceeds the gradients' promised accuracy (1e-8 in float64, 1e-7 in
            float32) the backward polishes the plan (Newton steps on the marginals, to
            rounding) and differentiates the exact plan; where even that leaves it
            above (λ_min below about 1e-8 in float64, 1e-9 in float32) it warns
            (raise ``eps``). Also a gradient (or forward-mode tangent) entry
            beyond the range of its input's dtype (±Inf there, the input and batch
            elements named): a float16 cost at ``eps=1e-6``, or float64 at an ``eps``
            below about 1e-302.

    References:
        Cuturi, "Sinkhorn Distances", NeurIPS 2013. Peyré & Cuturi, "Computational
        Optimal Transport", 2019 (§4.4 log domain). Gould, Hartley & Campbell, "Deep
        Declarative Networks", TPAMI 2021. Sander et al., "Sinkformers", AISTATS 2022.

    Examples::

        >>> C = torch.rand(2, 5, 7)
        >>> P = sinkhorn(C, eps=0.1)
        >>> torch.allclose(P.sum(-1), torch.full((2, 5), 1 / 5))
        True
        >>> # Sets of 3 and 5 points (padded to 5) against sets of 4 and 2 (padded to 4):
        >>> x, y = torch.rand(2, 5, 2), torch.rand(2, 4, 2)
        >>> a = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
        >>> b = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
        >>> P = sinkhorn(torch.cdist(x, y), a, b, eps=0.1)
        >>> bool((P[0, 3:] == 0).all() and (P[1, :, 2:] == 0).all())
        True
        >>> torch.allclose(P[1, :, :2], sinkhorn(torch.cdist(x[1], y[1, :2]), a[1], b[1, :2], eps=0.1))
        True
    """
    cost = check_tensor("cost", cost)
    refuse_vmap("sinkhorn", cost, a, b, eps, tangents=False, jacrev=False)
    _check_options(eps, max_iter, tol)
    if cost.ndim < 2 or cost.shape[-1] == 0 or cost.shape[-2] == 0:
        raise ShapeError(
            f"cost must have shape (*batch, M, N) with M, N >= 1, got {tuple(cost.shape)}"
        )
    m, n = cost.shape[-2:]
    # (cost's finiteness is checked after the solve, only where its error is not
    # finite: the solver returns NaN at once for NaN or Inf costs.)
    a = None if a is None else check_marginal("a", a, cost, m, "rows M")
    b = None if b is None else check_marginal("b", b, cost, n, "columns N")
    # Always solved in float64: Newton's linear algebra needs it at small eps, and the
    # output is then the correctly rounded plan in any lower precision. The gradients go
    # back to the caller's dtypes through one checked cast (a float16 cost's gradient of
    # 1.7e5 became Inf there, silently).
    work = torch.float64
    C, a64, b64 = widened("sinkhorn", (("cost", cost, 2), ("a", a, 1), ("b", b, 1)))
    # The marginals' derivatives are kept to the tightest accuracy promised among the
    # inputs' dtypes (float64's where any input is float64).
    accuracy = min(ACCURACY.get(t.dtype, ACCURACY[work]) for t in (cost, a, b) if t is not None)
    # A marginal's values are checked wherever it has entries; an empty one has none to
    # check (its reductions have no identity: aminmax raised a raw RuntimeError) and only
    # broadcasts to an empty batch, where nothing is solved.
    am = None if a is None or a.numel() == 0 else marginal_parts("a", a, a64)
    bm = None if b is None or b.numel() == 0 else marginal_parts("b", b, b64)
    shapes = [cost.shape[:-2]] + [v.shape[:-1] for v in (a, b) if v is not None]
    try:
        batch = torch.broadcast_shapes(*shapes) if len(shapes) > 1 else shapes[0]
    except RuntimeError:
        raise ShapeError(
            "the batch shapes of cost, a and b must broadcast, got "
            f"{[tuple(s) for s in shapes]}"
        ) from None
    tol = DEFAULT_TOL if tol is None else float(tol)
    out_shape = (*batch, m, n)
    if math.prod(batch) == 0:
        # Nothing to solve, but the empty result is still formed from the inputs, so
        # that a backward through it gives their (zero) gradients instead of failing.
        P = cost.expand(out_shape) * 0
        for v, dim in ((a, -1), (b, -2)):
            if v is not None:
                P = P + (v.unsqueeze(dim).expand(out_shape) * 0).to(P.dtype)
        return P

    # Solve for unit-mass marginals: the plan for (a, b) is Σa times the plan for
    # (a/Σa, b/Σb) (the entropy's extra term is constant), which keeps every quantity
    # in the solver at a known scale. Autograd carries the gradient through both.
    mass = None if am is None else am[1:3]
    # Zero entries (padding) switch on the solver's masks; none: the plain path.
    holes = (am is not None and am[3], bm is not None and bm[3])
    # (Each view of a tensor that requires grad is an autograd node: none when C already
    # has the working shape.)
    size = math.prod(batch)
    if C.shape != (size, m, n):
        C = C.expand(out_shape).reshape(-1, m, n)
    # (uniform ones as one row broadcast over the batch: two ops, not three)
    a = C.new_full((1, m), 1.0 / m).expand(size, m) if am is None else am[0].expand(*batch, m).reshape(-1, m)
    b = C.new_full((1, n), 1.0 / n).expand(size, n) if bm is None else bm[0].expand(*batch, n).reshape(-1, n)
    # The backward's Schur complement lives on the smaller side: make it the columns.
    flip = n > m
    if flip:
        C, a, b, holes = C.transpose(-1, -2), b, a, holes[::-1]
    holes = holes if any(holes) else None
    P = _solve_plan(cost, C, a, b, am, float(eps), int(max_iter), tol, flip, holes, work, accuracy, tuple(batch))
    if flip:
        P = P.transpose(-1, -2)
    if P.shape != out_shape:
        P = P.reshape(out_shape)
    if mass is not None:
        # Σa in two factors (its product may overflow where the plan's entries do not).
        P = (P * mass[0].unsqueeze(-1)).mul_(mass[1].unsqueeze(-1))
    # Rows sum to a and columns to b·Σa/Σb: in a narrower dtype an entry may exceed its
    # range (a of mass 1e40 in float32) or a row round to zeros (a = 1e-50), both warned.
    return narrowed(P, cost.dtype, "sinkhorn", "the plan", 2, ((-1, "row"), (-2, "column")),
                    "pass a wider cost dtype, or marginals of another mass", _may_not_fit(am, bm, m, n, cost.dtype))


def _may_not_fit(am: tuple | None, bm: tuple | None, m: int, n: int, dtype: torch.dtype) -> bool:
    """Whether the plan may not fit ``dtype``, from the marginals' host numbers (no pass
    over the plan): an entry is at most its row's sum a_i ≤ Σa, and a row's (a column's)
    largest entry at least its sum over N (over M); the sums are a_i = Σa·share and
    b_j Σa/Σb = Σa·share of b."""
    info = torch.finfo(dtype)
    top, bottom, row_share = (1.0, 1.0, 1.0 / m) if am is None else am[4]
    col_share = 1.0 / n if bm is None else bm[4][2]
    least = 2 * info.tiny * info.eps  # (a line whose largest entry reaches this keeps it)
    return not (top <= info.max / 2 and bottom * row_share / n >= least and bottom * col_share / m >= least)


class OptimalTransport(nn.Module):
    r"""Module form of :func:`sinkhorn`: the entropic optimal transport plan.

    .. math::

        P = \operatorname*{argmin}_{P \ge 0,\ P\mathbf 1 = a,\ P^\top\mathbf 1 = b}
        \langle C, P\rangle - \varepsilon H(P)

    Args:
        eps: entropic regularisation :math:`\varepsilon > 0`. Default: 1.0.
        max_iter: most iterations. Default: 1000.
        tol: relative column-marginal tolerance; ``None`` for 1e-12.

    Shape:
        - forward(cost, a=None, b=None): :math:`(*, M, N), (*, M), (*, N) \to (*, M, N)`;
          marginals >= 0 with positive sums (zeros: padding, see :func:`sinkhorn`).

    Raises:
        OptionError: at construction for an invalid ``eps``, ``max_iter`` or ``tol``;
            the call raises as :func:`sinkhorn`.

    Examples::

        >>> ot = OptimalTransport(eps=0.5)
        >>> scores = torch.randn(4, 6, 6)
        >>> attn = ot(-scores, torch.ones(6), torch.ones(6))   # doubly stochastic
        >>> attn.sum(-2).allclose(torch.ones(4, 6), atol=1e-5)
        True
    """

    def __init__(self, eps: float = 1.0, max_iter: int = 1000, tol: float | None = None) -> None:
        super().__init__()
        _check_options(eps, max_iter, tol)
        self.eps, self.max_iter, self.tol = eps, max_iter, tol

    def forward(
        self, cost: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None
    ) -> torch.Tensor:
        return sinkhorn(cost, a, b, eps=self.eps, max_iter=self.max_iter, tol=self.tol)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, max_iter={self.max_iter}, tol={self.tol}"
