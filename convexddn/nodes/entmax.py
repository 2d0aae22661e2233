r"""α-entmax: sparse probability maps (softmax at α = 1, sparsemax at α = 2).

.. math::

    \operatorname{entmax}_\alpha(x) = \operatorname*{argmax}_{p \in \Delta^{n}}
    p^\top x + H^T_\alpha(p), \qquad
    H^T_\alpha(p) = \frac{1}{\alpha(\alpha - 1)} \sum_i (p_i - p_i^\alpha)
    \quad (\alpha > 1),

with :math:`H^T_1` the Shannon entropy. The solution is
:math:`p_i = [(\alpha - 1) x_i - \tau]_+^{1/(\alpha - 1)}`, with the threshold
:math:`\tau` fixed by :math:`\sum_i p_i = 1`; entries below the threshold are exactly 0,
which makes entmax a drop-in sparse replacement for softmax in attention.

Forward: ``alpha=1`` is ``torch.softmax``; ``alpha=2`` is the sort-based Euclidean
projection onto the simplex (:func:`convexddn.nodes.projection.project_simplex`);
``1 < alpha < 2`` finds :math:`\tau` by Newton's method on
:math:`f(\tau) = \sum_i [z_i - \tau]_+^{k} - 1` (:math:`z = (\alpha - 1)x`,
:math:`k = 1/(\alpha - 1) > 1`): :math:`f` is convex and decreasing, so Newton started
left of the root (:math:`\tau_0 = \max z - 1`, where :math:`f \ge 0`) increases
monotonically to it, quadratically at the end, and stops when :math:`\tau` no longer
increases in floating point; ``alpha > 2`` (:math:`f` concave) uses bisection to the
dtype's resolution. Either way the result is normalised to sum to 1.

Backward (Peters, Niculae & Martins 2019, Prop. 1): on the support
:math:`S = \{i : p_i > 0\}`, with :math:`s_i = p_i^{2 - \alpha}` (and 0 off it),

.. math::

    \frac{\partial p}{\partial x} = \operatorname{diag}(s) - \frac{s s^\top}{\mathbf 1^\top s},

the softmax Jacobian at :math:`\alpha = 1` (:math:`s = p`) and sparsemax's at
:math:`\alpha = 2` (:math:`s = \mathbf 1_S`). At a tie (an entry exactly at the
threshold) the derivative does not exist; the formula then treats the entry as outside.
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .._checks import check_int, check_tensor, normalize_dims
from ..errors import InputError, NonFiniteError, OptionError, ShapeError
from .projection import project_simplex

__all__ = ["Entmax", "entmax"]

# Newton on τ stops earlier when τ stops increasing; this only bounds pathological input.
_MAX_NEWTON = 200
# Newton steps after which the entries already below τ are dropped from the work.
_COMPACT_AFTER = 3


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (
        math.isfinite(float(alpha)) and float(alpha) >= 1
    ):
        raise OptionError(f"alpha must be a finite number >= 1, got {alpha!r}")
    return float(alpha)


def _check_dim(dim: Any, x: torch.Tensor) -> int:
    check_int("dim", dim)
    d = normalize_dims("dim", dim, x.ndim)[0]
    if x.shape[d] == 0:
        raise ShapeError(
            f"x must have at least one entry along dim={dim}, got shape {tuple(x.shape)}"
        )
    return d


def _check_values(x: torch.Tensor, d: int) -> torch.Tensor:
    """Reject NaN, +inf and rows that are all -inf; return the row maxima."""
    top = x.amax(d, keepdim=True)  # NaN and +inf propagate to the maxima
    if not bool(torch.isfinite(top).all()):
        n_nan = int(torch.isnan(x).sum())
        n_pinf = int((x == math.inf).sum())
        if n_nan or n_pinf:
            raise NonFiniteError(
                f"x must not contain NaN or +inf (-inf masks an entry), got {n_nan} NaN "
                f"and {n_pinf} +inf value(s) among {x.numel()} (shape {tuple(x.shape)})"
            )
        rows = int((top == -math.inf).sum())
        raise InputError(
            f"x has {rows} row(s) along dim={d} whose entries are all -inf; "
            "at least one entry per row must be finite"
        )
    return top


def _threshold_newton(z: torch.Tensor, d: int, k: float) -> torch.Tensor:
    """τ with Σ [z − τ]_+^k = 1 for k > 1, z ≤ 0 with max 0 along d (monotone Newton)."""
    # Two points left of the root (f ≥ 0): max z − 1 (p_max ≤ 1), and, from the power
    # mean inequality Σ tᵢᵏ ≥ n^{1−k} (Σ tᵢ)ᵏ, mean z − n^{−1/k}; the larger is closer.
    n = z.shape[d]
    tau = (z.mean(d, keepdim=True) - n ** (-1.0 / k)).clamp_(min=-1.0)
    for it in range(_MAX_NEWTON):
        if it == _COMPACT_AFTER and n > 64:
            # τ only increases, so entries at or below it are out for good: continue on
            # each row's largest entries when few remain (rows with fewer keep some
            # entries below τ, which contribute 0).
            keep = int((z > tau).sum(d).max())
            if keep <= n // 4:
                z = z.topk(max(keep, 1), dim=d, sorted=False).values
        t = (z - tau).clamp_(min=0.0)
        q = t if k == 2.0 else t ** (k - 1.0)  # α = 1.5: no pow
        f = (q * t).sum(d, keepdim=True) - 1.0
        fp = q.sum(d, keepdim=True) * k
        # f ≥ 0 left of the root and f is convex, so the step only moves τ right; a
        # step that does not (rounding at the root) ends that row.
        new = torch.maximum(tau + f / fp, tau)
        if bool((new == tau).all()):
            break
        tau = new
    return tau


def _threshold_bisect(z: torch.Tensor, d: int, k: float, n: int) -> torch.Tensor:
    """τ for k < 1 by bisection on [−1, −n^{−1/k}] to the dtype's resolution."""
    lo = torch.full_like(z.narrow(d, 0, 1), -1.0)
    hi = torch.full_like(lo, -(n ** (-1.0 / k)))
    # The bracket starts narrower than 1 and halves each step: mantissa bits + 2 steps.
    for _ in range(round(-math.log2(torch.finfo(z.dtype).eps)) + 2):
        mid = 0.5 * (lo + hi)
        f = ((z - mid).clamp_(min=0.0) ** k).sum(d, keepdim=True) - 1.0
        above = f >= 0
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def _entmax_forward(x: torch.Tensor, top: torch.Tensor, alpha: float, d: int) -> torch.Tensor:
    k = 1.0 / (alpha - 1.0)
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    # Shift so that max z = 0: τ ∈ [−1, 0). Entries below max − 1 are never in the
    # support (p_max ≤ 1 forces τ ≥ max z − 1); raising them (and −inf) to that floor
    # changes nothing and keeps every difference finite.
    z = ((x - top).to(work) * (alpha - 1.0)).clamp_(min=-1.0)
    if alpha < 2:
        tau = _threshold_newton(z, d, k)
    else:
        tau = _threshold_bisect(z, d, k, x.shape[d])
    t = (z - tau).clamp_(min=0.0)
    p = t * t if k == 2.0 else t**k
    return (p / p.sum(d, keepdim=True)).to(x.dtype)


def _bind_fast(cls: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    # ``Function.apply`` re-derives forward's signature on every call unless it is stored.
    cls.forward.__signature__ = inspect.signature(cls.forward)  # type: ignore[attr-defined]
    return cls


@_bind_fast
class _EntmaxFn(torch.autograd.Function):
    """Generic-α entmax forward; backward diag(s) − s sᵀ/1ᵀs with s = p^{2−α} on the support."""

    @staticmethod
    def forward(x, top, alpha, d):  # type: ignore[override]
        return _entmax_forward(x, top, alpha, d)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.save_for_backward(output)
        ctx.alpha, ctx.d = inputs[2], inputs[3]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_p):  # type: ignore[override]
        (p,) = ctx.saved_tensors
        d, alpha = ctx.d, ctx.alpha
        if alpha == 1.5:
            s = p.sqrt()
        elif alpha < 2:
            s = p ** (2.0 - alpha)  # 0 off the support (0 to a positive power)
        else:
            pos = p > 0
            s = torch.where(pos, p, torch.ones_like(p)) ** (2.0 - alpha) * pos
        sg = s * grad_p
        coef = sg.sum(d, keepdim=True) / s.sum(d, keepdim=True)
        return torch.addcmul(sg, s, coef, value=-1.0), None, None, None


def entmax(x: torch.Tensor, alpha: float = 1.5, dim: int = -1) -> torch.Tensor:
    r"""α-entmax over one dimension: a sparse softmax with an exact backward.

    .. math::

        p = \operatorname*{argmax}_{p \ge 0,\ \mathbf 1^\top p = 1}
        p^\top x + \frac{1}{\alpha(\alpha - 1)} \sum_i (p_i - p_i^\alpha),
        \qquad p_i = [(\alpha - 1)x_i - \tau]_+^{1/(\alpha - 1)}

    ``alpha=1`` is softmax, ``alpha=2`` sparsemax (the Euclidean projection onto the
    simplex), ``alpha=1.5`` the usual sparse attention normaliser (Correia et al. 2019).
    Exact to the dtype: :math:`\tau` by monotone Newton (``1 < alpha < 2``), by one sort
    (``alpha=2``) or by bisection to the last bit (``alpha > 2``). The backward is the
    exact VJP of :math:`\operatorname{diag}(s) - s s^\top / \mathbf 1^\top s`,
    :math:`s_i = p_i^{2-\alpha}` on the support (Peters et al. 2019); it exists except at
    ties (an entry exactly at the threshold), where the entry counts as outside.

    ``-inf`` entries are allowed (masked positions: their probability is 0); a row
    must have one finite entry. float16/bfloat16 inputs are solved in float32.

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
        OptionError: ``alpha`` not a finite number >= 1, ``dim`` not an int.

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
    alpha = _check_alpha(alpha)
    d = _check_dim(dim, x)
    if x.numel() == 0:
        return x.clone()
    top = _check_values(x, d)
    if alpha == 1.0:
        return torch.softmax(x, d)
    if alpha == 2.0:
        # Floor at max − 1 (never in the support) so that −inf entries become finite; the
        # floor is detached, so no gradient flows through it (theirs is 0 anyway).
        return project_simplex(torch.maximum(x, top.detach() - 1.0), d)
    top = top.detach()
    if torch.is_grad_enabled() and x.requires_grad:
        return _EntmaxFn.apply(x, top, alpha, d)
    return _entmax_forward(x, top, alpha, d)


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
