r"""Robust vector pooling on sets too large for the block budget: the polish's and the derivatives'
sums over the points, a chunk of the points at a time.

Everything the polish reads at a point u when C <= N is a sum over the N points (or a minimum):
Σκ_i, the gradient g = Σ κ_i d_i, the Hessian H = (Σκ_i) I + Σ c_i n_i n_iᵀ, the objective Σφ(z_i),
the gradient's noise terms ‖κ∘z‖₂ and Σ|φ''_i| z_i, Σφ''_i, min z_i, Weyl's Σ min(κ_i, φ''_i), Σ|c_i|
(the rounding of forming H) and the IRLS point's Σ κ_i x_i; the derivatives read H, Σ|c_i| and
whether a term has negative curvature, then write x̄_i = κ_i v + c_i (n_iᵀ v) n_i per point. One pass
over the points forms the (R, N, C) differences, unit vectors and products, each the size of the input
(a float32 set of 1e5 3-vectors took 10 times its input in the polish, 9 in the backward); here they
are formed for a chunk of the points at a time, the chunk's sums added (in float64) to the rows'.

A set is chunked where one row's point temporaries exceed the pooling kernels' block budget
(:func:`~.pooling.kernels.block_rows`; 2 MiB on a CPU) and C <= N; every row of the call is then
taken at once, chunk by chunk (no loop over the sets). Other calls keep the one-pass code, bit for
bit; a chunked set's sums differ from the one-pass ones by their rounding.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._vector_pool_solvers import geometry, kappa, unit
from ._vector_pool_starts import equal_chunks, summed
from .pooling.kernels import block_rows
from .pooling.penalties import Penalty
from .pooling.rounding import _NOISE, _SUM_NOISE

# Elements of x's dtype per point and vector component that one chunk's step holds at once (d, n, n·c,
# the gradient's products, and n, n·c in float64: two elements of a float32 x each), and per point
# besides (z, κ, φ'', c, φ and their products).
_PER_COMPONENT, _PER_POINT = 8, 8
# Points per chunk at least, whatever the number of rows (Python's cost per chunk).
_MIN_CHUNK = 1024


def point_chunks(x: torch.Tensor) -> list[slice] | None:
    """The chunks of the points of ``x (R, N, C)`` in which the polish and the derivatives form
    their terms, or None where a row's terms fit the block budget (or C > N: the Woodbury form
    needs the N × N Gram matrix whole). All R rows share each chunk: its points are as many as
    fit the budget over R, at least :data:`_MIN_CHUNK` (and at most the budget's)."""
    R, N, C = x.shape
    fit = block_rows(_PER_COMPONENT * C + _PER_POINT, x, False)  # points per budget
    if N <= fit or C > N:
        return None
    return equal_chunks(N, max(fit // max(R, 1), min(fit, _MIN_CHUNK)))


class Sums(NamedTuple):
    """The polish's sums over the points at u (module docstring), rows first, in x's dtype."""

    s1: torch.Tensor  # Σ κ_i (R,)
    g: torch.Tensor  # Σ κ_i d_i, d_i = u − x_i (R, C)
    H: torch.Tensor  # s1 I + Σ c_i n_i n_iᵀ (R, C, C), accumulated in float64 as _hessian's
    f: torch.Tensor  # Σ φ(z_i) (R,)
    noise: torch.Tensor  # the gradient's rounding noise, as _vector_pool_rare.gradient_noise (R,)
    h: torch.Tensor  # Σ φ''(z_i) (R,)
    zmin: torch.Tensor  # min z_i (R,)
    lo: torch.Tensor  # Σ min(κ_i, φ''(z_i)) (R,): a lower bound on λ_min(H) (Weyl)
    cabs: torch.Tensor  # Σ |c_i| (R,)
    kx: torch.Tensor  # Σ κ_i x_i (R, C)


def gradient_noise_of(norm: torch.Tensor, dz: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The gradient's rounding noise eps (2.5 √N ‖φ'‖₂ + 4 Σ_i |φ''(z_i)| z_i) from ``norm`` = ‖φ'‖₂ and
    ``dz`` = Σ_i |φ''(z_i)| z_i of N = ``n`` points (:func:`~._vector_pool_rare.gradient_noise`'s formula)."""
    return (norm * (_SUM_NOISE * math.sqrt(n)) + _NOISE * dz) * torch.finfo(dtype).eps


def step_sums(pen: Penalty, x: torch.Tensor, u: torch.Tensor, a: torch.Tensor, chunks: list[slice]) -> Sums:
    """:class:`Sums` at ``u (R, C)`` of the sets ``x (R, N, C)`` (``a`` (R, 1) or 0-d), one chunk of
    the points at a time."""
    f64, dt = torch.float64, x.dtype
    acc: list | None = None
    zmin = None
    for ch in chunks:
        xs = x[:, ch]
        d, z = geometry(xs, u)
        k1, d2 = kappa(pen, z, a), pen.d2phi(z, a)
        n, c = unit(d, z), d2 - k1
        part = [k1.sum(-1), (k1.unsqueeze(-2) @ d).squeeze(-2),
                (n * c.unsqueeze(-1)).to(f64).mT @ n.to(f64), pen.phi(z, a).sum(-1), (k1 * z).square().sum(-1),
                torch.linalg.vecdot(d2.abs(), z), d2.sum(-1), torch.minimum(k1, d2).sum(-1), c.abs().sum(-1),
                (k1.unsqueeze(-2) @ xs).squeeze(-2)]
        part = [p.to(f64) for p in part]
        acc = part if acc is None else [s + p for s, p in zip(acc, part)]
        m = z.amin(-1)
        zmin = m if zmin is None else torch.minimum(zmin, m)
    assert acc is not None and zmin is not None
    s1, g, H, f, k2, dz, h, lo, cabs, kx = acc
    H.diagonal(dim1=-2, dim2=-1).add_(s1.unsqueeze(-1))
    noise = gradient_noise_of(k2.sqrt(), dz, x.shape[-2], dt)
    return Sums(s1.to(dt), g.to(dt), H.to(dt), f.to(dt), noise.to(dt), h.to(dt), zmin, lo.to(dt), cabs.to(dt),
                kx.to(dt))


def phi_sums(pen: Penalty, x: torch.Tensor, U: torch.Tensor, a: torch.Tensor, chunks: list[slice]) -> torch.Tensor:
    """(R, T): Σ_i φ(‖U_t − x_i‖) of the points ``U (R, T, C)``, ``a`` (R, 1, 1) or 0-d, a chunk at
    a time (trial points of the polish's escape, the convex start's mean and median)."""
    return summed(lambda ch: (pen.phi(torch.linalg.vector_norm(U.unsqueeze(-2) - x[:, ch].unsqueeze(-3), dim=-1),
                                      a).sum(-1),), chunks)[0]


def hessian_sums(pen: Penalty, x: torch.Tensor, a: torch.Tensor, y: torch.Tensor, chunks: list[slice]):
    """The derivatives' pieces at the solution ``y (R, C)``: ``(s, H, Σ|c_i|, mixed)`` with s = Σκ_i
    (summed in float64, rounded once), H = s I + Σ c_i n_i n_iᵀ (accumulated in float64 as
    :func:`~._vector_pool_solvers._hessian`) and ``mixed`` (R,) whether a term has negative curvature
    (κ_i < 0 or φ''_i < 0), a chunk of the points at a time."""
    f64 = torch.float64

    def part(ch: slice):
        d, z = geometry(x[:, ch], y)
        k1, d2 = kappa(pen, z, a), pen.d2phi(z, a)
        n, c = unit(d, z), d2 - k1
        # (``mixed`` summed as a bool tensor: torch's bool + is a logical or)
        return (k1.sum(-1, dtype=f64), (n * c.unsqueeze(-1)).to(f64).mT @ n.to(f64), c.abs().sum(-1, dtype=f64),
                ((d2 < 0) | (k1 < 0)).any(-1))
    s, H, cabs, mixed = summed(part, chunks)
    H.diagonal(dim1=-2, dim2=-1).add_(s.unsqueeze(-1))
    dt = x.dtype
    return s.to(dt), H.to(dt), cabs.to(dt), mixed


def gradient_parts(pen: Penalty, x: torch.Tensor, a: torch.Tensor, y: torch.Tensor, v: torch.Tensor,
                   chunks: list[slice], need_x: bool, need_a: bool):
    """``(x̄ (R, N, C) or None, ᾱ (R,) or None)``: x̄_i = κ_i v + c_i (n_iᵀ v) n_i and ᾱ = −Σ_i
    ∂_α φ'(z_i) (n_iᵀ v) at the solution ``y (R, C)`` for ``v = H⁻¹ ȳ (R, C)``, written a chunk of
    the points at a time into the one (R, N, C) output."""
    R, N, C = x.shape
    gx = torch.empty(R, N, C, dtype=v.dtype, device=x.device) if need_x else None
    ga = None
    for ch in chunks:
        d, z = geometry(x[:, ch], y)
        n = unit(d, z)
        k1 = kappa(pen, z, a)
        nv = (n @ v.unsqueeze(-1)).squeeze(-1)  # n_iᵀ v, (R, n)
        if gx is not None:
            gx[:, ch] = k1.unsqueeze(-1) * v.unsqueeze(-2) + ((pen.d2phi(z, a) - k1) * nv).unsqueeze(-1) * n
        if need_a:
            part = -(pen.d2phi_dalpha(z, a) * nv).sum(-1)
            ga = part if ga is None else ga + part
    return gx, ga


def irls_sums(pen: Penalty, x: torch.Tensor, u: torch.Tensor, a: torch.Tensor, chunks: list[slice]):
    """``(Σ_i κ_i (R,), Σ_i κ_i x_i (R, C))`` at ``u (R, C)``, summed in float64 a chunk of the points at
    a time: the IRLS point's (the truncated quadratic's polish)."""
    def part(ch: slice) -> tuple[torch.Tensor, torch.Tensor]:
        xs = x[:, ch]
        k1 = kappa(pen, geometry(xs, u)[1], a)
        return k1.sum(-1, dtype=torch.float64), (k1.unsqueeze(-2) @ xs).squeeze(-2).to(torch.float64)

    s1, kx = summed(part, chunks)
    return s1.to(x.dtype), kx.to(x.dtype)
