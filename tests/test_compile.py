"""The native nodes under ``torch.compile``: same results as eager, forward and backward.

Graph breaks are allowed (the solvers test convergence on the host). The ``eager``
backend replays the captured ops as they are, so its results must be bit-identical;
``aot_eager`` traces through AOTAutograd's decompositions, which may reassociate a
reduction, so it gets a few-ulp tolerance; one test runs the default inductor backend
on a tiny shape. Everything is skipped with the reason where torch.compile cannot run.
"""
from __future__ import annotations

import math
import shutil
import warnings

import pytest
import torch
from torch import nn

import convexddn as cddn

DT = torch.float64


def _compile_unavailable() -> str | None:
    if not hasattr(torch, "compile"):
        return "torch.compile does not exist in this torch version"
    try:
        import torch._dynamo as dynamo
    except Exception as err:  # noqa: BLE001 - any import failure means: unavailable
        return f"torch._dynamo cannot be imported: {err}"
    supported = getattr(dynamo, "is_dynamo_supported", lambda: True)
    if not supported():
        return "torch.compile (dynamo) is not supported on this platform / Python version"
    return None


REASON = _compile_unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

PENALTIES = ("quadratic", "pseudo_huber", "huber", "welsch", "trunc_quad")
LP_CASES = [(p, mode) for p in (1, 2, math.inf) for mode in ("ball", "sphere")]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no recompilation limit reached across tests
    (which would silently fall back to eager and make the comparison vacuous)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def data(seed: int = 0, shape=(3, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = 1.3 * torch.randn(shape, generator=g, dtype=DT)
    x[..., 0] += 4.0  # an outlier in every row for the robust penalties
    return x


def forward_backward(fn, module: nn.Module, x: torch.Tensor):
    """Output and the gradients of a fixed functional w.r.t. x and the module's parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cddn.errors.ConvexDDNWarning)
        xr = x.clone().requires_grad_(True)
        y = fn(xr)
        v = torch.linspace(-1.0, 2.0, y.numel(), dtype=y.dtype).reshape(y.shape)
        params = [p for p in module.parameters() if p.requires_grad]
        grads = torch.autograd.grad((y * v).sum(), [xr, *params])
    return y.detach(), grads


def compare(module: nn.Module, x: torch.Tensor, backend: str) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    eager = forward_backward(module, module, x)
    counter = CompileCounterWithBackend(backend)
    compiled_fn = torch.compile(module, backend=counter)
    got = forward_backward(compiled_fn, module, x)
    # Something was captured and compiled (graph breaks are fine, all-eager is not).
    assert counter.frame_count >= 1 and counter.op_count >= 1, (counter.frame_count, counter.op_count)
    # A second call runs the cached compiled code (the first one may have compiled).
    again = forward_backward(compiled_fn, module, x)
    for res in (got, again):
        if backend == "eager":
            assert torch.equal(res[0], eager[0])
            for a, b in zip(res[1], eager[1]):
                assert torch.equal(a, b)
        else:
            # A few ulps (float64) for reassociated reductions.
            torch.testing.assert_close(res[0], eager[0], rtol=1e-13, atol=1e-13)
            for a, b in zip(res[1], eager[1]):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(eager[0]).all()


# Per node, aot_eager: it also traces the backward (AOTAutograd). The eager backend is
# covered by the model test below (each compile costs ~1 s on a small CPU).
@pytest.mark.parametrize("backend", ["aot_eager"])
@pytest.mark.parametrize("penalty", PENALTIES)
def test_robust_pool_compiled_matches_eager(penalty, backend):
    pool = cddn.RobustPool(penalty, alpha=nn.Parameter(torch.tensor(0.9, dtype=DT)))
    compare(pool, data(), backend)


class _PoolTransposed(nn.Module):
    """Robust pooling of ``x.mT``: the rows the solver reads are a transposed view."""

    def __init__(self, penalty: str) -> None:
        super().__init__()
        self.pool = cddn.RobustPool(penalty, alpha=0.9)

    def forward(self, x):
        return self.pool(x.mT)


# Closed forms of phi' and phi'' (Gould et al. Table 1), alpha 0.9.
_DPHI = {"huber": lambda z: z.clamp(-0.9, 0.9), "pseudo_huber": lambda z: z / (1 + (z / 0.9) ** 2).sqrt()}
_D2PHI = {"huber": lambda z: (z.abs() <= 0.9).to(z.dtype), "pseudo_huber": lambda z: (1 + (z / 0.9) ** 2) ** -1.5}


# (Both penalties failed either way; one way each: a compile costs seconds.)
@pytest.mark.parametrize("penalty,layout", [("huber", "dim0"), ("pseudo_huber", "transposed")])
def test_robust_pool_compiled_strided_input_matches_eager(penalty, layout):
    """Pooling over dim 0, or over the last dim of a transposed view, hands the solver
    rows that are a transposed view of x. Traced, an ``out=`` op's result takes its
    operands' layout (eagerly: its ``out``'s), and the solvers' ``torch.sub(u, x,
    out=z)`` into a flat scratch buffer failed: BackendCompilerFailed, "Cannot view a
    tensor with shape [6, 8] and strides (1, 6) as a tensor with shape (48,)". Compiled
    now equals eager, and both the first-order condition and Table 1's gradient."""
    module = cddn.RobustPool(penalty, alpha=0.9, dim=0) if layout == "dim0" else _PoolTransposed(penalty)
    x = data(8, shape=(8, 6))
    compare(module, x, "aot_eager")
    # The reference: sum_i phi'(y - x_i) = 0 per column, and dy_j/dx_ij = phi''_i / sum phi''.
    xr = x.clone().requires_grad_(True)
    y = module(xr)
    (g,) = torch.autograd.grad(y.sum(), xr)
    r = y.detach() - x  # column j of x against y_j
    h = _D2PHI[penalty](r)
    # (the solver's stopping test: the Newton step |g| / h within tol (alpha + |y|), tol 1e-12)
    assert (_DPHI[penalty](r).sum(0).abs() / h.sum(0)).max() < 1e-11
    torch.testing.assert_close(g, h / h.sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["aot_eager"])
@pytest.mark.parametrize("p,mode", LP_CASES)
def test_lp_projection_compiled_matches_eager(p, mode, backend):
    proj = cddn.LpProjection(p=p, mode=mode, radius=nn.Parameter(torch.tensor(1.5, dtype=DT)))
    compare(proj, data(1), backend)


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_simplex_projection_compiled_matches_eager(backend):
    compare(cddn.SimplexProjection(), data(2), backend)


class SmallNet(nn.Module):
    """Linear → L1-ball projection → Welsch pooling over dims (1, 2) → Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(7, 6).to(DT)
        self.proj = cddn.LpProjection(p=1, radius=2.0)
        self.pool = cddn.RobustPool("welsch", alpha=nn.Parameter(torch.tensor(1.2, dtype=DT)), dim=(1, 2))
        self.head = nn.Linear(1, 1).to(DT)

    def forward(self, x):
        z = self.proj(self.lin(x)).reshape(x.shape[0], 3, 2 * x.shape[1])
        return self.head(self.pool(z).unsqueeze(-1))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_model_with_native_nodes_compiled_matches_eager(backend):
    compare(SmallNet(), data(3, shape=(4, 3, 7)), backend)


def test_inductor_backend_tiny_shape():
    """The default backend (inductor, which generates C++ on the CPU) on a tiny shape."""
    if shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        pytest.skip("inductor on the CPU needs a C++ compiler, none found on PATH")
    try:
        import torch._inductor  # noqa: F401
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"torch._inductor cannot be imported: {err}")
    x = data(4, shape=(2, 5))
    for module in (cddn.LpProjection(p=2, radius=nn.Parameter(torch.tensor(1.5, dtype=DT))),
                   cddn.RobustPool("pseudo_huber", alpha=nn.Parameter(torch.tensor(0.9, dtype=DT)))):
        eager = forward_backward(module, module, x)
        got = forward_backward(torch.compile(module), module, x)
        # Inductor fuses and may vectorise reductions: a few ulps, more for the iterative
        # solver, whose stopping test sees the rounding of each Newton step (tol 1e-12).
        torch.testing.assert_close(got[0], eager[0], rtol=1e-10, atol=1e-10)
        for a, b in zip(got[1], eager[1]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("penalty", ["pseudo_huber", "huber", "welsch"])
def test_robust_pool_compile_option_matches_eager(penalty, monkeypatch):
    """``compile=True`` forms the solvers' row sums from the penalty's derived formulas in
    one fused function (here traced by the ``eager`` backend, which replays the captured
    ops: the test checks those formulas, not inductor's code generation); the result
    equals the eager hand-fused path's to the solver tolerance."""
    import functools

    from convexddn.nodes.pooling import kernels

    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    x = data(5, shape=(6, 700))  # long rows: the sample stage too
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a compile failure would warn and fall back
        y_c = cddn.functional.robust_pool(x, penalty, 0.9, compile=True)
    y_e = cddn.functional.robust_pool(x, penalty, 0.9, compile=False)
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=1e-10)
    assert len(kernels._COMPILED) >= 1


# fullgraph=True: the closed-form projections (L2, L∞; ball and sphere) compile into one
# graph, input checks included (an asynchronous assert instead of a host sync). The
# iterative nodes (pooling, L1/simplex thresholds, transport, …) test convergence on the
# host and break the graph there, which the tests above cover.
FULLGRAPH_CASES = [(p, mode) for p in (2, math.inf) for mode in ("ball", "sphere")]


@pytest.mark.parametrize("p,mode", FULLGRAPH_CASES)
def test_closed_form_projections_compile_fullgraph(p, mode):
    module = cddn.LpProjection(p=p, mode=mode, radius=nn.Parameter(torch.tensor(1.5, dtype=DT)))
    x = data(6)
    eager = forward_backward(module, module, x)
    got = forward_backward(torch.compile(module, fullgraph=True, backend="aot_eager"), module, x)
    torch.testing.assert_close(got[0], eager[0], rtol=1e-13, atol=1e-13)
    for a, b in zip(got[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [2, math.inf])
def test_fullgraph_projection_still_rejects_nan(p):
    """Inside the compiled graph the finiteness check is an asynchronous assert: a NaN
    input still stops the call (a RuntimeError naming the argument, without counts)."""
    x = data(7)
    x[1, 2] = float("nan")
    f = torch.compile(cddn.LpProjection(p=p), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="x must be finite"):
        f(x)


def test_robust_pool_compile_option_stays_compiled_across_penalties(monkeypatch, caplog):
    """Each fused row-sum kernel has a code object of its own, so torch.compile keeps
    its compiled variants apart: three penalties, both solvers' row sums and both
    input ranks in one process used to exceed dynamo's recompile limit (8) on the one
    shared code object, after which the later kernels silently ran eagerly."""
    import functools
    import logging

    from convexddn.nodes.pooling import kernels

    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    x = data(6, shape=(5, 700))  # long rows: the sample stage's (R, 2, 1) points too
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        for penalty in ("pseudo_huber", "huber", "welsch"):
            for dtype in (torch.float64, torch.float32):
                for alpha in (0.9, torch.full((5,), 0.9, dtype=dtype)):  # one alpha, one per row
                    y = cddn.functional.robust_pool(x.to(dtype), penalty, alpha, compile=True)
                    e = cddn.functional.robust_pool(x.to(dtype), penalty, alpha, compile=False)
                    torch.testing.assert_close(y, e, rtol=0, atol=1e-10 if dtype == DT else 2e-5)
    assert not [r for r in caplog.records if "recompile" in r.getMessage()]
    keys = [k for k in kernels._COMPILED if isinstance(k, tuple)]
    assert len({kernels._COMPILED[k][0].__code__ for k in keys}) == len(keys) == 12


class _PoseHead(nn.Module):
    """A linear map of 3-D points, then PnP against fixed image points: the pose's last entry."""

    def __init__(self, q: torch.Tensor) -> None:
        super().__init__()
        self.q = q
        self.lin = nn.Linear(3, 3).to(DT)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(3, dtype=DT) + 0.01)
            self.lin.bias.zero_()

    def forward(self, p3):
        return cddn.functional.pnp(self.q, self.lin(p3))


def test_pnp_in_a_compiled_model_matches_eager():
    # PnP's solve takes autograd gradients and Hessians (create_graph) in its forward,
    # which failed under torch.compile ("aot_autograd does not currently support double
    # backward"), even under no_grad: a graph break now.
    g = torch.Generator().manual_seed(0)
    xy = 2 * torch.rand(2, 8, 2, generator=g, dtype=DT) - 1
    z = 2 * torch.rand(2, 8, 1, generator=g, dtype=DT) + 2
    p3 = torch.cat([z * xy, z], -1)
    compare(_PoseHead(xy), p3, "aot_eager")


# Forward mode (torch.autograd.forward_ad) through a compiled call gives the eager tangents: each
# node's own jvp, run eagerly (a graph break). Dynamo traced such a Function's forward alone and
# forward mode differentiated its ops (p=1: torch's "forward AD with minimum_out" error; a
# DeclarativeNode: no tangent at all), or it dropped ctx.mark_non_differentiable in the compiled
# setup_context and torch failed with "INTERNAL ASSERT FAILED at autograd_meta.cpp" (tv_denoise,
# eigen_decomposition, least_squares, sinkhorn).
class _SumToOne(cddn.DeclarativeNode):
    """y = argmin ½‖u − x‖² s.t. Σu = 1: y = x − (Σx − 1)/n."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return y.sum(-1, keepdim=True) - 1

    def solve(self, x):
        return x - (x.sum(-1, keepdim=True) - 1) / x.shape[-1]


_F = cddn.functional
FORWARD_MODE_CASES = {
    "tv_denoise": (lambda x: _F.tv_denoise(x, lam=1.0), (3, 6)),
    "TotalVariation1d": (cddn.TotalVariation1d(lam=0.5), (3, 6)),
    "eigen_decomposition": (lambda X: _F.eigen_decomposition(X + X.mT)[0], (3, 3, 3)),
    "least_squares": (lambda A: _F.least_squares(A, torch.ones(3, 4, dtype=DT)), (3, 4, 3)),
    "sinkhorn": (lambda C: _F.sinkhorn(C, eps=0.5), (3, 3, 4)),
    "project_lp_p1": (lambda z: _F.project_lp(z, 1), (3, 6)),
    "DeclarativeNode": (_SumToOne(), (3, 4)),
}


def _tangent(fn, z, dz):
    import torch.autograd.forward_ad as fwad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (dynamo's graph-break notes)
        with fwad.dual_level():
            return fwad.unpack_dual(fn(fwad.make_dual(z, dz))).tangent


@pytest.mark.parametrize("name", list(FORWARD_MODE_CASES))
def test_forward_mode_compiled_matches_eager(name):
    fn, shape = FORWARD_MODE_CASES[name]
    g = torch.Generator().manual_seed(0)
    z, dz = torch.randn(shape, generator=g, dtype=DT), torch.randn(shape, generator=g, dtype=DT)
    with torch.no_grad():  # the reference: float64 central differences
        fd = (fn(z + 1e-6 * dz) - fn(z - 1e-6 * dz)) / 2e-6
    eager = _tangent(fn, z, dz)
    torch.testing.assert_close(eager, fd, rtol=0, atol=1e-7)
    compiled = _tangent(torch.compile(fn, backend="eager"), z, dz)
    assert compiled is not None
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-12)


def test_forward_mode_compiled_projection_uses_its_jvp():
    """At a tie |x_i| = r of the L∞ ball the node's tangent is 0 there (its documented
    Jacobian: 1 where |x_i| < r, else 0); traced, the clamp's own derivative passed ẋ_i."""
    x = torch.tensor([[1.0, 0.3, -0.2], [2.0, -2.0, 0.5]], dtype=DT)
    expected = (x.abs() < 1).to(DT)
    proj = cddn.LpProjection(p=math.inf, radius=1.0)
    for fn in (proj, torch.compile(proj, backend="eager")):
        torch.testing.assert_close(_tangent(fn, x, torch.ones_like(x)), expected, rtol=0, atol=0)


# A NaN input under default torch.compile (fullgraph=False) raises the NonFiniteError it raises
# eagerly: check_finite breaks the graph for its host read. It was an asynchronous assert, a bare
# RuntimeError that `except NonFiniteError` / `except ValueError` missed. The closed-form L2/L∞
# projections break there only where the graph may break (fullgraph=True: the assert above).
NAN_CASES = {
    "robust_pool": lambda x: _F.robust_pool(x, "welsch"),
    "project_lp_p1": lambda x: _F.project_lp(x, 1),
    "project_lp_p2": cddn.LpProjection(p=2, radius=nn.Parameter(torch.tensor(1.5, dtype=DT))),
    "project_lp_pinf_sphere": lambda x: _F.project_lp(x, math.inf, "sphere"),
    "tv_denoise": lambda x: _F.tv_denoise(x),
    "sinkhorn": lambda x: _F.sinkhorn(x.reshape(2, 2, 3)),
    "DeclarativeNode": _SumToOne(),
}


@pytest.mark.parametrize("name", list(NAN_CASES))
def test_nan_input_compiled_raises_non_finite_error(name):
    x = data(8, shape=(2, 6))
    x[0, 1] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (dynamo's graph-break notes)
        with pytest.raises(cddn.errors.NonFiniteError, match=r"must be finite, got 1 NaN and 0 Inf"):
            torch.compile(NAN_CASES[name], backend="eager")(x)


# A bad option or an overflowing cast under default torch.compile (fullgraph=False) raises the
# error it raises eagerly: the check breaks the graph for its host read. It was an asynchronous
# assert, a bare RuntimeError that `except OptionError` / `except InputError` missed.
BAD_OPTION_CASES = {
    "robust_pool alpha": (lambda x, v: _F.robust_pool(x, "huber", v), cddn.errors.OptionError,
                          r"alpha must be finite and > 0, got \[-1.0\]"),
    "project_lp radius": (lambda x, v: _F.project_lp(x, 2, radius=v), cddn.errors.OptionError,
                          r"radius must be finite and > 0, got \[-1.0\]"),
    "linear_fit target": (lambda x, v: _F.linear_fit(x.float(), torch.full((7,), 1e39, dtype=DT) * -v).coef,
                          cddn.errors.InputError, r"target must fit x's dtype torch.float32 .* 7 of 7 entries"),
}


@pytest.mark.parametrize("name", list(BAD_OPTION_CASES))
def test_bad_option_compiled_raises_the_eager_error(name):
    fn, error, message = BAD_OPTION_CASES[name]
    x, v = data(9), torch.tensor(-1.0, dtype=DT)
    with pytest.raises(error, match=message):
        fn(x, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (dynamo's graph-break notes)
        with pytest.raises(error, match=message):
            torch.compile(fn, backend="eager")(x, v)


def test_fullgraph_projection_bad_radius_is_an_assert():
    """Where the graph must not break, the positivity check stays an asynchronous assert
    inside it: the call still stops, with a RuntimeError naming the option."""
    f = torch.compile(lambda x, r: _F.project_lp(x, 2, radius=r), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="radius must be finite and > 0"):
        f(data(10), torch.tensor(-1.0, dtype=DT))


# The iterative solvers run outside the compiled graph (a clean break around the solve): traced,
# each host read of their loops broke the graph, and the resume functions guarded on values that
# change from call to call (the rows still running, ``idx is None`` after a compaction, min λ, a
# row's spread against a cut): training steps at batch sizes 16 and 9 recompiled at every step
# and hit dynamo's recompile limit (8) in the TV solver's ``_put``: a small model (entmax, a
# ConvexLayer, TV, robust pooling) took 27 to 54 s for 6 steps on a small CPU (205 s on a busier
# one), 8 s now, nearly all of it the first two steps' compiles.
class _Sinkhorn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.eps = nn.Parameter(torch.tensor(0.5, dtype=DT))

    def forward(self, x):
        return cddn.functional.sinkhorn(x.reshape(x.shape[0], 2, 3).abs() * self.eps, eps=0.5)


RECOMPILE_CASES = {
    "TotalVariation1d": lambda: cddn.TotalVariation1d(0.2, learnable=True).to(DT),
    "RobustPool": lambda: cddn.RobustPool("pseudo_huber", alpha=nn.Parameter(torch.tensor(0.9, dtype=DT))),
    "sinkhorn": _Sinkhorn,
}


@pytest.mark.parametrize("name", list(RECOMPILE_CASES))
def test_solver_does_not_recompile_per_batch(name, caplog):
    import logging

    from torch._dynamo.testing import CompileCounterWithBackend

    module = RECOMPILE_CASES[name]()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(module, backend=counter)
    frames = []
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        for step in range(6):
            x = data(20 + step, shape=((16, 9)[step % 2], 6))  # new values at every step, two batch sizes
            eager = forward_backward(module, module, x)
            got = forward_backward(compiled, module, x)
            assert torch.equal(got[0], eager[0])
            for a, b in zip(got[1], eager[1]):
                assert torch.equal(a, b)
            frames.append(counter.frame_count)
            with torch.no_grad():  # a training step: the learnable option moves
                for p in module.parameters():
                    p.add_(0.01)
    assert not [r for r in caplog.records if "recompile" in r.getMessage()]
    # Compiled once per input shape (the second batch size makes the shapes dynamic), then
    # never again: the solver's values decide nothing in the compiled code.
    assert frames[1] >= 1 and frames[-1] == frames[1], frames
