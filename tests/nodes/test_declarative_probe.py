"""The first-call probe of a DeclarativeNode (convexddn/nodes/declarative_probe.py)."""
from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path

import pytest
import torch

import convexddn.nodes.declarative_probe as dp
from convexddn.errors import ProblemError
from convexddn.nodes.declarative import DeclarativeNode

sys.path.insert(0, str(Path(__file__).parent))
from test_declarative import Sphere  # noqa: E402  (y = x / ‖x‖, dy/dx = (I − y yᵀ) / ‖x‖)

DT = torch.float64


class _FrozenWeighted(DeclarativeNode):
    """y = argmin_u Σ_i w_i (u − x_i)² with a frozen parameter w; the probe of thread ``pause``
    stops inside its objective (its stand-ins swapped in) until ``go`` is set."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 1.0, 1.0], dtype=DT), requires_grad=False)
        self.pause, self.inside, self.go = None, threading.Event(), threading.Event()

    def objective(self, x, y):
        if threading.current_thread() is self.pause:
            self.inside.set()
            self.go.wait(10.0)
        return (self.w * (y - x) ** 2).sum(-1)

    def solve(self, x):
        return (self.w * x).sum(-1, keepdim=True) / self.w.sum()


def test_another_threads_probe_swapped_in_is_no_false_unread_parameter(monkeypatch):
    """The probe named the parameters that require grad from the node after leaving its swap
    guard, where another thread's probe may have its stand-ins (which require grad) swapped in:
    the frozen w was said to "require grad but neither the objective nor the constraints depend
    on them" (4 of 30 runs of 4 threads). Here the other thread's probe is held inside its swap
    exactly then. (Frozen w, nothing requires grad: no warning is right.)"""
    node = _FrozenWeighted()
    x = torch.tensor([[0.0, 1.0, 2.0, 4.0]], dtype=DT)
    y = node.solve(x)
    warned, real = [], dp.guarded
    monkeypatch.setattr(dp, "warn", lambda message, category, **kw: warned.append(message))
    other = threading.Thread(target=dp.probe, args=(node, (x,), y))
    node.pause = other

    @contextlib.contextmanager
    def then_the_other(module, swap):
        with real(module, swap):
            yield
        if threading.current_thread() is threading.main_thread() and not other.is_alive():
            other.start()  # (its probe swaps in its stand-ins and waits inside the objective)
            assert node.inside.wait(10.0)

    monkeypatch.setattr(dp, "guarded", then_the_other)
    try:
        dp.probe(node, (x,), y)
    finally:
        node.go.set()
        other.join(10.0)
    assert warned == []
    assert not node.w.requires_grad


class _Normalised(DeclarativeNode):
    """y = argmin_u ‖u − BatchNorm(x)‖² (no affine part): y = BatchNorm(x)."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(4, affine=False).double()

    def objective(self, x, y):
        return ((y - self.bn(x)) ** 2).sum(-1)

    def solve(self, x):
        with torch.no_grad():
            return self.bn(x)


def test_an_objective_writing_a_buffer_is_refused_by_name():
    """A BatchNorm in train mode in the objective writes its running statistics at each
    evaluation (the backward evaluates several times): torch's raw RuntimeError "native_batch_norm
    is not differentiable with respect to argument 'running_mean'" came from the probe's stand-in
    that required grad. Now a ProblemError naming the buffers; the node's own are left as they were."""
    node = _Normalised()
    x = torch.randn(5, 4, dtype=DT, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with pytest.raises(ProblemError, match=r"modified \['bn\.running_mean', 'bn\.running_var', "
                                           r"'bn\.num_batches_tracked'\] in place"):
        node(x)
    assert int(node.bn.num_batches_tracked) == 1  # (solve's own update only: not the probe's)
    node = _Normalised()
    node.bn.eval()  # (reads the running statistics, 0 and 1: y = x / √(1 + ε), closed form)
    node(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((5, 4), (1 + 1e-5) ** -0.5, dtype=DT), rtol=1e-10, atol=0)
    fresh = dict(torch.nn.BatchNorm1d(4, affine=False).double().named_buffers())
    assert all(torch.equal(b, fresh[n.removeprefix("bn.")]) for n, b in node.named_buffers())


class _Identity(DeclarativeNode):
    """y = argmin_u ½‖A u − x‖² with A = I held as ``state`` (a buffer or a parameter of any
    kind): y = x, dL/dx = 1 for L = Σ y."""

    def __init__(self, kind: str):
        super().__init__()
        E = torch.eye(4, dtype=DT)
        if kind == "int parameter":  # (an index table: torch allows it, requires_grad=False)
            self.k = torch.nn.Parameter(torch.tensor([1, 2]), requires_grad=False)
            self.register_buffer("A", E)
        else:
            self.register_buffer("A", E.to_sparse() if kind == "coo buffer" else E.to_sparse_csr())

    def objective(self, x, y):
        extra = 0.0 * self.k.sum() if hasattr(self, "k") else 0.0
        return 0.5 * (((self.A @ y.T).T - x) ** 2).sum(-1) + extra

    def solve(self, x):
        return x.clone()


@pytest.mark.parametrize("kind", ["int parameter", "coo buffer", "csr buffer"])
def test_integer_parameters_and_sparse_buffers_stand_in_as_copies(kind):
    """The probe's stand-ins (c164e9f) made an integer parameter require grad (torch's raw
    "only Tensors of floating point dtype can require gradients") and compared sparse buffer
    copies elementwise (raw NotImplementedError / RuntimeError). Closed form: y = x, dL/dx = 1."""
    x = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = _Identity(kind)(x)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), x.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, torch.ones_like(x), rtol=1e-12, atol=1e-12)


class _Shared(DeclarativeNode):
    """y = argmin_u ½‖u − (W x + c)‖² = W x + c, through one Linear held under two names (``a``
    and ``b``) and read through ``via`` only: for L = Σ y, dL/dx = 1ᵀ W per row, dL/dW = 1 sᵀ
    (s = Σ_b x_b) and dL/dc = B·1 (closed forms)."""

    def __init__(self, via: str, dtype: torch.dtype):
        super().__init__()
        torch.manual_seed(0)
        lin = torch.nn.Linear(3, 3).to(dtype)
        self.a = lin
        self.b = lin
        self.via = via

    def objective(self, x, y):
        return 0.5 * ((y - getattr(self, self.via)(x).to(y.dtype)) ** 2).sum(-1)

    def solve(self, x):
        return getattr(self, self.via)(x)


@pytest.mark.parametrize("via", ["a", "b"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_submodule_under_two_names_is_one_place_to_swap(via, dtype, recwarn):
    """The probe swapped the shared Linear's weight in by both names ('a.weight', 'b.weight': one
    place), and its restore left a stand-in there: after the first forward node.a.weight was a plain
    tensor, not the optimizer's parameter, and (float32) the probe warned that the parameters of the
    other name were unread (a false GradientWarning). Now each place is swapped once."""
    node = _Shared(via, dtype)
    W, c = node.a.weight, node.a.bias
    x = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]], dtype=dtype, requires_grad=True)
    y = node(x)
    assert node.a.weight is W and node.b.bias is c  # (the parameters themselves, after the probe)
    with torch.no_grad():
        node(x)
    node(x.detach())  # (grad mode on, nothing requires grad: probed again)
    assert node.a.weight is W and node.b.bias is c
    y.sum().backward()
    assert not [w for w in recwarn.list if "require grad but neither" in str(w.message)]
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    ones = torch.ones(3, dtype=dtype)
    torch.testing.assert_close(x.grad, (ones @ W.detach()).expand(2, 3), **tol)
    torch.testing.assert_close(W.grad, torch.outer(ones, x.detach().sum(0)), **tol)
    torch.testing.assert_close(c.grad, torch.full((3,), 2.0, dtype=dtype), **tol)


def test_unread_parameter_warning_names_the_attribute_solve_computed():
    """solve sets self.r = e^{log_s} + 1 (under no_grad: no graph) and the constraint reads
    self.r: log_s gets a zero gradient; the warning said only that nothing depends on log_s,
    and now names the attribute through which the problem meant to."""
    from convexddn.errors import GradientWarning

    class Ball(DeclarativeNode):
        def __init__(self):
            super().__init__()
            self.log_s = torch.nn.Parameter(torch.zeros((), dtype=DT))

        def objective(self, x, y):
            return 0.5 * ((y - x) ** 2).sum(-1)

        def inequality_constraints(self, x, y):
            return (y * y).sum(-1, keepdim=True) - self.r ** 2

        def solve(self, x):
            self.r = self.log_s.exp() + 1.0
            return x * torch.clamp(self.r / x.norm(dim=-1, keepdim=True), max=1.0)

    x = torch.tensor([[3.0, -1.0], [0.5, 0.2]], dtype=DT, requires_grad=True)
    with pytest.warns(GradientWarning, match=r"\['log_s'\] require grad.*tensor attribute\(s\) \['r'\] of the node: "
                                             r"one computed from a parameter in solve"):
        Ball()(x)


def test_first_call_under_disable_saved_tensors_hooks():
    # The probe registered saved-tensor hooks of its own, which torch refuses there: the node's
    # first call raised the caller's RuntimeError (later calls, other ops ran). None can be
    # registered around it there, so the probe's graph needs none.
    x = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with torch.autograd.graph.disable_saved_tensors_hooks("disabled by the caller"):
        y = Sphere()(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    n = x.detach().norm(dim=-1, keepdim=True)
    u = x.detach() / n
    torch.testing.assert_close(grad, (1 - u * u.sum(-1, keepdim=True)) / n, rtol=1e-10, atol=1e-12)


class _LogMeanExp(DeclarativeNode):
    """y = log mean exp(p) = argmin_y Σ exp(p − y) + n y (exp saves its output)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(8, dtype=DT))

    def objective(self, p, y):
        return torch.exp(self.scale * p - y).sum(-1) + p.shape[-1] * y.squeeze(-1)

    def solve(self, p):
        q = self.scale.detach() * p
        return torch.logsumexp(q, -1, keepdim=True) - torch.log(torch.tensor(float(p.shape[-1]), dtype=p.dtype))


def _live_tensors() -> int:
    import gc
    import warnings
    gc.collect()
    with warnings.catch_warnings():  # (isinstance on torch.distributed's deprecated aliases warns)
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_probes_leave_no_tensor_alive():
    """The probe's saved-tensor hooks returned each tensor itself, so an op's saved output
    held itself through its grad_fn, a cycle Python's collector cannot free: every probe
    (each grad-mode call with nothing requiring grad; each new node's first call) leaked
    its objective's exp outputs."""
    node = _LogMeanExp()
    node.scale.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    node(torch.randn(4, 8, dtype=DT, generator=gen))  # (a first call: the node's own set-up)
    before = _live_tensors()
    for _ in range(5):  # grad mode, nothing requires grad: probed each call
        node(torch.randn(4, 8, dtype=DT, generator=gen))  # (the output dropped at once)
    assert _live_tensors() == before
    for _ in range(5):  # a node per trial, trained one step, dropped
        trial = _LogMeanExp()
        trial(torch.randn(4, 8, dtype=DT, generator=gen)).sum().backward()
        del trial
    assert _live_tensors() == before
