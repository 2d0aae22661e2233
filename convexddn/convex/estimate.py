"""The a-posteriori error estimate of a solution: one Newton step at its limit scaling.

The residual does not bound the error of an ill-conditioned element (measured on the
OptNet QP: residual 1e-11, solution error 1e-5). One more Newton step with the KKT
matrix at the solution, its complementarity linearised at the limit
(:class:`~.limit_scaling.LimitScaling`), estimates the error; the same factorisation is
what the implicit backward needs, so it is kept for it (:func:`~.certify.finish`).
"""
from __future__ import annotations

import torch

from .kkt import bmv, row_inf
from .limit_scaling import LimitScaling
from .nullspace import NEARLY_DEPENDENT
from .symmetric_cones import ConeLayout, soc_frame

__all__ = ["error_estimate", "limit_scaling_at", "limit_step", "limit_system", "nearly_dependent_rows"]

# Polished points lie on ∂K (to rounding); the linearisation needs an interior one.
# Moving s, z in by δ e keeps them aligned and changes H only in directions where it is
# ~1/δ or ~δ, i.e. already at its limit ∞ or 0 (gradients 1e-10 accurate at 1e-12). In
# float32 a δ of 1e-12 left S's Cholesky failing at every solution with an active row
# (no element of the n = 50 QP certified); at 1e-5 they all are, the error estimates
# are ~4e-5 and the gradients ~2e-3 off float64's (1e-6: 5e-2 off; 1e-4: 1e-2).
_POLISHED_SHIFT = {torch.float64: 1e-12, torch.float32: 1e-5}


def _shift(like: torch.Tensor) -> float:
    return _POLISHED_SHIFT.get(like.dtype, _POLISHED_SHIFT[torch.float32])


def limit_scaling_at(layout: ConeLayout, sc: torch.Tensor, zc: torch.Tensor, lift: torch.Tensor) -> LimitScaling:
    """The :class:`~.limit_scaling.LimitScaling` of a solution's cone parts ``sc, zc``
    ``(B, mc)``, lifted into the interior by :data:`_POLISHED_SHIFT` where ``lift``
    ``(B, 1)`` (polished points lie on ∂K): the error estimate's and the backward's."""
    from .certify import decided  # (certify decides the pairs; it imports this module)

    delta = _shift(sc)
    sc_in = torch.where(lift, layout.lift(sc, delta), sc)
    zc_in = torch.where(lift, layout.lift(zc, delta), zc)
    k = layout.nonneg
    if k:
        # An undecided nonnegative pair is lifted by the larger of the two lifts, on both
        # members: each vector's lift is δ(1 + its norm), and where the primal and dual
        # sizes differ, a pair at its kink below both (s = z ~0, _at_kink) takes their
        # ratio as H, i.e. a side: the box [0, 1] projection of x = 0 (slacks ~8e5 beside
        # multipliers ~0, equilibrated) got H = 8e5, the one-sided derivative 1 - 1e-6
        # and no warning.
        open_ = lift & ~torch.stack(decided(sc[:, :k], zc[:, :k])).any(0)
        up = torch.maximum(sc_in[:, :k] - sc[:, :k], zc_in[:, :k] - zc[:, :k])
        sc_in = torch.cat([torch.where(open_, sc[:, :k] + up, sc_in[:, :k]), sc_in[:, k:]], 1)
        zc_in = torch.cat([torch.where(open_, zc[:, :k] + up, zc_in[:, :k]), zc_in[:, k:]], 1)
    return LimitScaling(layout, sc, zc, sc_in, zc_in, delta)


def _step_size(dv: torch.Tensor, v: torch.Tensor, scale) -> torch.Tensor:
    """(B,) ‖scale·dv‖∞ / (1 + ‖scale·v‖∞): the step relative to the point, in the units
    ``scale`` gives."""
    return row_inf(dv * scale) / (1 + row_inf(v * scale))


def nearly_dependent_rows(AE: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(B,) the elements among ``where`` (B,) whose equality rows ``AE`` (B, p, n), each
    scaled to unit length (a row's own scale says nothing of its direction), have a
    smallest singular value at most :data:`~.nullspace.NEARLY_DEPENDENT` of their largest
    (more rows than variables, or a zero row: dependent)."""
    idx = torch.nonzero(where).squeeze(1)
    rows = AE.index_select(0, idx)
    if rows.shape[1] > rows.shape[2]:
        return where.clone()
    norms = torch.linalg.vector_norm(rows, dim=2, keepdim=True)
    sv = torch.linalg.svdvals(rows / torch.where(norms > 0, norms, 1.0))
    return torch.zeros_like(where).index_copy(0, idx, sv[:, -1] <= NEARLY_DEPENDENT * sv[:, 0])


def _soc_linear(layout: ConeLayout, s: torch.Tensor, z: torch.Tensor, delta: float, rt: torch.Tensor) -> torch.Tensor:
    """(B, msoc) ``r`` of Newton on ``s ∘ z = 0`` in the limit's form ``ds + H dz = −r`` on the cones'
    parts ``s, z``: ``a_k b_k / b_k^lim`` along each frame direction c_k (``b_k / δ`` decided inactive,
    else ``a_k``), ``(z₀ s_t + s₀ z_t) / z₀ = s_t + rt² z_t`` on the tangent (``rt²`` (B, nsoc): H's there;
    ``s`` alone missed ``rt² z_t``: a sqrt epigraph's misaligned pairs, estimated 6e-8 off, were 3e-7)."""
    from .certify import decided  # (as in limit_scaling_at)

    a1, a2, b1, b2, u = soc_frame(layout, s, z)
    l1, l2 = (torch.where(decided(a, b)[1], b / delta, a) for a, b in ((a1, b1), (a2, b2)))
    out = s + layout._spread(rt * rt) * z  # its tangent part, s_t + rt² z_t (u's and the heads' replaced)
    out = out + layout._spread((l1 - l2) / 2 - layout._seg(out * u)) * u
    out[:, layout.index(s.device).heads] = (l1 + l2) / 2
    return out


def _row_rounding(ops, d, x: torch.Tensor, lo: int, hi: int, z0: int) -> torch.Tensor:
    """(B, hi − lo) the rounding of the rows lo:hi's terms at ``x``, eps (|A_i||x| + |b_i| + ‖A_i‖∞)
    (cone rows: ``z0``, the zero rows' count, at most ``lo``)."""
    if ops.diagonal:  # (each cone row one entry a_i, in variable cols_i)
        a = ops.a.abs()
        terms = ops.rows_mv(a, x.abs().unsqueeze(-1)).squeeze(-1)[:, lo - z0:hi - z0]
        unit = a[:, lo - z0:hi - z0]
    else:
        AI = d.A[:, lo:hi].abs()
        terms, unit = bmv(AI, x.abs()), AI.amax(2)
    return torch.finfo(x.dtype).eps * (terms + d.b[:, lo:hi].abs() + unit)


def _active_rows_damped(ops, d, layout: ConeLayout, x: torch.Tensor, gap: torch.Tensor, dx: torch.Tensor,
                        active: torch.Tensor) -> torch.Tensor:
    """(B,) whether the step ``dx`` leaves a nonnegative row decided ``active`` (B, nonneg) off its
    limit s + ds = 0, i.e. A_i (x + dx) = b_i (``gap`` (B, mc): A x − b on the cone rows), by a
    part of its gap (at most twice it) and more than 4 rounding levels of its terms, eps (|A_i||x|
    + |b_i| + ‖A_i‖∞).

    The factorised system holds such a row at H = δ (the lift, 1e-12), not at its limit 0:
    it leaves δ dz_i / z_i there, nothing of the gap where the active rows are independent,
    but along a direction where they are nearly dependent (curvature λ in A_I A_Iᵀ) a
    fraction δ/(λ + δ) of it, and the step there is λ/(λ + δ) of Newton's. Two halfspaces
    whose normals differ by 1e-6 (λ ≈ 2e-13) left 0.4 of a gap of 1.5e-13 (950 rounding
    levels): a point 2.4e-7 off was estimated 4e-8, below tol_error. Four in R^5 left 0.8 of
    gaps of 30: 1.8e-7 off, estimated 6e-9. (Far more than the gap is the multipliers' move,
    not the gap's: α-entmax's auxiliary cones at their tips leave p_i ≥ 0 at gaps of 1e-20
    beside δ dz_i / z_i ~ 1e-12, its estimate right. The QP benchmarks' steps leave at most 5.)"""
    z0, k = layout.zero, layout.nonneg
    e = (ops.Av(dx)[:, z0:z0 + k] + gap[:, :k]).abs()
    rounding = _row_rounding(ops, d, x, z0, z0 + k, z0)
    return (active & (e <= 2 * gap[:, :k].abs()) & (e > 4 * rounding)).any(1)


# Rounding levels of a cone's terms above which a polished point's active frame direction left
# off its limit is damped (_soc_damped). A frame coefficient compounds its rows' rounding with
# u's (formed from s − z): α-entmax's cones at their tips, polished, leave 4.6 to 5.4 levels
# with their estimates right; the squared-norm constraint at 1e-7 leaves 25 to 270 on points
# 0.2 to 6 of the solution's size off (5.8 on one 0.1 off, 2.7e-8 normwise: within the promise).
_SOC_ROUNDING = 16


def _soc_damped(ops, d, layout: ConeLayout, x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, gap: torch.Tensor,
                dx: torch.Tensor) -> torch.Tensor:
    """(B,) whether the step ``dx`` leaves a second-order cone's Jordan-frame direction c_k decided
    active (a_k < DECIDED b_k in :func:`~.symmetric_cones.soc_frame` of its parts ``s, z`` (B, msoc))
    off its limit a_k = 0 by a part of its gap (at most twice it) and more than :data:`_SOC_ROUNDING`
    rounding levels of its terms: :func:`_active_rows_damped`'s test along c_k, on the slack the rows give,
    b − A(x + dx), in the point's frame (``gap`` (B, msoc): A x − b on the cones' rows).

    The lift holds such a direction at H = δ/b_k, not at 0, and leaves (δ/b_k) db_k there: beside
    a cone whose rows are O(1) but whose information is a difference far smaller (CVXPY's form of
    ``sum_squares(A x − b) <= t``, ‖(1 − t, 2(A x − b))‖ ≤ 1 + t at t ≈ 2e-14, a_2 = 2(t − ‖A x − b‖²)),
    that is the step's whole move along c_k: Clarabel's points 0.1 to 6 of the solution's size off
    (1e-7) were estimated 4 times too small, 2e-8 for 8.8e-8, and certified. The rows' terms
    set the rounding (eps (|A_i||x| + |b_i| + ‖A_i‖∞) of each row, weighed as in a_k: the coefficients
    are the head's row ± Σ u_i times the tail's), so a cone at rounding level beside its constants
    is not damped; nor is a cone near its tip, whose other coefficient is below a quarter of its
    rows' terms (α-entmax's chains at α = 50: coefficients 1e-12 to 1e-5 beside terms ~1, their
    estimates right at up to 17 levels). Only polished points are tested (the caller masks): an
    unpolished one's step is rough anyway, and its polish is the same."""
    from .certify import decided  # (as in limit_scaling_at)

    z0, k = layout.zero, layout.nonneg
    a1, a2, b1, b2, u = soc_frame(layout, s, z)
    left = -(ops.Av(dx)[:, z0 + k:] + gap)  # the slack b − A(x + dx) the rows give after the step
    heads = layout.index(x.device).heads
    head, along = left[:, heads], layout._seg(left * u)
    ghead, galong = -gap[:, heads], layout._seg(-gap * u)
    terms = _row_rounding(ops, d, x, z0 + k, z0 + k + gap.shape[1], z0)
    rounding = terms[:, heads] + layout._seg(terms * u.abs())  # (u is 0 on the heads)
    eps = torch.finfo(x.dtype).eps
    out = torch.zeros_like(a1, dtype=torch.bool)
    for a, b, other, sign in ((a1, b1, a2, 1.0), (a2, b2, a1, -1.0)):
        e, g = (head + sign * along).abs(), (ghead + sign * galong).abs()
        # A cone whose point is itself a difference of its rows' terms (at its tip: its other
        # coefficient far below them) is not the case: its information is no smaller than it.
        sized = 4 * eps * other >= rounding
        out = out | (decided(a, b)[0] & (b > 0) & sized & (e <= 2 * g) & (e > _SOC_ROUNDING * rounding))
    return out.any(1)


def error_estimate(systems, d, layout, x, s, z, polished, refine, cols, duals):
    """(KKT system at the solution, Newton-step size ‖dx‖∞ / (1 + ‖x‖∞), damped) per element
    (:func:`limit_system`, then :func:`limit_step`'s size)."""
    kkt, W = limit_system(systems, layout, s, z, polished)
    error, damped, _ = limit_step(systems.ops, kkt, W, d, layout, x, s, z, polished, refine, cols, duals)
    return kkt, error, damped


def limit_system(systems, layout: ConeLayout, s: torch.Tensor, z: torch.Tensor, polished: torch.Tensor):
    """``(kkt, W)``: the KKT system of ``systems`` factorised at the limit scaling ``W``
    (:func:`limit_scaling_at`) of the point's cone parts ``s, z`` (B, m), lifted where
    ``polished`` (B,); its decided parts' exact limits set for the backward's refinement."""
    z0 = layout.zero
    W = limit_scaling_at(layout, s[:, z0:], z[:, z0:], polished[:, None])
    # (retry: a pivot that rounding alone made negative gets a proportional regularisation)
    kkt = systems(W, retry=True)
    kkt.limit = W.rows  # the decided parts' exact limits, for the backward's refinement
    return kkt, W


def limit_step(ops, kkt, W, d, layout, x, s, z, polished, refine, cols, duals):
    """``(error, damped, step)`` per element, ``step()`` the step ``(dx, ds, dz)`` (its ``ds``
    formed on that call only: most callers read the size alone): the Newton step at ``(x, s, z)`` with the
    system ``kkt`` factorised at the limit scaling ``W`` (:func:`limit_system`, at this point
    or a nearby one: then a chord step), and its size ‖dx‖∞ / (1 + ‖x‖∞):
    ``inf`` where the factorisation failed or the step does not solve the equality rows,
    NaN where it cannot be formed because those rows are nearly dependent (see below);
    ``damped`` (B,): the step fell short on the active rows (nearly dependent ones) or on a
    second-order cone's active direction (its information far below its rows' size), and its
    size understates Newton's (:func:`_active_rows_damped`, :func:`_soc_damped`).

    The system linearises the complementarity at its limit (:class:`~.limit_scaling.LimitScaling`)
    as the backward does, from any point (polished or not). Only the variables in ``cols``
    and the multipliers in ``duals`` count: an auxiliary variable that is not unique (an
    epigraph variable between two inactive bounds) makes the step arbitrary along itself
    without touching the outputs.
    """
    z0 = layout.zero
    sc, zc = s[:, z0:], z[:, z0:]
    rx = ops.Pv(x) + ops.ATv(z) + d.q
    rz = ops.Av(x) + s - d.b
    # Newton on s ∘ z = 0 (affine form) with the Jacobian at the lifted, decided pair:
    # z_in ds + s_in dz = −s ∘ z, i.e. ds + H dz = −s ∘ z / z_in (cones: _soc_linear). (With −s
    # alone, a row decided inactive kept its multiplier: z = 8e-8 on a box of half-width 7e-5
    # held x 2e-6 off its optimum, normwise, with an estimate of 5e-14.)
    k = layout.nonneg
    lin = _soc_linear(layout, sc[:, k:], zc[:, k:], _shift(sc), W.rt) if layout.soc else sc[:, k:]
    lin = torch.cat([sc[:, :k] * zc[:, :k] / W.z_nonneg, lin], 1) if k else lin
    rhs = torch.cat([-rz[:, :z0], lin - rz[:, z0:]], 1)
    dx, dz, _ = kkt.solve(-rx.unsqueeze(-1), rhs.unsqueeze(-1), refine)
    dx, dz = dx.squeeze(-1), dz.squeeze(-1)

    def step(dx=dx, dz=dz):  # (bound now: dx and dz are narrowed to the columns that count below)
        return dx, torch.cat([torch.zeros_like(rz[:, :z0]), -rz[:, z0:] - ops.Av(dx)[:, z0:]], 1), dz

    # The step is the Newton step only if it solves the equality rows, which the KKT form
    # regularises by δ: along nearly dependent rows refinement cannot remove it, the step
    # loses the residual's part there, and a point 0.25 off passed as 4.5e-8 (two rows
    # parallel to 1e-7). What it may lose is that residual's rounding (exactly redundant
    # rows: a doubly stochastic matrix's sums), ~eps·(|A_E||x| + |b_E|), not more; and
    # never below the rounding of the estimate's own unit, 1 + ‖x‖∞ (x_0 = 0 gave 1e-40
    # against a threshold of 0). Only rows that are nearly dependent make the point
    # unverifiable (NaN); on others the system at the point is what is singular along
    # them, e.g. every variable of a row decided active (a transport plan's marginal of
    # 1e-11, its entries ~1e-11 beside multipliers ~0.4 at the interior point's end):
    # not estimated (inf), another solver's point checkable as any other. A step that falls
    # short on the rows decided active is reported (``damped``, :func:`_active_rows_damped`;
    # the caller's polish then takes them at rounding level, :func:`.polish.polish`'s ``tight``).
    lost = dependent = torch.zeros_like(kkt.failed)
    if z0:  # (only the equality rows: no work for programs without them)
        AE, bE = d.A[:, :z0], d.b[:, :z0]
        eE = row_inf(ops.vec(ops.e_mv, dx) + rz[:, :z0])
        lost = eE > 64 * torch.finfo(dx.dtype).eps * (row_inf(bmv(AE.abs(), x.abs())) + row_inf(bE) + row_inf(AE))
        lost = lost & ~kkt.failed
        if bool(lost.any()):  # (a host read; the rows' spectra only where a residual was lost)
            dependent = nearly_dependent_rows(AE, lost)
    damped = torch.zeros_like(lost)
    if k:
        damped = _active_rows_damped(ops, d, layout, x, rz[:, z0:] - sc, dx, W.active) & ~kkt.failed
    if layout.soc:
        gap = (rz[:, z0:] - sc)[:, k:]
        damped = damped | (_soc_damped(ops, d, layout, x, sc[:, k:], zc[:, k:], gap, dx) & polished & ~kkt.failed)
    # The promise is normwise in the caller's units, which the equilibration's column
    # scales can spread apart from its own: the step is measured in both.
    sig = d.sigma[:, None]
    x_scale, z_scale = sig * d.D, sig * d.E / d.c[:, None]
    if cols is not None:
        cols = cols.to(dx.device)  # a no-op for the layer's (cached on the device)
        dx, x, x_scale = dx.index_select(1, cols), x.index_select(1, cols), x_scale.index_select(1, cols)
    error = torch.maximum(_step_size(dx, x, 1), _step_size(dx, x, x_scale))
    if duals is not None:
        duals = duals.to(dz.device)
        dz, z, z_scale = dz.index_select(1, duals), z.index_select(1, duals), z_scale.index_select(1, duals)
        error = torch.maximum(error, torch.maximum(_step_size(dz, z, 1), _step_size(dz, z, z_scale)))
    error = torch.where(kkt.failed | lost | ~torch.isfinite(error), torch.inf, error)
    return torch.where(dependent, torch.nan, error), damped, step  # NaN: cannot be estimated
