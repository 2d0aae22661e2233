"""ConvexLayer: batching, dtype/device, accuracy, verified solves and errors."""
from __future__ import annotations

import copy
import math
import pickle
import warnings

import cvxpy as cp
import pytest
import torch
from torch import nn

import convexddn as cddn
from convexddn.errors import (
    DoubleBackwardError,
    DTypeError,
    GradientWarning,
    InfeasibleError,
    NonFiniteError,
    NotDPPError,
    OptionError,
    ProblemError,
    ShapeError,
    SolverError,
    SolverWarning,
    UnboundedError,
)


def nonneg_projection(n: int = 3) -> tuple[cddn.ConvexLayer, cp.Parameter]:
    x = cp.Parameter(n, name="x")
    y = cp.Variable(n, name="y")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0])
    return cddn.ConvexLayer(prob, parameters=[x], variables=[y]), x


def affine_projection() -> cddn.ConvexLayer:
    """argmin ½‖u − x‖² s.t. aᵀu = b: closed form u = x − a (aᵀx − b)/‖a‖²."""
    x = cp.Parameter(4, name="x")
    a = cp.Parameter(4, name="a")
    b = cp.Parameter(name="b")
    u = cp.Variable(4, name="u")
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [a @ u == b])
    return cddn.ConvexLayer(prob, parameters=[x, a, b], variables=[u])


def affine_closed_form(x, a, b):
    return x - a * ((a * x).sum(-1, keepdim=True) - b.unsqueeze(-1)) / (a * a).sum(-1, keepdim=True)


def test_convex_layer_nonneg_projection_is_relu():
    layer, _ = nonneg_projection()
    x = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.25, -1.0]], dtype=torch.float64)
    assert torch.allclose(layer(x), x.clamp(min=0), atol=1e-7)


def test_convex_layer_grad_closed_form():
    layer, _ = nonneg_projection(5)
    x = torch.tensor([[1.0, -2.0, 3.0, -0.5, 0.7]], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[0.3, -1.0, 2.0, 0.4, -0.6]], dtype=torch.float64)
    (grad,) = torch.autograd.grad(layer(x), x, g)
    assert torch.allclose(grad, g * (x > 0), atol=1e-6)


@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
def test_convex_layer_batch_shapes(batch):
    layer = affine_projection()
    gen = torch.Generator().manual_seed(len(batch))
    x = torch.randn(*batch, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    a = torch.randn(*batch, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(batch, dtype=torch.float64, generator=gen, requires_grad=True)
    u = layer(x, a, b)
    assert u.shape == batch + (4,)
    ref = affine_closed_form(x, a, b)
    assert torch.allclose(u, ref, atol=1e-7)
    g = torch.randn(u.shape, dtype=torch.float64, generator=gen)
    grads = torch.autograd.grad(u, (x, a, b), g)
    refs = torch.autograd.grad(ref, (x, a, b), g)
    for got, want in zip(grads, refs):
        assert torch.allclose(got, want, atol=1e-6)


def test_convex_layer_mixed_batched_and_unbatched():
    layer = affine_projection()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    a = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)  # shared
    b = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)  # broadcasts to (2, 3)
    u = layer(x, a, b)
    ref = affine_closed_form(x, a.expand(2, 3, 4), b.expand(2, 3))
    assert u.shape == (2, 3, 4)
    assert torch.allclose(u, ref, atol=1e-7)
    g = torch.randn(u.shape, dtype=torch.float64, generator=gen)
    for got, want in zip(torch.autograd.grad(u, (x, a, b), g), torch.autograd.grad(ref, (x, a, b), g)):
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-6)


def test_convex_layer_finite_differences_every_parameter():
    layer = affine_projection()
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(2, 4, dtype=torch.float64, generator=gen),
              torch.randn(2, 4, dtype=torch.float64, generator=gen) + 2.0,
              torch.randn(2, dtype=torch.float64, generator=gen)]
    for k in range(len(params)):
        args = [p.clone().requires_grad_(i == k) for i, p in enumerate(params)]
        out = layer(*args)
        w = torch.randn(out.shape, dtype=torch.float64, generator=gen)
        (grad,) = torch.autograd.grad(out, args[k], w)
        direction = torch.randn(params[k].shape, dtype=torch.float64, generator=gen)
        eps = 1e-4
        plus = [p + eps * direction if i == k else p for i, p in enumerate(params)]
        minus = [p - eps * direction if i == k else p for i, p in enumerate(params)]
        with torch.no_grad():
            fd = ((layer(*plus) - layer(*minus)) * w).sum() / (2 * eps)
        assert abs(float((grad * direction).sum() - fd)) < 1e-5 * (1 + abs(float(fd)))


def test_convex_layer_dtype_preserved():
    layer, _ = nonneg_projection()
    x32 = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float32, requires_grad=True)
    y = layer(x32)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x32.grad.dtype == torch.float32
    assert layer(x32.double()).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_convex_layer_device_preserved():
    layer, _ = nonneg_projection()
    x = torch.tensor([[1.0, -2.0, 3.0]], device="cuda", requires_grad=True)
    y = layer(x)
    assert y.device == x.device
    y.sum().backward()
    assert x.grad.device == x.device


def test_convex_layer_empty_batch():
    layer, _ = nonneg_projection()
    x = torch.zeros(0, 3, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 3)


def test_convex_layer_empty_batch_broadcast():
    """An empty batch broadcast against a shared parameter: an empty output of the
    promoted dtype and gradients of the inputs' shapes (zero for the shared one)."""
    A, b, x = cp.Parameter((2, 3), name="A"), cp.Parameter(2, name="b"), cp.Variable(3)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + cp.sum_squares(x))), [A, b], [x])
    a = torch.randn(4, 0, 2, 3, dtype=torch.float64, requires_grad=True)
    shared = torch.randn(2, requires_grad=True)
    y = layer(a, shared)
    assert y.shape == (4, 0, 3) and y.dtype == torch.float64
    y.sum().backward()
    assert a.grad.shape == a.shape and torch.equal(shared.grad, torch.zeros(2))
    assert layer.last_solve.solved.shape == (4, 0)


def test_convex_layer_multiple_variables_tuple():
    x = cp.Parameter(2, name="x")
    u = cp.Variable(2, name="u")
    v = cp.Variable(2, name="v")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(u - x) + cp.sum_squares(v + x)))
    layer = cddn.ConvexLayer(prob, [x], [u, v])
    out = layer(torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert isinstance(out, tuple) and len(out) == 2
    assert torch.allclose(out[0], torch.tensor([1.0, 2.0], dtype=torch.float64), atol=1e-7)
    assert torch.allclose(out[1], torch.tensor([-1.0, -2.0], dtype=torch.float64), atol=1e-7)


def test_convex_layer_trains_nnls_in_sequential():
    """Non-negative least squares with learnable A and b inside nn.Sequential."""
    torch.manual_seed(0)
    m, n = 6, 4
    A = cp.Parameter((m, n), name="A")
    b = cp.Parameter(m, name="b")
    z = cp.Variable(n, name="z")
    nnls = cp.Problem(cp.Minimize(cp.sum_squares(A @ z - b) + 1e-3 * cp.sum_squares(z)), [z >= 0])

    class NNLS(nn.Module):
        def __init__(self):
            super().__init__()
            self.A = nn.Parameter(torch.randn(m, n))
            self.layer = cddn.ConvexLayer(nnls, [A, b], [z])

        def forward(self, feats):
            return self.layer(self.A, feats)

    model = nn.Sequential(nn.Linear(3, m), NNLS(), nn.Linear(n, 1))
    feats = torch.randn(16, 3)
    target = feats.sum(-1, keepdim=True).abs()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = ((model(feats) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model[1].A.grad is not None and torch.isfinite(model[1].A.grad).all()


def test_convex_layer_l1_ball_accuracy_issue_case():
    """The case measured on cvxpylayers' defaults (solution error 2e-2, gradient error 1):
    the Euclidean projection onto the unit L1 ball, n = 512, batch 16."""
    n = 512
    layer = cddn.layer("lp_ball", n=n, p=1, backend="cvxpy")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, n, dtype=torch.float64, generator=gen, requires_grad=True)

    def sort_projection(v):
        a = v.abs()
        s, _ = a.sort(-1, descending=True)
        cs = s.cumsum(-1) - 1
        k = torch.arange(1, n + 1, dtype=v.dtype)
        rho = (s - cs / k > 0).sum(-1, keepdim=True)
        theta = cs.gather(-1, rho - 1) / rho
        return v.sign() * (a - theta).clamp(min=0)

    ref = sort_projection(x)
    y = layer(x)
    assert (y - ref).abs().max() < 1e-6
    g = torch.randn(16, n, dtype=torch.float64, generator=gen)
    (gy,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert (gy - gr).abs().max() < 1e-4


def test_convex_layer_dense_qp_accuracy_issue_case():
    """The dense 50-variable QP (40 inequalities, 10 equalities), batch 64, whose
    gradients cvxpylayers' LSQR backward got wrong by 2.4: solutions against CVXPY's own
    Clarabel solve, gradients against central finite differences for every block."""
    n, m, p, batch = 50, 40, 10, 64
    layer = cddn.layer("qp", n=n, n_ineq=m, n_eq=p)
    gen = torch.Generator().manual_seed(0)
    data = [
        torch.randn(batch, n, n, dtype=torch.float64, generator=gen) / n ** 0.5 + torch.eye(n, dtype=torch.float64),
        torch.randn(batch, n, dtype=torch.float64, generator=gen),
        torch.randn(batch, m, n, dtype=torch.float64, generator=gen),
        torch.rand(batch, m, dtype=torch.float64, generator=gen) * 0.1,
        torch.randn(batch, p, n, dtype=torch.float64, generator=gen),
        torch.randn(batch, p, dtype=torch.float64, generator=gen) * 0.1,
    ]
    y = layer(*data)
    spec = cddn.registry.build("qp", n=n, n_ineq=m, n_eq=p)
    for i in range(0, batch, 8):
        for prm, val in zip(spec.parameters, data):
            prm.value = val[i].numpy()
        spec.problem.solve(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
        assert abs(spec.variables[0].value - y[i].numpy()).max() < 1e-6
    sub = [d[:8] for d in data]
    for k in range(len(sub)):
        args = [d.clone().requires_grad_(j == k) for j, d in enumerate(sub)]
        out = layer(*args)
        w = torch.randn(out.shape, dtype=torch.float64, generator=gen)
        (grad,) = torch.autograd.grad(out, args[k], w)
        direction = torch.randn(sub[k].shape, dtype=torch.float64, generator=gen)
        eps = 1e-6
        with torch.no_grad():
            plus = layer(*[d + eps * direction if j == k else d for j, d in enumerate(sub)])
            minus = layer(*[d - eps * direction if j == k else d for j, d in enumerate(sub)])
        fd = ((plus - minus) * w).flatten(1).sum(-1) / (2 * eps)
        analytic = (grad * direction).flatten(1).sum(-1)
        assert (fd - analytic).abs().max() < 1e-4


def test_convex_layer_solve_info_and_pickle():
    layer, _ = nonneg_projection()
    layer(torch.tensor([[1.0, -1.0, 0.5]]))
    info = layer.last_solve
    assert info.solvers == ["batched"] and info.backend == ["batched"] and max(info.residuals) <= 1e-6
    assert info.solved.shape == (1,) and bool(info.solved.all())
    clone = pickle.loads(pickle.dumps(layer))
    x = torch.tensor([[0.3, -0.2, 5.0]], dtype=torch.float64)
    assert torch.equal(clone(x), layer(x))


# Hook members that nn.Module.__setstate__ fills in for pickles from older torch versions.
_OLD_TORCH_MISSING = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_state_dict_pre_hooks",
                      "_load_state_dict_post_hooks", "_non_persistent_buffers_set", "_backward_pre_hooks")


def test_convex_layer_setstate_old_torch_pickle():
    # ConvexLayer.__setstate__ replaced nn.Module's without calling it: a pickle from an
    # older torch (without these hook dicts) failed on the first call with
    # AttributeError: 'ConvexLayer' object has no attribute '_state_dict_pre_hooks'.
    layer, _ = nonneg_projection()
    state = layer.__getstate__()
    for key in _OLD_TORCH_MISSING:
        state.pop(key)
    old = cddn.ConvexLayer.__new__(cddn.ConvexLayer)
    old.__setstate__(state)
    x = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64)
    assert torch.equal(old(x), layer(x))
    assert old.state_dict() == {}
    old.register_forward_hook(lambda *a, **k: None, with_kwargs=True)
    assert torch.equal(old(x), layer(x))


def test_convex_layer_module_tree_holds_no_cvxpylayers_layer():
    # cvxpylayers' (empty) CvxpyLayer was registered as a submodule: the repr showed
    # "(_layer): CvxpyLayer()" once the per-element path had been built.
    x = cp.Parameter(3, name="x")
    y = cp.Variable(3, name="y")
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0]), [x], [y], solver="Clarabel")
    assert layer._layer is not None  # (built at construction for a per-element solver)
    assert "_layer" not in repr(layer) and "CvxpyLayer" not in repr(layer)
    assert [name for name, _ in layer.named_modules()] == [""] and layer.state_dict() == {}
    x = torch.tensor([[1.0, -2.0, 3.0]])
    ref = layer.to(torch.float32)(x)
    assert layer.last_solve.backend == ["per_element"]
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert "_layer" not in repr(clone) and clone._layer is not None
        assert torch.equal(clone(x), ref)
    # A pickle that registered it as a submodule: moved out on load.
    state = layer.__getstate__()
    state["_modules"] = {"_layer": state.pop("_layer")}
    old = cddn.ConvexLayer.__new__(cddn.ConvexLayer)
    old.__setstate__(state)
    assert "_layer" not in old._modules and old._layer is not None and torch.equal(old(x), ref)



def test_deep_copy_of_a_layer_on_a_problem_compiled_before_solves():
    """copy.deepcopy gives CVXPY's nodes new ids but copied their cached canonical forms
    (old ids): once another layer had compiled the problem (its call's second opinion),
    compiling the copy killed the whole process in CVXPY's C++ backend: a deep copy of a
    layer (std::out_of_range, map::at), the same with a parameter in a variable's bounds
    (a segfault), a layer on the user's deep copy of the problem. In a subprocess, as a
    crash would end the test run. Answers against closed forms: x_i = 1 / c_i where
    sum(1 / c) <= 5; with x >= 2 lo + 1 and q = (-1, 3): x = (1, (3 + sqrt(11)) / 2)."""
    import ast
    import subprocess
    import sys
    import textwrap

    import numpy as np

    script = textwrap.dedent("""
        import copy, warnings, torch, cvxpy as cp, convexddn as cddn
        warnings.simplefilter("ignore")
        c = cp.Parameter(3, pos=True); x = cp.Variable(3)
        prob = cp.Problem(cp.Minimize(c @ x - cp.sum(cp.log(x))), [cp.sum(x) <= 5])
        cv = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
        cddn.ConvexLayer(prob, [c], [x], solver="Clarabel")(cv)
        clone = copy.deepcopy(cddn.ConvexLayer(prob, [c], [x], solver="Clarabel"))
        prob2, c2, x2 = copy.deepcopy((prob, c, x))
        lo, q = cp.Parameter(2, nonneg=True), cp.Parameter(2)
        y = cp.Variable(2, bounds=[2 * lo + 1, None])
        bounded = cp.Problem(cp.Minimize(cp.sum_squares(y - q) - cp.sum(cp.log(y))))
        vals = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([-1.0, 3.0], dtype=torch.float64)
        cddn.ConvexLayer(bounded, [lo, q], [y], solver="Clarabel")(*vals)
        bclone = copy.deepcopy(cddn.ConvexLayer(bounded, [lo, q], [y], solver="Clarabel"))
        print([clone(cv).tolist(), cddn.ConvexLayer(prob2, [c2], [x2], solver="Clarabel")(cv).tolist(),
               bclone(*vals).tolist()])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-500:]
    layer_copy, problem_copy, bounds_copy = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    for got in (layer_copy, problem_copy):
        np.testing.assert_allclose(got, [1.0, 0.5, 2.0], atol=1e-7)
    np.testing.assert_allclose(bounds_copy, [1.0, (3 + 11 ** 0.5) / 2], atol=1e-7)

# ----------------------------------------------------------------------------- errors


def test_convex_layer_invalid_not_dpp():
    x = cp.Parameter(2, name="x")
    y = cp.Variable(2, name="y")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y) + x[0] * x[1] * cp.sum(y)), [y >= 0])
    with pytest.raises(NotDPPError, match=r"DPP.*objective"):
        cddn.ConvexLayer(prob, [x], [y])


def test_not_dpp_because_of_parametric_bounds_says_so():
    # A parameter in a variable's bounds= makes CVXPY count the variable as
    # parameter-dependent, so c @ x is not DPP: the error blamed the objective alone. It
    # now names the variable and the rewrite, which is DPP and solves to the same point.
    c, ub, a = (cp.Parameter(3, name=k) for k in ("c", "ub", "a"))
    x = cp.Variable(3, bounds=[0, ub], name="x")
    prob = cp.Problem(cp.Minimize(c @ x + 0.1 * cp.sum_squares(x)), [a @ x <= 1])
    with pytest.raises(NotDPPError, match=r"objective .* not DPP \(it reads variable\(s\) x whose bounds= hold "
                                          r"parameters.*x >= lb, x <= ub"):
        cddn.ConvexLayer(prob, [c, ub, a], [x])
    x2 = cp.Variable(3, name="x2")
    rewritten = cp.Problem(cp.Minimize(c @ x2 + 0.1 * cp.sum_squares(x2)), [a @ x2 <= 1, x2 >= 0, x2 <= ub])
    y = cddn.ConvexLayer(rewritten, [c, ub, a], [x2])(
        torch.tensor([-1.0, 0.05, -0.2], dtype=torch.float64), torch.tensor([2.0, 2.0, 0.5], dtype=torch.float64),
        torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64))
    # Separable closed form: x_i = clip(-c_i / 0.2, 0, ub_i) (a @ x = 0.25 <= 1: inactive).
    torch.testing.assert_close(y, torch.tensor([2.0, 0.0, 0.5], dtype=torch.float64), atol=1e-8, rtol=0)
    # Without parameters in the bounds the message has no such note.
    z = cp.Variable(2, bounds=[0, 1], name="z")
    p = cp.Parameter(2, name="p")
    with pytest.raises(NotDPPError) as info:
        cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(z) + p[0] * p[1] * cp.sum(z))), [p], [z])
    assert "bounds=" not in str(info.value)


def test_convex_layer_invalid_nonconvex_problem():
    x = cp.Parameter(2, name="x")
    y = cp.Variable(2, name="y")
    prob = cp.Problem(cp.Maximize(cp.sum_squares(y - x)), [y >= 0])
    with pytest.raises(ProblemError, match="DCP"):
        cddn.ConvexLayer(prob, [x], [y])


def test_convex_layer_invalid_parameter_list():
    x = cp.Parameter(2, name="x")
    z = cp.Parameter(2, name="z")
    y = cp.Variable(2, name="y")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x - z)))
    with pytest.raises(ProblemError, match=r"exactly once.*\['x', 'z'\]"):
        cddn.ConvexLayer(prob, [x], [y])


def test_convex_layer_invalid_options():
    layer_args = nonneg_projection()
    prob = layer_args[0].problem
    params, variables = layer_args[0].parameters_, layer_args[0].variables_
    with pytest.raises(OptionError, match=r"solver must be one of .*'gurobi'"):
        cddn.ConvexLayer(prob, params, variables, solver="gurobi")
    with pytest.raises(OptionError, match="adjoint must be one of"):
        cddn.ConvexLayer(prob, params, variables, adjoint="fast")
    with pytest.raises(OptionError, match=r"tol must be a number in \(0, 1\)"):
        cddn.ConvexLayer(prob, params, variables, tol=0)
    with pytest.raises(OptionError, match="refine must be an integer >= 0, got -1"):
        cddn.ConvexLayer(prob, params, variables, refine=-1)


def test_convex_layer_invalid_tensor_count():
    layer = affine_projection()
    with pytest.raises(ShapeError, match=r"expected 3 tensor\(s\).*got 2"):
        layer(torch.zeros(4), torch.zeros(4))


def test_convex_layer_invalid_trailing_shape():
    layer = affine_projection()
    with pytest.raises(ShapeError, match=r"parameter 1 \(a\).*trailing shape \(4,\), got \(2, 5\)"):
        layer(torch.zeros(2, 4), torch.zeros(2, 5), torch.zeros(2))


def test_convex_layer_invalid_inconsistent_batch():
    layer = affine_projection()
    with pytest.raises(ShapeError, match=r"do not broadcast: parameter 0 \(x\): \(2,\), parameter 1 \(a\): \(3,\)"):
        layer(torch.zeros(2, 4), torch.ones(3, 4), torch.zeros(()))


def test_convex_layer_invalid_nan_and_inf():
    layer, _ = nonneg_projection()
    x = torch.tensor([[1.0, float("nan"), float("inf")], [float("nan"), 0.0, 1.0]])
    with pytest.raises(NonFiniteError, match=r"parameter 0 \(x\) must be finite, got 2 NaN and 1 Inf"):
        layer(x)


def test_convex_layer_invalid_dtype():
    layer, _ = nonneg_projection()
    with pytest.raises(DTypeError, match=r"floating-point dtype.*torch.int64"):
        layer(torch.tensor([1, 2, 3]))
    with pytest.raises(DTypeError, match="must be a torch.Tensor, got list"):
        layer([1.0, 2.0, 3.0])


def _box_layer(**kwargs):
    lo = cp.Parameter(2, name="lo")
    hi = cp.Parameter(2, name="hi")
    y = cp.Variable(2, name="y")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y)), [y >= lo, y <= hi])
    return cddn.ConvexLayer(prob, [lo, hi], [y], **kwargs)


def test_convex_layer_infeasible_names_batch_indices():
    layer = _box_layer()
    lo = torch.zeros(2, 2, 2)
    hi = torch.ones(2, 2, 2)
    lo[1, 0] = 2.0  # lo > hi: infeasible at batch index (1, 0) only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        with pytest.raises(InfeasibleError, match=r"infeasible at 1 batch index\(es\) \[\(1, 0\)\]") as info:
            layer(lo, hi)
    assert info.value.indices == [(1, 0)]
    assert "infeasible" in info.value.statuses[0].lower()


def test_convex_layer_infeasible_without_fallback_clarabel_status():
    layer = _box_layer(fallback=None)
    with pytest.raises(InfeasibleError, match="Clarabel: Infeasible"):
        layer(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))


def test_convex_layer_unbounded():
    c = cp.Parameter(2, name="c")
    y = cp.Variable(2, name="y")
    prob = cp.Problem(cp.Minimize(c @ y), [y >= 0])
    layer = cddn.ConvexLayer(prob, [c], [y], fallback=None)
    with pytest.raises(UnboundedError, match=r"unbounded at 1 batch index\(es\) \[\(1,\)\]"):
        layer(torch.tensor([[1.0, 1.0], [-1.0, 1.0]]))


def test_convex_layer_solver_failure_is_solver_error():
    # One iteration cannot solve anything: the KKT check rejects the iterate. An
    # exponential cone has no batched form, so no second opinion comes after it.
    c = cp.Parameter(2, name="c", pos=True)
    y = cp.Variable(2, name="y")
    prob = cp.Problem(cp.Minimize(cp.sum(cp.exp(y)) - c @ y))
    layer = cddn.ConvexLayer(prob, [c], [y], solver="Clarabel", fallback=None,
                             solver_args={"max_iter": 1}, refine=0)
    with pytest.raises(SolverError, match=r"KKT residual"):
        layer(torch.tensor([0.5, 2.0]))


def test_convex_layer_failed_per_element_solve_gets_second_opinion():
    """The same one-iteration failure on a QP: the batched form solves it instead
    (y = clamp(0, lo, hi)) with its own iterations, and says so in last_solve."""
    layer = _box_layer(solver="Clarabel", fallback=None, solver_args={"max_iter": 1}, refine=0)
    y = layer(torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(y, torch.tensor([0.5, 0.0], dtype=torch.float64), atol=1e-9, rtol=0)
    info = layer.last_solve
    assert info.solvers == ["batched"] and info.backend == ["batched"]


def test_convex_layer_fallback_warns_and_solves():
    layer = _box_layer(solver="Clarabel", solver_args={"max_iter": 1}, fallback="SCS", refine=0)
    with pytest.warns(SolverWarning, match="solved by the fallback SCS"):
        y = layer(torch.tensor([0.5, -1.0]), torch.tensor([1.0, 2.0]))
    assert torch.allclose(y, torch.tensor([0.5, 0.0]), atol=1e-6)
    # last_solve names the solver that produced the returned solution, not the first one.
    assert layer.last_solve.solvers == ["SCS"] and layer.last_solve.backend == ["per_element"]


def test_convex_layer_workers_match_single_process():
    layer1 = cddn.layer("qp", n=6, n_ineq=4, n_eq=1, solver="Clarabel")
    layer2 = cddn.layer("qp", n=6, n_ineq=4, n_eq=1, solver="Clarabel", workers=2)
    gen = torch.Generator().manual_seed(5)
    data = [torch.randn(8, 6, 6, dtype=torch.float64, generator=gen) / 2 + torch.eye(6, dtype=torch.float64),
            torch.randn(8, 6, dtype=torch.float64, generator=gen),
            torch.randn(8, 4, 6, dtype=torch.float64, generator=gen),
            torch.rand(8, 4, dtype=torch.float64, generator=gen),
            torch.randn(8, 1, 6, dtype=torch.float64, generator=gen),
            torch.randn(8, 1, dtype=torch.float64, generator=gen)]
    outs = []
    for layer in (layer1, layer2):
        args = [d.clone().requires_grad_() for d in data]
        y = layer(*args)
        outs.append((y.detach(), torch.autograd.grad((y * y).sum(), args)))
    assert torch.equal(outs[0][0], outs[1][0])
    for g1, g2 in zip(outs[0][1], outs[1][1]):
        assert torch.equal(g1, g2)
    with pytest.raises(OptionError, match="workers must be an integer >= 1, got 0"):
        cddn.layer("qp", n=6, workers=0)


def test_convex_layer_under_no_grad():
    # cvxpylayers + diffcp raised TypeError when `mode` was passed without gradients.
    layer = cddn.layer("lp_ball", n=4, p=1, backend="cvxpy", solver="Clarabel", adjoint="dense")
    x = torch.tensor([[2.0, -1.0, 0.5, 0.0]], requires_grad=True)
    with torch.no_grad():
        y = layer(x)
    assert not y.requires_grad
    assert torch.allclose(y, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), atol=1e-6)


def test_convex_layer_dead_worker_raises_solver_error_then_recovers():
    layer = cddn.layer("simplex", n=3, workers=2, backend="cvxpy", solver="Clarabel")
    x = torch.tensor([[0.1, 0.2, 0.7], [1.0, 0.0, 0.0], [0.3, 0.3, 0.3]], dtype=torch.float64)
    want = layer(x)
    for proc in list(layer._backend._workers._executor._processes.values()):
        proc.kill()
        proc.join()
    with pytest.raises(SolverError, match=r"worker process .* died"):
        layer(x)
    # The broken pool is dropped; the next call starts a fresh one.
    assert torch.equal(layer(x), want)


def _call_in_child(layer, x, daemon: bool):
    """layer(x) in a forked child process (daemonic or not): ("ok", y) or ("err", repr)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()

    def child():
        try:
            queue.put(("ok", layer(x).detach().numpy()))  # (not a tensor: no shared-memory handle)
        except BaseException as err:  # noqa: BLE001 (reported to the parent)
            queue.put(("err", repr(err)))

    proc = ctx.Process(target=child, daemon=daemon)
    proc.start()
    try:
        out = queue.get(timeout=120)
        proc.join(timeout=60)  # and the child exits (with the pool it started)
        return out if proc.exitcode == 0 else ("err", f"the child did not exit (exit code {proc.exitcode})")
    finally:
        if proc.is_alive():
            proc.kill()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_convex_layer_workers_in_a_forked_child_and_a_daemonic_one():
    """A forked child inherited its parent's started worker pool, whose manager thread
    does not exist there: the child's call never returned. A daemonic process (a
    DataLoader's or a Pool's worker) may not start children: AssertionError. Now the
    child starts its own pool, shut down before the child waits for its children at exit
    (it never exited), and a daemonic process solves in itself."""
    layer = cddn.layer("simplex", n=3, workers=2, backend="cvxpy", solver="Clarabel")
    x = torch.tensor([[0.1, 0.2, 0.7], [1.0, 0.0, 0.0], [0.3, 0.3, 0.3]], dtype=torch.float64)
    want = layer(x)  # starts the pool here
    assert layer._backend._workers._executor is not None
    for daemon in (False, True):
        kind, got = _call_in_child(layer, x, daemon)
        assert kind == "ok", got
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- audit fixes


@pytest.mark.parametrize("solver, args, match", [
    ("Clarabel", {"max_iter": "100"}, r"solver_args\['max_iter'\] must be an integer, got '100'"),
    ("auto", {"max_iter": "100"}, r"solver_args\['max_iter'\] must be an integer, got '100'"),
    ("auto", {"max_iter": 0}, r"solver_args\['max_iter'\] must be an integer >= 1, got 0"),
    ("Clarabel", {"tol_feas": -1e-9}, r"solver_args\['tol_feas'\] must be a finite number >= 0, got -1e-09"),
    ("Clarabel", {"tol_feas": math.inf}, r"solver_args\['tol_feas'\] must be a finite number >= 0, got inf"),
    ("Clarabel", {"tol_gap_abs": "x"}, r"solver_args\['tol_gap_abs'\] must be a finite number >= 0, got 'x'"),
    ("Clarabel", {"verbose": "yes"}, r"solver_args\['verbose'\] must be True or False, got 'yes'"),
    ("Clarabel", {"time_limit": -1.0}, r"solver_args\['time_limit'\] must be a number of seconds >= 0"),
    ("SCS", {"max_iters": 1.5}, r"solver_args\['max_iters'\] must be an integer, got 1.5"),
    ("SCS", {"eps_abs": torch.tensor(1e-6)}, r"solver_args\['eps_abs'\] must be a finite number >= 0"),
    ("SCS", {"scale": 0.0}, r"solver_args\['scale'\] must be finite and > 0"),
    ("ECOS", {"nitref": -1}, r"solver_args\['nitref'\] must be an integer >= 0, got -1"),
    # An int beyond the float range: a raw OverflowError before.
    ("Clarabel", {"tol_feas": 10**400}, r"solver_args\['tol_feas'\] must be a finite number >= 0, got 1000"),
    ("SCS", {"scale": 10**400}, r"solver_args\['scale'\] must be finite and > 0, got 1000"),
])
def test_convex_layer_invalid_solver_args_values(solver, args, match):
    x = cp.Parameter(3, name="x")
    y = cp.Variable(3, name="y")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0])
    with pytest.raises(OptionError, match=match):  # at construction, not mid-batch
        cddn.ConvexLayer(prob, [x], [y], solver=solver, solver_args=args)
    layer = cddn.ConvexLayer(prob, [x], [y], solver=solver)
    with pytest.raises(OptionError, match=match.replace("solver_args", r"solver_args \(per call\)")):
        layer(torch.randn(3), solver_args=args)


def test_convex_layer_solver_args_values_normalised():
    import numpy as np

    layer, _ = nonneg_projection()
    layer = cddn.ConvexLayer(layer.problem, layer.parameters_, layer.variables_, solver="Clarabel",
                             solver_args={"max_iter": np.int64(50), "tol_feas": np.float32(1e-9),
                                          "time_limit": float("inf")})
    args = layer.solver_args
    assert type(args["max_iter"]) is int and type(args["tol_feas"]) is float
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(layer(x), x.clamp(min=0), atol=1e-8, rtol=0)


def test_convex_layer_last_solve_describes_an_empty_call():
    layer, _ = nonneg_projection()
    layer(torch.randn(2, 5, 3))
    assert layer.last_solve.solved.shape == (2, 5)
    layer(torch.randn(0, 3))
    info = layer.last_solve
    assert info.solved.shape == (0,) and info.solved.dtype == torch.bool
    assert info.backend == info.solvers == info.statuses == info.residuals == []
    layer(torch.randn(2, 0, 3))
    assert layer.last_solve.solved.shape == (2, 0)


def test_convex_layer_none_argument_is_dtype_error():
    layer, _ = nonneg_projection()
    with pytest.raises(DTypeError, match=r"parameter 0 \(x\) must be a torch.Tensor, got NoneType"):
        layer(None)
    with pytest.raises(DTypeError, match=r"parameter 0 \(x\) must be a torch.Tensor, got NoneType"):
        layer(x=None)
    with pytest.raises(ShapeError, match=r"missing \['x'\]"):
        layer()


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
def test_double_backward_raises(solver):
    # Both backends differentiate once. With create_graph=True the first-order gradient is
    # right; differentiating it again raised nothing on the batched path (it gave zeros)
    # and returned None on the per-element one: now DoubleBackwardError on both.
    x = cp.Parameter(3, name="x")
    y = cp.Variable(3)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0, cp.sum(y) <= 1]), [x], [y],
                             solver=solver)
    X = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64, requires_grad=True)  # inside: y = x
    (g,) = torch.autograd.grad((layer(X) ** 2).sum(), X, create_graph=True)
    torch.testing.assert_close(g.detach(), 2 * X.detach())
    with pytest.raises(DoubleBackwardError, match="ConvexLayer does not support double backward"):
        torch.autograd.grad(g.sum(), X, allow_unused=True)
    with pytest.raises(DoubleBackwardError):
        g.sum().backward()


def test_gp_input_changed_in_place_after_the_forward_differentiates_at_the_forward_point():
    # gp=True takes the log of each parameter (a saved tensor). The second-order guard handed it
    # views from a Function of two outputs, which torch cannot rebuild once their base changes:
    # backward raised "Output 0 of View is a view ... returns multiple views". Now the guard
    # passes copies: the gradient is the one at the point solved. x = a, y = sqrt(b) here.
    x, y = cp.Variable(pos=True), cp.Variable(pos=True)
    a, b = cp.Parameter(pos=True), cp.Parameter(pos=True)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(x * y), [a / x <= 1, b / y ** 2 <= 1]), [a, b], [x, y], gp=True)
    A = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    B = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    a_in = A * 1.0
    X, Y = layer(a_in, B)
    a_in.add_(0.37)
    (X + Y).sum().backward()
    torch.testing.assert_close(X.detach(), A.detach(), rtol=1e-7, atol=0)
    torch.testing.assert_close(A.grad, torch.ones(2, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(B.grad, 0.5 / B.detach().sqrt(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("tol", [1.0, 2.0, torch.tensor(1e-9), torch.tensor([1e-6, 1e-6]), True, 0.0])
def test_tol_is_a_number_in_unit_interval(tol):
    # tol = 1 accepted an infeasible element as solved; a tensor tol gave an error naming
    # tol_accept (never passed) or torch's own.
    x = cp.Parameter(2, name="x")
    y = cp.Variable(2)
    with pytest.raises(OptionError, match=r"^tol must be a number in \(0, 1\)"):
        cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x))), [x], [y], tol=tol)


def test_ambiguous_parameter_name_is_refused_by_name_only():
    # Two cp.Parameters named "x": binding by that name picked the first and then blamed
    # the user for giving it twice; positionally they work.
    a, b = cp.Parameter(2, name="x"), cp.Parameter(2, name="x")
    y = cp.Variable(2)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - a)), [y <= b]), [a, b], [y])
    with pytest.raises(ShapeError, match=r"parameter name 'x' is ambiguous: parameters \[0, 1\]"):
        layer(torch.ones(2, dtype=torch.float64), x=torch.ones(2, dtype=torch.float64))
    out = layer(torch.tensor([3.0, -1.0], dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0], dtype=torch.float64), atol=1e-8, rtol=0)


def test_nonunique_solution_gradient_is_zero_not_amplified():
    # min c·y on the simplex with c = (1, 1): every point of the edge is optimal. The
    # batched backward returned the cotangent amplified by ~1/δ (±1e9); now zero, as the
    # warning says, and the per-element path's minimum-norm one is ~0 too.
    c = cp.Parameter(2, name="c")
    y = cp.Variable(2)
    prob = cp.Problem(cp.Minimize(c @ y), [y >= 0, cp.sum(y) == 1])
    for solver in ("auto", "Clarabel"):
        layer = cddn.ConvexLayer(prob, [c], [y], solver=solver)
        C = torch.tensor([[1.0, 1.0], [1.0, 2.0]], dtype=torch.float64, requires_grad=True)
        with pytest.warns(GradientWarning, match=r"batch indices \[\(0,\)\]"):
            layer(C)[:, 0].sum().backward()
        assert C.grad.abs().max() < 1e-8, (solver, C.grad)


def test_gradient_warnings_name_the_callers_batch_indices():
    # Element (1, 0) of a (2, 2) batch is non-unique (zero cost on z, z >= x free above);
    # the others are not. Both backends, and the re-solve of a subset, name it as (1, 0).
    x = cp.Parameter(2, name="x")
    cz = cp.Parameter(2, name="c", nonneg=True)
    y, z = cp.Variable(2), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x) + cz @ z), [y >= 0, z >= x])
    C = torch.ones(2, 2, 2, dtype=torch.float64)
    C[1, 0] = torch.tensor([0.0, 1.0])
    for solver in ("auto", "Clarabel"):
        layer = cddn.ConvexLayer(prob, [x, cz], [y, z], solver=solver)
        X = torch.tensor([1.0, -1.0], dtype=torch.float64).expand(2, 2, 2).clone().requires_grad_()
        with pytest.warns(GradientWarning, match=r"batch indices \[\(1, 0\)\]"):
            layer(X, C)[1].sum().backward()


def test_float16_outputs_beyond_range_warn():
    # The solution 6e5 does not fit float16 (max 65504): it was returned as inf silently.
    x = cp.Parameter(2, name="x")
    y = cp.Variable(2)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - 10 * x)), [y >= -1e9]), [x], [y])
    with pytest.warns(cddn.errors.ConvexDDNWarning, match="1 solution entries exceed the range of torch.float16"):
        out = layer(torch.tensor([60000.0, 1.0], dtype=torch.float16))
    assert out.dtype == torch.float16 and torch.isinf(out[0]) and out[1] == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.tensor([6000.0, 1.0], dtype=torch.float16))


def test_float32_outputs_beyond_range_warn():
    # x* = b/a = 1e40 came back as inf with solved=True and no warning (only float16 was checked).
    a, b, x = cp.Parameter(pos=True), cp.Parameter(), cp.Variable()
    prob = cp.Problem(cp.Minimize(cp.square(a * x - b)))
    for solver in ("auto", "Clarabel"):
        layer = cddn.ConvexLayer(prob, [a, b], [x], solver=solver)
        with pytest.warns(cddn.errors.ConvexDDNWarning, match="exceed the range of torch.float32.*pass float64"):
            out = layer(torch.tensor(1e-30), torch.tensor(1e10))
        assert out.dtype == torch.float32 and torch.isinf(out)


def test_per_element_undecided_row_warns_only_where_the_side_matters():
    """A nonnegative row with multiplier and slack both ~0 was always reported "not
    unique or not differentiable": also the bound t_aux <= t_i of a ball row strictly
    inside (CVXPY's free epigraph variable), where the gradient is exact whichever side
    is taken. It now warns only where the two sides' gradients differ."""
    Q, t = cp.Parameter((3, 2)), cp.Parameter(3, nonneg=True)
    X = cp.Variable((3, 2))
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - Q)), [cp.norm(X, 2, axis=1) <= t])
    Qv = torch.tensor([[1.0, 2.0], [0.1, 0.1], [-3.0, 0.5]], dtype=torch.float64, requires_grad=True)
    tv = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    W = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (cddn.ConvexLayer(prob, [Q, t], [X], solver="Clarabel")(Qv, tv) * W).sum().backward()
    # Closed form: X_i = Q_i min(1, t_i / ‖Q_i‖).
    Qc, tc = Qv.detach().clone().requires_grad_(), tv.detach().clone().requires_grad_()
    nrm = Qc.norm(dim=1, keepdim=True)
    (Qc * torch.clamp(tc[:, None] / nrm, max=1.0) * W).sum().backward()
    torch.testing.assert_close(Qv.grad, Qc.grad, atol=1e-9, rtol=0)
    torch.testing.assert_close(tv.grad, tc.grad, atol=1e-9, rtol=0)
    # A weakly active bound (x >= 0 at q_0 = 0: dx_0/dq_0 is 0 on one side, 1 on the
    # other) still warns.
    q, x = cp.Parameter(2), cp.Variable(2)
    weak = cp.Problem(cp.Minimize(cp.sum_squares(x - q)), [x >= 0])
    qv = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    with pytest.warns(GradientWarning, match="not unique or not differentiable"):
        cddn.ConvexLayer(weak, [q], [x], solver="Clarabel")(qv)[0].backward()


def test_float16_gradients_beyond_range_warn():
    """dL/da = −10 b / a² = −1e5 for a float16 a = 0.01 came back as −inf, silently."""
    a, b, x = cp.Parameter(pos=True), cp.Parameter(), cp.Variable()
    prob = cp.Problem(cp.Minimize(cp.square(a * x - b)))  # x* = b / a
    for solver in ("auto", "Clarabel"):
        layer = cddn.ConvexLayer(prob, [a, b], [x], solver=solver)
        A = torch.tensor(0.01, dtype=torch.float16, requires_grad=True)
        B = torch.tensor(1.0, dtype=torch.float16, requires_grad=True)
        with pytest.warns(GradientWarning, match=r"1 gradient entries of parameter 0 \(.*\) exceed the range of "
                                                 r"torch.float16"):
            (10.0 * layer(A, B)).backward()
        assert torch.isinf(A.grad) and A.grad.dtype == torch.float16
        A = torch.tensor(0.5, dtype=torch.float16, requires_grad=True)  # −40: fits, and no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            (10.0 * layer(A, B)).backward()
        assert A.grad.item() == pytest.approx(-40.0, rel=1e-3)


def test_float16_symmetric_parameter_with_large_entries():
    """Finite float16 entries of 40000 overflowed in the symmetrisation (v + vᵀ)/2: the
    solver saw Inf (SolverError "KKT residual nan", or numerical trouble)."""
    S = cp.Parameter((2, 2), symmetric=True)
    q, x = cp.Parameter(2), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - q)), [S @ x <= 40000.0])
    Sv, qv = torch.tensor([[40000.0, 1.0], [1.0, 40000.0]]), torch.tensor([2.0, 0.5])
    for solver in ("auto", "Clarabel"):
        out = cddn.ConvexLayer(prob, [S, q], [x], solver=solver)(Sv.half(), qv.half())
        # The constraint S x <= 40000 binds at 40000 x_i + x_j = 40000: x ≈ (1, 0.5) to float16.
        torch.testing.assert_close(out.double(), torch.tensor([1.0, 0.5], dtype=torch.float64), atol=1e-3, rtol=0)


def test_duals_of_a_constraint_of_several_cones_are_refused_and_per_cone_duals_are_right():
    """The duals of cp.SOC(t, X, axis=1) with t of size 3 came back as the first cone's
    (t, x) triple laid out flat: dual t = [2.47, -1.11, -2.21] for [2.47, 0, 2.08]."""
    Q, t = cp.Parameter((3, 2)), cp.Parameter(3, nonneg=True)
    X = cp.Variable((3, 2))
    soc = cp.SOC(t, X, axis=1)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - Q)), [soc])
    with pytest.raises(ProblemError, match="holds 3 cones.*one constraint per cone"):
        cddn.ConvexLayer(prob, [Q, t], [X, *soc.dual_variables])
    cones = [cp.SOC(t[i], X[i]) for i in range(3)]
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - Q)), cones)
    Qv = torch.tensor([[1.0, 2.0], [0.1, 0.1], [-3.0, 0.5]], dtype=torch.float64)
    tv = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    outs = cddn.ConvexLayer(prob, [Q, t], [X] + [d for c in cones for d in c.dual_variables])(Qv, tv)
    Xo, duals = outs[0], outs[1:]
    # Stationarity: 2 (X − Q) is the stacked X-part of the duals (sign as CVXPY's), and
    # each cone's t-part is the norm of its X-part (complementarity on the boundary) or 0.
    stacked = torch.stack([duals[2 * i + 1] for i in range(3)])
    torch.testing.assert_close(stacked, 2 * (Xo - Qv), atol=1e-7, rtol=0)
    Q.value, t.value = Qv.numpy(), tv.numpy()
    prob.solve(solver="CLARABEL")
    for i, c in enumerate(cones):
        torch.testing.assert_close(duals[2 * i], torch.tensor(c.dual_variables[0].value, dtype=torch.float64)
                                   .reshape(duals[2 * i].shape), atol=1e-6, rtol=0)


def test_power_cones_of_inexact_exponents_are_refused_at_construction():
    """diffcp has no power cones: they were dropped, and every call failed (a bare
    Exception from Clarabel, or SCS's "solved" point with a residual of 1.4). An exponent
    that is an exact rational is stated in second-order cones (.power_cones); another is
    refused, named."""
    q, x = cp.Parameter(3), cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum(cp.power(x, 1.123456789, approx=False)) - q @ x), [x >= 0])
    for solver in ("auto", "Clarabel", "SCS"):
        with pytest.raises(ProblemError, match="power cone.*exponent 1.123456789.*not exact.*approx=True"):
            cddn.ConvexLayer(prob, [q], [x], solver=solver)
    # 1.5 = 3/2 is exact, with approx=False as with CVXPY's default: x = (q / 1.5)².
    qv = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    for approx in (False, True):
        prob = cp.Problem(cp.Minimize(cp.sum(cp.power(x, 1.5, approx=approx)) - q @ x), [x >= 0])
        torch.testing.assert_close(cddn.ConvexLayer(prob, [q], [x])(qv), (qv / 1.5) ** 2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
def test_problems_cvxpylayers_cannot_take_raise_problem_error(solver):
    # An LP without constraints (TypeError in our canonicalisation, cvxpy's SolverError
    # on the per-element path) was a raw error from the constructor.
    q = cp.Parameter(2, name="q")
    y = cp.Variable(2)
    # The message says why (it named only DIFFCP).
    with pytest.raises(ProblemError, match="cvxpylayers cannot use this problem.*no constraints and an affine "
                                           "objective: unbounded for any nonzero cost"):
        cddn.ConvexLayer(cp.Problem(cp.Minimize(q @ y)), [q], [y], solver=solver)


def test_cvxpy_error_without_a_message_names_the_expression():
    """CVXPY raises a bare NotImplementedError for expressions it cannot canonicalise
    (real() of a real expression): the error said only "NotImplementedError: "."""
    p, x = cp.Parameter(3, name="p"), cp.Variable(3, name="x")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x) + cp.real(p @ x)))
    for solver, error in (("Clarabel", ProblemError), ("auto", ProblemError), ("batched", OptionError)):
        with pytest.raises(error, match=r"NotImplementedError: \(no message\) .*for real \(real\(p @ x\)\)"):
            cddn.ConvexLayer(prob, [p], [x], solver=solver)


@pytest.mark.parametrize("solver", ["auto", "batched", "Clarabel", "SCS"])
def test_zero_size_parameter_or_variable_invalid(solver):
    """A parameter (or returned variable) without entries, which CVXPY leaves out of the
    compiled problem, was refused with cvxpylayers' bare 'KeyError: 3' (its id), or
    under solver='batched' an OptionError around it, naming neither."""
    q, y = cp.Parameter(2, name="q"), cp.Variable(2, name="y")
    G, h, e = cp.Parameter((0, 2), name="G"), cp.Parameter(0, name="h"), cp.Parameter((3, 0), name="E")
    cases = [
        (cp.Problem(cp.Minimize(cp.sum_squares(y) + q @ y), [G @ y <= h]), [q, G, h],
         r"parameters\[1\] \(G, shape \(0, 2\)\) has no entries \(zero size\)"),
        (cp.Problem(cp.Minimize(cp.sum_squares(y - q) + cp.sum(e))), [e, q],
         r"parameters\[0\] \(E, shape \(3, 0\)\) has no entries \(zero size\).*remove it from the problem"),
    ]
    for prob, params, message in cases:
        with pytest.raises(ProblemError, match=message):
            cddn.ConvexLayer(prob, params, [y], solver=solver)
    z = cp.Variable((2, 0), name="z")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - q) + cp.sum(z)))
    with pytest.raises(ProblemError, match=r"variables\[1\] \(z, shape \(2, 0\)\) has no entries.*drop it"):
        cddn.ConvexLayer(prob, [q], [y, z], solver=solver)
    # Unreturned, a zero-size variable is no obstacle.
    out = cddn.ConvexLayer(prob, [q], [y], solver=solver)(torch.tensor([1.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([1.0, -2.0], dtype=torch.float64), atol=1e-7, rtol=0)


# --- per-element path: audit findings (2026-12-02) -------------------------------------------

def _nonneg_projection(**kwargs):
    x = cp.Parameter(3)
    y = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0])
    return cddn.ConvexLayer(prob, [x], [y], **kwargs)


def test_adjoint_lsqr_works():
    """adjoint='lsqr' passed maxiter to scipy's lsqr (which calls it iter_lim): TypeError
    in every forward (the polish) and backward. Closed form: y = max(x, 0), dy/dx = [x > 0]."""
    layer = _nonneg_projection(solver="Clarabel", adjoint="lsqr")
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y.detach(), torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64), atol=1e-7, rtol=0)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("solver, args, match", [
    ("Clarabel", {"direct_solve_method": "foo"}, r"not accepted by Clarabel: Bad settings.*direct_solve_method"),
    ("Clarabel", {"max_iter": 2 ** 40}, r"not accepted by Clarabel"),
    ("SCS", {"alpha": 5.0}, r"solver_args\['alpha'\] must be a number in \(0, 2\), got 5.0"),
    ("ECOS", {"feastol": 0.0}, r"solver_args\['feastol'\] must be finite and > 0, got 0.0"),
])
def test_solver_args_out_of_range_are_option_errors(solver, args, match):
    """Accepted before: a bare Exception from Clarabel in every element, or each element
    failing inside SCS/ECOS and silently solved by another path (fallback=None: the batched
    one, no warning)."""
    with pytest.raises(OptionError, match=match):
        _nonneg_projection(solver=solver, solver_args=args)


def test_no_degeneracy_warning_for_an_element_without_cotangent():
    """With workers=1 the forward's refine left its degeneracy flag on the element's
    residual map and a zero-cotangent backward (which returns before any solve) warned
    about a degenerate vertex it never differentiated; workers=2 did not."""
    c, b, v = cp.Parameter(2), cp.Parameter(2), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(c @ v), [v >= 0, v[0] + v[1] <= b[0], v[0] - v[1] <= b[1]])
    layer = cddn.ConvexLayer(prob, [c, b], [v], solver="Clarabel")
    C = torch.tensor([[-1.0, -0.1]] * 2, dtype=torch.float64)
    B = torch.tensor([[1.0, 1.0], [1.0, 3.0]], dtype=torch.float64, requires_grad=True)  # 0: degenerate
    out = layer(C, B)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (g,) = torch.autograd.grad(out[1].sum(), B)
    assert g[0].tolist() == [0.0, 0.0]


def test_last_solve_names_the_solver_whose_point_is_returned(monkeypatch):
    """When Clarabel stopped (status Failure) and SCS, warm-started at its point, gave the
    point returned, last_solve said solvers=['Clarabel'], statuses=['Failure'], solved.
    (Since the exact exponential-cone projection the polish recovers Clarabel's point
    from one iteration by itself: its first polish is made to fail here.)"""
    from convexddn.convex import cone as cone_module

    real, calls = cone_module.ResidualMap.refine, []

    def refine(self, x, y, s, steps):
        calls.append(1)
        return real(self, x, y, s, steps) if len(calls) > 1 else (x, y, s, 1e-3)

    monkeypatch.setattr(cone_module.ResidualMap, "refine", refine)
    xp, yv = cp.Parameter(3), cp.Variable(3)
    prob = cp.Problem(cp.Minimize(-cp.sum(cp.entr(yv)) - xp @ yv), [cp.sum(yv) == 1])
    # (The default fallback: with fallback=None no other solver is used at all.)
    layer = cddn.ConvexLayer(prob, [xp], [yv], solver="Clarabel", solver_args={"max_iter": 1})
    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    with pytest.warns(SolverWarning, match="Clarabel: Failure; solved by SCS from its point"):  # (a rescue, said)
        y = layer(x)
    torch.testing.assert_close(y, torch.softmax(x, 0), atol=1e-7, rtol=0)  # closed form
    info = layer.last_solve
    assert info.solvers == ["Clarabel→SCS"] and "SCS from its point: solved" in info.statuses[0]
    # Residuals are Python floats on both paths (the per-element one gave np.float64).
    assert type(info.residuals[0]) is float


def test_kkt_check_sees_second_order_cone_violations():
    """diffcp's SOC projection returns a point unchanged when ‖u‖ is within np.isclose of
    t (1e-5 relative): a slack and multiplier 1e-5 outside the cone had KKT residual 0 and
    passed tol = 1e-6. Reference: the closed-form projection, s − Π(s) = (−eps/2, eps/2, 0)."""
    import numpy as np
    import scipy.sparse as sp
    from diffcp import cones as cone_lib

    from convexddn.convex.cone_checks import kkt_residual

    A, b, c = sp.csc_matrix(-np.eye(3)), np.zeros(3), np.zeros(3)
    cones = cone_lib.parse_cone_dict({"q": [3]})
    for eps in (1e-6, 1e-5):
        x = np.array([1.0, 1.0 + eps, 0.0])  # s = x outside the cone by eps; y = 0
        # s − Π(s) = (−eps/2, eps/2, 0): its ∞-norm over 1 + the block's row scale, the
        # rows' terms |A||x| + |s| + |b| = 2|x| (largest 2 (1 + eps)).
        expected = (eps / 2) / (1 + 2 * (1 + eps))
        assert kkt_residual(A, b, c, cones, x, np.zeros(3), x) == pytest.approx(expected, rel=1e-6)


def test_complex_and_hermitian_parameters_refused_at_construction_imag_works():
    """CVXPY gives a complex parameter two columns per entry (a Hermitian one its own
    triangles), the layer built one per entry of a real tensor: construction passed and
    every call failed with a raw torch/scipy error (hermitian, default solver: a wrong
    answer, [1, 1.33] for [3, 5])."""
    import numpy as np

    x = cp.Variable(3)
    c = cp.Parameter(3, complex=True, name="c")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(cp.real(c) - x) + cp.sum_squares(cp.imag(c))))
    for solver in ("auto", "batched", "Clarabel", "SCS", "ECOS"):
        with pytest.raises(ProblemError, match=r"parameters\[0\] \(c, shape \(3,\)\) is declared complex=True: "
                                               r"ConvexLayer takes real parameters only.*imag=True.*"
                                               r"split it into two real parameters.*c_re"):
            cddn.ConvexLayer(prob, [c], [x], solver=solver)
    y = cp.Variable(2)
    herm = cp.Parameter((2, 2), hermitian=True, name="H")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - cp.real(herm) @ np.ones(2))))
    for solver in ("auto", "Clarabel", "SCS"):
        with pytest.raises(ProblemError, match=r"parameters\[0\] \(H, shape \(2, 2\)\) is declared hermitian=True: "
                                               r"ConvexLayer takes real parameters only.*symmetric=True"):
            cddn.ConvexLayer(prob, [herm], [y], solver=solver)
    # The splits the messages suggest work, as do imag=True parameters.
    c_re, c_im = cp.Parameter(3, name="c_re"), cp.Parameter(3, name="c_im")
    z = c_re + 1j * c_im
    split = cp.Problem(cp.Minimize(cp.sum_squares(cp.real(z) - x) + cp.sum_squares(cp.imag(z))))
    re, im = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64)
    torch.testing.assert_close(cddn.ConvexLayer(split, [c_re, c_im], [x])(re, im), re, atol=1e-7, rtol=0)
    h_re, h_im = cp.Parameter((2, 2), symmetric=True), cp.Parameter((2, 2))
    hz = h_re + 1j * (h_im - h_im.T) / 2
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - cp.real(hz @ np.array([1.0, 1j]))))),
                             [h_re, h_im], [y])
    R, I = np.array([[1.0, 2.0], [2.0, 3.0]]), np.array([[0.0, 0.7], [-0.7, 0.0]])
    torch.testing.assert_close(layer(torch.tensor(R), torch.tensor(I)),
                               torch.tensor(np.real((R + 1j * I) @ np.array([1.0, 1j]))), atol=1e-7, rtol=0)
    imag = cp.Parameter(2, imag=True, name="p")
    for solver in ("auto", "Clarabel"):
        layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - 2 * cp.imag(imag)))), [imag], [y],
                                 solver=solver)
        torch.testing.assert_close(layer(torch.tensor([1.0, -2.0], dtype=torch.float64)),
                                   torch.tensor([2.0, -4.0], dtype=torch.float64), atol=1e-7, rtol=0)


@pytest.mark.parametrize("solver", ["auto", "batched", "Clarabel", "SCS", "ECOS"])
def test_imag_parameter_second_layer_on_one_problem(solver):
    """CVXPY reuses a problem's last compilation for the same solver and refills its
    imag=True parameters from their values, which layers do not set: a second layer on
    one problem failed at construction ('Invalid dimensions () for Parameter value'),
    under solver='auto' it silently lost its batched solver."""
    y, p = cp.Variable(2), cp.Parameter(2, imag=True, name="p")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - 2 * cp.imag(p))), [y <= 3])
    value = torch.tensor([[1.0, -2.0], [2.0, 5.0]], dtype=torch.float64, requires_grad=True)
    expected = torch.tensor([[2.0, -4.0], [3.0, 3.0]], dtype=torch.float64)
    for _ in range(2):
        layer = cddn.ConvexLayer(prob, [p], [y], solver=solver)
        torch.testing.assert_close(layer(value), expected, atol=1e-7, rtol=0)
    if solver in ("auto", "batched"):
        assert layer.last_solve.backend == ["batched", "batched"]
    layer(value).sum().backward()
    torch.testing.assert_close(value.grad, torch.tensor([[2.0, 2.0], [0.0, 0.0]], dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_wrong_entry_in_parameters_or_variables_is_named():
    """A wrong entry gave 'parameters must be a list of cvxpy.Parameter' without saying
    which entry or what it was."""
    A, b, x = cp.Parameter((2, 3), name="A"), cp.Parameter(2, name="b"), cp.Variable(3, name="x")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)), [A @ x <= b])
    cases = [
        ([A, cp.Variable(2, name="v")], [x],
         r"parameters\[1\] must be a cvxpy\.Parameter, got a cvxpy Variable 'v' of shape \(2,\) .*variables"),
        ([A, cp.Constant(torch.ones(2).numpy())], [x], r"parameters\[1\] must be a cvxpy\.Parameter, got a cvxpy Constant"),
        ([A, torch.ones(2)], [x], r"parameters\[1\] must be a cvxpy\.Parameter, got a torch\.Tensor of shape \(2,\)"),
        (A, [x], r"parameters must be a list of cvxpy\.Parameter, got a single cvxpy\.Parameter 'A'.*\(wrap it: \[A\]\)"),
        ("A", [x], r"parameters must be a list of cvxpy\.Parameter, got a str"),
        ([A, b], [b], r"variables\[0\] must be a cvxpy\.Variable, got a cvxpy Parameter 'b' of shape \(2,\) .*parameters"),
        ([A, b], [x, None], r"variables\[1\] must be a cvxpy\.Variable, got None"),
        ([A, b], x, r"variables must be a list of cvxpy\.Variable, got a single cvxpy\.Variable 'x' of shape "
                    r"\(3,\) \(wrap it: \[x\]\)"),
        ([A, b], [], r"variables must be a non-empty list of cvxpy\.Variable .*got an empty list"),
    ]
    for params, vars_, message in cases:
        with pytest.raises(ProblemError, match=message):
            cddn.ConvexLayer(prob, params, vars_)


def test_symmetric_declaration_message_names_the_batch_index():
    """symmetric=True said only 'not symmetric'; PSD=True named the batch index."""
    from convexddn.errors import InputError

    z = cp.Variable(2)
    bad = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.5], [0.0, 1.0]]], dtype=torch.float64)
    for attr in ("symmetric", "PSD"):
        S = cp.Parameter((2, 2), name="S", **{attr: True})
        layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(z)), [S @ z >= 1]), [S], [z])
        with pytest.raises(InputError, match=rf"parameter 0 \(S\) is declared {attr}=True, got 1 matrices that are "
                                             r"not \(shape \(2, 2, 2\); the first, at batch index \(1,\), is not symmetric\)"):
            layer(bad)
        with pytest.raises(InputError, match=r"\(shape \(2, 2\); it is not symmetric\)"):
            layer(bad[1])


@pytest.mark.parametrize("attr, good, bad", [("boolean", [0.0, 1.0], [0.5, -1.0]), ("integer", [-2.0, 3.0], [0.5])])
def test_boolean_and_integer_parameters_are_checked(attr, good, bad):
    """CVXPY takes a boolean parameter as nonneg (b‖x‖₁ is convex only so) and refuses
    other values itself; the layer accepted 0.5 silently and reported -1 as unbounded."""
    from convexddn.errors import InputError

    b, y, x = cp.Parameter(name="b", **{attr: True}), cp.Parameter(2), cp.Variable(2)
    term = cp.norm1(x) if attr == "boolean" else cp.sum(x)  # (convex with a nonneg b; any b)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - y) + b * term), [cp.norm_inf(x) <= 3])
    layer = cddn.ConvexLayer(prob, [b, y], [x])
    Y = torch.tensor([1.0, -2.0], dtype=torch.float64)
    for v in good:
        layer(torch.tensor(v, dtype=torch.float64), Y)
    for v in bad:
        with pytest.raises(InputError, match=rf"parameter 0 \(b\) is declared {attr}=True, got 1 entries"):
            layer(torch.tensor(v, dtype=torch.float64), Y)


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
def test_second_backward_without_retain_graph_raises_on_both_paths(solver):
    """The per-element path's backward saves no tensor: a second backward() without
    retain_graph ran it again and silently doubled X.grad (the batched path raised
    torch's error). Now both raise it; with retain_graph=True the second backward
    accumulates the same gradient again, as torch does everywhere."""
    n = 3
    x, y = cp.Parameter(n), cp.Variable(n)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0, cp.sum(y) <= 1]), [x], [y],
                             solver=solver)
    X = torch.tensor([[0.3, 0.2, -0.1]], dtype=torch.float64, requires_grad=True)
    s = layer(X).sum()  # (sum saves no tensor: only the layer's own backward can refuse)
    s.backward()
    first = X.grad.clone()
    torch.testing.assert_close(first, torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64), rtol=0, atol=1e-8)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        s.backward()
    X.grad = None
    s = layer(X).sum()  # (sum saves no tensor: only the layer's own backward can refuse)
    s.backward(retain_graph=True)
    s.backward()
    torch.testing.assert_close(X.grad, 2 * first, rtol=1e-12, atol=1e-12)
    X.grad = None  # outputs may still be changed in place before the backward, as any op's
    y = layer(X)
    y /= 2
    y.sum().backward()
    torch.testing.assert_close(X.grad, first / 2, rtol=1e-12, atol=1e-12)


def test_warnings_name_the_callers_line():
    """Every ConvexLayer warning pointed at torch's eval_frame.py (the torch.compiler.disable
    wrapper added a frame to the fixed stacklevels), so the printed location and
    module-specific filters missed the user's code. Forward (a masked element, a float16
    overflow) and backward (a kink) now name this file."""
    n = 3
    q, h, x = cp.Parameter(n), cp.Parameter(), cp.Variable(n)
    masked = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(x - q)), [x >= 0, cp.sum(x) <= h]), [q, h], [x],
                              on_failure="mask")
    big = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= 3 * q]), [q], [x])
    v, lam, y = cp.Parameter(2), cp.Parameter(nonneg=True), cp.Variable(2)
    kink = cddn.ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - v) + lam * cp.norm(y)), []), [v, lam], [y])
    vv = torch.tensor([[0.6, 0.8]], dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masked(torch.randn(2, n, dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64))
        big(torch.tensor([[3e4, 0.0, 0.0]], dtype=torch.float16))
        kink(vv, torch.tensor([1.0], dtype=torch.float64))[0, 1].backward()
    kinds = {w.category.__name__ for w in caught}
    assert {"SolverWarning", "ConvexDDNWarning", "GradientWarning"} <= kinds, kinds
    assert all(w.filename == __file__ for w in caught), [(w.category.__name__, w.filename) for w in caught]


def test_psd_and_symmetric_checks_follow_the_dtype_of_the_values():
    """A rank-deficient PSD matrix in float16 or bfloat16 was refused as not PSD: its
    negative eigenvalue (-0.00089 for float16) is the rounding of its entries, which the
    check judged at a float32-level tolerance (1e-6·max|entry|). The tolerance now
    follows the dtype's eps and the matrix size (rounding moves an eigenvalue by up to
    n·eps/2·max|entry|), so such a matrix is accepted and solved; a clearly indefinite
    half-precision matrix is still refused, and so is a float64 matrix whose values were
    rounded in float32 (float64's tolerance is unchanged)."""
    n, batch = 4, 8
    P = cp.Parameter((n, n), name="P", PSD=True)
    q = cp.Parameter(n, name="q")
    x = cp.Variable(n)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.quad_form(x, P) + cp.sum_squares(x) + q @ x)), [P, q], [x])
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(batch, n, 2, dtype=torch.float64, generator=gen)
    exact = V @ V.transpose(-1, -2)  # PSD of rank 2
    q64 = torch.randn(batch, n, dtype=torch.float64, generator=gen)
    for dtype in (torch.float16, torch.bfloat16):
        Ph, qh = exact.to(dtype), q64.to(dtype)
        assert float(torch.linalg.eigvalsh(Ph.double()).min()) < -1e-4  # rounding made it indefinite
        out = layer(Ph, qh)
        assert out.dtype == dtype
        # The float64 solve of the matrix before rounding (and the same q), and its closed form.
        ref = layer(exact, qh.double())
        closed = torch.linalg.solve(2 * (exact + torch.eye(n, dtype=torch.float64)), -qh.double()[..., None])[..., 0]
        torch.testing.assert_close(ref, closed, atol=1e-7, rtol=0)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(out.double(), ref, atol=4 * n * eps * float(ref.abs().max()), rtol=0)
        # Clearly indefinite (smallest eigenvalue -0.3·max|entry|): refused in half precision too.
        Q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))[0]
        bad = (Q * torch.tensor([1.0, 1.0, 1.0, -0.3], dtype=torch.float64)) @ Q.T
        with pytest.raises(cddn.errors.InputError, match=r"parameter 0 \(P\) is declared PSD=True, got 1 matrices "
                                                         rf"that are not .*smallest eigenvalue -0\.[23].*{str(dtype)[6:]}"):
            layer(torch.cat([Ph, bad.to(dtype)[None]]), torch.cat([qh, qh[:1]]))
    # A float64 matrix whose values were rounded in float32 is not PSD to float64's tolerance.
    with pytest.raises(cddn.errors.InputError, match=r"declared PSD=True"):
        layer(exact.float().double(), q64)

    # symmetric (and PSD): X W Xᵀ computed in half precision is symmetric only to within
    # rounding (it was refused as "not symmetric"); a 10% asymmetry is still refused.
    S = cp.Parameter((n, n), name="S", symmetric=True)
    y = cp.Variable(n)
    sym_layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - cp.sum(S, axis=1)))), [S], [y])
    for dtype in (torch.float16, torch.bfloat16):
        X = torch.randn(batch, n, n, dtype=torch.float64, generator=gen).to(dtype)
        W = V.to(dtype) @ V.to(dtype).transpose(-1, -2)
        XWX = X @ W @ X.transpose(-1, -2)
        assert bool((XWX != XWX.transpose(-1, -2)).any())
        wide = XWX.double()
        expected = (0.5 * (wide + wide.transpose(-1, -2))).sum(-1)
        out = sym_layer(XWX)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(out.double(), expected, atol=4 * eps * float(expected.abs().max()), rtol=0)
        layer(XWX, torch.zeros(batch, n, dtype=dtype))  # PSD: symmetric and eigenvalues within rounding
        skew = XWX.clone()
        skew[3, 0, 1] += 0.1 * float(XWX[3].abs().max())
        with pytest.raises(cddn.errors.InputError, match=r"declared symmetric=True, got 1 matrices .* batch index "
                                                         r"\(3,\), is not symmetric"):
            sym_layer(skew)


def test_a_solver_that_cannot_take_the_cones_is_refused_at_construction():
    """ECOS has no semidefinite cone: as the solver or the fallback of a problem with
    X >> 0 it failed on every element of every call (fallback=None: a SolverError per
    call; as the first solver, a SolverWarning and SCS's answer per call). Now an
    OptionError at construction names the option and the cone; Clarabel and SCS still
    solve it (the projection of a symmetric matrix onto the PSD cone: its eigenvalues
    clamped at zero)."""
    import numpy as np

    A = cp.Parameter((3, 3), symmetric=True)
    X = cp.Variable((3, 3), symmetric=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - A)), [X >> 0])
    for kwargs, option in (({"solver": "ECOS", "fallback": None}, "solver"), ({"solver": "ECOS"}, "solver"),
                           ({"solver": "Clarabel", "fallback": "ECOS"}, "fallback"),
                           ({"fallback": "ECOS"}, "fallback")):
        with pytest.raises(OptionError, match=rf"{option}='ECOS' cannot solve semidefinite cones"):
            cddn.ConvexLayer(prob, [A], [X], **kwargs)
    a = np.array([[1.0, 2.0, 0.0], [2.0, -1.0, 0.5], [0.0, 0.5, -2.0]])
    w, V = np.linalg.eigh(a)
    want = torch.tensor((V * np.maximum(w, 0)) @ V.T)
    for solver in ("Clarabel", "SCS"):
        got = cddn.ConvexLayer(prob, [A], [X], solver=solver, fallback=None)(torch.tensor(a))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_elements_the_per_element_path_fails_get_the_batched_form_where_it_does_not_pay(monkeypatch):
    """The per-element path runs first where the batched form does not pay (``fits``, a
    speed choice); elements it fails are solved by the batched form before any error
    wherever memory holds one element (entmax, n = 100, alpha = 1.25: Clarabel and SCS
    stalled at residual 2e-6 and a SolverError, though the batched form solves it to
    1.5e-12). Here Clarabel is cut to one iteration with no fallback, so every element
    fails per element; y = max(x, 0) and dy/dx = [x > 0] are the closed forms."""
    import convexddn.convex.batched as batched_module

    monkeypatch.setattr(batched_module.BatchedProgram, "fits", lambda self, device: False)
    x, y = cp.Parameter(4, name="x"), cp.Variable(4, name="y")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0])
    layer = cddn.ConvexLayer(prob, [x], [y], fallback=None, solver_args={"max_iter": 1}, refine=0)
    xs = torch.tensor([[1.0, -2.0, 0.5, -0.25], [-1.0, 3.0, -0.5, 2.0]], dtype=torch.float64, requires_grad=True)
    out = layer(xs)
    assert layer.last_solve.backend == ["batched"] * 2 and all(layer.last_solve.solved)
    torch.testing.assert_close(out, xs.detach().clamp(min=0), atol=1e-9, rtol=0)
    (grad,) = torch.autograd.grad(out.sum(), xs)
    torch.testing.assert_close(grad, (xs.detach() > 0).to(torch.float64), atol=1e-7, rtol=0)
    # Beyond the memory budget for one element: no batched form, the per-element failure stands.
    monkeypatch.setitem(batched_module._BATCHED_MAX_BYTES, "cpu", layer._opinion.memory_estimate(1) - 1)
    with pytest.raises(SolverError, match="KKT residual"):
        layer(xs.detach())


@pytest.mark.parametrize("strategy", ["reverse-mode", "forward-mode"])
def test_vectorized_jacobian_is_refused_in_either_strategy(strategy):
    """jacobian(..., vectorize=True) batches the cotangents or tangents with autograd's
    own vmap; the forward-mode strategy failed inside the derivative with torch's raw
    "Batching rule not implemented for aten::alias". The Jacobian one cotangent at a time
    is the box projection's, diag(|x| < 1)."""
    x, y = cp.Parameter(3), cp.Variable(3)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= -1, y <= 1]), [x], [y])
    X = torch.tensor([2.0, 0.5, -3.0], dtype=torch.float64)
    what = "forward-mode tangents" if strategy == "forward-mode" else "cotangents"
    with pytest.raises(ProblemError, match=f"^ConvexLayer does not support batched {what} "):
        torch.autograd.functional.jacobian(layer, X, vectorize=True, strategy=strategy)
    J = torch.autograd.functional.jacobian(layer, X)
    torch.testing.assert_close(J, torch.diag(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)), atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_symmetric_parameter_with_subnormal_entries_is_taken_as_given(dtype):
    """The symmetric part (v + vᵀ)/2 was taken in the caller's dtype, halves first: half of
    an odd subnormal rounds, so the projection argmin ‖X − S‖² = S of an exactly
    symmetric float16 S = [[3, 5], [5, 2²⁴]]·2⁻²⁴ came back [[4, 4], [4, 2²⁴]]·2⁻²⁴."""
    S, X = cp.Parameter((2, 2), symmetric=True), cp.Variable((2, 2))
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(X - S))), [S], [X])
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the smallest subnormal
    V = torch.tensor([[3.0, 5.0], [5.0, 0.0]], dtype=torch.float64).to(dtype) * tiny
    V[1, 1] = 1.0
    assert bool((V[0] != 0).all()) and torch.equal(V, V.T)
    torch.testing.assert_close(layer(V), V, atol=0, rtol=0)


def _box_problem():
    """argmin ½‖u − x‖² s.t. −½ ≤ u ≤ ½: closed form clamp(x, −½, ½)."""
    x, u = cp.Parameter(4, name="x"), cp.Variable(4, name="u")
    return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u - x)), [u >= -0.5, u <= 0.5]), x, u


@pytest.mark.parametrize("how", ["context", "default"])
@pytest.mark.parametrize("cls", ["ConvexLayer", "CvxpyLayer"])
def test_layer_builds_under_a_meta_default_device(how, cls, default_device):
    """Built under torch.device("meta") (or torch.set_default_device, as a CUDA default
    device is set): the canonicalisation's host-side index maps followed the default
    device, then .numpy() raised torch's TypeError ("can't convert meta device type
    tensor to numpy"). The layer has no tensors of its own; it solves as built on the CPU."""
    prob, x, u = _box_problem()
    make = (lambda: cddn.ConvexLayer(prob, [x], [u])) if cls == "ConvexLayer" else \
        (lambda: cddn.CvxpyLayer(prob, parameters=[x], variables=[u]))
    with default_device("meta", how):
        layer = make()
    layer = layer.to_empty(device="cpu")
    X = torch.tensor([[1.0, -0.2, 0.3, -2.0], [0.1, 0.6, -0.7, 0.0]], dtype=torch.float64)
    out = layer(X)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.allclose(out, X.clamp(-0.5, 0.5), atol=1e-7)


def test_layer_solves_cpu_tensors_under_another_default_device(default_device):
    """A call on CPU tensors while the default device is another (meta here, as a CUDA
    default): the coefficient maps' order check compared its CPU positions with an
    arange on the default device (torch's RuntimeError, "Tensor on device meta is not on
    the expected device cpu"). Closed form: clamp(x, −½, ½), gradient 1 inside the box."""
    prob, x, u = _box_problem()
    layer = cddn.ConvexLayer(prob, [x], [u])
    X = torch.tensor([[1.0, -0.2, 0.3, -2.0], [0.1, 0.6, -0.7, 0.0]], dtype=torch.float64, requires_grad=True)
    with default_device("meta"):
        out = layer(X)
        (grad,) = torch.autograd.grad(out.sum(), X)
    assert torch.allclose(out, X.detach().clamp(-0.5, 0.5), atol=1e-7)
    assert torch.allclose(grad, (X.detach().abs() < 0.5).double(), atol=1e-6)


def test_mask_warning_lists_every_failed_element_in_the_batch_shape():
    """The on_failure="mask" warning had no ``elements`` (nor ``notes``), unlike the layer's
    other warnings (docs/which-path.md), and its message cut the list at 20 with no sign of
    more: 25 infeasible elements of a (6, 5) batch came back as 20 flat-looking indices."""
    x = cp.Parameter(2, name="x")
    z = cp.Variable(2)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(z)), [z >= x, z <= 1]), [x], [z],
                             on_failure="mask")
    X = torch.zeros(30, 2, dtype=torch.float64)
    X[:25, 0] = 2.0  # z >= 2 and z <= 1: infeasible
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = layer(X.reshape(6, 5, 2))
    masked = [w.message for w in rec if "set to NaN" in str(w.message)]
    assert len(masked) == 1 and isinstance(masked[0], SolverWarning)
    expected = [(i // 5, i % 5) for i in range(25)]
    assert masked[0].elements == expected
    assert len(masked[0].notes) == 25 and all(isinstance(n, str) and n for n in masked[0].notes)
    message = str(masked[0])
    assert message.startswith("ConvexLayer: 25 batch element(s) not solved")
    assert "batch indices [(0, 0), (0, 1)" in message and "(3, 4)], ...;" in message  # the first 20, and more
    assert (~layer.last_solve.solved).reshape(-1).tolist() == [True] * 25 + [False] * 5
    assert bool(torch.isnan(out.reshape(30, 2)[:25]).all()) and bool(torch.isfinite(out.reshape(30, 2)[25:]).all())
