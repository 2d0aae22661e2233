r"""The batched entropic-OT solver behind :func:`convexddn.nodes.transport.sinkhorn`.

Everything here works on ``(B, M, N)`` costs with ``N ≤ M`` and unit-mass marginals
``a`` ``(B, M)``, ``b`` ``(B, N)`` (the public function arranges both), in the dtype it
is given (float64 from the public function).

The plan is :math:`P_{ij} = \exp(\alpha_i + \beta_j - C_{ij}/\varepsilon)`. The solver
keeps the potentials and forms :math:`P` with the rows exact (:math:`\alpha` from one
log-domain row update), so the reduced dual

.. math::

    \varphi(\beta) = \langle a, \alpha(\beta)\rangle + \langle b, \beta\rangle, \qquad
    \nabla\varphi = b - P^\top\mathbf 1, \qquad \nabla^2\varphi = -S, \qquad
    S = \operatorname{diag}(P^\top\mathbf 1) - P^\top\operatorname{diag}(P\mathbf 1)^{-1}P,

is concave; the column error :math:`\|P^\top\mathbf 1 - b\|_1` is the stopping test.
Rounds alternate a Newton step on :math:`\varphi` (step halving under the Armijo rule,
steps capped at 20 in each potential) and a block of Sinkhorn iterations done as matrix
scaling of the current plan (two matrix–vector products per iteration, no ``exp``).
Sinkhorn converges linearly, fast when :math:`\varepsilon` is large compared with the
spread of the costs and very slowly when it is small; Newton converges quadratically
near the optimum; each element takes whichever served it better in the last round.
For each batch element whose rows spread over 50ε at most (no entry of the kernel below
e⁻⁵⁰, so nothing can underflow; a constant added to a row does not change the plan),
plain Sinkhorn on the kernel :math:`K = e^{(\min_j C_{ij} - C)/\varepsilon}`
runs first, two matrix–vector products per iteration, and hands its potentials to the
rounds below when its observed linear rate predicts more than ``3·KERNEL_AHEAD``
further iterations (or after ``KERNEL_ITERS``; :mod:`convexddn.nodes._sinkhorn_kernel`).
The other elements are solved as a batch of their own (so an easy element never waits on
a hard one's path), and when a row spreads over more than 50ε, ε-scaling first solves loosely for
ε = spread/50, spread/200, … and warm-starts each stage from the last, so that the final
stage starts near its optimum; each batch element follows its own schedule (from its
own spread), and every plan returned is at the final ε. (Past a spread of about 10³ε the
plan's support is disconnected in float64 and convergence to ``tol`` may need more than
``max_iter``, for some costs from ~250ε; the caller then warns.)

Arguments of ``exp`` below the dtype's normal range are never formed: CPUs take a slow
path for them (about 50x per element) and their denormal results slow every later
operation. Plan entries below ``e·tiny`` (6e-308 in float64) are exactly 0. Zero entries
of ``a`` or ``b`` (padding) are handled by the masks of :mod:`._sinkhorn_padding`
(``pad``; ``None`` when there are none, and then nothing here changes).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._sinkhorn_columns import exact_cols, log_floor as _lo
from ._sinkhorn_kernel import kernel_rounds as _kernel_sinkhorn
from ._sinkhorn_padding import Padding, col_shift_, completion, offsets_removed, plain_ranges, row_shifted
from ._sinkhorn_schur import flush as _flush
from ._sinkhorn_schur import held_columns, schur_solve

# Sinkhorn iterations between two checks of the column error (each check forms P).
BLOCK = 10
# Newton is tried below this column error, and its step counts as having served an
# element when it at least halves the error; elsewhere a Sinkhorn block follows.
NEWTON_BELOW, NEWTON_GAIN = 0.1, 0.5
# An element whose last Sinkhorn block cut its error by this factor or more stays on
# Sinkhorn: a few more blocks are cheaper than Newton steps.
FAST_BLOCK = 1e-3
# ε-scaling: used when the costs spread over more than SCALE_ABOVE·ε; the stages
# start at spread/SCALE_ABOVE, shrink by SCALE_STEP, and stop each at STAGE_TOL.
SCALE_ABOVE, SCALE_STEP, STAGE_TOL = 50.0, 0.25, 1e-4
# Plain kernel Sinkhorn's iteration budget (spreads up to SCALE_ABOVE·ε) before the Newton
# rounds take over from its potentials (its checks: KERNEL_CHECK, KERNEL_AHEAD there).
KERNEL_ITERS = 200
# Step halvings tried along one Newton direction.
HALVINGS = 12
# Largest change of a potential in one Newton step (a trust region): near-singular S
# far from the optimum gives huge directions that a line search alone may accept.
MAX_STEP = 20.0
# Below this column error φ's rounding hides the progress of a step, so a lower error
# alone accepts it (Newton is then in its quadratic phase).
QUADRATIC = 1e-6


class _State:
    """Potentials β, the α of one exact row update, the plan and the checks on it.

    With ``pad``: α = −∞ on dead rows (log 0), β = −∞ on dead columns; their plan
    entries are exact zeros, their terms of φ are dropped, and r is 1 on dead rows.
    """

    def __init__(self, beta, ce, a, la, b, lo, pad=None):
        x = beta.unsqueeze(-2) - ce
        m = x.amax(-1, keepdim=True)
        d = x.sub_(m)
        # log Σ_j exp(x_ij − m_i), the terms below e·tiny clamped there (each is under one
        # ulp of the sum; their exp would be denormal).
        rest = d.clamp(min=lo).exp_().sum(-1).log_()
        self.alpha = la - (m.squeeze(-1) + rest)
        self.beta = beta
        # The plan from x − m and log a − rest, not from x + α: with potentials of 1e16
        # (costs spread over 1e16 ε) log a_i is rounded away in α, and the rows summed
        # to 1 instead of a_i (a plan of total mass M).
        z = d.add_((la - rest).unsqueeze(-1))
        self.P = z.clamp(min=lo).exp_().masked_fill_(z < lo, 0.0)
        self.r, self.c = self.P.sum(-1), self.P.sum(-2)
        self.err = (self.c - b).abs().sum(-1)
        if pad is None:
            self.phi = (a * self.alpha).sum(-1) + (b * beta).sum(-1)
        else:
            self.r = self.r + pad.pad_r
            self.phi = ((a * self.alpha).masked_fill_(pad.dead_r, 0.0).sum(-1)
                        + (b * beta).masked_fill_(pad.dead_c, 0.0).sum(-1))

    def take(self, other: _State, mask: torch.Tensor) -> None:
        """Adopt ``other``'s values on the batch elements in ``mask``."""
        m1 = mask.unsqueeze(-1)
        for name in ("alpha", "beta", "r", "c"):
            setattr(self, name, torch.where(m1, getattr(other, name), getattr(self, name)))
        self.P = torch.where(mask[..., None, None], other.P, self.P)
        self.err = torch.where(mask, other.err, self.err)
        self.phi = torch.where(mask, other.phi, self.phi)


def _scaling_block(st: _State, a: torch.Tensor, b: torch.Tensor, steps: int, pad=None) -> torch.Tensor:
    """``steps`` Sinkhorn iterations as matrix scaling of the current plan; returns β.

    diag(u) P diag(v) is the plan of (α + log u, β + log v), so alternating
    v = b / Pᵀu, u = a / Pv are Sinkhorn's updates. u and v are clamped to
    [1/cap, cap]: a column sum that underflowed would give v = inf, and a clamped update
    is a partial step towards that coordinate's maximiser, which still ascends φ.
    Entries of P below tiny·cap are left out so that no product is denormal. The
    caller's exact log-domain row update then absorbs the block's rounding. With
    ``pad`` the products are 0 on dead columns and rows: 1 is added there (0/1 = 0, then
    clamped; the potential stays −∞).
    """
    finfo = torch.finfo(st.P.dtype)
    cap = finfo.max ** 0.25
    P = _flush(st.P, finfo.tiny * cap)
    Pt = P.transpose(-1, -2)
    u = torch.ones_like(a).unsqueeze(-2)
    # Row-vector products (uᵀP, vᵀPᵀ): about twice as fast as P @ column on CPU.
    if pad is None:
        for _ in range(steps):
            v = (b.unsqueeze(-2) / (u @ P)).clamp_(1 / cap, cap)
            u = (a.unsqueeze(-2) / (v @ Pt)).clamp_(1 / cap, cap)
    else:
        pr, pc = pad.pad_r.unsqueeze(-2), pad.pad_c.unsqueeze(-2)
        for _ in range(steps):
            v = (b.unsqueeze(-2) / (u @ P).add_(pc)).clamp_(1 / cap, cap)
            u = (a.unsqueeze(-2) / (v @ Pt).add_(pr)).clamp_(1 / cap, cap)
    return st.beta + v.squeeze(-2).log()


def solve(
    C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, max_iter: int, tol: float,
    cols_exact: bool = False, pad: Padding | None = None, gibbs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The plan, its column error ‖Pᵀ1 − b‖₁ (rows exact) and G, batched.

    Stops when every element's error is at most ``tol`` or after ``max_iter`` Sinkhorn
    iterations plus Newton steps in all (each batch solved together counts its own: the
    log domain's; on the kernel path, each element's own kernel iterations, then its Newton
    batch's steps); the caller reports elements above ``tol``.
    Costs with NaN or Inf give a NaN plan and error without iterating (the caller then
    checks its inputs: one host sync fewer than checking first).
    When ε is small against the spread of the costs, the problem is first solved for a
    decreasing sequence of ε (ε-scaling), each stage warm-started from the last one's
    potentials and solved loosely: the last stage then starts near its optimum, where
    Newton converges, instead of in Sinkhorn's slow regime.

    ``cols_exact`` swaps the roles at the end: the columns are scaled to ``b`` exactly
    and the returned error is the rows' ‖P1 − a‖₁ (for a caller whose rows are these
    columns). The scaling moves the rows by at most the columns' error; a column whose
    mass underflowed (all of it, when ``max_iter`` ran out far from the optimum) is formed
    anew from the row potentials (:func:`~convexddn.nodes._sinkhorn_columns.exact_cols`).

    ``pad``: the masks of zero entries of ``a`` and ``b`` (None: there are none). With
    ``gibbs`` too, G is the plan with each dead row's and column's Gibbs distribution
    filled in (:func:`~convexddn.nodes._sinkhorn_padding.completion`, for the backward);
    otherwise G is None.
    """
    P, err, pot = _solve(C, a, b, eps, max_iter, tol, pad, cols_exact)
    if cols_exact:
        err = (P.sum(-1) - a).abs_().sum(-1)
    G = completion(P, *pot, eps, pad) if gibbs and pot is not None else None
    return P, err, G


def _solve(
    C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, max_iter: int, tol: float,
    pad: Padding | None = None, cols_exact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """(plan, column error, potentials): with ``pad``, (f, g, the caller's costs, the row
    and column shifts) for the completion (f, g = −∞ on dead rows, columns); None without.
    With ``cols_exact`` the plan's columns are made exact
    (:func:`~convexddn.nodes._sinkhorn_columns.exact_cols`); the error is still the one before.

    The path is chosen per batch element, from its own largest row range: the elements
    within 50ε take the kernel path, the others the log domain, each group solved as a
    batch of its own (and with its own ``max_iter``) and scattered back, so an element's
    result does not depend on which path its batch mates need (one hard element sent
    every easy one to the log domain, 15–20x slower)."""
    # The plan is unchanged by adding a constant to a row of C (α absorbs it), so the
    # spread that matters is the largest range within a row (and a huge offset of a whole row
    # or column, which that range would round in, is removed first; plain_ranges: no line is).
    C0, s, t = C, 0.0, 0.0  # (the caller's costs and the shifts, for the completion)
    lim = plain_ranges(C) if pad is None and C.numel() else None  # (then one host read for the set-up)
    C, s, t = offsets_removed(C, pad) if C.numel() and lim is None else (C, s, t)
    if pad is None:
        D, full = C - (C.amin(-1, keepdim=True) if lim is None else lim[0][0]), None
    else:
        # Shifts and spread from the live entries only; the solver sees 0 at dead ones.
        full, low = row_shifted(C, pad)
        s = s + low
        D = full.masked_fill(pad.dead, 0.0)
    # Each element's spread; (|C|'s largest times 0 is NaN where any cost is NaN or Inf,
    # dead ones too, which the masked D would hide.)
    spread = lim[1] if lim is not None else D.amax((-2, -1)) if C.numel() else D.new_zeros(D.shape[:-2])
    if pad is not None and C.numel():
        spread = spread + C.abs().amax((-2, -1)) * 0.0
    n, cut = D.shape[0], SCALE_ABOVE * eps
    easy = None if lim is not None and (lim[3] <= cut or not lim[2] <= cut) else spread <= cut
    # (One host sync for the input test and the split; none where plain_ranges read one path for all.)
    top, n_easy = (lim[3], n * (lim[3] <= cut)) if easy is None else torch.stack(
        (spread.amax(), easy.sum().to(spread.dtype))).tolist() if n else (0.0, 0)
    n_easy = int(n_easy)
    if not math.isfinite(top / eps):
        # NaN or Inf in C (amin and amax propagate NaN), or a row range that overflows, or
        # its ratio to eps (which ε-scaling would have walked down from for 500 stages): a
        # non-finite error tells the caller, which checks its inputs then; nothing iterated.
        return torch.full_like(C, math.nan), torch.full_like(C[..., 0, 0], math.nan), None
    if n_easy in (0, n):  # one path for the whole batch: no copies
        rows = (lambda: C - C.amin(-1, keepdim=True)) if pad is None else (lambda: full)
        P, err, f, g, dt = _path(n_easy > 0, D, rows, a, b, eps, max_iter, tol, pad, cols_exact)
        return P, err, None if pad is None else (f, g, C0, s, t + dt)
    # Both paths: the easy elements first (a stable sort keeps their order), then the others.
    # Each group solves on copies (D and full stay as they are), taken by indexing, which keeps
    # the layout (rows or columns contiguous) and so the rounding of a call on those alone.
    order = torch.argsort((~easy).to(torch.uint8), stable=True)
    P, err = torch.empty_like(D), D.new_empty(n)
    f, g = (None, None) if pad is None else (torch.empty_like(a), torch.empty_like(b))
    src = D if full is None else full
    for kernel, idx in ((True, order[:n_easy]), (False, order[n_easy:])):
        sub = None if pad is None else pad.select(idx)
        P[idx], err[idx], fi, gi, dt = _path(kernel, D[idx], lambda idx=idx: src[idx], a[idx], b[idx], eps,
                                             max_iter, tol, sub, cols_exact)
        if pad is not None:
            f[idx], g[idx] = fi, gi
            if torch.is_tensor(dt):  # (the log domain's column shifts)
                t = t.index_add(0, idx, dt)
    return P, err, None if pad is None else (f, g, C0, s, t)


def _path(
    kernel: bool, D: torch.Tensor, rows: Callable[[], torch.Tensor], a: torch.Tensor, b: torch.Tensor,
    eps: float, max_iter: int, tol: float, pad: Padding | None, cols_exact: bool,
) -> tuple:
    """(plan, column error, α, β (None without ``pad``), column shift added to D) for a batch
    on one path: ``kernel``, each row of ``D`` (C less its row minima, 0 on dead entries;
    overwritten) spreads over 50ε at most; else the log domain with ε-scaling. ``rows()``:
    D anew, with dead entries as they are (read once; it may be modified)."""
    dt = 0.0
    if kernel:
        # (The kernel overwrites D; β = log v refers to the same row-shifted costs, ≤ 50ε.)
        shifted = rows if pad is None else (lambda: rows().masked_fill(pad.dead, 0.0))
        P, err, v, used, worst, u = _kernel_sinkhorn(D, shifted, a, b, eps, max_iter, KERNEL_ITERS, tol, pad)
        # Those above tol with budget left go on to Newton, a batch per count of kernel iterations.
        late = (err > tol) & (used < max_iter) if worst > tol else None
        counts = [] if late is None else used[late].unique().tolist()
        if not counts:
            P = exact_cols(P, b, lambda: u.transpose(-1, -2).log() - shifted() / eps, pad) if cols_exact else P
            pot = (None, None) if pad is None else (u.squeeze(-2).log(), v.squeeze(-2).log())
            return P, err, *pot, dt
        D, alpha, beta = shifted(), u.squeeze(-2).log(), v.squeeze(-2).log()
        for n in counts:
            idx = torch.nonzero(late & (used == n)).squeeze(1)
            whole = idx.numel() == err.numel()  # (all of them: no copies)
            sel = (lambda t: t) if whole else (lambda t, idx=idx: t[idx])
            st = _solve_at(sel(D), sel(a), sel(b), eps, max_iter - n, tol, sel(beta), None,
                           pad if pad is None or whole else pad.select(idx))[0]
            x = (st.P, st.err, st.alpha, st.beta)
            P, err, alpha, beta = x if whole else (w.index_copy(0, idx, y) for w, y in zip((P, err, alpha, beta), x))
    else:
        # Less each column's minimum too (β absorbs it): the potentials then stay of the
        # size of the spread over ε, not |C|/ε, whose rounding in β − C/ε would cap the
        # column error (5e-12 with 1e4 added to every cost of randn ones, 4e-8 with 1e8).
        # Each row keeps its zero and no entry grows.
        if pad is None:
            D.sub_(D.amin(-2, keepdim=True))
        else:
            full, dt = col_shift_(rows(), pad)
            D = full.masked_fill(pad.dead, 0.0)
        # Each element's own spread sets its ε-scaling schedule: an easy element batched
        # with a hard one must neither run the hard one's stages nor wait on its budget.
        spread = D.amax((-2, -1))
        start = torch.where(spread > SCALE_ABOVE * eps, spread / SCALE_ABOVE, eps)
        st = _solve_at(D, a, b, eps, max_iter, tol, None, start, pad)[0]
        P, err, alpha, beta = st.P, st.err, st.alpha, st.beta
    P = exact_cols(P, b, lambda: alpha.unsqueeze(-1) - D / eps, pad) if cols_exact else P
    return P, err, alpha, beta, dt


def _anchored(beta: torch.Tensor) -> torch.Tensor:
    """β less its largest entry (α absorbs the constant; −∞ stays): rescaled between stages,
    it grew 1/SCALE_STEP-fold each time (1e18 at a masked cost of 1e20 ε) and rounded β's
    differences away, a uniform plan whose marginals passed, silently."""
    return beta - beta.amax(-1, keepdim=True)


def _solve_at(
    D: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, max_iter: int, tol: float,
    beta: torch.Tensor | None, start: torch.Tensor | None = None, pad: Padding | None = None,
) -> tuple[_State, int]:
    """(final state: plan, column error, potentials; iterations used) at ``eps``, from
    ``beta`` (or 0; −∞ on the dead columns of ``pad``).

    ``start`` ``(B,)``: each element's first ε (ε-scaling; None: ``eps`` for all). An
    element solves loosely (``STAGE_TOL``) at its current ε, then moves on to the next,
    ε·``SCALE_STEP`` or ``eps``, while the others keep iterating: each follows its own
    schedule within the shared loop. Every element's plan is returned at ``eps``: one
    still at a larger ε when ``max_iter`` runs out gets the plan of its potentials at
    ``eps`` (rows exact), whose column error is then the one reported.
    """
    lo = _lo(D.dtype)
    la = a.log()
    # cur: each element's ε while any is above eps (None once all are at eps).
    cur = None if start is None or not bool((start > eps).any()) else start
    ce = D / (eps if cur is None else cur[:, None, None])
    loose = max(tol, STAGE_TOL)
    goal = tol if cur is None else torch.full_like(cur, tol).masked_fill_(cur > eps, loose)
    if beta is None:
        beta = torch.zeros_like(b) if pad is None else torch.zeros_like(b).masked_fill_(pad.dead_c, -math.inf)
    st = _State(beta, ce, a, la, b, lo, pad)
    it, held = 0, held_columns(b) if pad is None else pad.fixed  # (the Newton steps' held columns)
    # Each element's error reduction over its last Sinkhorn block (0: none run yet).
    rate = torch.zeros_like(st.err)
    while True:
        todo = st.err > goal
        if cur is not None:
            up = ~todo & (cur > eps)
            # (One host sync for both tests.)
            any_up, any_todo = torch.stack((up.any(), todo.any())).tolist()
            if any_up:
                # Warm start at the next ε: β/ε, the potential in units of cost, is kept.
                nxt = torch.where(up, (cur * SCALE_STEP).clamp_(min=eps), cur)
                beta_n = _anchored(st.beta) * (cur / nxt).unsqueeze(-1)
                cur = nxt
                ce = D / cur[:, None, None]
                st.take(_State(beta_n, ce, a, la, b, lo, pad), up)
                rate = torch.where(up, 0.0, rate)
                staged = cur > eps
                goal = goal.masked_fill(~staged, tol)
                if not bool(staged.any()):
                    cur, goal = None, tol
                continue
        else:
            any_todo = bool(todo.any())
        if not any_todo or it >= max_iter:
            break
        served = torch.zeros_like(todo)
        newton = todo & (st.err < NEWTON_BELOW) & (rate > FAST_BLOCK)
        if bool(newton.any()):  # a host sync per outer iteration (and per halving below)
            it += 1
            # S d = ∇φ; the (a − r) term accounts for rows exact only up to rounding.
            corr = ((a - st.r) / st.r).unsqueeze(-2) @ st.P
            grad = b - st.c - corr.squeeze(-2)
            d, bad, _ = schur_solve(st.P, st.r, grad, held)
            d = d * (MAX_STEP / d.abs().amax(-1, keepdim=True)).clamp(max=1.0)
            slope = (grad * d).sum(-1)
            pending, t = newton & ~bad & (slope > 0), 1.0
            for _ in range(HALVINGS):
                trial = _State(st.beta + t * d, ce, a, la, b, lo, pad)
                # Armijo on φ; or, in the quadratic phase, a lower error.
                ok = pending & torch.isfinite(trial.phi) & (
                    (trial.phi >= st.phi + 0.1 * t * slope)
                    | ((trial.err < st.err) & (st.err < QUADRATIC))
                )
                served |= ok & (trial.err < NEWTON_GAIN * st.err)
                st.take(trial, ok)
                pending &= ~ok
                if not bool(pending.any()):
                    break
                t *= 0.5
        rest = todo & ~served
        # (One host sync for both tests; each outer iteration runs a block of scaling
        # steps or a Newton step with its Schur factorisation, which it amortises.)
        any_rest, all_rest = torch.stack((rest.any(), rest.all())).tolist()
        if any_rest and it < max_iter:
            steps = min(BLOCK, max_iter - it)
            it += steps
            after = _State(_scaling_block(st, a, b, steps, pad), ce, a, la, b, lo, pad)
            rate = torch.where(rest, after.err / st.err, rate)
            if all_rest:
                st = after
            else:
                st.take(after, rest)
    if cur is not None:
        # max_iter ran out with elements still at a larger ε: their plan solves another
        # problem (and may pass the column test). Report the plan of their potentials at
        # eps instead, with its true column error; the caller warns on it.
        late = cur > eps
        st.take(_State(_anchored(st.beta) * (cur / eps).unsqueeze(-1), D / eps, a, la, b, lo, pad), late)
    return st, it
