"""CvxpyLayer's reading of cvxpylayers' ``solver_args`` (convexddn.convex.compat_args): a
replaced backend's settings, a chosen solver's own settings reaching it, canon_backend's
value, and the ignored-keys notice naming each key once per layer."""
from __future__ import annotations

import importlib.util
import re
import warnings

import cvxpy as cp
import numpy as np
import pytest
import scs
import torch
from cvxpylayers.torch import CvxpyLayer as Reference

from convexddn.convex.compat import CvxpyLayer
from convexddn.convex.solver_args import solver_settings
from convexddn.errors import ConvexDDNWarning, OptionError

F64 = torch.float64


def projection_problem(n: int = 3):
    """argmin ‖y − x‖² s.t. y ≥ 0: the closed form relu(x)."""
    x = cp.Parameter(n)
    y = cp.Variable(n)
    return cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [y >= 0]), x, y


def notices(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ConvexDDNWarning)]


def test_replaced_backends_settings_are_ignored_with_the_one_warning():
    """cvxpylayers' own test_quad_form_psd_forward: CvxpyLayer(..., solver="MOREAU") called with
    solver_args={"tol": 1e-12, "max_iters": 500}. solver="MOREAU" is replaced by the default
    solver (a warning), yet Moreau's `tol` raised OptionError "unknown key(s) ['tol']", as if no
    solver took it. A key no solver here takes is now that replaced solver's setting, ignored
    as it is and named in the warning with the reason; max_iters still reaches the per-element
    solver. Reference: the closed form −q/2 of min ½xᵀ(2I)x + qᵀx."""
    n = 4
    Q, q, x = cp.Parameter((n, n), PSD=True), cp.Parameter(n), cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, Q) + q.T @ x), [])
    Qt = torch.eye(n, dtype=F64) * 2.0
    qt = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = CvxpyLayer(problem, parameters=[Q, q], variables=[x], solver="MOREAU")
        (sol,) = layer(Qt, qt, solver_args={"tol": 1e-12, "max_iters": 500})
        layer(Qt, qt, solver_args={"tol": 1e-9})  # named already: no notice
    torch.testing.assert_close(sol, -qt / 2, atol=1e-8, rtol=0)
    said = notices(caught)
    assert len(said) == 3, said
    assert said[0].startswith("CvxpyLayer ignores [\"solver='MOREAU'\"] (solver='MOREAU': another algorithm, "
                              "replaced by the default solver).")
    assert said[1].startswith("CvxpyLayer ignores ['tol'] (tol: settings of solver='MOREAU', which convexddn "
                              "replaces by its default solver: they reach no solver here).")
    assert said[2].startswith("CvxpyLayer: ['max_iters'] reach only the per-element solver")
    # The constructor's solver_args too, and MPAX's own (its algorithm): one combined warning.
    with pytest.warns(ConvexDDNWarning) as record:
        CvxpyLayer(problem, [Q, q], [x], solver="mpax", solver_args={"algorithm": "raPDHG", "eps": 1e-6})
    (text,) = [str(w.message) for w in record if str(w.message).startswith("CvxpyLayer ignores")]
    assert text.startswith("CvxpyLayer ignores ['eps', 'algorithm', \"solver='mpax'\"] (algorithm: settings of "
                           "solver='mpax', which convexddn replaces"), text
    # Without a replaced backend such a key names no setting of any solver: refused as before.
    with pytest.raises(OptionError, match=r"solver_args has unknown key\(s\) \['tol'\]; valid keys are"):
        CvxpyLayer(problem, [Q, q], [x])(Qt, qt, solver_args={"tol": 1e-12})
    # A known key's value is still checked, and another solver's setting still refused.
    with pytest.raises(OptionError, match=r"solver_args\['max_iters'\] must be an integer >= 1, got 0"):
        layer(Qt, qt, solver_args={"tol": 1e-12, "max_iters": 0})
    with pytest.raises(OptionError, match=r"solver_args\['nitref'\] is a setting of ECOS"):
        layer(Qt, qt, solver_args={"nitref": 3})


def test_scs_own_setting_linear_solver_reaches_scs(monkeypatch):
    """solver_args={"solve_method": "SCS", "linear_solver": "cpu_indirect"}: SCS 3.3's own
    setting (scs.LinearSolver), which cvxpylayers hands to SCS, raised OptionError "unknown
    key(s) ['linear_solver']" (SCS's settings were a hand-written list without it). It now
    reaches SCS, seen by intercepting scs.solve on the layer's own program (4 variables, not
    SCS's 1-variable trial of the settings), its value checked against scs.LinearSolver's.
    Reference: relu(x)."""
    calls = []
    solve = scs.solve

    def recording(data, cone, **settings):
        calls.append((data["A"].shape[1], settings.get("linear_solver")))
        return solve(data, cone, **settings)

    monkeypatch.setattr(scs, "solve", recording)
    problem, x, y = projection_problem()
    xt = torch.tensor([[1.0, -2.0, 0.5], [-0.3, 0.7, -1.1]], dtype=F64)
    args = {"solve_method": "SCS", "linear_solver": "cpu_indirect"}
    for layer, call in ((CvxpyLayer(problem, [x], [y]), args), (CvxpyLayer(problem, [x], [y], solver_args=args), None)):
        calls.clear()
        (sol,) = layer(xt, solver_args=call)
        torch.testing.assert_close(sol, xt.clamp(min=0), atol=1e-7, rtol=0)
        assert [n for n, _ in calls if n > 1] == [4, 4], calls  # one solve per element (y and an epigraph)
        assert all(setting == "cpu_indirect" for _, setting in calls), calls
    assert layer.convex_layer.solver_args == {"linear_solver": "cpu_indirect"}
    assert "linear_solver" in solver_settings("SCS")
    # The reference hands it to SCS too (its answer to SCS's accuracy).
    (ref,) = Reference(problem, [x], [y])(xt, solver_args=args)
    torch.testing.assert_close(ref, xt.clamp(min=0), atol=1e-3, rtol=0)
    # Its value is checked against SCS's own list, and SCS judges what its build lacks.
    choices = re.escape(str([s.value for s in scs.LinearSolver]))
    with pytest.raises(OptionError, match=rf"solver_args\['linear_solver'\] must be one of {choices} \(or a "
                                          r"scs.LinearSolver\), got 'bogus'"):
        layer(xt, solver_args={"solve_method": "SCS", "linear_solver": "bogus"})
    layer(xt, solver_args={"solve_method": "SCS", "linear_solver": scs.LinearSolver.QDLDL})
    if importlib.util.find_spec("scs._scs_gpu") is None:  # (SCS's wheels build no GPU solver)
        with pytest.raises(OptionError, match=r"\{'linear_solver': 'gpu_indirect'\} are not accepted by SCS "
                                              r"3\.\d+\.\d+: .*_scs_gpu"):
            layer(xt, solver_args={"solve_method": "SCS", "linear_solver": "gpu_indirect"})


def test_canon_backend_value_is_checked():
    """CvxpyLayer(canon_backend="BOGUS") was accepted and ignored with the generic warning,
    where cvxpylayers (through CVXPY) raises ValueError("Unknown backend: BOGUS"). It is now an
    OptionError naming the argument, CVXPY's backends and what came; a valid one is still
    ignored with the warning (the problem is canonicalised once here)."""
    problem, x, y = projection_problem()
    with pytest.raises(ValueError, match="Unknown backend: BOGUS"):
        Reference(problem, [x], [y], canon_backend="BOGUS")
    for value in ("BOGUS", 1, ""):
        with pytest.raises(OptionError) as err:
            CvxpyLayer(problem, [x], [y], canon_backend=value)
        assert str(err.value) == f"canon_backend must be one of ['COO', 'CPP', 'RUST', 'SCIPY'] or None, got {value!r}"
    for value in ("SCIPY", "cpp"):
        with pytest.warns(ConvexDDNWarning, match=r"ignores \['canon_backend'\] \(canon_backend: CVXPY's "
                                                  r"canonicalisation backend"):
            CvxpyLayer(problem, [x], [y], canon_backend=value)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvexDDNWarning)
        CvxpyLayer(problem, [x], [y], canon_backend=None)


def test_each_newly_ignored_key_is_named_once_per_layer():
    """The "CvxpyLayer ignores [...]" notice was shown once per layer, naming the first call's
    keys: a later call with other ignored keys (diffcp's mode='dense', warm_starts, SCS's
    acceleration_lookback) ignored them without a word. Each key is now named once per
    layer: a call's keys not named yet get a notice of their own, naming only them."""
    problem, x, y = projection_problem()
    xt = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    layer = CvxpyLayer(problem, [x], [y])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(xt, solver_args={"eps": 1e-9})
        layer(xt, solver_args={"mode": "dense", "warm_starts": None, "acceleration_lookback": 0, "eps": 1e-9})
        layer(xt, solver_args={"mode": "lsqr", "eps": 1e-8})  # all named already
        layer(xt, solver_args={"max_iters": 50, "mode": "dense"})
        layer(xt, solver_args={"max_iters": 60, "verbose": False})
        other = CvxpyLayer(problem, [x], [y])  # another layer names them again
        (sol,) = other(xt, solver_args={"mode": "dense"})
    torch.testing.assert_close(sol, xt.clamp(min=0), atol=1e-8, rtol=0)
    said = notices(caught)
    assert [s.split(" (")[0] for s in said] == [
        "CvxpyLayer ignores ['eps']",
        "CvxpyLayer ignores ['mode', 'warm_starts', 'acceleration_lookback']",
        "CvxpyLayer: ['max_iters'] reach only the per-element solver under the default solver: it solves the "
        "elements the batched interior point does not certify; pass solve_method='Clarabel'",
        "CvxpyLayer: ['verbose'] reach only the per-element solver under the default solver: it solves the "
        "elements the batched interior point does not certify; pass solve_method='Clarabel'",
        "CvxpyLayer ignores ['mode']"], said
    assert "mode: diffcp's derivative settings" in said[1] and "warm_starts: diffcp's warm starts" in said[1]
    assert "acceleration_lookback: SCS convergence tuning" in said[1]
    assert all(s.endswith("Each key is named once per layer.") for s in said), said
    assert np.isfinite(sol.numpy()).all()
