"""Batched Jordan algebra of the symmetric cones an interior-point method needs.

The cone is :math:`K = \\{0\\}^{z} \\times \\mathbb{R}_+^{l} \\times Q^{q_1} \\times \\dots
\\times Q^{q_k}` with second-order cones :math:`Q^q = \\{(u_0, u_1) \\in \\mathbb{R}
\\times \\mathbb{R}^{q-1} : \\|u_1\\|_2 \\le u_0\\}`, rows in that order (CVXPY's and
Clarabel's). Every function here acts on the *cone part* of a vector, the ``l + Σ q_i``
rows after the zero cone, batched as ``(B, mc)`` or ``(B, mc, k)`` (``k`` columns
transformed at once); the zero cone has no algebra (its slack is identically 0).

Jordan product and identity: :math:`u \\circ v = (u^T v,\\; u_0 v_1 + v_0 u_1)` on each
second-order cone, :math:`u_i v_i` on :math:`\\mathbb{R}_+`; :math:`e = (1, 0)` resp. 1.
The Nesterov–Todd scaling :math:`W` of an interior pair :math:`(s, z)` is the symmetric
positive definite map with :math:`W z = W^{-1} s = \\lambda`; on a second-order cone
:math:`W = \\eta \\bar W` with :math:`\\bar W = [[\\bar w_0, \\bar w_1^T], [\\bar w_1, I +
\\bar w_1 \\bar w_1^T / (1 + \\bar w_0)]]` (Vandenberghe, "The CVXOPT linear and quadratic
cone program solvers", 2010, §4; Goulart & Chen, "Clarabel", 2024).

Second-order cones of different sizes are handled together by segment sums
(``index_add`` over a cone index per row): no Python loop over cones or batch elements.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .tensor_cache import cached

__all__ = ["ConeLayout", "NTScaling", "soc_frame"]


def _t(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Give a per-row (B, r) tensor the trailing column dim of ``like`` if it has one."""
    return v.unsqueeze(-1) if like.dim() == 3 else v


@dataclass
class _Index:
    soc_id: torch.Tensor  # (msoc,) cone number of each second-order-cone row
    heads: torch.Tensor  # (nsoc,) position of each cone's first row within the soc part
    tail: torch.Tensor  # (msoc,) 1.0 on rows that are not a head, else 0.0


@dataclass
class ConeLayout:
    """Sizes of the zero, nonnegative and second-order cones, in row order.

    Args:
        zero: rows of the zero cone (equality constraints).
        nonneg: rows of the nonnegative orthant.
        soc: the size of each second-order cone (each >= 1).
    """

    zero: int
    nonneg: int
    soc: tuple[int, ...] = ()
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.soc = tuple(int(q) for q in self.soc)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = {}  # index tensors are rebuilt on the device that needs them
        return state

    @property
    def m(self) -> int:
        """All rows."""
        return self.zero + self.nonneg + sum(self.soc)

    @property
    def cone_rows(self) -> int:
        """Rows after the zero cone."""
        return self.nonneg + sum(self.soc)

    @property
    def degree(self) -> int:
        """Degree ν of the barrier: one per nonnegative row and per second-order cone."""
        return self.nonneg + len(self.soc)

    def index(self, device: torch.device) -> _Index:
        return cached(self._cache, str(device), lambda: self._build_index(device))

    def _build_index(self, device: torch.device) -> _Index:
        sizes = torch.tensor(self.soc, dtype=torch.long, device="cpu")
        soc_id = torch.repeat_interleave(torch.arange(len(self.soc), device="cpu"), sizes)
        heads = torch.cumsum(sizes, 0) - sizes
        # 0/1 entries, exact in float32, which promotes to the iterates' dtype: a
        # float64 mask made a float32 program with a second-order cone float64.
        tail = torch.ones(int(sizes.sum()), dtype=torch.float32, device="cpu")
        tail[heads] = 0.0
        return _Index(soc_id.to(device), heads.to(device), tail.to(device))

    # ------------------------------------------------------------------ segment helpers
    def _seg(self, v: torch.Tensor) -> torch.Tensor:
        """Sum of the soc-part rows of each cone: (B, msoc[, k]) -> (B, nsoc[, k])."""
        idx = self.index(v.device)
        out = v.new_zeros((v.shape[0], len(self.soc)) + tuple(v.shape[2:]))
        return out.index_add_(1, idx.soc_id, v)

    def _spread(self, v: torch.Tensor) -> torch.Tensor:
        """Per-cone values (B, nsoc[, k]) onto the cone's rows (B, msoc[, k])."""
        return v[:, self.index(v.device).soc_id]

    def _split(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(nonnegative rows, second-order rows) of a cone part; without second-order
        cones ``(u, None)``, no slicing (a dispatched op each, in every iteration)."""
        if not self.soc:
            return u, None
        return u[:, : self.nonneg], u[:, self.nonneg:]

    # ------------------------------------------------------------------ algebra
    def unit(self, like: torch.Tensor) -> torch.Tensor:
        """The identity e of the Jordan algebra, shaped (B, mc) like ``like``."""
        e = like.new_zeros(like.shape[:2])
        e[:, : self.nonneg] = 1.0
        if self.soc:  # (slices, not an index: a scalar put through an index is a host copy)
            e[:, self.nonneg:] = 1.0 - self.index(like.device).tail
        return e

    def add_unit(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """u + c e, ``c`` one value per element ``(B,)``: ``(B, mc) -> (B, mc)``."""
        if not self.soc:  # e = 1: a broadcast, no identity tensor formed
            return u + c[:, None]
        return u + c[:, None] * self.unit(u)

    def dot(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per-element inner product over the cone part: (B, mc) -> (B,)."""
        return (u * v).sum(1)

    def jordan(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Jordan product u ∘ v, (B, mc)."""
        ul, us = self._split(u)
        vl, vs = self._split(v)
        if not self.soc:
            return ul * vl
        idx = self.index(u.device)
        u0, v0 = us[:, idx.heads], vs[:, idx.heads]
        out = self._spread(u0) * vs + self._spread(v0) * us
        out[:, idx.heads] = self._seg(us * vs)
        return torch.cat([ul * vl, out], 1)

    def jordan_solve(self, lam: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Solve λ ∘ x = r for x, with λ in the interior of the cone."""
        ll, ls = self._split(lam)
        rl, rs = self._split(r)
        if not self.soc:
            return rl / ll
        idx = self.index(lam.device)
        l0, r0 = ls[:, idx.heads], rs[:, idx.heads]
        l1r1 = self._seg(ls * rs * idx.tail)
        det = self.jdet(ls)
        x = rs / self._spread(l0) + self._spread((l1r1 / l0 - r0) / det) * ls * idx.tail
        x[:, idx.heads] = (l0 * r0 - l1r1) / det
        return torch.cat([rl / ll, x], 1)

    def jdet(self, us: torch.Tensor) -> torch.Tensor:
        """u_0² − ‖u_1‖² of each cone of a soc part (B, msoc), computed without cancellation."""
        idx = self.index(us.device)
        u0 = us[:, idx.heads]
        n1 = torch.sqrt(self._seg(us * us * idx.tail))
        return (u0 - n1) * (u0 + n1)

    def min_eig(self, u: torch.Tensor) -> torch.Tensor:
        """Smallest eigenvalue over the cone part, per element: (B, mc) -> (B,)."""
        ul, us = self._split(u)
        parts = [ul]
        if self.soc:
            idx = self.index(u.device)
            parts.append(us[:, idx.heads] - torch.sqrt(self._seg(us * us * idx.tail)))
        vals = torch.cat(parts, 1)
        if vals.shape[1] == 0:
            return u.new_full((u.shape[0],), math.inf)
        return vals.amin(1)

    def violation(self, u: torch.Tensor, scale: torch.Tensor | None = None, unit: float = 1.0) -> torch.Tensor:
        """Largest Euclidean distance of a cone block of u to the cone, per element;
        with ``scale`` (one value per row of u): each block's distance over ``unit +`` its
        rows' largest scale."""
        ul, us = self._split(u)
        parts = [torch.clamp(-ul, min=0.0)]
        if scale is not None:
            sl, ss = self._split(scale)
            parts[0] = parts[0] / (unit + sl)
        if self.soc:
            idx = self.index(u.device)
            u0 = us[:, idx.heads]
            n1 = torch.sqrt(self._seg(us * us * idx.tail))
            dist = torch.where(n1 <= -u0, torch.sqrt(u0 * u0 + n1 * n1),
                               torch.clamp(n1 - u0, min=0.0) / math.sqrt(2.0))
            if scale is not None:
                block = torch.zeros_like(dist).scatter_reduce_(1, idx.soc_id.expand_as(ss), ss, "amax")
                dist = dist / (unit + block)
            parts.append(dist)
        vals = torch.cat(parts, 1)
        return vals.amax(1) if vals.shape[1] else u.new_zeros(u.shape[0])

    def lift(self, u: torch.Tensor, delta: float) -> torch.Tensor:
        """u moved along e until its smallest eigenvalue is at least δ (1 + ‖u‖∞)."""
        if u.shape[1] == 0:  # no cone rows (an unconstrained or equality-only problem)
            return u
        return self.add_unit(u, torch.clamp(delta * (1 + u.abs().amax(1)) - self.min_eig(u), min=0.0))

    def shift_inside(self, u: torch.Tensor, level: float = 1.0) -> torch.Tensor:
        """u + (level − λ_min(u)) e where λ_min(u) < level, which lands in the interior."""
        lam = self.min_eig(u)
        return self.add_unit(u, torch.clamp(level - lam, min=0.0))

    def max_step(self, u: torch.Tensor, d: torch.Tensor, extra: tuple = ()) -> torch.Tensor:
        """Largest α >= 0 with u + α d in the cone (u interior); inf when unbounded. (B,).

        ``extra``: further ``(u, d)`` pairs of nonnegative ``(B, k)`` blocks (e.g. the
        dual iterate, τ and κ) whose ratio tests are done in the same pass.
        """
        ul, us = self._split(u)
        dl, ds = self._split(d)
        if extra:
            ul = torch.cat([ul] + [e[0] for e in extra], 1)
            dl = torch.cat([dl] + [e[1] for e in extra], 1)
        # u > 0: the ratio u / (−d) where d < 0; huge (≈ inf) where d >= 0 (no torch.where:
        # it is several times slower than arithmetic on CPU for these sizes).
        # (the dtype's smallest normal: 1e-300 is 0 in float32, and a +0.0 entry of d
        # became -0.0, a step of -inf that froze the element)
        alpha = ul / torch.clamp(-dl, min=torch.finfo(dl.dtype).tiny)
        alpha = alpha.amin(1) if alpha.shape[1] else u.new_full((u.shape[0],), math.inf)
        if self.soc:
            alpha = torch.minimum(alpha, self.soc_max_step(us, ds))
        return alpha

    def soc_max_step(self, us: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
        """:meth:`max_step` of the second-order part ``(B, msoc)`` alone."""
        idx = self.index(us.device)
        J = 1.0 - 2.0 * idx.tail  # +1 on heads, -1 on tails
        a = self._seg(ds * ds * J)
        b = self._seg(us * ds * J)
        c = torch.clamp(self.jdet(us), min=0.0)
        disc = b * b - a * c
        sq = torch.sqrt(torch.clamp(disc, min=0.0))
        # Smallest positive root of a α² + 2 b α + c, written without cancellation.
        root_neg_b = c / torch.where(-b + sq > 0, -b + sq, 1.0)
        root_pos_b = (-b - sq) / torch.where(a < 0, a, -1.0)
        alpha = torch.where(b < 0, root_neg_b, root_pos_b)
        free = ((a >= 0) & (b >= 0)) | (disc < 0)
        return torch.where(free, math.inf, alpha).amin(1)


def soc_frame(layout: ConeLayout, s: torch.Tensor, z: torch.Tensor):
    """Jordan-frame coefficients of each second-order cone's pair (soc parts ``(B, msoc)``):
    ``s = a1 c1 + a2 c2 (+ tangent)``, ``z = b1 c1 + b2 c2`` (+ the same tangent), ``c_{1,2} = (1, ±u)/2`` with
    ``u = (s1 − z1)/‖s1 − z1‖`` (the frame a complementary pair shares). Returns
    ``(a1, a2, b1, b2)`` ``(B, nsoc)`` and ``u`` ``(B, msoc)`` (0 on the heads)."""
    idx = layout.index(s.device)
    dv = (s - z) * idx.tail
    nd = torch.sqrt(layout._seg(dv * dv))
    u = dv / layout._spread(torch.where(nd > 0, nd, 1.0))
    su, zu = layout._seg(s * u), layout._seg(z * u)
    s0, z0 = s[:, idx.heads], z[:, idx.heads]
    return s0 + su, s0 - su, z0 + zu, z0 - zu, u


class NTScaling:
    """Nesterov–Todd scaling W of interior (s, z) on the cone part, and λ = W z.

    (The implicit derivative's scaling at the limit is :class:`~.limit_scaling.LimitScaling`.)

    Shape:
        s, z: ``(B, mc)``; :meth:`apply` and :meth:`apply_inv` take ``(B, mc)`` or
        ``(B, mc, k)``.
    """

    def __init__(self, layout: ConeLayout, s: torch.Tensor, z: torch.Tensor) -> None:
        self.layout = layout
        sl, ss = layout._split(s)
        zl, zs = layout._split(z)
        self.w = torch.sqrt(sl / zl)
        if layout.soc:
            idx = layout.index(s.device)
            s_norm = torch.sqrt(torch.clamp(layout.jdet(ss), min=0.0))
            z_norm = torch.sqrt(torch.clamp(layout.jdet(zs), min=0.0))
            sb = ss / layout._spread(s_norm)
            zb = zs / layout._spread(z_norm)
            gamma = torch.sqrt(torch.clamp((1.0 + layout._seg(sb * zb)) / 2.0, min=0.0))
            J = 1.0 - 2.0 * idx.tail
            wbar = (sb + J * zb) / layout._spread(2.0 * gamma)
            # w̄ᵀJw̄ = 1 in exact arithmetic; enforce it through w̄_0 = (1 + ‖w̄_1‖²)^½ so that
            # W̄⁻¹ = J W̄ J holds to rounding even when w̄_0 is large (iterates near ∂K).
            w0 = torch.sqrt(1.0 + layout._seg(wbar * wbar * idx.tail))
            wbar[:, idx.heads] = w0
            self.wbar = wbar
            self.eta = torch.sqrt(s_norm / z_norm)
        self.lam = self.apply(z)

    def _wbar(self, v: torch.Tensor, sign: float) -> torch.Tensor:
        """W̄ v (sign=+1) or J W̄ J v (sign=-1, = W̄⁻¹ v) on the soc part."""
        lay = self.layout
        idx = lay.index(v.device)
        w = _t(self.wbar, v)
        tail = _t(idx.tail, v)
        w0 = self.wbar[:, idx.heads]
        v0 = v[:, idx.heads]
        zeta = lay._seg(w * v * tail)  # w̄_1ᵀ v_1
        coef = sign * v0 + zeta / _t(1.0 + w0, v)
        out = v + lay._spread(coef) * w * tail
        out[:, idx.heads] = _t(w0, v) * v0 + sign * zeta
        return out

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """W v."""
        if not self.layout.soc:
            return _t(self.w, v) * v
        vl, vs = self.layout._split(v)
        soc = _t(self.layout._spread(self.eta), v) * self._wbar(vs, 1.0)
        return torch.cat([_t(self.w, v) * vl, soc], 1) if self.layout.nonneg else soc

    def apply_inv(self, v: torch.Tensor) -> torch.Tensor:
        """W⁻¹ v."""
        if not self.layout.soc:
            return v / _t(self.w, v)
        vl, vs = self.layout._split(v)
        soc = self._wbar(vs, -1.0) / _t(self.layout._spread(self.eta), v)
        return torch.cat([vl / _t(self.w, v), soc], 1) if self.layout.nonneg else soc

