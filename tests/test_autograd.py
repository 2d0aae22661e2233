"""convexddn._autograd: every first-order-only node refuses second derivatives clearly."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from convexddn.errors import DoubleBackwardError, ProblemError
from convexddn.functional import (
    eigen_decomposition,
    entmax,
    least_squares,
    linear_fit,
    pnp,
    project_lp,
    project_simplex,
    robust_pool,
    robust_vector_pool,
    sinkhorn,
    tridiagonal_solve,
    tv_denoise,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_checks import Quartic  # noqa: E402

F64 = torch.float64


def _pnp_points():
    g = torch.Generator().manual_seed(0)
    xy = 2 * torch.rand(1, 8, 2, generator=g, dtype=F64) - 1
    z = 2 * torch.rand(1, 8, 1, generator=g, dtype=F64) + 2
    return xy, torch.cat([z * xy, z], -1) + 0.01 * torch.randn(1, 8, 3, generator=g, dtype=F64)


def _sym(n):
    a = torch.randn(2, n, n, dtype=F64, generator=torch.Generator().manual_seed(1))
    return a + a.mT


# (name, input, node as a function of it); each output is a differentiable tensor. The inputs
# are seeded: drawn from the global generator they depended on what ran before the import
# (an L1-ball input projected onto vertices in both rows has a zero Hessian).
_G = torch.Generator().manual_seed(11)
CASES = [
    ("robust_pool", torch.randn(2, 8, dtype=F64, generator=_G), lambda x: robust_pool(x, "huber", 1.0)),
    ("project_lp L2 sphere", torch.randn(2, 5, dtype=F64, generator=_G), lambda x: project_lp(x, 2, "sphere", 1.0)),
    ("project_lp L1 ball", 3 * torch.randn(2, 5, dtype=F64, generator=_G), lambda x: project_lp(x, 1, "ball", 1.0)),
    ("project_lp Linf ball", 3 * torch.randn(2, 5, dtype=F64, generator=_G),
     lambda x: project_lp(x, "inf", "ball", 1.0)),
    ("project_simplex", torch.randn(2, 5, dtype=F64, generator=_G), project_simplex),
    ("entmax", torch.randn(2, 6, dtype=F64, generator=_G), lambda x: entmax(x, 1.5)),
    ("sinkhorn", torch.rand(1, 4, 4, dtype=F64, generator=_G), lambda c: sinkhorn(c, eps=0.5)),
    ("tv_denoise", torch.randn(2, 9, dtype=F64, generator=_G), lambda x: tv_denoise(x, 0.5)),
    ("least_squares", torch.randn(2, 6, 3, dtype=F64, generator=_G),
     lambda a: least_squares(a, torch.ones(2, 6, dtype=F64))),
    ("robust_vector_pool", torch.randn(1, 3, 5, dtype=F64, generator=_G),
     lambda x: robust_vector_pool(x, "huber", 1.0)),
    ("eigen_decomposition", _sym(4), lambda s: eigen_decomposition(s).eigenvectors),
    ("tridiagonal_solve", 4 + torch.rand(2, 6, dtype=F64, generator=_G),
     lambda d: tridiagonal_solve(d, torch.ones(2, 5, dtype=F64), -torch.ones(2, 5, dtype=F64),
                                 torch.linspace(-1, 1, 6, dtype=F64).expand(2, 6))),
    ("pnp", _pnp_points()[1], lambda p: pnp(_pnp_points()[0], p)),
]


@pytest.mark.parametrize("name,x,node", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("loss", ["square", "linear"])
def test_second_derivative_raises_double_backward_error(name, x, node, loss):
    # torch's once_differentiable raised a generic RuntimeError, and where the incoming
    # gradient is a constant (a loss linear in the output) it attached nothing: the
    # second derivative came back as None, or zeros behind another op.
    X = x.clone().requires_grad_()
    out = node(X)
    value = (out * out).sum() if loss == "square" else (out * torch.linspace(1, 2, out.shape[-1], dtype=F64)).sum()
    (g,) = torch.autograd.grad(value, X, create_graph=True)
    # The first-order gradient is the plain one.
    (plain,) = torch.autograd.grad((lambda o: (o * o).sum() if loss == "square" else
                                    (o * torch.linspace(1, 2, o.shape[-1], dtype=F64)).sum())(node(X)), X)
    torch.testing.assert_close(g.detach(), plain)
    with pytest.raises(DoubleBackwardError, match="does not support double backward"):
        torch.autograd.grad((g * g).sum(), X, allow_unused=True)


def test_inputs_changed_in_place_after_the_forward_still_differentiate():
    # The guard's anchors are not saved tensors: an input changed in place after the
    # forward (which these nodes do not need in their backward) must not fail it.
    a = torch.randn(4, 4, dtype=F64, requires_grad=True)
    s = a @ a.mT
    lam, vec = eigen_decomposition(s, 2)
    s.add_(1.0)
    (lam.sum() + vec.abs().sum()).backward()
    h = torch.randn(2, 9, dtype=F64, requires_grad=True) * 2
    y = tv_denoise(h, 0.3)
    h.add_(1.0)
    y.sum().backward()


def test_bind_fast_skips_argument_binding_for_positional_calls(monkeypatch):
    """Function.apply binds every call's arguments through inspect (~20 µs) to fill in
    defaults; the library's Functions, called with every argument positionally, skip it
    (and give the same result); a call with keywords still takes torch's path."""
    import inspect

    from convexddn._autograd import bind_fast

    @bind_fast
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(x, k=2.0):
            return x * k

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.k = inputs[1]

        @staticmethod
        def backward(ctx, g):
            return g * ctx.k, None

    x = torch.tensor([1.0, -3.0], requires_grad=True)
    calls = []
    original = inspect.Signature.bind
    monkeypatch.setattr(inspect.Signature, "bind", lambda *a, **k: calls.append(1) or original(*a, **k))
    y = Scale.apply(x, 3.0)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert calls == [] and y.tolist() == [3.0, -9.0] and g.tolist() == [3.0, 3.0]
    assert Scale.apply(x).tolist() == [2.0, -6.0] and calls == [1]  # a default to fill in
    assert Scale.apply(x, k=0.5).tolist() == [0.5, -1.5] and calls == [1, 1]


def _loss(node):
    return lambda x: (node(x) ** 2).sum()


FUNC_CASES = [c for c in CASES if c[0] != "pnp"]  # (pnp refuses torch.func: below)


@pytest.mark.parametrize("name,x,node", FUNC_CASES, ids=[c[0] for c in FUNC_CASES])
def test_torch_func_grad_is_the_gradient_and_its_second_order_is_refused(name, x, node):
    """torch.func.grad runs a node's backward with grad mode on: the guard that refuses
    second derivatives (an old-style autograd.Function) then raised torch's "must
    override the setup_context staticmethod" for every node. First order now equals
    torch.autograd's; grad of grad raises DoubleBackwardError."""
    X = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(_loss(node)(X), X)
    torch.testing.assert_close(torch.func.grad(_loss(node))(x), want, rtol=1e-12, atol=1e-12)
    out, vjp = torch.func.vjp(node, x)
    torch.testing.assert_close(vjp(2 * out)[0], want, rtol=1e-12, atol=1e-12)  # (d/dx Σ out² = Jᵀ 2 out)
    with pytest.raises(DoubleBackwardError, match="does not support double backward"):
        torch.func.grad(lambda v: torch.func.grad(_loss(node))(v).sum())(x)


def test_convex_layer_under_torch_func_grad():
    """The batched convex path's backward went through the same guard (torch's
    "setup_context" error): torch.func.grad now equals torch.autograd's gradient."""
    import cvxpy as cp

    from convexddn import ConvexLayer

    v, y = cp.Parameter(3), cp.Variable(3)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - v)), [y >= 0, cp.sum(y) <= 1]), [v], [y])
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    loss = _loss(layer)
    X = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(loss(X), X)
    torch.testing.assert_close(torch.func.grad(loss)(x), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(DoubleBackwardError, match="does not support double backward"):
        torch.func.grad(lambda t: torch.func.grad(loss)(t).sum())(x)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_pnp_refuses_torch_func_transforms(transform):
    """Its solver and backward differentiate by torch.autograd, which torch.func does
    not allow inside (torch.func.grad failed in the backward with torch's own error)."""
    xy, p3d = _pnp_points()
    f = lambda p: pnp(xy, p).sum()  # noqa: E731
    call = torch.func.grad(f) if transform == "grad" else torch.func.vmap(lambda p: pnp(xy, p[None])[0])
    arg = p3d if transform == "grad" else torch.stack([p3d[0], p3d[0] + 0.01])
    with pytest.raises(ProblemError, match="pnp does not run under torch.func transforms other than jvp"):
        call(arg)


# torch.func.jacrev (a vmap over the vjp) failed for every node: the second-order guard
# had no vmap rule. Where the backward is plain torch ops it now works, and where a jvp
# exists so does jacfwd (entmax, project_simplex, least_squares and robust_pool refused it
# until 2026-12-06, robust_pool and robust_vector_pool jacrev: tests/test_autograd_batched.py).
JACREV_WORKS = {"project_lp L2 sphere", "project_lp L1 ball", "project_lp Linf ball", "project_simplex", "entmax",
                "tv_denoise", "least_squares", "eigen_decomposition", "tridiagonal_solve", "robust_pool",
                "robust_vector_pool"}
JACFWD_WORKS = {"project_lp L2 sphere", "project_lp L1 ball", "project_lp Linf ball", "project_simplex", "entmax",
                "tv_denoise", "least_squares", "robust_pool", "robust_vector_pool", "eigen_decomposition",
                "tridiagonal_solve"}
VMAP_WORKS = {"robust_vector_pool", "robust_pool"}


def _transform(kind, node, x):
    if kind == "vmap":
        return torch.func.vmap(node)(torch.stack([x, 1.01 * x]))
    return getattr(torch.func, kind)(node)(x)


@pytest.mark.parametrize("kind", ["vmap", "jacrev", "jacfwd"])
@pytest.mark.parametrize("name,x,node", FUNC_CASES, ids=[c[0] for c in FUNC_CASES])
def test_torch_func_transforms_work_or_raise_problem_error(name, x, node, kind):
    """Each node under torch.func.vmap / jacrev / jacfwd either gives what torch.autograd
    gives (the unbatched calls; autograd.functional.jacobian) or raises a ProblemError
    naming it. Before, most raised torch's own errors ("data-dependent control flow",
    "does not have vmap support", "Cannot access data pointer")."""
    works = {"vmap": VMAP_WORKS, "jacrev": JACREV_WORKS, "jacfwd": JACFWD_WORKS}[kind]
    if name not in works:
        with pytest.raises(ProblemError, match=name.split()[0]):
            _transform(kind, node, x)
        return
    got = _transform(kind, node, x)
    want = (torch.stack([node(x), node(1.01 * x)]) if kind == "vmap"
            else torch.autograd.functional.jacobian(node, x.clone()))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
def test_convex_layer_refuses_torch_func_transforms_it_cannot_run(solver):
    """vmap, jacrev and jacfwd (host reads in the solver and its checks) and, on the
    per-element path (numpy), torch.func.grad raise a ProblemError naming ConvexLayer
    (torch's own errors before)."""
    import cvxpy as cp

    from convexddn import ConvexLayer

    v, y = cp.Parameter(3), cp.Variable(3)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - v)), [y >= 0, cp.sum(y) <= 1]), [v], [y],
                        solver=solver)
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    for kind in ("vmap", "jacrev", "jacfwd"):
        with pytest.raises(ProblemError, match="ConvexLayer"):
            _transform(kind, layer, x)
    if solver == "Clarabel":
        with pytest.raises(ProblemError, match="per-element path .* does not run under torch.func"):
            torch.func.grad(_loss(layer))(x)


CONSTANT_UNDER_VMAP = [
    ("entmax", lambda c: entmax(c, 1.5)),
    ("project_simplex", project_simplex),
    ("least_squares", lambda a: least_squares(a, torch.ones(2, 6, dtype=F64))),
    ("sinkhorn", lambda c: sinkhorn(c, eps=0.5)),
    ("robust_pool", lambda c: robust_pool(c, "huber", 1.0)),
]


@pytest.mark.parametrize("name,node", CONSTANT_UNDER_VMAP, ids=[c[0] for c in CONSTANT_UNDER_VMAP])
def test_a_plain_vmap_over_a_call_on_constants_works(name, node):
    """A node called on constants inside torch.func.vmap (its inputs not batched, no
    tangents) works as before the jacfwd refusal; under jacfwd too where the node's
    Function has a vmap rule, and sinkhorn's, which has none, refuses it clearly."""
    x = next(c[1] for c in CASES if c[0] == name)
    scale = torch.tensor([1.0, 2.0], dtype=F64)
    got = torch.func.vmap(lambda t: t * node(x).sum())(scale)
    torch.testing.assert_close(got, scale * node(x).sum())
    if name != "sinkhorn":
        got = torch.func.jacfwd(lambda t: t * node(x).sum())(scale)
        torch.testing.assert_close(got, torch.diag(node(x).sum().expand(2)))
        return
    with pytest.raises(ProblemError, match=r"^sinkhorn does not support batched forward-mode tangents \(torch.func"):
        torch.func.jacfwd(lambda t: t * node(x).sum())(scale)


@pytest.mark.parametrize("name,x,node", FUNC_CASES[1:4], ids=[c[0] for c in FUNC_CASES[1:4]])
def test_forward_over_reverse_raises_double_backward_error(name, x, node):
    """torch.func.hessian and jvp(grad(f)) differentiate the gradient by forward mode:
    torch's "must implement the jvp function" before; now DoubleBackwardError."""
    with pytest.raises(DoubleBackwardError, match="does not support double backward"):
        torch.func.hessian(_loss(node))(x)
    with pytest.raises(DoubleBackwardError, match="does not support double backward"):
        torch.func.jvp(torch.func.grad(_loss(node)), (x,), (torch.ones_like(x),))


FORWARD_CASES = [
    ("eigenvalues", _sym(4)[0], lambda s: eigen_decomposition(s, 1).eigenvalues.sum()),
    ("entmax", torch.randn(6, dtype=F64), lambda x: (entmax(x, 1.5) * torch.arange(6.0, dtype=F64)).sum()),
    ("tv_denoise", torch.randn(9, dtype=F64), lambda x: (tv_denoise(x, 0.5) ** 2).sum()),
]


@pytest.mark.parametrize("name,x,f", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_over_forward_raises_double_backward_error(name, x, f):
    """A jvp's tangent is computed without a graph: differentiating it by a second jvp
    gave a zero Hessian for the largest eigenvalue and entmax's second derivative 6 % off,
    silently."""
    d = torch.ones_like(x)
    torch.func.jvp(f, (x,), (d,))  # first order works
    with pytest.raises(DoubleBackwardError):
        torch.func.jvp(lambda t: torch.func.jvp(f, (t,), (d,))[1], (x,), (d,))


@pytest.mark.parametrize("name,x,f", FORWARD_CASES[:1] + FORWARD_CASES[2:], ids=["eigenvalues", "tv_denoise"])
def test_torch_func_second_derivatives_raise_double_backward_error(name, x, f):
    """hessian, jacrev∘jacrev and jacfwd∘jacfwd of the nodes that support jacrev and
    jacfwd: torch's "output with shape [1] doesn't match the broadcast shape" for the
    eigenvalues, or a silently wrong Hessian (jacfwd∘jacfwd), before."""
    for second in (torch.func.hessian, lambda g: torch.func.jacrev(torch.func.jacrev(g)),
                   lambda g: torch.func.jacfwd(torch.func.jacfwd(g))):
        with pytest.raises(DoubleBackwardError):
            second(f)(x)


def test_pnp_refuses_batched_cotangents():
    """pnp's backward reads its Hessian checks on the host: autograd's own batching gave
    torch's "Batching rule not implemented"; now a ProblemError."""
    xy, p3d = _pnp_points()
    P = p3d.clone().requires_grad_(True)
    out = pnp(xy, P)
    with pytest.raises(ProblemError, match="pnp does not support batched cotangents"):
        torch.autograd.grad(out, P, torch.eye(6, dtype=F64).view(6, 1, 6), is_grads_batched=True)


def test_convex_layer_second_look_under_torch_func_is_refused():
    """An element the batched iterations do not certify gets Clarabel's second look, in
    numpy: under torch.func.grad that failed with torch's "Cannot access data pointer"."""
    import cvxpy as cp

    from convexddn import ConvexLayer

    n = 3
    q, h, x = cp.Parameter(n), cp.Parameter(), cp.Variable(n)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(x - q)), [x >= 0, cp.sum(x) <= h]), [q, h], [x],
                        on_failure="mask")
    H = torch.tensor([1.0, -1.0], dtype=F64)  # element 1 infeasible
    Q = torch.randn(2, n, dtype=F64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ProblemError, match="does not run under torch.func"):
        torch.func.grad(lambda a: torch.nan_to_num(layer(a, H)).pow(2).sum())(Q)


@pytest.mark.parametrize("transform", ["grad", "jvp"])
def test_convex_layer_second_look_refusal_names_the_elements(transform):
    """The refusal names the elements that wanted the second look, in the caller's batch shape,
    and what the iterations said of them (it named neither: a user could not tell which element
    of a mixed batch was infeasible, under torch.func.jvp or grad)."""
    import cvxpy as cp

    from convexddn import ConvexLayer

    q, h, x = cp.Parameter(2), cp.Parameter(), cp.Variable(2)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(x - q)), [x >= 0, cp.sum(x) <= h]), [q, h], [x])
    H = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=F64)  # batch (2, 2): element (1, 1) infeasible (sum(x) <= -1)
    Q = torch.ones(2, 2, 2, dtype=F64)
    f = lambda a: layer(a, H).sum()  # noqa: E731
    with pytest.raises(ProblemError, match=r"batch indices \[\(1, 1\)\], .*\(\(1, 1\): primal infeasible\)"):
        if transform == "grad":
            torch.func.grad(f)(Q)
        else:
            torch.func.jvp(f, (Q,), (torch.ones_like(Q),))


# A node's second tensor argument made under torch.inference_mode (a radius, a budget, a
# TV weight computed there), with x requiring grad: (name, x, value of the argument, node).
INFERENCE_ARGS = [
    ("project_lp L1", 3 * torch.randn(2, 5, dtype=F64), 1.5, lambda x, r: project_lp(x, 1, "ball", r)),
    ("project_lp L2", torch.randn(2, 5, dtype=F64), 0.5, lambda x, r: project_lp(x, 2, "sphere", r)),
    ("project_lp Linf", torch.randn(2, 5, dtype=F64), 0.5, lambda x, r: project_lp(x, "inf", "ball", r)),
    ("project_simplex", torch.randn(2, 5, dtype=F64), 2.0, lambda x, z: project_simplex(x, -1, z)),
    ("tv_denoise", torch.randn(2, 12, dtype=F64), 0.3, lambda x, lam: tv_denoise(x, lam)),
]


@pytest.mark.parametrize("name,x,value,node", INFERENCE_ARGS, ids=[c[0] for c in INFERENCE_ARGS])
def test_an_argument_made_in_inference_mode(name, x, value, node):
    """Saved for the backward as a plain copy: ``Function.apply`` raised torch's
    "Inference tensors cannot be saved for backward". Outputs and gradients are those
    of the same call with a normal tensor."""
    with torch.inference_mode():
        arg = torch.tensor(value, dtype=F64)
    xi = x.clone().requires_grad_()
    y = node(xi, arg)
    (g,) = torch.autograd.grad((y * torch.linspace(-1, 1, y.shape[-1], dtype=F64)).sum(), xi)
    xr = x.clone().requires_grad_()
    yr = node(xr, torch.tensor(value, dtype=F64))
    (gr,) = torch.autograd.grad((yr * torch.linspace(-1, 1, yr.shape[-1], dtype=F64)).sum(), xr)
    torch.testing.assert_close(y, yr, rtol=0, atol=0)
    torch.testing.assert_close(g, gr, rtol=0, atol=0)


@pytest.mark.parametrize("penalty", ["huber", "pseudo_huber", "welsch", "trunc_quad"])
def test_robust_pool_backward_inside_a_forward_ad_level(penalty):
    """A dual level open, x requiring grad, but no tangent on the node's path (another
    tensor carries it): the reverse-mode gradient with respect to x is the ordinary one,
    as outside the level, its tangent None (exactly: nothing on the path moves). (The
    backward's out= kernels once failed in a dual level with torch's "Trying to use
    forward AD with sub_out".)"""
    import torch.autograd.forward_ad as fw

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, dtype=F64, generator=g, requires_grad=True)
    a = torch.full((3,), 0.7, dtype=F64)
    want, = torch.autograd.grad(robust_pool(x, penalty, a).pow(2).sum(), x)
    with fw.dual_level():
        other = fw.make_dual(a.clone(), torch.ones(3, dtype=F64))
        y = robust_pool(x, penalty, a)
        got, = torch.autograd.grad(y.pow(2).sum(), x)
        elsewhere = other * 2  # (forward mode on other tensors goes on)
        assert fw.unpack_dual(got).tangent is None and fw.unpack_dual(elsewhere).tangent is not None
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("penalty", ["huber", "pseudo_huber", "welsch"])  # (trunc_quad's is 0 here)
def test_robust_pool_mixed_second_derivative_in_a_forward_ad_level_is_refused(penalty):
    """alpha carries a tangent, x requires grad: the gradient's tangent is the mixed
    second derivative d/dalpha (dL/dx), nonzero (central differences of the first-order
    gradient, below). It came back None, silently; now DoubleBackwardError."""
    import torch.autograd.forward_ad as fw

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 9, dtype=F64, generator=g)
    a0 = torch.full((3,), 0.7, dtype=F64)

    def grad_x(a):
        x = x0.clone().requires_grad_()
        return torch.autograd.grad(robust_pool(x, penalty, a).pow(2).sum(), x)[0]

    mixed = (grad_x(a0 + 1e-6) - grad_x(a0 - 1e-6)) / 2e-6
    assert mixed.abs().max() > 1e-3  # (what the dropped tangent should have been)
    with fw.dual_level():
        x = x0.clone().requires_grad_()
        y = robust_pool(x, penalty, fw.make_dual(a0, torch.ones(3, dtype=F64)))
        with pytest.raises(DoubleBackwardError, match="robust_pool does not support double backward in forward mode"):
            torch.autograd.grad(y.pow(2).sum(), x)


def _sinkhorn_marginal(a):
    g = torch.Generator().manual_seed(4)
    C = torch.rand(2, 4, 5, generator=g, dtype=F64)
    b = torch.softmax(torch.randn(2, 5, generator=g, dtype=F64), -1)
    return sinkhorn(C, a, b, eps=0.5)


def _convex_layer():
    import cvxpy as cp

    from convexddn import ConvexLayer

    v, y = cp.Parameter(4), cp.Variable(4)
    return ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - v)), [y >= 0, cp.sum(y) <= 1]), [v], [y])


FORWARD_OVER_REVERSE = CASES + [  # (seeded, as CASES: a ConvexLayer input projected onto vertices has H = 0)
    ("Quartic (a DeclarativeNode, named)", torch.randn(2, 3, dtype=F64, generator=_G), Quartic()),
    ("sinkhorn marginal", torch.softmax(torch.randn(2, 4, dtype=F64, generator=_G), -1), _sinkhorn_marginal),
    ("ConvexLayer", torch.randn(2, 4, dtype=F64, generator=_G), _convex_layer()),
    ("linear_fit", torch.randn(2, 3, 7, dtype=F64, generator=_G),
     lambda z: linear_fit(z, torch.arange(7.0, dtype=F64)).coef),
]


@pytest.mark.parametrize("name,x,node", FORWARD_OVER_REVERSE, ids=[c[0] for c in FORWARD_OVER_REVERSE])
def test_forward_over_reverse_through_forward_ad_raises_double_backward_error(name, x, node):
    """x carries a tangent d and requires grad; torch.autograd.grad inside the dual level:
    the gradient's tangent is the Hessian-vector product H d (plain torch ops give it). It
    came back None for the nodes, zeros for ConvexLayer and 87 % off for sinkhorn's
    marginals, silently; now DoubleBackwardError naming the function called. (The true
    H d, central differences of the first-order gradient, is checked to be nonzero.)"""
    import torch.autograd.forward_ad as fw

    if name == "project_lp Linf ball":  # (3 randn: every entry clipped at times, a zero Hessian)
        x = x / 3
    out = node(x)
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=F64).view_as(out)
    d = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(6))  # (sinkhorn: not C + a1ᵀ + 1bᵀ)

    def grad(z):
        z = z.clone().requires_grad_()
        return torch.autograd.grad((node(z) * w).pow(2).sum(), z)[0]

    assert ((grad(x + 1e-6 * d) - grad(x - 1e-6 * d)) / 2e-6).abs().max() > 1e-3
    with fw.dual_level():
        X = fw.make_dual(x.clone().requires_grad_(), d)
        loss = (node(X) * w).pow(2).sum()
        with pytest.raises(DoubleBackwardError, match=f"{name.split()[0]} does not support double backward"):
            torch.autograd.grad(loss, X)


def test_refusals_name_the_function_called():
    """linear_fit runs least_squares, entmax(alpha=2) project_simplex, a ConvexLayer its
    batched program: their refusals named those (least_squares, project_simplex,
    BatchedProgram), which the user never called; pnp under torch.func.jacfwd said it
    does not support torch.func.jacrev. (linear_fit under jacfwd, refused then, works.)"""
    x = torch.randn(2, 3, 7, dtype=F64, generator=torch.Generator().manual_seed(5))
    fit = lambda z: linear_fit(z, torch.arange(7.0, dtype=F64)).coef  # noqa: E731

    def double_backward(node, z):
        z = z.clone().requires_grad_()
        (g,) = torch.autograd.grad(node(z).pow(2).sum(), z, create_graph=True)
        torch.autograd.grad(g.sum(), z)

    calls = [("linear_fit", ProblemError, lambda: torch.func.vmap(fit)(torch.stack([x, x]))),
             ("linear_fit", DoubleBackwardError, lambda: double_backward(fit, x)),
             ("entmax", DoubleBackwardError, lambda: double_backward(lambda z: entmax(z, 2.0), x[0])),
             ("ConvexLayer", DoubleBackwardError, lambda: double_backward(_convex_layer(), x[:, 0, :4]))]
    for name, error, call in calls:
        with pytest.raises(error, match=f"^{name} ") as info:
            call()
        assert not any(inner in str(info.value) for inner in ("least_squares", "project_simplex", "BatchedProgram"))
    xy, p3d = _pnp_points()
    message = r"pnp does not support batched forward-mode tangents \(torch.func.jacfwd\)"
    with pytest.raises(ProblemError, match=message) as info:
        torch.func.jacfwd(lambda p: pnp(xy, p))(p3d)
    assert "jacrev" not in str(info.value)


def test_autograd_functional_jvp_is_refused_with_what_to_use():
    """torch.autograd.functional.jvp differentiates the backward (the double-vjp trick)
    even for a first-order product: refused as a second derivative, with a message that
    named nothing to use instead. It names torch.func.jvp and torch.autograd.forward_ad,
    which give the product (checked against central differences)."""
    x = 2 * torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    v = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    f = lambda z: project_lp(z, 1, "ball", 1.0)  # noqa: E731
    with pytest.raises(DoubleBackwardError, match=r"torch.autograd.functional.jvp .* use torch.func.jvp or "
                                                  r"torch.autograd.forward_ad"):
        torch.autograd.functional.jvp(f, x, v)
    fd = (f(x + 1e-6 * v) - f(x - 1e-6 * v)) / 2e-6
    torch.testing.assert_close(torch.func.jvp(f, (x,), (v,))[1], fd, rtol=1e-7, atol=1e-7)


def test_robust_pool_forward_over_reverse_is_refused():
    """torch.func.jvp over torch.func.grad (a second derivative) failed inside the
    backward with torch's NotImplementedError for every penalty but the quadratic; it
    raises the DoubleBackwardError the quadratic did."""
    from convexddn.functional import robust_pool

    x = torch.randn(3, 9, dtype=F64, generator=torch.Generator().manual_seed(1))
    f = torch.func.grad(lambda z: robust_pool(z, "huber", 1.0).pow(2).sum())
    with pytest.raises(DoubleBackwardError, match="robust_pool"):
        torch.func.jvp(f, (x,), (torch.ones_like(x),))


def test_torch_jit_trace_is_refused_by_name():
    # A trace records the solver's host-side decisions (paths, iteration counts) as
    # constants: a traced TotalVariation1d was silently wrong on new inputs, a traced
    # ConvexLayer lost its gradient (and a fresh one failed with 'unordered_map::at').
    import cvxpy as cp

    from convexddn import ConvexLayer
    from convexddn.errors import ProblemError
    from convexddn.functional import entmax, project_lp, robust_pool, robust_vector_pool, tv_denoise

    x = torch.randn(2, 3, 8, dtype=torch.float64)
    p = cp.Parameter(3, name="p")
    y = cp.Variable(3)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - p)), [y >= 0]), [p], [y])
    layer(torch.randn(3, dtype=torch.float64))  # (a layer called once traced "fine", without a gradient)
    for name, fn, arg in [("robust_pool", lambda t: robust_pool(t, "welsch", 1.0), x),
                          ("robust_vector_pool", lambda t: robust_vector_pool(t, "huber", 1.0), x),
                          ("project_lp", lambda t: project_lp(t, 1, "ball", 1.0), x),
                          ("entmax", lambda t: entmax(t, 1.5), x),
                          ("tv_denoise", lambda t: tv_denoise(t, 0.5), x),
                          ("ConvexLayer", layer, torch.randn(3, dtype=torch.float64))]:
        with pytest.raises(ProblemError, match=f"{name} does not run under torch.jit.trace"):
            torch.jit.trace(fn, (arg,), check_trace=False)


@pytest.mark.parametrize("name,x,node", CASES, ids=[c[0] for c in CASES])
def test_make_fx_tracing_is_refused(name, x, node):
    """torch.func.linearize (make_fx tracing) records the solvers' host decisions as
    constants: eigen_decomposition's eigenvectors came back with ±inf tangents, silently,
    and the other nodes raised torch's raw '_local_scalar_dense' error."""
    with pytest.raises(ProblemError, match=f"{name.split()[0]} does not run under torch.jit.trace, make_fx"):
        torch.func.linearize(node, x.clone())


@pytest.mark.parametrize("name", ["sinkhorn", "pnp"])
def test_autograd_batched_forward_mode_is_refused(name):
    """torch.autograd.functional.jacobian(vectorize=True, strategy='forward-mode') batches
    the tangents with autograd's own vmap: these nodes failed inside torch ("Batching rule
    not implemented for aten::detach", "aten::is_nonzero"). The error names the batched
    forward-mode tangents, not the cotangents (least_squares and eigen_decomposition,
    refused until 2026-12-06 as "batched cotangents or tangents", take them)."""
    _, x, node = next(c for c in CASES if c[0] == name)
    if name == "pnp":  # (its image points made outside: no random ops under the vmap)
        node = lambda p, q=_pnp_points()[0]: pnp(q, p)  # noqa: E731
    with pytest.raises(ProblemError, match=f"^{name} does not support batched forward-mode tangents "
                                           r"\(torch.autograd.functional.jacobian\(..., vectorize=True, "):
        torch.autograd.functional.jacobian(node, x.clone(), vectorize=True, strategy="forward-mode")


@pytest.mark.parametrize("k", [None, 2])
def test_eigen_decomposition_backward_of_an_empty_batch(k):
    # The forward ran; the backward's amin() over an empty batch raised torch's error.
    X = torch.zeros(0, 4, 4, dtype=F64, requires_grad=True)
    lam, V = eigen_decomposition(X, k)
    (g,) = torch.autograd.grad(lam.sum() + V.sum(), X)
    assert g.shape == (0, 4, 4)


class _Exported(torch.nn.Module):
    """A module around a node function: what torch.export takes."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


_EXPORTABLE = ("project_lp L2 sphere", "project_lp Linf ball")
EXPORT_REFUSED = [(name.replace("project_lp L1 ball", "project_lp(p=1)").split()[0], x, node)
                  for name, x, node in CASES if name not in _EXPORTABLE] + [
    ("ConvexLayer", torch.randn(2, 4, dtype=F64, generator=_G), _convex_layer()),
    ("Quartic", torch.randn(2, 3, dtype=F64, generator=_G), Quartic()),
]


@pytest.mark.skipif(not hasattr(torch, "export"), reason="no torch.export in this torch")
@pytest.mark.parametrize("name,x,node", EXPORT_REFUSED, ids=[c[0] for c in EXPORT_REFUSED])
def test_torch_export_is_refused_by_name(name, x, node):
    """torch.export (non-strict, its default) failed inside with torch's raw
    GuardOnDataDependentSymNode: it sets torch.compiler.is_compiling(), which let the
    refusals of jit.trace and make_fx pass. The node's ProblemError now, naming it."""
    with pytest.raises(ProblemError, match=rf"^{re.escape(name)} does not run under torch.export"):
        torch.export.export(_Exported(node), (x.clone(),), strict=False)


@pytest.mark.skipif(not hasattr(torch, "export"), reason="no torch.export in this torch")
@pytest.mark.parametrize("name", ["ConvexLayer", "robust_pool", "Quartic", "entmax"])
def test_strict_torch_export_is_refused_by_name(name):
    """Strict export (dynamo) failed before the refusals, or wrapped their error in its
    own Unsupported: "Skip inlining torch.compiler.disable()d function" (ConvexLayer),
    "Failed to convert args/kwargs to proxy" (robust_pool), "Unsupported context manager"
    (a DeclarativeNode), "Observed exception" (entmax)."""
    _, x, node = next(c for c in EXPORT_REFUSED if c[0] == name)
    with pytest.raises(ProblemError, match=rf"^{name} does not run under torch.export"):
        torch.export.export(_Exported(node), (x.clone(),), strict=True)


@pytest.mark.skipif(not hasattr(torch, "export"), reason="no torch.export in this torch")
@pytest.mark.parametrize("p,mode", [(2, "ball"), (2, "sphere"), ("inf", "ball"), ("inf", "sphere")])
def test_closed_form_projections_export(p, mode):
    """The closed-form L2 and L∞ projections export, and the exported program projects
    new inputs as the closed forms do: x·r/‖x‖ (the ball: only outside it), the clamp
    (the sphere: the largest |x_k| inside pushed to ±r)."""
    x = 2 * torch.randn(4, 5, dtype=F64, generator=_G)
    x[0] *= 0.05  # a row inside both balls
    program = torch.export.export(_Exported(lambda t: project_lp(t, p, mode, 1.5)), (x.clone(),))
    new = 2 * torch.randn(4, 5, dtype=F64, generator=_G)
    new[1] *= 0.05
    if p == 2:
        norm = torch.linalg.vector_norm(new, dim=-1, keepdim=True)
        expected = new * (1.5 / norm if mode == "sphere" else (1.5 / norm).clamp(max=1))
    else:
        expected = new.clamp(-1.5, 1.5)
        if mode == "sphere":
            k = new.abs().argmax(-1, keepdim=True)
            inside = new.abs().amax(-1, keepdim=True) < 1.5
            top = torch.where(new.gather(-1, k) >= 0, 1.5, -1.5).to(F64)
            expected = torch.where(inside, expected.scatter(-1, k, top), expected)
    torch.testing.assert_close(program.module()(new), expected, rtol=1e-14, atol=1e-14)


def test_registry_wrappers_refuse_vmap_and_name_the_layer():
    """convexddn.layer's wrappers around a node or a ConvexLayer: under torch.func.vmap their
    own input checks read values first and failed with torch's "data-dependent control flow"
    (entmax and sparsemax with backend='cvxpy', lp_ball with backend='cvxpy', ot_entropic); the
    nodes they run named themselves (sinkhorn, tv_denoise) where the caller built layer(...)."""
    import convexddn

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, dtype=F64, generator=gen)
    cost, a = torch.rand(3, 3, dtype=F64, generator=gen), torch.full((3,), 1 / 3, dtype=F64)
    wrapped = [convexddn.layer("sparsemax", n=4, backend="cvxpy"), convexddn.layer("entmax", n=4, alpha=1.5,
                                                                                    backend="cvxpy"),
               convexddn.layer("lp_ball", n=4, p=2, backend="cvxpy")]
    for layer in wrapped:
        with pytest.raises(ProblemError, match="^ConvexLayer does not run under torch.func.vmap"):
            torch.func.vmap(layer)(x)
    ot = convexddn.layer("ot_entropic", m=3, n=3)
    with pytest.raises(ProblemError, match=r"^layer\('ot_entropic'\) does not run under torch.func.vmap"):
        torch.func.vmap(ot)(cost.expand(2, 3, 3), a.expand(2, 3), a.expand(2, 3))
    with pytest.raises(ProblemError, match=r"^layer\('ot_entropic'\) "):
        torch.func.jacrev(lambda c: ot(c, a, a))(cost)
    with pytest.raises(ProblemError, match=r"^layer\('tv1d'\) does not run under torch.func.vmap"):
        torch.func.vmap(convexddn.layer("tv1d", n=5))(torch.randn(2, 5, dtype=F64, generator=gen))
    # (called plainly, each still solves)
    assert ot(cost, a, a).shape == (3, 3) and wrapped[0](x).shape == (2, 4)
