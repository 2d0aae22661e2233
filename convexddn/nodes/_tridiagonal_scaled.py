r"""Scale-proof pieces of the tridiagonal solver (:mod:`._tridiagonal_solver`): the componentwise
backward error in exponent-split form and the equilibrated, pivoted solve.

Same layout as there: main diagonal ``b`` ``(M, N)``, sub-diagonal ``a`` ``(M, N-1)`` holding
:math:`A_{i+1,i}`, super-diagonal ``c`` ``(M, N-1)`` holding :math:`A_{i,i+1}`, ``d`` and ``x``
``(M, N, K)``.

Why: a graded system :math:`RAS` (row and column scalings spanning :math:`2^{\pm 500}`, every
entry a normal float64) has terms :math:`a_{ij} x_j` and a check scale
:math:`16\varepsilon(|A||x| + |d|)` far outside the dtype's range even where every entry and
the solution are inside it. Powers of two are exact, so both the check (:func:`omega`) and the
solve (:func:`solve_scaled`) are carried out on exactly rescaled quantities: nothing underflows
that matters, nothing overflows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ACCEPT_PIVOTED", "condition", "equilibrate", "growth", "multiply", "omega", "product_sum",
           "refine_pivoted", "row_max", "scaled_residual", "snap_zeros", "solve_pivoted", "solve_scaled", "split_form",
           "split_sum_to", "unscale"]

_LOW = -(1 << 20)  # the exponent given to a zero: below the sum of any two real exponents
ACCEPT_PIVOTED = 64.0  # a pivoted answer's ω is accepted up to this many ulps (and snap_zeros' threshold)


def multiply(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``A x`` (``(M, N, K)``), out of place: under torch.func.jacfwd a tangent (``b``, ``a`` or
    ``c``) may be batched where ``x`` is not, and an in-place sum into the unbatched term failed."""
    out = b.unsqueeze(-1) * x
    if b.shape[-1] > 1:
        out = out + F.pad(a.unsqueeze(-1) * x[:, :-1], (0, 0, 1, 0))
        out = out + F.pad(c.unsqueeze(-1) * x[:, 1:], (0, 0, 0, 1))
    return out


def product_sum(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(mant, exp)``, each ``(M, L)``, with :math:`\sum_k u_{lk} v_{lk} = \text{mant} \cdot
    2^{\text{exp}}` for ``u``, ``v`` ``(M, L, K)``: every product formed as the product of the
    ``frexp`` mantissas and the sum of the exponents, the terms of a sum scaled by the power of two
    of its largest one (exact; a term below it by more than the dtype's range is negligible), so
    that no product overflows and a sum whose terms cancel comes out right (two columns
    :math:`\pm 10^{200}` whose products overflowed float64 and summed to NaN: 0). ``exp`` int64."""
    if not u.shape[-1] or not u.numel():
        return u.new_zeros(u.shape[:-1]), torch.zeros(u.shape[:-1], dtype=torch.long, device=u.device)
    mu, eu = _split(u)
    mv, ev = _split(v)
    e = eu.long() + ev.long()
    top = e.amax(-1)
    top = top.masked_fill(top < _LOW // 2, 0)  # (every term zero)
    return torch.ldexp(mu * mv, (e - top.unsqueeze(-1)).clamp_min(_LOW // 2).to(u.dtype)).sum(-1), top


def split_form(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mant, exp)`` with ``t = mant · 2^exp`` (``frexp``; ``exp`` int64, very negative for a zero)."""
    m, e = _split(t)
    return m, e.long()


def split_sum_to(mant: torch.Tensor, exp: torch.Tensor, shape: tuple) -> torch.Tensor:
    """``mant · 2^exp`` (``exp`` int64, both of a broadcast shape) summed to ``shape`` (as
    ``sum_to_size``), the terms of each sum scaled by the power of two of the largest one first:
    ±Inf only where the sum itself is beyond the dtype's range."""
    if not mant.numel():
        return mant.new_zeros(shape)
    lead = mant.ndim - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and mant.shape[lead + i] != 1]
    top = exp.amax(dims, keepdim=True) if dims else exp
    scaled = torch.ldexp(mant, (exp - top).clamp_min(_LOW // 2).to(mant.dtype))
    return _pow2(scaled.sum_to_size(shape), top.reshape(shape))


def scaled_residual(dd: torch.Tensor, db: torch.Tensor, da: torch.Tensor, dc: torch.Tensor, x: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(r, s)`` with :math:`\dot d - \dot A x = r \cdot 2^{s}`, ``s`` ``(M, 1, K)`` int64: ``x``
    scaled per column and :math:`\dot A` per element by powers of two before the products (exact),
    ``r``'s columns at most 2 in size: no product overflows (a true residual within range came
    back ±Inf or NaN where :math:`\dot A x` overflowed)."""
    ex = _exponent(x.abs().amax(1, keepdim=True))  # (M, 1, K)
    ea = _exponent(row_max(db, da, dc).amax(1)).view(-1, 1, 1)  # (M, 1, 1)
    s = torch.maximum(ex + ea + 2, _exponent(dd.abs().amax(1, keepdim=True)))  # (|three products| < 4)
    s = s.masked_fill(s < _LOW // 2, 0)
    e2 = ea.view(-1, 1)
    prod = multiply(_pow2(db, -e2), _pow2(da, -e2), _pow2(dc, -e2), _pow2(x, -ex))
    return _pow2(dd, -s) - _pow2(prod, ex + ea - s), s


def row_max(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``(M, N)``: each row's largest absolute entry (a maximum: no sum to overflow)."""
    s = b.abs()
    if b.shape[-1] > 1:
        s[:, 1:] = torch.maximum(s[:, 1:], a.abs())
        s[:, :-1] = torch.maximum(s[:, :-1], c.abs())
    return s


def _split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t = m · 2^e`` (``frexp``: ``|m|`` in [1/2, 1), exact also for subnormals), with ``e`` =
    :data:`_LOW` for a zero (so that it never sets a maximum exponent)."""
    m, e = torch.frexp(t)
    return m, e.masked_fill(t == 0, _LOW)


def _exponent(t: torch.Tensor) -> torch.Tensor:
    """The exponents of :func:`split_form` (int64: sums of them stay exact)."""
    return split_form(t)[1]


def omega(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, d: torch.Tensor, x: torch.Tensor
          ) -> torch.Tensor:
    r"""``(M,)`` the componentwise backward error (Oettli–Prager) of ``x``, whatever the scale:

    .. math::

        \omega = \max_{i,k} \frac{|d - A x|_{ik}}{(|A|\,\max(|x|, t) + |d|)_{ik}}

    with :math:`t` the dtype's smallest normal number: an entry of ``x`` below it carries an
    absolute rounding of one subnormal ulp (:math:`\varepsilon t`), which that floor allows for
    (a correctly rounded answer whose entries underflow passes). Every product
    :math:`a_{ij} x_{jk}` is formed as the product of the two ``frexp`` mantissas and the sum
    of the exponents; each ``(i, k)``'s terms are then scaled by the power of two of their
    largest one (exact): neither the residual nor the scale can under- or overflow (the plain
    check's 16ε·scale rounded to zero for subnormal systems and overflowed near 1e308). NaN where
    ``x`` is not finite. About four times the plain check's cost: used where that one cannot be
    trusted and on the pivoted answers."""
    m, n, k = x.shape
    if not n * k:
        return x.new_zeros(m)
    tiny = torch.finfo(x.dtype).tiny
    floor = x.abs().clamp_min(tiny)
    # Row i's three terms: (a_{i-1} x_{i-1}, b_i x_i, c_i x_{i+1}), zeros padded at the ends.
    coefs = (F.pad(a, (1, 0)), b, F.pad(c, (0, 1)))
    shifts = ((lambda t: F.pad(t[:, :-1], (0, 0, 1, 0))), (lambda t: t), (lambda t: F.pad(t[:, 1:], (0, 0, 0, 1))))
    md, ed = _split(d)
    res, size = [], []
    for coef, shift in zip(coefs, shifts):
        mc, ec = _split(coef.unsqueeze(-1))
        mx, ex = _split(shift(x))
        mf, ef = torch.frexp(shift(floor))  # (the padded zeros: their coefficient is 0)
        res.append((mc * mx, ec + ex))
        size.append((mc.abs() * mf, ec + ef))  # (ef >= ex: these set the largest exponent)
    top = torch.stack([ed] + [e for _, e in size]).amax(0)

    def scaled(mant, exp):  # mant · 2^(exp - top), exp <= top: no overflow; what underflows is negligible
        return torch.ldexp(mant, (exp - top).to(mant.dtype))

    dd = scaled(md, ed)
    r, s = dd, dd.abs()
    for (mr, er), (ms, es) in zip(res, size):
        r = r - scaled(mr, er)
        s = s + scaled(ms, es)
    w = torch.where(r == 0, 0.0, r.abs() / s)  # (s >= 1/4 wherever any term is nonzero)
    worst = w.flatten(1).amax(1)
    return worst.masked_fill(~torch.isfinite(x).flatten(1).all(1), math.nan)


def _pow2(t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``t · 2^k`` for an integer tensor ``k`` broadcasting with ``t``, exact where the result is
    normal: in steps of at most :math:`2^{\\pm(e_{max}-2)}` (``2^k`` alone over- or underflows for
    the exponents of a subnormal system), a fixed number of them (no host read: torch.func)."""
    top = int(math.log2(torch.finfo(t.dtype).max)) - 1  # (1023 for float64, 126 for float32)
    for _ in range(5):  # |k| <= 5 top: the row and column scalings together, with room
        step = k.clamp(-top, top)
        t, k = torch.ldexp(t, step.to(t.dtype)), k - step
    return t


def solve_pivoted(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, d: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Gaussian elimination with partial pivoting on the band (LAPACK ``gtsv``'s algorithm),
    vectorised over the ``M`` elements, a loop over the rows: ``(x, ratio, factors)``, ``ratio``
    ``(M,)`` the smallest over the pivots of :math:`|u_{ii}|` over the larger of the two terms
    whose difference formed it (1 for a pivot that is an entry of ``A``): the cancellation. A
    ratio at most a few ε says a pivot is rounding error (``A`` within that distance of a
    singular matrix, entrywise); 0, an exactly zero pivot. (Scaling a column by a power of two
    changes neither the pivot choices nor these ratios.) ``factors``: the interchanges,
    multipliers and ``U``, for more right-hand sides (:func:`refine_pivoted`).

    Each step works on two whole rows, ``(M, 4 + K)``: their entries in columns i, i+1, i+2, a
    zero column and the rhs; the pivot row is picked by one ``where`` per row, the other one
    eliminated by one multiply-subtract, the result moved one column left by one ``index_select``
    (14 torch calls a row, back substitution and indexing included, where the entry-by-entry loop
    made 66: one thread, a loaded 2-core machine, (1, 20000) float64 3.5 s ->
    1.0 s, (64, 1024) 116 -> 40 ms; the pivots, choices and ratios unchanged, bit for bit).
    Refinements reuse the ``factors`` (:func:`refine_pivoted`: 7 calls a row)."""
    m, n = b.shape
    k = d.shape[-1]
    # Row j of A: its entries in columns j-1, j, j+1, a zero column (kept zero by the updates:
    # the source of the fill-in's zero where no interchange happens), its rhs. (Out of place: under
    # torch.func.jacfwd d may be batched where b is not.)
    cols = (F.pad(a.T, (0, 0, 1, 0)), b.T, F.pad(c.T, (0, 0, 0, 1)), torch.zeros_like(b.T))
    rows = torch.cat([t.unsqueeze(-1) for t in cols] + [d.transpose(0, 1)], -1)
    # A row left below the pivot is updated in columns i+1.. : moved one column left for the next step.
    left = torch.tensor([1, 2, 3, 3, *range(4, 4 + k)], device=b.device)
    cur, below, size = rows[0].index_select(1, left), rows.unbind(0)[1:], a.abs().T.unsqueeze(-1).unbind(0)
    tops, bots, mults, swaps = [], [], [], []
    for i in range(n - 1):
        swap = cur[:, :1].abs() < size[i]  # (M, 1): the sub-diagonal entry is the larger pivot
        top, bot = torch.where(swap, below[i], cur), torch.where(swap, cur, below[i])
        f = bot[:, :1] / top[:, :1]  # (0/0 for a zero pivot: NaN after it, ratio 0)
        tops.append(top), bots.append(bot), mults.append(f), swaps.append(swap)
        # (not addcmul: fused, it rounded a pivot differently from the difference of the two terms)
        cur = (bot - f * top).index_select(1, left)
    tops.append(cur)
    u = torch.stack(tops)  # (N, M, 4 + K): row i of U in columns i, i+1, i+2, and of (L^-1 P d)
    # The pivot of row i is u[i, :, 0]: an entry of A where row i swapped (ratio 1), else the
    # difference bot - f top of step i - 1 (the entry itself for i = 0), whose ratio
    # |u_ii| / max(|bot|, |f top|) (a maximum, not a sum: entries near the dtype's largest do not
    # overflow it) says how much of it cancelled; 0 for a zero pivot (after which all is NaN).
    u0, formed, swapped = u[..., 0], torch.ones_like(u[..., 0]), torch.zeros_like(u[..., 0], dtype=torch.bool)
    if n > 1:
        f, bot = torch.stack(mults)[..., 0], torch.stack(bots)[..., 1]
        ft = f * u[:-1, :, 1]
        formed[1:] = torch.where(ft == 0, 1.0, u0[1:].abs() / torch.maximum(bot.abs(), ft.abs()))
        swapped[:-1] = torch.stack(swaps)[..., 0]
    ratio = torch.where(swapped, 1.0, torch.where(u0 == 0, 0.0, formed)).amin(0)
    ratio = ratio.masked_fill((u0 == 0).any(0), 0.0)
    factors = (swapped[:-1, :, None], f[..., None] if n > 1 else u0[:0, :, None], u[..., :3])
    return _back(u[..., :3], u[..., 4:]), ratio, factors


def _back(u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x`` ``(M, N, K)`` from ``U x = y``: ``u`` ``(N, M, 3)`` the rows of ``U`` in columns i,
    i+1, i+2 (the last two rows' missing entries 0), ``y`` ``(N, M, K)``."""
    n = u.shape[0]
    u0, u1, u2, y = u[..., :1].unbind(0), u[..., 1:2].unbind(0), u[..., 2:].unbind(0), y.unbind(0)
    x1 = y[n - 1] / u0[n - 1]
    x2, out = torch.zeros_like(x1), [x1]
    for i in range(n - 2, -1, -1):
        x1, x2 = torch.addcmul(torch.addcmul(y[i], u1[i], x1, value=-1), u2[i], x2, value=-1).div_(u0[i]), x1
        out.append(x1)
    return torch.stack(out[::-1], 1)


def _solve_factored(factors: tuple[torch.Tensor, ...], d: torch.Tensor) -> torch.Tensor:
    """``A⁻¹ d`` (``(M, N, K)``) with the ``factors`` of :func:`solve_pivoted`: the same
    interchanges and multipliers applied to ``d`` (3 operations a row), then :func:`_back`."""
    swapped, mults, u = factors
    rows = d.transpose(0, 1).unbind(0)
    cur, ys = rows[0], []
    for i, (swap, f) in enumerate(zip(swapped.unbind(0), mults.unbind(0))):
        top, bot = torch.where(swap, rows[i + 1], cur), torch.where(swap, cur, rows[i + 1])
        ys.append(top)
        cur = bot - f * top
    ys.append(cur)
    return _back(u, torch.stack(ys))


def equilibrate(b, a, c, d, headroom: torch.Tensor | None = None
                ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    r"""The equilibrated system of :func:`solve_scaled`, :math:`(\tilde A, \tilde d)` as
    ``(bs, as, cs, ds)``, the exponents ``shift`` (``(M, N, K)``) that bring its solution back
    (:math:`x = \tilde y \cdot 2^{\text{shift}}`, :func:`unscale`), and ``lost`` ``(M,)``: whether
    :math:`\tilde d` lost bits of ``d`` (entries rounded or flushed below the normal range).

    Each rhs column of :math:`R d` is scaled by :math:`2^{-s}`. By default :math:`s` brings its
    largest entry to at least 1/2 and at most :math:`2^{e_{max}/2}` (headroom for the growth of
    the solution: lowering every column to [1/2, 1) flushed a solution entry 2^-1200 below the
    column's largest to 0, x = (2^600, 2^-600) for a permutation matrix). With ``headroom``
    (``(M, 1, K)`` integers, :func:`growth` measured on the default's solve) the columns are
    lowered only as far as their smallest nonzero entry stays normal, and at least as far as
    leaves :math:`2^{\text{headroom}}` below the largest finite number: exact where the range
    allows it (``d = (1e-300, 1.7e308)`` for a permutation matrix: the default's 2^-511 flushed
    1e-300 to 0 and the check failed, a SolverError blaming the conditioning)."""
    e = torch.frexp(row_max(b, a, c))[1].long()  # (M, N): rows' largest entries in [2^(e-1), 2^e); 0: zero row
    eb, ea, ec = _exponent(b) - e, _exponent(a) - e[:, 1:], _exponent(c) - e[:, :-1]
    g = eb.clone()  # column j holds b_j (row j), a_j (row j+1), c_{j-1} (row j-1)
    if b.shape[1] > 1:
        g[:, :-1] = torch.maximum(g[:, :-1], ea)
        g[:, 1:] = torch.maximum(g[:, 1:], ec)
    g = g.masked_fill(g < _LOW // 2, 0)  # (a zero column: A is singular, any scale)
    bs, as_, cs = _pow2(b, -e - g), _pow2(a, -e[:, 1:] - g[:, :-1]), _pow2(c, -e[:, :-1] - g[:, 1:])
    ed = _exponent(d) - e.unsqueeze(-1)  # exponents of R d's entries
    f = ed.amax(1, keepdim=True)  # (M, 1, K)
    empty = f < _LOW // 2  # (a zero column: y = 0)
    info = torch.finfo(d.dtype)
    emax, emin = math.frexp(info.max)[1], math.frexp(info.tiny)[1]  # frexp's exponents: 1024, -1021 (float64)
    s = f - f.clamp(0, emax // 2)
    if headroom is not None:
        lo = ed.masked_fill(ed < _LOW // 2, -_LOW).amin(1, keepdim=True)  # the smallest nonzero entry's
        s = (lo - emin).minimum(s).maximum(f - emax + headroom.clamp(0, emax // 2))  # (lo - s >= emin if it can)
    s = s.masked_fill(empty, 0)
    ds = _pow2(d, -e.unsqueeze(-1) - s)
    # (any twice, not flatten(1): autograd's vmap of batched cotangents has no rule for flatten)
    lost = (_pow2(ds, e.unsqueeze(-1) + s) != d).any(-1).any(-1)
    return (bs, as_, cs, ds), s - g.unsqueeze(-1), lost


def growth(ds: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(M, 1, K)``: by how many powers of two each column's largest entry grew from the
    equilibrated rhs ``ds`` to the solution ``y`` (at least 0; half the exponent range where
    ``y`` is not finite), the headroom a lossless shift must leave (:func:`equilibrate`)."""
    top = math.frexp(torch.finfo(y.dtype).max)[1]
    gain = _exponent(y.abs().amax(1, keepdim=True)) - _exponent(ds.abs().amax(1, keepdim=True))
    finite = torch.isfinite(y).all(1, keepdim=True)
    return torch.where(finite, gain.clamp(0, top // 2), top // 2)


def condition(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, solve) -> torch.Tensor:
    r"""``(M,)`` an estimate (from below, usually within a factor 3: Higham 1988) of
    :math:`\kappa_1(\tilde A) = \|\tilde A\|_1 \|\tilde A^{-1}\|_1` for
    :math:`\tilde A = R A C` equilibrated (``R``: each row by its largest entry; ``C``: then each
    column by its largest scaled entry; scale-free: scalings of the rows and columns of ``A``
    leave it unchanged), by Hager's method with Higham's extra probe (as LAPACK ``gtcon``), one
    iteration: :math:`y = \tilde A^{-1} e/N`, :math:`z = \tilde A^{-\top} \mathrm{sign}(y)`,
    :math:`j = \arg\max_j |z_j|`, :math:`\|\tilde A^{-1}\|_1 \gtrsim \max(\|y\|_1,
    \|\tilde A^{-1} e_j\|_1, \tfrac{2}{3N} \|\tilde A^{-1} p\|_1)`, :math:`p_i = (-1)^i (1 + i/(N-1))`.
    ``solve(b, a, c, d)`` solves with :math:`\tilde A` (``d`` ``(M, N, K)``; :math:`\tilde A^\top`:
    ``a`` and ``c`` swapped), three calls; NaN or Inf where it breaks down (a zero row or column
    included). The scalings are plain divisions, not :func:`equilibrate`'s powers of two (8 ms of
    its 24 at (1, 20000)): for float32 data in float64 (the wide route), whose ratios of entries
    (at most 2^277) stay far inside the range. (Hager, *ACM TOMS* 1984; Higham, *ACM TOMS* 1988.)"""
    m, n = b.shape
    r = 1.0 / row_max(b, a, c)
    bs, as_, cs = b * r, a * r[:, 1:], c * r[:, :-1]
    col = bs.abs()  # column j: b_j, a_j (row j+1), c_{j-1} (row j-1)
    if n > 1:
        col[:, :-1] = torch.maximum(col[:, :-1], as_.abs())
        col[:, 1:] = torch.maximum(col[:, 1:], cs.abs())
    s = 1.0 / col
    bs, as_, cs = bs * s, as_ * s[:, :-1], cs * s[:, 1:]
    i = torch.arange(n, dtype=b.dtype, device=b.device)
    probes = torch.stack([torch.full_like(i, 1.0 / n), (1 - 2 * (i % 2)) * (1 + i / max(n - 1, 1))], -1)
    y = solve(bs, as_, cs, probes.expand(m, n, 2))
    z = solve(bs, cs, as_, torch.where(y[..., :1] >= 0, 1.0, -1.0))  # (Ãᵀ: lower and upper swapped)
    unit = torch.zeros_like(z).scatter_(1, z.abs().argmax(1, keepdim=True), 1.0)
    inverse = torch.stack([y[..., 0].abs().sum(1), solve(bs, as_, cs, unit).abs().sum((1, 2)),
                           y[..., 1].abs().sum(1) * (2 / (3 * n))]).amax(0)
    norm = bs.abs()
    if n > 1:
        norm = norm + F.pad(as_.abs(), (0, 1)) + F.pad(cs.abs(), (1, 0))
    return norm.amax(1) * inverse


def unscale(y: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The solution of the system of :func:`equilibrate` brought back: ``y · 2^shift``."""
    return _pow2(y, shift)


def refine_pivoted(system: tuple[torch.Tensor, ...], factors: tuple[torch.Tensor, ...], y: torch.Tensor,
                   where: torch.Tensor) -> torch.Tensor:
    """One step of refinement with the same pivoting (``factors``: :func:`solve_pivoted`'s,
    reused) on the equilibrated ``system``, taken by the elements ``where`` (``(M,)`` bool)."""
    bs, as_, cs, ds = system
    y_new = y + _solve_factored(factors, ds - multiply(bs, as_, cs, y))
    return torch.where(where.view(-1, 1, 1), y_new, y)


def snap_zeros(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(M, N, K)`` with the entries at most :data:`ACCEPT_PIVOTED` ε of their column's largest set to 0.

    Partial pivoting is backward stable normwise, not componentwise: where the structure forces
    a 0 in the exact answer (a decoupled row ``4 x₀ = 0`` interchanged with a larger sub-diagonal
    entry; a zero diagonal, ``c₀ x₁ = 0``), the pivoted answer carries rounding there (1.8e-15;
    2e-31 refined), that row's componentwise backward error is 1 whatever the rest, and a system
    of condition number 71 raised "too ill-conditioned" (its transpose's derivative warned
    "inaccurate"). The checked route keeps the snapped answer only where it passes the same
    componentwise check (:mod:`._tridiagonal_solver`), so nothing it lets through misses it: a
    graded answer's small entries that are not 0 fail their own rows there."""
    top = x.abs().amax(1, keepdim=True)
    return x.masked_fill(x.abs() <= ACCEPT_PIVOTED * torch.finfo(x.dtype).eps * top, 0.0)


def solve_scaled(b, a, c, d, steps: torch.Tensor | int = 0, lossless: torch.Tensor | None = None,
                 snapped: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The slow path (:mod:`._tridiagonal_solver`, step 3): ``(x, ratio)``. The system is
    equilibrated by powers of two (:func:`equilibrate`), :math:`\tilde A = R A C` (``R``: each
    row by its largest entry's; ``C``: then each column by its largest scaled entry's, so that
    every row and every column of :math:`\tilde A` has its largest entry in [1/2, 1)) and
    :math:`\tilde d = R d\,2^{-f}` (``f``: each rhs column's largest brought to at least 1/2
    and at most :math:`2^{e_{max}/2}` if outside), all exponents found in integer arithmetic and
    each entry shifted once (exact: an entry tiny against its row's largest is not rounded away
    before the column scaling brings it back). Then :math:`x = C \tilde y\, 2^f` with
    :math:`\tilde A \tilde y = \tilde d` solved by :func:`solve_pivoted` (``ratio`` its),
    then ``steps`` (``(M,)`` or an int) steps of refinement with the same pivoting
    (:func:`refine_pivoted`). ``lossless`` (``(M,)`` bool): those elements solved again with
    :func:`equilibrate`'s lossless shift, its headroom the :func:`growth` of the first solve;
    ``snapped`` (``(M,)`` bool): those elements' answers through :func:`snap_zeros`.
    Rows alone left a column graded by 2^±500 in :math:`\tilde y`: its small entries underflowed."""
    system, shift, _ = equilibrate(b, a, c, d)
    if lossless is not None and bool(lossless.any()):  # (a plain tensor: the route)
        again, shift_l, _ = equilibrate(b, a, c, d, growth(system[3], solve_pivoted(*system)[0]))
        pick = lossless.view(-1, 1, 1)
        system = tuple(torch.where(pick.view(-1, *[1] * (t.ndim - 1)), u, t) for t, u in zip(system, again))
        shift = torch.where(pick, shift_l, shift)
    y, ratio, factors = solve_pivoted(*system)
    if not torch.is_tensor(steps):
        steps = torch.full((b.shape[0],), steps, device=b.device)
    for k in range(int(steps.max()) if steps.numel() else 0):  # (a plain tensor: the route)
        y = refine_pivoted(system, factors, y, steps > k)
    x = unscale(y, shift)
    if snapped is not None:
        x = torch.where(snapped.view(-1, 1, 1), snap_zeros(x), x)
    return x, ratio
