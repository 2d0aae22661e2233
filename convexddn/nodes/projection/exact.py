r"""Exact signs of floating-point sums, for the projections' discrete decisions (inside or
outside the L1 ball, which coordinates are in a simplex projection's support).

A rounded sum can put a point exactly on the boundary (Σ|xᵢ| = r) outside, or an entry
exactly at the threshold τ inside the support. The sign of Σᵢ aᵢ is decided here from
error-free transformations: a pairwise tree of TwoSum (Knuth) gives
Σᵢ aᵢ = s + Σⱼ eⱼ exactly (s the rounded sum, eⱼ the n − 1 rounding errors), so
|s| > B ≥ |Σⱼ eⱼ| certifies sign(s); else the same is done for (s, e₁, …) (each pass
shrinks the remainder by about the unit roundoff), until every row is decided.
"""
from __future__ import annotations

import torch

__all__ = ["exact_sign", "exact_support"]

_PASSES = 40  # each pass gains ~53 bits; float64 spans ~2100 bits: never reached in practice


def _two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, e)`` with s = fl(a + b) and a + b = s + e exactly (Knuth's TwoSum, no branch)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _distill(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, e)``: s (…) the pairwise rounded sum of t (…, n) along its last dim, e (…, m)
    the rounding errors, with Σ t = s + Σ e exactly (NaN errors of overflowed sums zeroed:
    s is ±Inf there and decides the sign)."""
    errs = []
    while t.shape[-1] > 1:
        if t.shape[-1] % 2:
            t = torch.nn.functional.pad(t, (0, 1))
        t, e = _two_sum(t[..., 0::2], t[..., 1::2])
        errs.append(torch.nan_to_num(e, nan=0.0, posinf=0.0, neginf=0.0))
    e = torch.cat(errs, -1) if errs else t.new_zeros(t.shape[:-1] + (0,))
    return t[..., 0], e


def _rows(t: torch.Tensor, d: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """t with ``d`` moved last and the rest flattened: (rows, n), and the moved shape."""
    t = t.movedim(d, -1)
    return t.reshape(-1, t.shape[-1]), tuple(t.shape)


def _unrows(t: torch.Tensor, shape: tuple[int, ...], d: int) -> torch.Tensor:
    """Inverse of :func:`_rows` for a (rows, k) result."""
    return t.reshape(shape[:-1] + (t.shape[-1],)).movedim(-1, d)


def exact_sign(terms: torch.Tensor, d: int) -> torch.Tensor:
    r"""sign(Σᵢ termsᵢ) along ``d`` in exact arithmetic (keepdim; −1, 0 or 1 in terms' dtype).

    ``terms`` is float64 (any float's values are exact there; its sums round, hence this):
    finite, or with overflowed terms of one sign only (the sum's sign is then theirs). First
    the plain sum s decides where |s| > 2(n + 1)·2⁻⁵³·Σ|tᵢ| + n·2⁻¹⁰⁷⁴ (a bound on any
    summation order's error, subnormals included): most rows, at the cost of two sums.
    The rest are distilled; there the bound on the errors' sum is fl(Σ|eⱼ|)(1 + 2m·2⁻⁵³)
    plus m·2⁻¹⁰⁷⁴.
    """
    t, shape = _rows(terms, d)
    n = t.shape[-1]
    tiny = torch.finfo(torch.float64).tiny * torch.finfo(torch.float64).eps
    s = t.sum(-1)
    bound = t.abs().sum(-1) * (2.0 * (n + 1) * 2.0**-53) + n * tiny
    sign = torch.sign(s)
    compiling = torch.compiler.is_compiling()  # no host read there: a fixed number of passes
    if compiling:
        rows = None
    else:
        rows = torch.nonzero(~(s.abs() > bound) & torch.isfinite(s)).squeeze(-1)
        if not rows.numel():
            return _unrows(sign.unsqueeze(-1), shape, d)
        t = t[rows]
    sub = torch.zeros(t.shape[:-1], dtype=t.dtype, device=t.device)
    open_ = torch.ones(t.shape[:-1], dtype=torch.bool, device=t.device)
    for _ in range(3 if compiling else _PASSES):
        s, e = _distill(t)
        m = e.shape[-1]
        bound = e.abs().sum(-1) * (1.0 + 2.0 * m * 2.0**-53) + m * tiny
        done = (s.abs() > bound) | ~torch.isfinite(s) | (e == 0).all(-1)
        sub = torch.where(open_ & done, torch.sign(s), sub)
        open_ = open_ & ~done
        if not compiling and not bool(open_.any()):
            break
        t = torch.cat([s.unsqueeze(-1), e], -1)
    sign = sub if rows is None else sign.index_copy(0, rows, sub)
    return _unrows(sign.unsqueeze(-1), shape, d)


def _bisected_support(a: torch.Tensor, z: float | torch.Tensor, seed: torch.Tensor, d: int) -> torch.Tensor:
    r"""The support {i : aᵢ > τ} of the projection of ``a`` onto {v ≥ 0, Σv = z}, exactly, by bisection.

    With u = a sorted descending, j is in it iff f_j = z − Σ_{i<j} (u_i − u_j) > 0
    (Duchi et al.: u_j > (Σ_{i≤j} u_i − z)/j), and f_j falls with j, so the support is the
    ρ = max{j : f_j > 0} largest entries; an entry exactly at τ has f_j = 0 and is outside.
    Each f_j is signed exactly (:func:`exact_sign`, the differences split by TwoSum); ρ is
    bisected from the rounded count ``seed`` (…, 1) (a float ρ, off only where a rounded
    f_j was near 0: one or two signs decide most rows). ``a`` (…, n, …) float64, z > 0;
    returns a bool mask of a's shape (ties with u_ρ are all in: their f_j equal f_ρ).
    """
    u = a.sort(dim=d, descending=True).values
    n = u.shape[d]
    shape = [1] * u.ndim
    shape[d] = n
    pos = torch.arange(1, n + 1, device=u.device).view(shape)
    zt = torch.broadcast_to(torch.as_tensor(z, dtype=u.dtype, device=u.device), seed.shape)

    def positive(j: torch.Tensor) -> torch.Tensor:  # f_j > 0, j (…, 1) in [1, n]
        hi, lo = _two_sum(u, -u.gather(d, j - 1))  # u_i − u_j = hi + lo exactly
        before = pos < j
        zero = torch.zeros((), dtype=u.dtype, device=u.device)
        # (an overflowed difference gives f_j = −Inf, rightly negative; its NaN error goes)
        lo = torch.nan_to_num(lo, nan=0.0, posinf=0.0, neginf=0.0)
        terms = torch.cat([torch.where(before, -hi, zero), torch.where(before, -lo, zero), zt], d)
        return exact_sign(terms, d) > 0

    # Invariant f_lo > 0 ≥ f_hi (f_1 = z > 0; f_{n+1} stands for "none").
    lo = torch.ones_like(seed, dtype=torch.long)
    hi = torch.full_like(lo, n + 1)
    r0 = seed.long().clamp(1, n)
    for j in (r0, (r0 + 1).clamp(max=n)):
        p = positive(j)
        lo, hi = torch.where(p, torch.maximum(lo, j), lo), torch.where(p, hi, torch.minimum(hi, j))
    compiling = torch.compiler.is_compiling()
    for _ in range(max(n, 2).bit_length() + 1):
        if not compiling and not bool((hi - lo > 1).any()):
            break
        mid = (lo + hi) // 2
        p = positive(mid.clamp(max=n))
        lo, hi = torch.where(p, torch.maximum(lo, mid), lo), torch.where(p, hi, torch.minimum(hi, mid))
    return a >= u.gather(d, lo - 1)


def exact_support(a: torch.Tensor, z: float | torch.Tensor, m0: torch.Tensor, d: int) -> torch.Tensor:
    r"""The exact support (bool, a's shape) of a's projection onto {v ≥ 0, Σv = z}, given
    ``m0``, the support found from the rounded threshold (bool, a's shape).

    With F(w) = z − Σᵢ max(aᵢ − w, 0) (non-decreasing in w; F(u_j) = f_j of
    :func:`_bisected_support`), the support is {i : F(aᵢ) > 0}. m0 is certified where
    F(w_in) > 0 ≥ F(w_out) for w_in = min of a on m0 and w_out = max off it: computed in
    float64 with the error bound 2(n + 2)·2⁻⁵³·(z + Σ max(aᵢ − w, 0)) + n·2⁻¹⁰⁷⁴, this
    settles all but rows with an entry within rounding of τ (ties, near-ties), which are
    bisected exactly. ``a`` float64 (…, n, …), z > 0 (a number or broadcastable keepdim).
    """
    a2, shape = _rows(a, d)
    m2 = _rows(m0, d)[0]
    n = a2.shape[-1]
    kshape = list(a.shape)
    kshape[d] = 1
    zt = _rows(torch.broadcast_to(torch.as_tensor(z, dtype=a2.dtype, device=a2.device), kshape), d)[0]
    inf = torch.tensor(torch.inf, dtype=a2.dtype, device=a2.device)
    w_in = torch.where(m2, a2, inf).amin(-1, keepdim=True)
    w_out = torch.where(m2, -inf, a2).amax(-1, keepdim=True)
    tiny = torch.finfo(torch.float64).tiny * torch.finfo(torch.float64).eps

    def f(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = (a2 - w).clamp_(min=0.0).sum(-1, keepdim=True)
        return zt - p, (zt + p) * (2.0 * (n + 2) * 2.0**-53) + n * tiny

    f_in, b_in = f(w_in)
    f_out, b_out = f(w_out)
    ok = (w_in < inf) & (f_in > b_in) & ((w_out == -inf) | (f_out < -b_out))
    mask = a2 >= w_in
    if torch.compiler.is_compiling():  # no host read: the bisection for every row
        return _unrows(_bisected_support(a2, zt, m2.sum(-1, keepdim=True), -1), shape, d)
    rows = torch.nonzero(~ok.squeeze(-1)).squeeze(-1)
    if rows.numel():
        sub = _bisected_support(a2[rows], zt[rows], m2[rows].sum(-1, keepdim=True), -1)
        mask = mask.index_copy(0, rows, sub)
    return _unrows(mask, shape, d)
