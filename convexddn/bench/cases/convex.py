"""Benchmark case: the convex path — batched torch interior point vs per element vs cvxpylayers.

Problems (all parameters batched, float64):

- ``qp50``: n = 50, 40 inequalities, 10 equalities (``½‖Lx‖² + qᵀx``, ``Gx ≤ h``, ``Ax = b``);
- ``qp100``: n = 100, 100 inequalities (the OptNet setting);
- ``mpc30``: constrained MPC in the form of cvxpylayers' example, over a longer horizon
  (8 states, 3 inputs, 30 steps, ``|u| ≤ 1``; sparse, 248 equalities; theirs has 10
  states, 4 inputs, 5 steps);
- ``sparsemax16``: projection of ``x ∈ R^16`` onto the simplex;
- ``l1ball512``: projection onto the L1 ball in ``R^512``;
- ``logreg60``: ridge-regularised logistic regression with 60 features and 120 samples,
  tilted by the parameter (``Σ log(1 + exp(-yᵢ xᵢᵀw)) + ½‖w‖² − θᵀw``): exponential
  cones, so every path is per element; its rows also time the per-element path with
  LSMR instead of its sparse LU (``adjoint="lsmr"``).

Paths, measured in one process on the same inputs, interleaved rounds, medians:
``ConvexLayer`` with ``solver="auto"`` (the batched backend, with per-element re-solves
of anything it does not certify), ``ConvexLayer(solver="Clarabel")`` (the per-element
path), cvxpylayers' default (diffcp + SCS) and cvxpylayers + Moreau when the ``moreau``
package is importable (``pip install 'convexddn[bench]'``; skipped with a note
otherwise). Accuracy: the largest difference of each path's solution and gradient
(same upstream gradient) from the per-element path's, which agrees with central finite
differences to ~1e-8 in the test suite (``tests/convex``).
"""
from __future__ import annotations

import importlib.util
import statistics
import time
import warnings
from typing import Any, Callable

import cvxpy as cp
import torch

from ...convex.layer import ConvexLayer
from ..harness import round_order, sync
from .common import CVXPY_ROUNDS

__all__ = ["convex_cases", "CONVEX_PROBLEMS", "moreau_available"]

F64 = torch.float64


def moreau_available() -> bool:
    """Whether cvxpylayers can use the Moreau solver here."""
    return importlib.util.find_spec("moreau") is not None


def _qp(n: int, m: int, p: int, batch: int, gen: torch.Generator):
    L = cp.Parameter((n, n), name="L")
    q = cp.Parameter(n, name="q")
    G = cp.Parameter((m, n), name="G")
    h = cp.Parameter(m, name="h")
    x = cp.Variable(n, name="x")
    cons = [G @ x <= h]
    params = [L, q, G, h]
    data = [torch.eye(n, dtype=F64) + 0.1 * torch.randn(batch, n, n, dtype=F64, generator=gen),
            torch.randn(batch, n, dtype=F64, generator=gen),
            torch.randn(batch, m, n, dtype=F64, generator=gen)]
    x0 = torch.randn(batch, n, dtype=F64, generator=gen)
    # h = G x0 + slack: strictly feasible, with some constraints active at the solution.
    data.append(torch.einsum("bmn,bn->bm", data[2], x0) + torch.rand(batch, m, dtype=F64, generator=gen))
    if p:
        A = cp.Parameter((p, n), name="A")
        b = cp.Parameter(p, name="b")
        cons.append(A @ x == b)
        params += [A, b]
        Ad = torch.randn(batch, p, n, dtype=F64, generator=gen)
        data += [Ad, torch.einsum("bpn,bn->bp", Ad, x0)]
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L @ x) + q @ x), cons)
    return prob, params, [x], data


def _mpc(steps: int, batch: int, gen: torch.Generator, nx: int = 8, nu: int = 3):
    """Constrained MPC in the form of cvxpylayers' example: the inputs over ``steps`` steps of
    linear dynamics from the parameter x₀, quadratic costs, |u| ≤ 1 (sparse, with
    nx·(steps + 1) equalities)."""
    Ad = (torch.eye(nx, dtype=F64) + 0.1 * torch.randn(nx, nx, dtype=F64, generator=gen)).numpy()
    Bd = torch.randn(nx, nu, dtype=F64, generator=gen).numpy()
    x0 = cp.Parameter(nx, name="x0")
    X, U = cp.Variable((nx, steps + 1), name="X"), cp.Variable((nu, steps), name="U")
    cons = [X[:, 0] == x0] + [X[:, t + 1] == Ad @ X[:, t] + Bd @ U[:, t] for t in range(steps)]
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X) + cp.sum_squares(U)), cons + [cp.abs(U) <= 1])
    return prob, [x0], [U], [3 * torch.randn(batch, nx, dtype=F64, generator=gen)]


def _sparsemax(n: int, batch: int, gen: torch.Generator):
    xp = cp.Parameter(n, name="x")
    y = cp.Variable(n, name="y")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - xp)), [cp.sum(y) == 1, y >= 0])
    return prob, [xp], [y], [torch.randn(batch, n, dtype=F64, generator=gen)]


def _l1ball(n: int, batch: int, gen: torch.Generator):
    xp = cp.Parameter(n, name="x")
    y = cp.Variable(n, name="y")
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - xp)), [cp.norm(y, 1) <= 1.0])
    return prob, [xp], [y], [2 * torch.randn(batch, n, dtype=F64, generator=gen) / n ** 0.5 * 4]


def _logreg(n: int, batch: int, gen: torch.Generator):
    m = 2 * n
    X = torch.randn(m, n, dtype=F64, generator=gen).numpy()
    labels = torch.randint(0, 2, (m,), generator=gen).double().mul(2).sub(1).numpy()
    th = cp.Parameter(n, name="theta")
    w = cp.Variable(n, name="w")
    loss = cp.sum(cp.logistic(-cp.multiply(labels, X @ w))) + 0.5 * cp.sum_squares(w) - th @ w
    return cp.Problem(cp.Minimize(loss)), [th], [w], [torch.randn(batch, n, dtype=F64, generator=gen)]


#: name -> (description, builder(batch, generator))
CONVEX_PROBLEMS: dict[str, tuple[str, Callable]] = {
    "qp50": ("QP n=50, 40 ≤, 10 =", lambda B, g: _qp(50, 40, 10, B, g)),
    "qp100": ("QP n=100, 100 ≤ (OptNet)", lambda B, g: _qp(100, 100, 0, B, g)),
    "mpc30": ("MPC, 8 states, 3 inputs, 30 steps", lambda B, g: _mpc(30, B, g)),
    "sparsemax16": ("sparsemax n=16", lambda B, g: _sparsemax(16, B, g)),
    "l1ball512": ("L1-ball projection n=512", lambda B, g: _l1ball(512, B, g)),
    "logreg60": ("logistic regression, 60 features", lambda B, g: _logreg(60, B, g)),
}
#: Problems whose rows also time the per-element path with the LSMR adjoint.
LSMR_ROWS = {"logreg60"}


# Above this batch the CPU-bound paths (per element, cvxpylayers) are not timed: a round
# would take minutes. The reference is then the batched path on the CPU, which agrees
# with the per-element path to ~1e-9 in the tests.
PEER_MAX_BATCH = 1024

#: Timed rounds of the convex rows at least (a round of the slow rows takes minutes on a CPU).
CONVEX_ROUNDS = CVXPY_ROUNDS  # (one cap for both kinds of cone-program rows, as --help says)
#: ... and at most, where a round is cheap: more interleaved rounds within this many
#: seconds per problem and batch make the medians of the fast rows (a QP at batch 64: ~1.5 s
#: a round for all four paths) robust to a shared machine's drift.
CONVEX_MAX_ROUNDS, CONVEX_ROUND_BUDGET_S = 15, 20.0


def _paths(prob, params, variables, peers: bool = True, lsmr: bool = False) -> dict[str, Callable]:
    from cvxpylayers.torch import CvxpyLayer

    batched = ConvexLayer(prob, params, variables)
    if not peers:  # the batched layer on the parameters' device and on the CPU (its own
        # instance: each row reads its own last_solve)
        return {"convexddn batched (auto)": batched,
                "convexddn batched (auto), cpu": ConvexLayer(prob, params, variables)}
    paths: dict[str, Callable] = {
        "convexddn batched (auto)": batched,
        "convexddn per element": ConvexLayer(prob, params, variables, solver="Clarabel"),
    }
    if lsmr:
        paths["convexddn per element, LSMR adjoint"] = ConvexLayer(prob, params, variables, solver="Clarabel",
                                                                   adjoint="lsmr")
    cvx = CvxpyLayer(prob, parameters=params, variables=variables)
    paths["cvxpylayers default"] = lambda *a: cvx(*a)[0]
    if moreau_available():
        try:  # importable is not usable: cvxpy's own probe of the solver can still fail
            mor = CvxpyLayer(prob, parameters=params, variables=variables, solver="MOREAU")
        except Exception as err:  # noqa: BLE001 - a peer failing is a result, not a crash
            message = f"{type(err).__name__}: {str(err)[:120]}"

            def mor(*_a, message=message):
                raise RuntimeError(message)
        paths["cvxpylayers + Moreau"] = lambda *a: mor(*a)[0]
    return paths


def _fwd_bwd(fn: Callable, data: list[torch.Tensor], g: torch.Tensor, device) -> tuple[float, float, Any, Any]:
    args = [d.detach().to(device).requires_grad_(True) for d in data]
    sync(device)
    t0 = time.perf_counter()
    y = fn(*args)
    sync(device)
    t1 = time.perf_counter()
    grads = torch.autograd.grad(y, args, g.to(device=device, dtype=y.dtype), allow_unused=True)
    sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, y.detach().cpu().double(), [None if gr is None else gr.cpu().double() for gr in grads]


def convex_cases(problems: list[tuple[str, int]], repeats: int, progress, device: str = "cpu",
                 budget_s: float = CONVEX_ROUND_BUDGET_S) -> list[dict]:
    """Time every path on ``(problem name, batch)`` pairs; one row per path and problem.

    Each pair gets ``repeats`` interleaved rounds, or more (up to :data:`CONVEX_MAX_ROUNDS`)
    as many as fit in ``budget_s`` seconds at the warm-up's pace; each row records its
    ``rounds``.
    """
    dev = torch.device(device)
    rows = []
    for name, batch in problems:
        desc, build = CONVEX_PROBLEMS[name]
        gen = torch.Generator().manual_seed(0)
        prob, params, variables, data = build(batch, gen)
        g = torch.randn((batch,) + tuple(variables[0].shape), dtype=F64, generator=gen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peers = batch <= PEER_MAX_BATCH
            paths = _paths(prob, params, variables, peers, name in LSMR_ROWS)
            base_label = "convexddn per element" if peers else "convexddn batched (auto), cpu"
            ref = _fwd_bwd(paths[base_label], data, g, torch.device("cpu"))  # warm-up + reference
            results: dict[str, dict[str, Any]] = {}
            round_s = 0.0
            for label, fn in paths.items():
                on = dev if label == "convexddn batched (auto)" else torch.device("cpu")
                try:
                    f, b, y, grads = _fwd_bwd(fn, data, g, on)  # warm-up (canonicalisation, caches)
                    results[label] = {"fwd": [], "bwd": [], "y": y, "grads": grads, "device": on}
                    round_s += f + b
                except Exception as err:  # noqa: BLE001 - a peer failing is a result, not a crash
                    results[label] = {"error": f"{type(err).__name__}: {str(err)[:120]}"}
                progress.update(1)
            rounds = max(repeats, min(CONVEX_MAX_ROUNDS, int(budget_s / max(round_s, 1e-9))))
            for k in range(rounds):
                for label in round_order(paths, k):
                    fn, r = paths[label], results[label]
                    if "error" in r:
                        continue
                    f, b, _, _ = _fwd_bwd(fn, data, g, r["device"])
                    r["fwd"].append(f)
                    r["bwd"].append(b)
                if k < repeats:  # the progress bar counts the rounds every pair gets
                    progress.update(len(paths))
        for label, r in results.items():
            row = {"family": "convex", "problem": name, "description": desc, "batch": batch,
                   "path": label, "device": str(r.get("device", "cpu")), "rounds": rounds}
            if "error" in r:
                row["note"] = r["error"]
            else:
                row["fwd_s"] = statistics.median(r["fwd"])
                row["bwd_s"] = statistics.median(r["bwd"])
                row["max_solution_diff"] = float((r["y"] - ref[2]).abs().max())
                row["max_grad_diff"] = max(float((a - b).abs().max()) for a, b in zip(r["grads"], ref[3])
                                           if a is not None and b is not None)
                layer = paths[label]
                if isinstance(layer, ConvexLayer) and layer.last_solve is not None:
                    # Elements the batched iterations did not certify (a second opinion or
                    # the per-element path solved them); on the per-element path, elements
                    # whose result was in doubt and the batched form solved.
                    solvers, backends = layer.last_solve.solvers, layer.last_solve.backend
                    row["per_element_fallbacks"] = sum(s != "batched" for s in solvers) if \
                        label.startswith("convexddn batched") else sum(b == "batched" for b in backends)
                    # All elements per element without a batched attempt: routed by size.
                    row["routed_per_element"] = bool(label.startswith("convexddn batched") and not
                                                     layer._use_batched(r["device"]))
            rows.append(row)
        base = next((r for r in rows if r["problem"] == name and r["batch"] == batch
                     and r["path"] == "convexddn per element" and "fwd_s" in r), None)
        if base is None:
            for r in rows:
                if r["problem"] == name and r["batch"] == batch and r["path"].startswith("convexddn batched"):
                    r["note"] = (f"reference: the batched path on the CPU (batch > {PEER_MAX_BATCH}: "
                                 "per element and cvxpylayers not timed)")
        for r in rows:
            if base and r["problem"] == name and r["batch"] == batch and "fwd_s" in r:
                r["speedup_vs_per_element"] = (base["fwd_s"] + base["bwd_s"]) / (r["fwd_s"] + r["bwd_s"])
    if not moreau_available():
        rows.append({"family": "convex", "problem": "—", "path": "cvxpylayers + Moreau",
                     "note": "skipped: the moreau package is not installed (pip install 'convexddn[bench]')"})
    return rows
