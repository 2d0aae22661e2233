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
import numbers
from typing import Any

import torch
from torch import nn

from .._autograd import bind_fast, may_carry_tangents, refuse_vmap
from .._first_order import first_order, first_order_jvp
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
            keep = int((z > tau).sum(d).max())  # one host sync, once per call
            if keep <= n // 4:
                z = z.topk(max(keep, 1), dim=d, sorted=False).values
        t = (z - tau).clamp_(min=0.0)
        q = t if k == 2.0 else t ** (k - 1.0)  # α = 1.5: no pow
        f = (q * t).sum(d, keepdim=True) - 1.0
        fp = q.sum(d, keepdim=True) * k
        # f ≥ 0 left of the root and f is convex, so the step only moves τ right; a
        # step that does not (rounding at the root) ends that row.
        new = torch.maximum(tau + f / fp, tau)
        # One host sync per Newton step (a few per call: the steps converge quadratically).
        if bool((new == tau).all()):
            break
        tau = new
    return tau


def _bits(v: torch.Tensor) -> torch.Tensor:
    """The IEEE bit pattern of a nonnegative float tensor, as integers in the same order."""
    return v.view(torch.int32 if v.dtype == torch.float32 else torch.int64)


def _threshold_bisect(z: torch.Tensor, d: int, k: float, n: int) -> torch.Tensor:
    """m = −τ with Σ [z + m]_+^k ≤ 1 < Σ [z + m⁺]_+^k, m⁺ the next float (k < 1).

    Bisection on the bit patterns of m ∈ [n^{−1/k}, 1] (nonnegative floats order like
    their bit patterns): every step halves the number of floats in the bracket, so it
    ends on two adjacent floats however small m is. Halving the value instead stops
    at an absolute width ~eps, which is most of m when m ≪ 1 (near-uniform rows).
    The lower end is returned, where the mass Σ p is at most 1 (see the caller).
    """
    one = torch.ones((), dtype=z.dtype)
    lo0 = torch.tensor(n ** (-1.0 / k), dtype=z.dtype)
    lo_b, hi_b = int(_bits(lo0)), int(_bits(one))
    lo = torch.full_like(z.narrow(d, 0, 1), lo_b, dtype=_bits(one).dtype)
    hi = torch.full_like(lo, hi_b)
    # f(lo) ≤ 0 (every term ≤ n^{−1}) and f(1) ≥ 0 (the top term is 1).
    for _ in range((hi_b - lo_b).bit_length()):
        mid = lo + (hi - lo) // 2
        f = ((z + mid.view(z.dtype)).clamp_(min=0.0) ** k).sum(d, keepdim=True)
        above = f > 1.0
        lo = torch.where(above, lo, mid)
        hi = torch.where(above, mid, hi)
    return lo.view(z.dtype)


# Below this α − 1 a float32 solve loses more than ~1e-4 relative (eps / (α − 1)): float64.
_NEAR_ONE_F32 = 1e-3
# ... and below this one float64 too (2e-6): the softmax limit is closer (O((α − 1) x²)).
_SOFTMAX_BELOW = 1e-10


def _work_dtype(dtype: torch.dtype, alpha: float) -> torch.dtype:
    # Half inputs are solved in float32; α − 1 or 1/(α − 1) outside float32's range
    # (α > 3.4e38) would become inf/0 there (NaN results), and α near 1 amplifies its
    # rounding (at α = 1 + 1e-9 every float32 answer was uniform): solve in float64 instead.
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if work == torch.float32 and (1.0 / (alpha - 1.0) < torch.finfo(work).tiny or alpha - 1.0 < _NEAR_ONE_F32):
        work = torch.float64
    return work


def _entmax_forward(x: torch.Tensor, top: torch.Tensor, alpha: float, d: int) -> torch.Tensor:
    k = 1.0 / (alpha - 1.0)
    work = _work_dtype(x.dtype, alpha)
    # Shift so that max z = 0: τ ∈ [−1, 0). Entries below max − 1 are never in the support
    # (p_max ≤ 1 forces τ ≥ max z − 1): raised (and −inf) to it, every difference is finite.
    z = ((x - top).to(work) * (alpha - 1.0)).clamp_(min=-1.0)
    if alpha < 2:
        tau = _threshold_newton(z, d, k)
        t = (z - tau).clamp_(min=0.0)
        p = t * t if k == 2.0 else t**k
        # k > 1: pᵢ has absolute error ~ k·eps·|τ| at most, normalising is harmless.
        return (p / p.sum(d, keepdim=True)).to(x.dtype)
    m = _threshold_bisect(z, d, k, x.shape[d])
    u = z + m  # zᵢ − τ: pᵢ = uᵢ^k on the support
    up = u.clamp(min=0.0)
    p = up**k
    # k < 1: uᵢ is known to δ ≈ 2·eps·|τ| (τ to one ulp, zᵢ rounded; |zᵢ| ≤ |τ| on the
    # support), so pᵢ to ~ k·δ·uᵢ^{k−1}: relative error (2 eps/(α−1))·(p_max/pᵢ)^{α−1},
    # which reaches 100% for the small entries (uᵢ ≲ δ). Dividing by Σp would spread
    # their error onto every entry; instead the missing mass r = 1 − Σp ≥ 0 (m is the
    # bracket end with Σp ≤ 1) goes to the entries in proportion to their error
    # estimate (uᵢ⁺ + δ)^{k−1} (entries with uᵢ > −δ, i.e. possibly in the support):
    # resolved entries keep their value to eps, a lone unresolved one gets exactly the
    # mass the others leave, several share it.
    # Two exclusions keep a one-hot row one-hot (p_i ≈ 3e-8 and O(1) gradients there
    # otherwise, for 2 < α < 3): entries at the floor z = −1 are never in the support
    # (m ≤ 1), and a shortfall r at the rounding level of Σp (m is the bracket's lower
    # end, an ulp below 1 for a one-hot row) is rounding, not a missing mass.
    eps = torch.finfo(work).eps
    delta = m * (2.0 * eps)
    maybe = (u > -delta) & (z > -1.0)
    w = (up + delta) ** (k - 1.0) * maybe
    r = 1.0 - p.sum(d, keepdim=True)
    # Σp's own rounding: ~eps per term's rounding plus the summation's, which grows with
    # the log of the terms summed (entries off the support add exact zeros: masked −inf
    # padding changed a 3-entry row's answer by 7 % once it was 1000 entries long).
    terms = maybe.sum(d, keepdim=True).to(work)
    r = torch.where(r > 4.0 * (2.0 + torch.log2(terms.clamp_(min=1.0))) * eps, r, 0.0)
    p = torch.addcmul(p, w, r / w.sum(d, keepdim=True).clamp_(min=torch.finfo(work).tiny)).clamp_(min=0.0)
    return p.to(x.dtype)


@bind_fast
class _EntmaxFn(torch.autograd.Function):
    """Generic-α entmax forward; backward diag(s) − s sᵀ/1ᵀs with s = p^{2−α} on the support."""

    @staticmethod
    def forward(x, top, alpha, d):  # type: ignore[override]
        return _entmax_forward(x, top, alpha, d)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)
        ctx.alpha, ctx.d = inputs[2], inputs[3]

    @staticmethod
    @first_order("entmax")
    def backward(ctx, grad_p):  # type: ignore[override]
        (p,) = ctx.saved_tensors
        return _jacobian_product(p, grad_p, ctx.alpha, ctx.d), None, None, None

    @staticmethod
    @first_order_jvp("entmax")  # its tangent differentiated again: DoubleBackwardError, not NaN
    def jvp(ctx, x_t, *_):  # type: ignore[override]
        """Forward mode: the Jacobian is symmetric, so its product is the backward's."""
        (p,) = ctx.saved_tensors
        return _jacobian_product(p, x_t, ctx.alpha, ctx.d)


def _jacobian_product(p: torch.Tensor, grad_p: torch.Tensor, alpha: float, d: int) -> torch.Tensor:
    """(diag(s) − s sᵀ/1ᵀs) g with s = p^{2−α} on the support: the VJP and the JVP."""
    # Half precision would overflow s = p^{2−α} (α > 2) or lose the sums: use float32.
    work = _work_dtype(p.dtype, alpha)
    p, g = p.to(work), grad_p.to(work)
    if alpha < 2:
        s = p.sqrt() if alpha == 1.5 else p ** (2.0 - alpha)  # 0 off the support
        sg = s * g
        coef = sg.sum(d, keepdim=True) / s.sum(d, keepdim=True)
        return torch.addcmul(sg, s, coef, value=-1.0).to(grad_p.dtype)
    # α > 2: s = p^{2−α} peaks at the smallest pᵢ (entry j), 1/eps or more above the rest,
    # and sᵢ(gᵢ − c), c = sᵀg/1ᵀs, cancels there. Since Jᵀ1 = 0, g is shifted per row:
    # h = g − g_j, so c = Σ_{i≠j} ŝᵢhᵢ/1ᵀŝ (ŝ = s/s_j ≤ 1) is small and accurate. Each
    # product sᵢ(hᵢ − c) is one exp of (2−α)·log pᵢ + log|hᵢ − c| in float64: s_j alone
    # passes any range where the product does not (as two factors: inf·0, every entry
    # NaN in float32 from α ≈ 18).
    wide = torch.float64 if p.device.type != "mps" else work  # (MPS has no float64)
    p, g = p.to(wide), g.to(wide)
    pos = p > 0
    logp = torch.where(pos, p, 1.0).log()  # 0 off the support, where it is not used
    lmin = torch.where(pos, logp, math.inf).amin(d, keepdim=True)
    s = torch.where(pos, ((2.0 - alpha) * (logp - lmin)).exp(), 0.0)  # ŝ: 1 at j, 0 off the support
    j = s.argmax(d, keepdim=True)
    h = g - g.gather(d, j)
    diff = h - (s * h).sum(d, keepdim=True) / s.sum(d, keepdim=True)
    out = torch.where(pos, ((2.0 - alpha) * logp + diff.abs().log()).exp() * diff.sign(), 0.0)
    # Entry j from Jᵀ1 = 0 (J is symmetric): −Σ_{i≠j} outᵢ. Its own product s_j·c loses c
    # where ŝᵢ underflows (α = 100: ŝ = e^-900 beside s_j = 1e392, a product of 2.6).
    return out.scatter(d, j, out.gather(d, j) - out.sum(d, keepdim=True)).to(grad_p.dtype)


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
    refuse_vmap("entmax", x, tangents=False)
    alpha = _check_alpha(alpha)
    d = _check_dim(dim, x)
    if x.numel() == 0:
        return x.clone()
    top = _check_values(x, d)
    if alpha - 1.0 < _SOFTMAX_BELOW:
        return torch.softmax(x, d)
    top = top.detach()
    if alpha == 2.0:
        # Shift by the (detached) row max, which sparsemax ignores, then floor at −1
        # (never in the support) so that −inf entries become finite. Flooring x itself
        # at max − 1 fails once ulp(max) ≥ 1 (max − 1 rounds to max: every entry
        # floored to the max, a uniform answer); x − max is exact wherever it is > −1
        # and rounds monotonically elsewhere, so the floor is exact.
        return project_simplex((x - top).clamp(min=-1.0), d)
    if (torch.is_grad_enabled() and x.requires_grad) or may_carry_tangents(x):
        return _EntmaxFn.apply(x, top, alpha, d)  # (forward mode: its jvp, not the solver's ops)
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
