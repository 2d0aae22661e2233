"""The α-entmax map and its Jacobian product, for :mod:`convexddn.nodes.entmax`: the
threshold τ by monotone Newton (1 < α < 2) or by bisection on bit patterns (α > 2), the
working dtype, and (diag(s) − s sᵀ/1ᵀs) g with s = p^{2−α}. The math and the accuracy
are in :mod:`convexddn.nodes.entmax`'s docstring."""
from __future__ import annotations

import math

import torch

from .._autograd import any_batched
from ._overflow import warn_gradient_overflow

__all__ = ["SOFTMAX_BELOW", "entmax_map", "jacobian_product"]

# Newton on τ stops earlier when τ stops increasing; this only bounds pathological input.
_MAX_NEWTON = 200
# Newton steps after which the entries already below τ are dropped from the work.
_COMPACT_AFTER = 3


def _threshold_newton(z: torch.Tensor, d: int, k: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """τ with Σ [z − τ]_+^k = 1 for k > 1, z ≤ 0 with max 0 along d (monotone Newton), and
    the indices along d of the entries it was compacted to (None: not compacted), a
    superset of the support."""
    # Two points left of the root (f ≥ 0): max z − 1 (p_max ≤ 1), and, from the power
    # mean inequality Σ tᵢᵏ ≥ n^{1−k} (Σ tᵢ)ᵏ, mean z − n^{−1/k}; the larger is closer.
    n = z.shape[d]
    tau = (z.mean(d, keepdim=True) - n ** (-1.0 / k)).clamp_(min=-1.0)
    idx = None
    for it in range(_MAX_NEWTON):
        if it == _COMPACT_AFTER and n > 64:
            # τ only increases, so entries at or below it are out for good: continue on
            # each row's largest entries when few remain (rows with fewer keep some
            # entries below τ, which contribute 0).
            keep = int((z > tau).sum(d).max())  # one host sync, once per call
            if keep <= n // 4:
                z, idx = z.topk(max(keep, 1), dim=d, sorted=False)
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
    return tau, idx


def _float32_answer(x: torch.Tensor, top: torch.Tensor, tau: torch.Tensor, idx: torch.Tensor | None,
                    alpha: float, d: int) -> torch.Tensor:
    """p for float32 x from the float32 root τ, formed in float64 and rounded once: τ refined
    by Newton, pᵢ = (zᵢ − τ)_+^k / Σⱼ (zⱼ − τ)_+^k with z = (α − 1)(x − top), on the
    entries the float32 solve was compacted to (``idx``: a superset of its support, the
    rest 0) or on all of them.

    A float32 τ is off by ~ε|τ| and zᵢ by its rounding (~ε|zᵢ|), so every zᵢ − τ was off by
    ~ε|τ|, which pᵢ = (zᵢ − τ)^k multiplies by k relative to the small entries: 746 ulps
    at pᵢ = 4.7e-7 (α = 1.5, randn rows), ~1 ulp against the row max. (Only τ in float64,
    the rest in float32, still left k·ε relative on the largest entry, which the
    normalisation spread onto all: 13 ulps at α = 1.2.) From τ's error e ~ ε one Newton
    step leaves (f''/2f')e² ≤ (k − 1)ρe²/2 for k ≥ 2 (Σtᵏ = 1, t ≤ 1); for k < 2, f''
    grows like t^{k−2} at the small entries: two steps.
    """
    f64 = torch.float64
    k = 1.0 / (alpha - 1.0)
    xs = x if idx is None else x.gather(d, idx)
    # (Converted before the arithmetic: float32 − float64 across dtypes is many times slower on CPU.)
    z = xs.to(f64).sub_(top.to(f64)).mul_(alpha - 1.0).clamp_(min=-1.0)
    tau = tau.to(f64)
    # In place where possible: on rows that were not compacted fresh float64 buffers cost
    # more than their arithmetic (forward+backward at (256, 1000), α = 1.5, 0.05·randn rows:
    # 1.9× the float32-only code with one buffer per operation, 1.1–1.2× in place).
    for _ in range(1 if k >= 2.0 else 2):
        # τ < max z = 0 from either side of the root (Newton on a convex decreasing f never
        # steps right of it): the largest tᵢ and so f' are positive.
        t = torch.sub(z, tau).clamp_(min=0.0)
        if k == 2.0:  # Σt² as a norm: a reduction, no buffer
            f, fp = torch.linalg.vector_norm(t, dim=d, keepdim=True).square_(), t.sum(d, keepdim=True)
        else:
            q = t.pow(k - 1.0)
            fp = q.sum(d, keepdim=True)
            f = q.mul_(t).sum(d, keepdim=True)
        tau = tau + f.sub_(1.0) / fp.mul_(k)
    p = z.sub_(tau).clamp_(min=0.0)
    p = p.square_() if k == 2.0 else p.pow_(k)
    p = p.div_(p.sum(d, keepdim=True)).to(x.dtype)
    # Compacted: the entries left out are below the float32 τ of the compaction step, far
    # below the final one (short of ties within its rounding, whose pᵢ ~ (ε|τ|)^k).
    return p if idx is None else torch.zeros_like(x).scatter_(d, idx, p)


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
    one = torch.ones((), dtype=z.dtype, device="cpu")  # host-side: read as ints below
    lo0 = torch.tensor(n ** (-1.0 / k), dtype=z.dtype, device="cpu")
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
SOFTMAX_BELOW = 1e-10


def _work_dtype(dtype: torch.dtype, alpha: float) -> torch.dtype:
    # Half inputs are solved in float32; α − 1 or 1/(α − 1) outside float32's range
    # (α > 3.4e38) would become inf/0 there (NaN results), and α near 1 amplifies its
    # rounding (at α = 1 + 1e-9 every float32 answer was uniform): solve in float64 instead.
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if work == torch.float32 and (1.0 / (alpha - 1.0) < torch.finfo(work).tiny or alpha - 1.0 < _NEAR_ONE_F32):
        work = torch.float64
    return work


def entmax_map(x: torch.Tensor, top: torch.Tensor, alpha: float, d: int) -> torch.Tensor:
    """p in the working dtype (:func:`_work_dtype`: float32 for half x, float64 near α = 1),
    not yet rounded to x's: the backward reads its support and s = p^{2−α} from this p
    (a float16 pᵢ of 5.7e-9 rounds to 0, off the support, where sᵢ is 7.6e-5 at α = 1.5)."""
    k = 1.0 / (alpha - 1.0)
    work = _work_dtype(x.dtype, alpha)
    n = x.shape[d]
    # α > 2: the threshold m = p_max^{α−1} ≥ n^{1−α} underflowed float32's normal range
    # from α ≈ 1 + 87/ln n (zeros(1024) at α = 15: NaN rows): float64 then.
    if alpha > 2 and work == torch.float32 and n ** (1.0 - alpha) < torch.finfo(work).tiny:
        work = torch.float64
    # Shift so that max z = 0: τ ∈ [−1, 0). Entries below max − 1 are never in the support
    # (p_max ≤ 1 forces τ ≥ max z − 1): raised (and −inf) to it, every difference is finite.
    # (The difference in the working dtype: bfloat16's x − top rounded by up to 0.4 %.)
    z = ((x.to(work) - top.to(work)) * (alpha - 1.0)).clamp_(min=-1.0)
    if alpha < 2:
        tau, idx = _threshold_newton(z, d, k)
        if work == x.dtype == torch.float32 and x.device.type != "mps":  # (MPS has no float64)
            return _float32_answer(x, top, tau, idx, alpha, d)
        t = (z - tau).clamp_(min=0.0)
        p = t * t if k == 2.0 else t**k
        # k > 1: pᵢ has absolute error ~ k·eps·|τ| at most, normalising is harmless.
        return p / p.sum(d, keepdim=True)
    m = _threshold_bisect(z, d, k, n)
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
    # Relative to the row's smallest base (the largest weight: 1): δ^{k−1} itself
    # overflowed for m near the smallest normal (inf·0 = NaN); an overflowing ratio is
    # a weight of 0.
    base = torch.where(maybe, up + delta, math.inf)
    w = torch.where(maybe, (base / base.amin(d, keepdim=True)) ** (k - 1.0), 0.0)
    r = 1.0 - p.sum(d, keepdim=True)
    # Σp's own rounding: ~eps per term's rounding plus the summation's, which grows with
    # the log of the terms summed (entries off the support add exact zeros: masked −inf
    # padding changed a 3-entry row's answer by 7 % once it was 1000 entries long).
    terms = maybe.sum(d, keepdim=True).to(work)
    r = torch.where(r > 4.0 * (2.0 + torch.log2(terms.clamp_(min=1.0))) * eps, r, 0.0)
    p = torch.addcmul(p, w, r / w.sum(d, keepdim=True)).clamp_(min=0.0)
    if n ** (1.0 - alpha) < torch.finfo(work).tiny:
        # m below the normal range (0 at p_max^{α−1} < 2^-1074: [1, 1, 0] at α = 1100):
        # any entry in the support is within m of the top, i.e. tied with it (z is 0 or
        # ≥ 2^-149 in size for float32 input): the tied entries share the mass equally.
        tied = (u >= 0).to(work)
        p = torch.where(m < torch.finfo(work).tiny, tied / tied.sum(d, keepdim=True), p)
    return p


def jacobian_product(p: torch.Tensor, grad_p: torch.Tensor, alpha: float, d: int,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """(diag(s) − s sᵀ/1ᵀs) g with s = p^{2−α} on the support: the VJP and the JVP, in
    ``dtype`` (x's; default grad_p's), where its overflow is checked (α > 2)."""
    dtype = grad_p.dtype if dtype is None else dtype
    # Half precision would overflow s = p^{2−α} (α > 2) or lose the sums: use float32.
    work = _work_dtype(p.dtype, alpha)
    p, g = p.to(work), grad_p.to(work)
    if alpha < 2:
        s = p.sqrt() if alpha == 1.5 else p ** (2.0 - alpha)  # 0 off the support
        sg = s * g
        coef = sg.sum(d, keepdim=True) / s.sum(d, keepdim=True)
        return torch.addcmul(sg, s, coef, value=-1.0).to(dtype)
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
    out = out.scatter(d, j, out.gather(d, j) - out.sum(d, keepdim=True)).to(dtype)
    # s reaches p_min^{2−α}: the true product can exceed the dtype (zeros(9) at α = 50 in
    # float32: 9^48 g). Said, not returned as a silent Inf (a host read, α > 2 only; not
    # on the cotangents a vmap batches, where no host read can be made).
    if not any_batched(grad_p):
        warn_gradient_overflow("entmax", grad_p, [("x", out)], (d - out.ndim,))  # (x's own layout)
    return out


