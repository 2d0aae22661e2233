"""A DeclarativeNode's ``solve`` that runs autograd of its own, and options reassigned after
construction (:mod:`convexddn.nodes._kept_grads`, ``DeclarativeNode._check_options``), also under
``torch.func.functional_call`` with parameter values that are not leaves.

A ``solve`` minimising the objective with ``torch.optim.LBFGS`` and ``f.backward()`` (the DDN
reference's pooling nodes do) added its inner gradients to the node's parameters' and the inputs'
``.grad``, and the implicit gradient came on top: ``d(sum y)/d alpha`` 23.3 for 0.127, silently."""
from __future__ import annotations

import warnings

import pytest
import torch

import convexddn as cddn
from convexddn.errors import OptionError, ProblemError

F64 = torch.float64


class PseudoHuberPool(cddn.DeclarativeNode):
    """y = argmin_u Σ α²(√(1 + (u − x_i)²/α²) − 1), solved by LBFGS on the objective."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.tensor(alpha, dtype=F64))

    def objective(self, x, y):
        a2 = self.alpha ** 2
        return (a2 * (torch.sqrt(1.0 + (y - x) ** 2 / a2) - 1.0)).sum(-1)

    def solve(self, x):
        y = x.mean(-1, keepdim=True).clone().requires_grad_()
        with torch.enable_grad():
            opt = torch.optim.LBFGS([y], max_iter=100, tolerance_grad=1e-13, tolerance_change=1e-16,
                                    line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                f = self.objective(x, y).sum()
                f.backward()
                return f
            opt.step(closure)
        return y.detach()


def _x():
    return torch.randn(2, 9, dtype=F64, generator=torch.Generator().manual_seed(0))


def test_inner_backward_reaches_neither_parameters_nor_inputs():
    x = _x().requires_grad_()
    node = PseudoHuberPool(0.7)
    node(x).sum().backward()
    h = 1e-6
    with torch.no_grad():
        x0 = x.detach()
        fd = (PseudoHuberPool(0.7 + h).solve(x0).sum() - PseudoHuberPool(0.7 - h).solve(x0).sum()) / (2 * h)
    assert float(node.alpha.grad) == pytest.approx(float(fd), rel=1e-5)
    # y(x + c) = y(x) + c: each row of dy/dx sums to 1.
    torch.testing.assert_close(x.grad.sum(-1), torch.ones(2, dtype=F64), rtol=0, atol=1e-8)


def test_existing_gradients_are_kept_as_they_were():
    node = PseudoHuberPool(0.7)
    g = torch.tensor(5.0, dtype=F64)
    node.alpha.grad = g
    y = node(_x())  # (a forward alone: the solve's backward ran, nothing of it stays)
    assert node.alpha.grad is g and float(g) == 5.0
    y.sum().backward()
    fresh = PseudoHuberPool(0.7)
    fresh(_x()).sum().backward()
    assert float(node.alpha.grad) == pytest.approx(5.0 + float(fresh.alpha.grad), rel=1e-12)
    # A parameter without a gradient keeps None through a forward.
    other = PseudoHuberPool(0.7)
    other(_x())
    assert other.alpha.grad is None


class _Mean(cddn.DeclarativeNode):
    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def solve(self, x):
        return x.clone()


@pytest.mark.parametrize("name, value", [("batch_dims", -1), ("batch_dims", True), ("batch_dims", 1.5),
                                         ("batch_dims", "1"), ("implicit_dtype", torch.float16),
                                         ("active_tol", -1.0)])
def test_options_reassigned_after_construction_are_checked_at_the_call(name, value):
    node = _Mean()
    setattr(node, name, value)
    with pytest.raises(OptionError, match=name):
        node(torch.randn(2, 3, 4, dtype=F64))


class _NewtonShrink(cddn.DeclarativeNode):
    """y = argmin_u ½ k ‖u − x‖² + ½ ‖u‖²  =>  y = k x / (k + 1); solve takes ``steps`` Newton steps
    whose gradient is ``f.backward()`` (Hessian (k + 1) I)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(2.0, dtype=F64))
        self.steps = steps

    def objective(self, x, y):
        return 0.5 * self.k * ((y - x) ** 2).sum(-1) + 0.5 * (y ** 2).sum(-1)

    def solve(self, x):
        u = torch.zeros_like(x)
        for _ in range(self.steps):
            u = u.detach().requires_grad_()
            with torch.enable_grad():
                self.objective(x, u).sum().backward()
            u = u - u.grad / (self.k.detach() + 1)
        return u.detach()


@pytest.mark.parametrize("steps, make, dk", [(1, lambda t: t + 1.2, 1.0), (1, lambda t: 2 * t, 2.0),
                                             (2, lambda t: 2 * t, 2.0)])
def test_inner_backward_stays_off_functional_call_fast_weights(steps, make, dk):
    # functional_call with a non-leaf value (MAML's fast weights): the inner backward ran on into
    # theta.grad (6.03 for -0.27) or freed the caller's graph (torch's "backward through the graph a
    # second time"). Closed form, k = make(theta) = 2.4: d Σy / d theta = dk Σx / (k + 1)².
    x = _x()
    node = _NewtonShrink(steps)
    node(x.clone().requires_grad_())  # (probed)
    theta = torch.tensor(1.2, dtype=F64, requires_grad=True)
    y = torch.func.functional_call(node, {"k": make(theta)}, (x,))
    assert theta.grad is None  # (the forward alone)
    y.sum().backward()
    torch.testing.assert_close(theta.grad, dk * (x / 3.4 ** 2).sum(), rtol=1e-10, atol=0)
    assert node.k.grad is None


def test_solve_modifying_a_functional_call_value_in_place_is_refused():
    # The detached value solve sees shares its version counter with the value passed.
    class Writes(_NewtonShrink):
        def solve(self, x):
            self.k.mul_(1.0)
            return self.k * x / (self.k + 1)

    theta = torch.tensor(1.2, dtype=F64, requires_grad=True)
    with pytest.raises(ProblemError, match="'k'"):
        torch.func.functional_call(Writes(1), {"k": 2 * theta}, (_x(),))


def test_non_leaf_functional_call_value_warns_nothing():
    # Only a leaf has a .grad to keep: reading a non-leaf's warned (torch's "The .grad attribute of
    # a Tensor that is not a leaf Tensor is being accessed"), twice a forward. d Σy / d theta as above.
    x = _x().requires_grad_()
    node = _NewtonShrink(1)
    node(x)
    theta = torch.tensor(1.2, dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = torch.func.functional_call(node, {"k": 2 * theta}, (x,))
        (grad,) = torch.autograd.grad(y.sum(), theta)
    torch.testing.assert_close(grad, 2 * (x.detach() / 3.4 ** 2).sum(), rtol=1e-10, atol=0)


class _HeldShrink(_NewtonShrink):
    """_NewtonShrink whose solve, after its own backward passes, waits for the test's thread
    (another thread's backward lands on ``k`` meanwhile)."""

    def __init__(self, inside, release) -> None:
        super().__init__(steps=2)
        self.inside, self.release = inside, release

    def solve(self, x):
        u = super().solve(x)
        self.inside.set()
        assert self.release.wait(30)
        return u


@pytest.mark.parametrize("initial", [None, 10.0])
def test_another_threads_gradient_landing_during_a_solve_stays(initial):
    """Thread B's forward (its solve runs backward passes of its own into k) while the main
    thread runs a backward into k: kept_grads put every parameter's .grad back as it was when
    the solve began, so the main thread's gradient was erased (None, or the initial 10),
    silently; with a solve that ran no backward of its own, too. Only B's own is taken out."""
    import threading

    for own_backward in (True, False):
        inside, release = threading.Event(), threading.Event()
        node = _HeldShrink(inside, release)
        node.steps = 2 if own_backward else 0
        node.k.grad = None if initial is None else torch.tensor(initial, dtype=F64)
        out = {}

        def forward():
            with torch.no_grad():
                out["y"] = node(torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(1)))

        thread = threading.Thread(target=forward)
        thread.start()
        assert inside.wait(30)
        (node.k ** 2).backward()  # d(k²)/dk = 2k = 4
        release.set()
        thread.join(30)
        want = 4.0 + (0.0 if initial is None else initial)
        assert node.k.grad is not None and float(node.k.grad) == pytest.approx(want, abs=1e-12), own_backward
        if own_backward:  # (B's solve is right: y = k x / (k + 1), Newton exact in one step)
            x = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(out["y"], 2 * x / 3)


def test_a_backward_on_autograd_s_own_thread_counts_as_the_waiting_caller_s():
    """On CUDA a backward's hooks run on autograd's device thread, which Python knows only as a
    dummy thread (as one started by ``_thread``, here): its pass is the solving thread's while that
    thread waits in a backward call, and not otherwise; a Python thread's is never."""
    import _thread
    import threading

    from convexddn.nodes._kept_grads import _ours

    owner = threading.get_ident()

    def from_dummy_thread():
        done, result = threading.Event(), []
        _thread.start_new_thread(lambda: (result.append(_ours(owner)), done.set()), ())
        assert done.wait(30)
        return result[0]

    seen = []
    w = torch.ones(2, dtype=F64, requires_grad=True)
    w.register_hook(lambda g: seen.append(from_dummy_thread()))
    (w * 3).sum().backward()  # (the hook runs in this thread, inside its backward call)
    assert seen == [True]
    assert from_dummy_thread() is False  # (this thread is not in a backward now)
    python_thread = []
    t = threading.Thread(target=lambda: python_thread.append(_ours(owner)))
    t.start()
    t.join(30)
    assert python_thread == [False]
    assert _ours(owner) is True


class _GradShrink(_NewtonShrink):
    """_NewtonShrink whose solve also asks torch.autograd.grad for dF/dk (kept in ``seen``), then
    waits for the test's thread."""

    def __init__(self, inside, release) -> None:
        super().__init__(steps=1)
        self.inside, self.release, self.seen = inside, release, []

    def solve(self, x):
        u = torch.zeros_like(x).requires_grad_()
        with torch.enable_grad():
            du, dk = torch.autograd.grad(self.objective(x, u).sum(), [u, self.k])
        self.seen.append(float(dk))
        self.inside.set()
        assert self.release.wait(30)
        return (u - du / (self.k.detach() + 1)).detach()


@pytest.mark.parametrize("node_kind", ["backward", "autograd.grad"])
@pytest.mark.parametrize("main", ["zero_grad, backward", "zero_grad"])
def test_a_training_step_in_another_thread_during_a_solve(node_kind, main):
    """While thread B's solve (its own backward into k, or torch.autograd.grad of k) waits, the main
    thread starts a step: zero_grad(), then a backward. k.grad is the main thread's alone: 4 (2k),
    or None after zero_grad alone; taking B's own sum back out of a fresh gradient gave -2.3, and
    putting .grad back as it was gave the stale 10. B's autograd.grad gets dF/dk = ½‖x‖²."""
    import threading

    inside, release = threading.Event(), threading.Event()
    node = _HeldShrink(inside, release) if node_kind == "backward" else _GradShrink(inside, release)
    node.k.grad = torch.tensor(10.0, dtype=F64)  # (a previous step's)
    x = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    thread = threading.Thread(target=lambda: node(x))
    thread.start()
    assert inside.wait(30)
    node.zero_grad()
    if main == "zero_grad, backward":
        (node.k ** 2).backward()
    release.set()
    thread.join(30)
    if main == "zero_grad":
        assert node.k.grad is None
    else:
        assert float(node.k.grad) == 4.0
    if node_kind == "autograd.grad":
        assert node.seen == [pytest.approx(0.5 * float((x ** 2).sum()), rel=1e-14)]


def test_two_threads_solving_at_once_leave_no_gradient():
    """Two threads' inference through one node whose solve runs a backward of its own, A's waiting
    for B's call to return: k.grad stays None (it came back 0 or 1e-17, and AdamW's weight decay
    then stepped a parameter no loss reached)."""
    import threading

    class _Two(_NewtonShrink):
        def __init__(self):
            super().__init__(steps=1)
            self.a_did, self.b_done = threading.Event(), threading.Event()

        def solve(self, x):
            if threading.current_thread().name == "B":
                assert self.a_did.wait(30)
            u = super().solve(x)
            if threading.current_thread().name == "A":
                self.a_did.set()
                assert self.b_done.wait(30)
            return u

    node = _Two()
    x = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(3))

    def b():
        with torch.no_grad():
            node(x)
        node.b_done.set()

    threads = [threading.Thread(target=lambda: node(x), name="A"), threading.Thread(target=b, name="B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert node.k.grad is None


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_solve_that_zeroes_its_gradients_then_runs_backward_keeps_the_caller_s(set_to_none):
    """solve calls self.zero_grad() and then its own backward: the caller's 10 stays, its tensor
    and its value (a TypeError from copying None, for a while; zeroed in place with
    set_to_none=False); outside solve, zero_grad is torch's."""
    class _Zeroing(_NewtonShrink):
        def solve(self, x):
            self.zero_grad(set_to_none)
            return super().solve(x)

    node = _Zeroing(steps=1)
    g = torch.tensor(10.0, dtype=F64)
    node.k.grad = g
    node(torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(4)))
    assert node.k.grad is g and float(g) == 10.0
    node.zero_grad(set_to_none)
    assert node.k.grad is None if set_to_none else float(node.k.grad) == 0.0


def test_a_submodule_s_sparse_gradient_stays_sparse():
    """A parameter reached through a submodule (an Embedding(sparse=True) weight) is guarded by
    hooks, which hand autograd dense zeros for the solve's passes: its sparse .grad came back dense
    and SparseAdam refused it; it is sparse again, with its values."""
    class _Embedded(PseudoHuberPool):
        def __init__(self):
            super().__init__(0.7)
            self.emb = torch.nn.Embedding(4, 1, sparse=True, dtype=F64)

        def objective(self, x, y):
            return super().objective(x, y) * self.emb.weight[0, 0].exp()

    node = _Embedded()
    node.emb(torch.tensor([1, 2])).sum().backward()
    before = node.emb.weight.grad.to_dense()
    node(_x())
    after = node.emb.weight.grad
    assert after.is_sparse and torch.equal(after.to_dense(), before)
    torch.optim.SparseAdam([node.emb.weight]).step()
