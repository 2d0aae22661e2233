r"""α-entmax: sparse probability maps (softmax at α = 1, sparsemax at α = 2).

.. math::

    \operatorname{entmax}_\alpha(x) = \operatorname*{argmax}_{p \in \Delta^{n}}
    p^\top x + H^T_\alpha(p), \qquad
    H^T_\alpha(p) = \frac{1}{\alpha(\alpha - 1)} \sum_i (p_i - p_i^\alpha)
    \quad (\alpha > 1),

with :math:`H^T_1` the Shannon entropy. The solution is :math:`p_i = [(\alpha - 1) x_i -
\tau]_+^{1/(\alpha - 1)}`, :math:`\tau` fixed by :math:`\sum_i p_i = 1`; entries below
the threshold are exactly 0: a drop-in sparse replacement for softmax in attention.

Forward: ``alpha=1`` is ``torch.softmax``; ``alpha=2`` is the sort-based Euclidean
projection onto the simplex (:func:`convexddn.nodes.projection.project_simplex`);
``1 < alpha < 2`` finds :math:`\tau` by Newton's method on
:math:`f(\tau) = \sum_i [z_i - \tau]_+^{k} - 1` (:math:`z = (\alpha - 1)x`,
:math:`k = 1/(\alpha - 1) > 1`): :math:`f` is convex and decreasing, so Newton started
left of the root (:math:`\tau_0 = \max z - 1`, where :math:`f \ge 0`) increases
monotonically to it, quadratically at the end, and stops when :math:`\tau` no longer
increases in floating point, and the result is normalised to sum to 1. ``alpha > 2``
(:math:`f` concave) bisects :math:`\tau` on its bit pattern down to two adjacent floats.

Accuracy for ``alpha > 2``: :math:`u_i = z_i - \tau = p_i^{\alpha-1}` is known only to
:math:`\delta \approx 2\,\varepsilon|\tau|` (:math:`|\tau| = p_{\max}^{\alpha-1}`), so
:math:`p_i` has relative error about :math:`\frac{2\varepsilon}{\alpha-1}(p_{\max}/p_i)^{\alpha-1}`
(the problem itself is that sensitive to :math:`x_i` there); the large entries are exact
to about the sum of the small ones' absolute errors (as sensitive too: at ``alpha=10``
one ulp of a small support entry's logit moved :math:`p_{\max}` by 8e-6). Entries with
:math:`u_i \lesssim \delta` are not resolved: they share the mass :math:`1 - \sum_i p_i`
the others leave (by their error estimates); a single one is exact
(:math:`1 - \sum_{j \ne i} p_j`), several only in total. E.g. at ``alpha=3`` entries
below ~3e-3 p_max (float32) or ~1.5e-7 p_max (float64) lose over 1%; at ``alpha=10``, ~0.25 and ~0.025 p_max.
Accuracy for float32 input (``1 < alpha <= 2``): :math:`\tau` from the float32 solve is
refined in float64 (one or two Newton steps; for ``alpha=2`` one exact step of the
piecewise-linear sum) and :math:`p` is formed in float64 from :math:`x` itself and
rounded once: each entry within 0.5 ulp of float64's answer. Formed in float32, every
:math:`z_i - \tau` carried an absolute error of ~:math:`\varepsilon|\tau|` (normwise ~1
ulp), which the small entries felt in full: 746 ulps at :math:`p_i = 4.7\cdot 10^{-7}`
(``alpha=1.5``), 85 ulps at ``alpha=2``. float64 inputs are unchanged.
For :math:`\alpha \to 1^+` all paths lose about :math:`\varepsilon/(\alpha - 1)` relative
(:math:`p_i = u_i^{1/(\alpha-1)}` amplifies the rounding of :math:`u_i`): float32 (and
half) inputs with :math:`\alpha - 1 < 10^{-3}` are therefore solved in float64, and
below :math:`\alpha - 1 = 10^{-10}` the softmax limit is returned (α-entmax differs by
:math:`O((\alpha - 1) x^2)`).

Backward (Peters, Niculae & Martins 2019, Prop. 1): on the support
:math:`S = \{i : p_i > 0\}`, with :math:`s_i = p_i^{2 - \alpha}` (and 0 off it),

.. math::

    \frac{\partial p}{\partial x} = \operatorname{diag}(s) - \frac{s s^\top}{\mathbf 1^\top s},

the softmax Jacobian at :math:`\alpha = 1` (:math:`s = p`) and sparsemax's at
:math:`\alpha = 2` (:math:`s = \mathbf 1_S`). At a tie (an entry exactly at the
threshold) the derivative does not exist; the formula then treats the entry as outside.
For ``alpha > 2`` the VJP is formed relative to the entry of largest :math:`s` (no
cancellation) and in float32 at least; it is as accurate as :math:`p`: where several
entries are unresolved (above) their :math:`s` and so their gradients are not accurate
(the true ones are large there, :math:`\gtrsim p_i/(\varepsilon |x_i|)`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._autograd import bind_fast, called_as, may_carry_tangents, refuse_vmap
from .._anchor import graph_anchor
from .._first_order import first_order, first_order_jvp
from .._checks import check_int, check_number, check_tensor, normalize_dims
from ..errors import InputError, NonFiniteError, ShapeError
from ._entmax_map import SOFTMAX_BELOW, entmax_map, jacobian_product
from .degeneracy import failed_indices
from .projection import project_simplex

__all__ = ["Entmax", "entmax"]


def _check_alpha(alpha: Any) -> float:
    # (The shared validator: an integer beyond the float range is refused by name, not
    # an OverflowError; a tensor is refused saying that α is a constant.)
    return check_number("alpha", alpha, at_least=1, constant_because="alpha is a constant of the node")


def _check_dim(dim: Any, x: torch.Tensor) -> int:
    check_int("dim", dim)
    d = normalize_dims("dim", dim, x.ndim)[0]
    if x.shape[d] == 0:
        raise ShapeError(
            f"x must have at least one entry along dim={dim}, got shape {tuple(x.shape)}"
        )
    return d


def _check_values(x: torch.Tensor, d: int) -> tuple[torch.Tensor, bool]:
    """Reject NaN, +inf and rows that are all -inf; return the row maxima and whether each
    is above x's lowest finite value (in the same host read)."""
    top = x.amax(d, keepdim=True)  # NaN and +inf propagate to the maxima
    finite, above_lowest = torch.stack([torch.isfinite(top).all(), (top > torch.finfo(x.dtype).min).all()]).tolist()
    if not finite:
        n_nan = int(torch.isnan(x).sum())
        n_pinf = int((x == math.inf).sum())
        if n_nan or n_pinf:
            raise NonFiniteError(
                f"x must not contain NaN or +inf (-inf masks an entry), got {n_nan} NaN "
                f"and {n_pinf} +inf value(s) among {x.numel()} (shape {tuple(x.shape)})"
            )
        empty = (top == -math.inf).squeeze(d)
        where = failed_indices(empty, empty.shape)
        raise InputError(
            f"x has {len(where)} row(s) along dim={d} whose entries are all -inf (at indices {where[:8]} of x's "
            "other dims); at least one entry per row must be finite"
        )
    return top, above_lowest


@bind_fast
class _EntmaxFn(torch.autograd.Function):
    """Generic-α entmax forward, p in the working dtype (its caller rounds it to x's: the
    support and s are read from the unrounded p); backward diag(s) − s sᵀ/1ᵀs with
    s = p^{2−α} on the support."""

    generate_vmap_rule = True  # (torch.func.jacfwd: a vmap over the jvp, the primals unbatched)

    @staticmethod
    def forward(x, top, alpha, d):  # type: ignore[override]
        return entmax_map(x, top, alpha, d)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)
        ctx.anchors = graph_anchor(inputs[0])  # (their graph, not them: see first_order)
        ctx.alpha, ctx.d, ctx.dtype = inputs[2], inputs[3], inputs[0].dtype

    @staticmethod
    @first_order("entmax")
    def backward(ctx, grad_p):  # type: ignore[override]
        (p,) = ctx.saved_tensors
        return jacobian_product(p, grad_p, ctx.alpha, ctx.d, ctx.dtype), None, None, None

    @staticmethod
    @first_order_jvp("entmax")  # its tangent differentiated again: DoubleBackwardError, not NaN
    def jvp(ctx, x_t, *_):  # type: ignore[override]
        """Forward mode: the Jacobian is symmetric, so its product is the backward's (formed
        and checked in x_t's dtype, widened exactly to p's, which the caller's cast narrows)."""
        (p,) = ctx.saved_tensors
        return jacobian_product(p, x_t, ctx.alpha, ctx.d).to(p.dtype)


def entmax(x: torch.Tensor, alpha: float = 1.5, dim: int = -1) -> torch.Tensor:
    r"""α-entmax over one dimension: a sparse softmax with an exact backward.

    .. math::

        p = \operatorname*{argmax}_{p \ge 0,\ \mathbf 1^\top p = 1}
        p^\top x + \frac{1}{\alpha(\alpha - 1)} \sum_i (p_i - p_i^\alpha),
        \qquad p_i = [(\alpha - 1)x_i - \tau]_+^{1/(\alpha - 1)}

    ``alpha=1`` is softmax, ``alpha=2`` sparsemax (the Euclidean projection onto the
    simplex), ``alpha=1.5`` the usual sparse attention normaliser (Correia et al. 2019).
    :math:`\tau` by monotone Newton (``1 < alpha < 2``), by one sort (``alpha=2``, exact)
    or by bisection to the last bit (``alpha > 2``). For ``alpha > 2`` an entry
    :math:`p_i` has relative error about
    :math:`\frac{2\varepsilon}{\alpha-1}(p_{\max}/p_i)^{\alpha-1}`: small entries are not
    resolved (see the module docstring); they share exactly the mass the others leave;
    large entries are exact to about the sum of the small ones' absolute errors. The
    backward is the exact VJP of :math:`\operatorname{diag}(s) - s s^\top / \mathbf 1^\top s`,
    :math:`s_i = p_i^{2-\alpha}` on the support (Peters et al. 2019); it exists except at
    ties (an entry exactly at the threshold), where the entry counts as outside.
    float32 input with ``1 < alpha <= 2`` has its threshold refined and :math:`p` formed in
    float64, rounded once: small entries keep their relative accuracy (module docstring).

    ``-inf`` entries are allowed (masked positions: their probability is 0); a row
    must have one finite entry. float16/bfloat16 inputs are solved in float32 (float64 for
    ``alpha > 2`` where :math:`n^{1-\alpha}` is below float32's range; entries tied at
    the top of a row share its mass equally at any ``alpha``).

    Args:
        x: scores, floating point.
        alpha: :math:`\alpha \ge 1`. Default: 1.5.
        dim: the dimension normalised over. Default: -1.

    Shape:
        - Input: :math:`(*, n, *)` with ``n`` at ``dim``.
        - Output: same shape, dtype and device; nonnegative, summing to 1 along ``dim``.

    Raises:
        DTypeError: ``x`` is not floating point.
        NonFiniteError: ``x`` has NaN or +inf entries.
        InputError: a row is entirely ``-inf``.
        ShapeError: ``dim`` out of range, or ``x`` empty along ``dim``.
        OptionError: ``alpha`` not a finite number >= 1 (a tensor ``alpha`` too: it is
            a constant of the node), ``dim`` not an int.

    Warns:
        GradientWarning: in backward (``alpha > 2``), a gradient beyond the dtype's
            range: :math:`s_i = p_i^{2-\alpha}` reaches :math:`n^{\alpha-2}` (e.g.
            ``zeros(9)`` at ``alpha=50`` in float32); Inf is returned there.

    References:
        Peters, Niculae & Martins, "Sparse Sequence-to-Sequence Models", ACL 2019.
        Blondel, Martins & Niculae, "Learning Classifiers with Fenchel-Young Losses",
        AISTATS 2019. Correia, Niculae & Martins, "Adaptively Sparse Transformers",
        EMNLP 2019. Martins & Astudillo, "From Softmax to Sparsemax", ICML 2016.

    Examples::

        >>> p = entmax(torch.tensor([[2.0, 1.0, -1.0]]), alpha=1.5)
        >>> p[0, 2].item()   # exactly zero
        0.0
    """
    x = check_tensor("x", x)
    refuse_vmap("entmax", x)
    alpha = _check_alpha(alpha)
    d = _check_dim(dim, x)
    if x.numel() == 0:
        return x.clone()
    top, above_lowest = _check_values(x, d)
    if alpha - 1.0 < SOFTMAX_BELOW:
        return torch.softmax(x, d)
    top = top.detach()
    if alpha == 2.0:
        # Shift by the (detached) row max, which sparsemax ignores, then floor at −1
        # (never in the support) so that −inf entries become finite. Flooring x itself
        # at max − 1 fails once ulp(max) ≥ 1 (max − 1 rounds to max: every entry
        # floored to the max, a uniform answer); x − max is exact wherever it is > −1
        # and rounds monotonically elsewhere, so the floor is exact. Half inputs are
        # solved in float32 and rounded once (in bfloat16 the threshold rounded to 8 bits
        # and rows of 4096 summed to 1 ± 1.2e-2).
        work = torch.promote_types(x.dtype, torch.float32)
        if x.dtype == torch.float32 and above_lowest:
            # float32: x itself, its −inf entries at the lowest float (below every row max:
            # never in the support; a row whose max is that float takes the path below).
            # float32 x − max rounds (by up to ε|x − max|: 5 ulps on a small entry of randn
            # rows), while project_simplex forms its answer from x's own values in float64,
            # rounded once.
            with called_as("entmax"):
                return project_simplex(torch.nan_to_num(x, neginf=torch.finfo(x.dtype).min), d)
        with called_as("entmax"):  # (its refusals, now or in the backward, name entmax)
            return project_simplex((x.to(work) - top.to(work)).clamp(min=-1.0), d).to(x.dtype)
    if (torch.is_grad_enabled() and x.requires_grad) or may_carry_tangents(x):
        return _EntmaxFn.apply(x, top, alpha, d).to(x.dtype)  # (forward mode: its jvp, not the solver's ops)
    return entmax_map(x, top, alpha, d).to(x.dtype)


class Entmax(nn.Module):
    r"""Module form of :func:`entmax`: a sparse attention normaliser.

    .. math::

        p = \operatorname*{argmax}_{p \in \Delta} p^\top x + H^T_\alpha(p)

    Args:
        alpha: :math:`\alpha \ge 1` (1: softmax, 1.5: entmax, 2: sparsemax). Default: 1.5.
        dim: the dimension normalised over. Default: -1.

    Shape:
        - Input: :math:`(*, n, *)`; Output: same shape.

    Raises:
        OptionError: at construction for an invalid ``alpha`` or ``dim``; the call
            raises as :func:`entmax`.

    Examples::

        >>> attn = Entmax(alpha=1.5)
        >>> scores = torch.randn(2, 4, 8, 8)          # (B, heads, queries, keys)
        >>> w = attn(scores)                          # rows sum to 1, many exact zeros
        >>> torch.allclose(w.sum(-1), torch.ones(2, 4, 8))
        True
    """

    def __init__(self, alpha: float = 1.5, dim: int = -1) -> None:
        super().__init__()
        self.alpha = _check_alpha(alpha)
        check_int("dim", dim)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return entmax(x, self.alpha, self.dim)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, dim={self.dim}"
