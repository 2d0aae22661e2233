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


def exact_sign(terms: torch.Tensor, d: int) -> torch.Tensor:
    r"""sign(Σᵢ termsᵢ) along ``d`` in exact arithmetic (keepdim; −1, 0 or 1 in terms' dtype).

    ``terms`` is float64 (any float's values are exact there; its sums round, hence this):
    finite, or with overflowed terms of one sign only (the sum's sign is then theirs). The
    bound on the errors' sum is fl(Σ|eⱼ|)(1 + 2m·2⁻⁵³) plus m·2⁻¹⁰⁷⁴ for the subnormal range.
    """
    t = terms.movedim(d, -1)
    sign = torch.zeros(t.shape[:-1], dtype=t.dtype, device=t.device)
    open_ = torch.ones(t.shape[:-1], dtype=torch.bool, device=t.device)
    tiny = torch.finfo(torch.float64).tiny * torch.finfo(torch.float64).eps
    compiling = torch.compiler.is_compiling()  # no host read there: a fixed number of passes
    for _ in range(3 if compiling else _PASSES):
        s, e = _distill(t)
        m = e.shape[-1]
        bound = e.abs().sum(-1) * (1.0 + 2.0 * m * 2.0**-53) + m * tiny
        done = (s.abs() > bound) | ~torch.isfinite(s) | (e == 0).all(-1)
        sign = torch.where(open_ & done, torch.sign(s), sign)
        open_ = open_ & ~done
        if not compiling and not bool(open_.any()):
            break
        t = torch.cat([s.unsqueeze(-1), e], -1)
    return sign.unsqueeze(-1).movedim(-1, d)


def exact_support(a: torch.Tensor, z: float | torch.Tensor, seed: torch.Tensor, d: int) -> torch.Tensor:
    r"""The support {i : aᵢ > τ} of the projection of ``a`` onto {v ≥ 0, Σv = z}, exactly.

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
