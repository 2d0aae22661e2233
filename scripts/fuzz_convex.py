"""Random convex programs through ``ConvexLayer`` against CVXPY + Clarabel, element by element.

    python scripts/fuzz_convex.py [SEED] [CASES] [KINDS] [SOLVER]
    python scripts/fuzz_convex.py --gradients [SEED] [CASES] [KINDS] [SOLVER]

KINDS: comma-separated among qp, lp_box, socp, huber, l1fit, socfit, maxpen (default: all);
SOLVER: the layer's ``solver`` option (default ``auto``; ``Clarabel`` puts the
per-element path first).

Each case draws a problem kind, sizes (n 2–11 variables, m 1–9 inequalities, 0–3
equalities), a data scale 10^±5, rows made active at a known feasible point (none to
all), sometimes a duplicated row or a rank-deficient quadratic term, and in one case of
five an element made infeasible by a contradictory row pair. The layer (default
``solver="auto"``) solves a batch of 8; every element is then solved by Clarabel through
CVXPY at 1e-12. Printed as defects: a returned point whose objective is above the
reference's by more than 1e-6 relative or that violates a constraint by more than 1e-6
relative to the data; an error naming an element the reference solved; an unexpected
exception. Also printed (not counted): elements the reference calls infeasible or
unbounded that the error does not name — the reference is then often the one that is
wrong (Clarabel at 1e-12 called bounded problems with data ~3e4 unbounded).

With ``--gradients`` each solved element's directional derivative (autograd, along a
random direction of every parameter) is compared with the layer's own central
difference (steps 1e-6 and 1e-7 of each parameter's scale; the closer counts: a solution
map curved on the scale of the step is exact only at the smaller). A defect: an element
off by more than 1e-3 relative that no ``GradientWarning`` names (a gradient that does not exist,
returned silently); also printed, not counted: a named element whose central difference
agrees to 1e-6, with its one-sided differences (a false alarm if they agree too; where
they differ, the direction crosses a kink symmetrically — a duplicated active row moved
apart — and the gradient returned is the blend of the two sides that the warning
announces). Differences of 1e-4 to 1e-3 are left to rounding: the
solutions are exact to ~1e-10, a step of 1e-6 leaves ~1e-4.

Found this way and fixed: Huber losses with equalities that failed on every path (S's
Cholesky at the solution), badly scaled infeasible programs reported as a generic
``SolverError`` (see ``tests/convex/test_reliability.py``), and gradients at degenerate
vertices returned without a warning (``tests/convex/test_batched.py``).
"""
from __future__ import annotations

import re
import sys
import warnings
from contextlib import contextmanager

import cvxpy as cp
import numpy as np
import torch

from convexddn import ConvexLayer
from convexddn.errors import ConvexDDNError, GradientWarning

KINDS = ("qp", "lp_box", "socp", "huber", "l1fit", "socfit", "maxpen")
BATCH = 8


def _problem(rng: np.random.Generator, kind: str):
    """(problem, parameters, variable, values per parameter (BATCH, ...), scale)."""
    n, m = int(rng.integers(2, 12)), int(rng.integers(1, 10))
    p = int(rng.integers(0, min(n, 4)))
    scale = float(10.0 ** rng.uniform(-5, 5))
    x = cp.Variable(n)
    q, G, h = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    params, cons = [q, G, h], [G @ x <= h]
    x0 = rng.standard_normal((BATCH, n)) * scale
    G_val = rng.standard_normal((BATCH, m, n))
    if m > 1 and rng.random() < 0.3:
        G_val[:, -1] = G_val[:, 0]  # a duplicated row
    active = float(rng.choice([0.0, 0.3, 0.6, 1.0]))
    slack = rng.random((BATCH, m)) * scale * (rng.random((BATCH, m)) < active)
    values = [rng.standard_normal((BATCH, n)) * scale, G_val, np.einsum("bmn,bn->bm", G_val, x0) + slack]
    if m > 1 and rng.random() < 0.2:  # element 1: G_0 x <= h_0 and G_0 x >= h_0 + scale
        values[1][1, -1], values[2][1, -1] = -G_val[1, 0], -values[2][1, 0] - scale
    if p:
        Ae, be = cp.Parameter((p, n)), cp.Parameter(p)
        A_val = rng.standard_normal((BATCH, p, n))
        params += [Ae, be]
        cons.append(Ae @ x == be)
        values += [A_val, np.einsum("bpn,bn->bp", A_val, x0)]
    if kind == "qp":
        L = cp.Parameter((n, n))
        L_val = rng.standard_normal((BATCH, n, n)) * (1.0 if rng.random() < 0.5 else 0.1)
        if rng.random() < 0.3:
            L_val[:, :, -1] = 0  # singular quadratic term
        params.append(L)
        values.append(L_val)
        obj = 0.5 * cp.sum_squares(L @ x) + q @ x
    elif kind == "lp_box":
        obj = q @ x
        cons.append(cp.abs(x) <= 10 * scale)
    elif kind == "socp":
        obj = q @ x
        cons.append(cp.norm(x, 2) <= 5 * scale)
    elif kind == "huber":
        obj = cp.sum(cp.huber(x - q, scale))
    elif kind == "l1fit":
        obj = cp.norm(x - q, 1)
        cons.append(cp.norm(x, "inf") <= 10 * scale)
    elif kind == "socfit":
        obj = cp.norm(x - q, 2) + cp.norm(x, 1)
    else:  # maxpen
        obj = cp.max(x - q) + 0.01 * cp.sum_squares(x) / scale
    return cp.Problem(cp.Minimize(obj), cons), params, x, values, scale


def run_case(seed: int, case: int, kinds: tuple[str, ...], solver: str = "auto") -> int:
    """Defects found in one case (printed)."""
    rng = np.random.default_rng(seed * 1000 + case)
    kind = str(rng.choice(kinds))
    prob, params, x, values, scale = _problem(rng, kind)
    layer = ConvexLayer(prob, params, [x], solver=solver)
    error, y = None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            y = layer(*[torch.tensor(v) for v in values]).numpy()
        except ConvexDDNError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - a defect to report, not to stop on
            print(f"case {case} {kind}: unexpected {type(e).__name__}: {e}")
            return 1
    named = []
    if error is not None:
        named = [int(i) for i in re.findall(r"\((\d+),\)", str(error).split("of batch shape")[0])]
    defects = 0
    for i in range(BATCH):
        for param, v in zip(params, values):
            param.value = v[i]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                prob.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
            except cp.error.SolverError:
                continue
        status = prob.status
        if error is not None:
            if i in named and status == "optimal":
                print(f"case {case} {kind} element {i}: the reference solved it, the layer raised "
                      f"{type(error).__name__}")
                defects += 1
            elif i not in named and status in ("infeasible", "unbounded"):
                print(f"case {case} {kind} element {i}: the reference says {status}, not named (not counted)")
            continue
        if status != "optimal":
            continue
        best = prob.objective.value
        x.value = y[i]
        ours = prob.objective.value
        violation = max(float(np.abs(c.violation()).max()) for c in prob.constraints)
        if ours > best + 1e-6 * (1 + abs(best)) or violation > 1e-6 * (1 + np.abs(y[i]).max()):
            print(f"case {case} {kind} scale {scale:.2g} element {i}: objective {ours:.10g} against "
                  f"{best:.10g}, violation {violation:.2g}")
            defects += 1
    return defects


@contextmanager
def _named_by_warnings():
    """Collect the indices that GradientWarnings name (the batch here is 1-D: flat and
    batch indices, ``[0, 2]`` or ``[(0,), (2,)]``, are the same numbers)."""
    named: set[int] = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield named
    for w in caught:
        found = re.search(r"(?:flat|batch) indices \[([0-9, ()]*)\]", str(w.message))
        if issubclass(w.category, GradientWarning) and found:
            named |= {int(v) for v in re.findall(r"[0-9]+", found.group(1))}


def run_gradient_case(seed: int, case: int, kinds: tuple[str, ...], solver: str = "auto") -> int:
    """Defects found in one case's gradients (printed)."""
    rng = np.random.default_rng(seed * 1000 + case)
    kind = str(rng.choice(kinds))
    prob, params, x, values, _ = _problem(rng, kind)
    layer = ConvexLayer(prob, params, [x], solver=solver)
    base = [torch.tensor(v) for v in values]
    dirs = [torch.tensor(rng.standard_normal(v.shape)) * (t.abs().mean() + 1e-3) for v, t in zip(values, base)]
    gy = torch.tensor(rng.standard_normal((BATCH, x.shape[0])))
    try:
        with _named_by_warnings() as named:
            inputs = [t.clone().requires_grad_() for t in base]
            grads = torch.autograd.grad((layer(*inputs) * gy).sum(), inputs)
        # The differences come from the default (batched) layer whatever the solver under
        # test: the solution map is the same, and the per-element path's solutions (exact
        # to ~1e-8) leave differences at these steps noisy by percents.
        ref = layer if solver == "auto" else ConvexLayer(prob, params, [x])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mid = ref(*base)
            # Two steps: a solution map curved on the scale of 1e-6 (a QP whose solution
            # is ~3e7 at data ~2e3: seed 4, case 45) has a central difference 30 % off at
            # 1e-6 and exact at 1e-7; the closer of the two counts.
            sides = {step: (ref(*[t + step * d for t, d in zip(base, dirs)]),
                            ref(*[t - step * d for t, d in zip(base, dirs)])) for step in (1e-6, 1e-7)}
    except ConvexDDNError:
        return 0  # infeasible here or a step away: nothing to differentiate
    auto = sum((g * d).reshape(BATCH, -1).sum(1) for g, d in zip(grads, dirs))
    diffs = {step: ((p - m) * gy).sum(1) / (2 * step) for step, (p, m) in sides.items()}
    errors = torch.minimum(*[(auto - d).abs() / (1 + d.abs()) for d in diffs.values()]).tolist()
    step, (plus, minus) = 1e-6, sides[1e-6]
    diff = diffs[step]
    # One-sided differences: at a kink that the direction crosses symmetrically (a
    # duplicated active row moved apart) the central difference is the blend of the two
    # sides, which the gradient returned there may equal; the sides themselves differ.
    right, left = ((plus - mid) * gy).sum(1) / step, ((mid - minus) * gy).sum(1) / step
    kink = ((right - left).abs() / (1 + diff.abs())).tolist()
    defects = 0
    for i, err in enumerate(errors):
        if err > 1e-3 and i not in named:
            print(f"case {case} {kind} element {i}: gradient off by {err:.2e} with no GradientWarning")
            defects += 1
        elif err < 1e-6 and i in named:
            what = (f"a kink (one-sided differences {float(left[i]):.6g} and {float(right[i]):.6g})"
                    if kink[i] > 1e-4 else "no kink seen along this direction")
            print(f"case {case} {kind} element {i}: named by a GradientWarning, central difference agrees; {what}")
    return defects


def main(argv: list[str]) -> int:
    gradients = bool(argv) and argv[0] == "--gradients"
    argv = argv[1:] if gradients else argv
    seed = int(argv[0]) if argv else 0
    cases = int(argv[1]) if len(argv) > 1 else 25
    kinds = tuple(argv[2].split(",")) if len(argv) > 2 else KINDS
    solver = argv[3] if len(argv) > 3 else "auto"
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise SystemExit(f"unknown kind(s) {sorted(unknown)}; choose among {', '.join(KINDS)}")
    run = run_gradient_case if gradients else run_case
    defects = sum(run(seed, case, kinds, solver) for case in range(cases))
    print(f"seed {seed}: {cases} cases, {defects} defect(s)")
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
