"""Several threads calling the library at once (inference servers, data pipelines).

Each interleaving that broke is forced here with events, so that the tests fail on the
code before the fix every time: process-wide state saved and restored by two threads
at once (warning filters, BLAS thread counts), and a DeclarativeNode's parameters
swapped by one thread's backward while another thread's forward or backward read them.
"""
from __future__ import annotations

import multiprocessing
import queue
import functools
import re
import threading
import time
import warnings

import cvxpy as cp
import pytest
import torch
from threadpoolctl import threadpool_info

import convexddn as cddn
from convexddn import functional as F
from convexddn.convex import diffcp_solve
from convexddn.nodes.declarative import DeclarativeNode

F64 = torch.float64
WAIT = 5.0  # seconds; reached only where the code under test is broken


def _scs_layer() -> cddn.ConvexLayer:
    x = cp.Parameter(3, name="x")
    y = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0, cp.sum(y) <= 1])
    return cddn.ConvexLayer(prob, [x], [y], solver="SCS")


def _blas_threads() -> list[tuple[str, int]]:
    return sorted((i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas")


def _action(module: str) -> str:
    """What the filters do now with a UserWarning raised from ``module``."""
    for action, message, category, mod, lineno in warnings.filters:
        if message is None and issubclass(UserWarning, category) and (mod is None or mod.match(module)) and not lineno:
            return action
    return warnings.defaultaction


def _in_order(monkeypatch, threads: dict, a_dies: bool) -> dict:
    """Patch the per-element solver so that thread "a" is inside it when thread "b"
    enters, and "b" leaves after "a" has returned (and, if ``a_dies``, ended): "a"
    restores first. What the filters do inside is noted in the returned dict."""
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, str] = {}
    original = diffcp_solve.solve_internal

    def solve(*args, **kwargs):
        who = threading.current_thread().name
        if who == "a" and "a" not in seen:
            seen["a"] = _action("probe")
            a_in.set()
            b_in.wait(WAIT)
        elif who == "b" and "b" not in seen:
            seen["b"], seen["b_solver"] = _action("probe"), _action("diffcp.cone_program")
            b_in.set()
            threads["a"].join(WAIT) if a_dies else a_done.wait(WAIT)
        return original(*args, **kwargs)

    monkeypatch.setattr(diffcp_solve, "solve_internal", solve)
    seen["events"] = (a_in, a_done)
    return seen


@pytest.mark.parametrize("a_dies", [True, False])
def test_concurrent_per_element_solves_restore_warning_filters_and_blas_threads(monkeypatch, a_dies):
    """Both threads saved the state at entry and put it back at exit: the one leaving
    last restored the other's "ignore every warning" filter (for the rest of the
    process; meanwhile every other thread's warnings were lost too) and, where the first
    had ended, its one BLAS thread."""
    import threadpoolctl

    # (threadpoolctl >= 3.8: the first thread to set OpenBLAS's count keeps control while
    # it lives; the test's threads must be able to take it)
    release = getattr(getattr(threadpoolctl, "OpenBLASController", None), "clear_controlling_thread", None)
    if release is not None:
        release(force=True)
    layer = _scs_layer()
    threads: dict[str, threading.Thread] = {}
    seen = _in_order(monkeypatch, threads, a_dies)
    a_in, a_done = seen["events"]
    b_done, errors = threading.Event(), []

    def call(name: str) -> None:
        try:
            if name == "b":
                a_in.wait(WAIT)
            layer(torch.tensor([[0.5, -1.0, 2.0]], dtype=F64))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
        finally:
            (a_done if name == "a" else b_done).set()
            if name == "a" and not a_dies:
                b_done.wait(WAIT)

    filters, blas = list(warnings.filters), _blas_threads()
    threads.update((n, threading.Thread(target=call, args=(n,), name=n)) for n in "ab")
    for t in threads.values():
        t.start()
    for t in threads.values():
        t.join()
    assert not errors
    assert warnings.filters == filters
    assert _blas_threads() == blas
    # Inside a solve only the solver packages' warnings are ignored.
    assert seen["a"] != "ignore" and seen["b"] != "ignore" and seen["b_solver"] == "ignore"


class _Weighted(DeclarativeNode):
    """½ Σ w (y − x)²: y = x. A float32 parameter, a float64 backward: the backward swaps
    float64 casts in for ``w``; ``solve`` reads ``w`` too."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        self.hook = None

    def objective(self, x, y):
        if self.hook is not None:
            self.hook()
        return 0.5 * (self.w * (y - x) ** 2).sum(-1)

    def solve(self, x):
        return x * (self.w / self.w)


def test_declarative_forward_waits_for_another_threads_backward():
    """The forward solved with the float64 casts another thread's backward had swapped
    in: DTypeError (and its saved state was the casts)."""
    node = _Weighted()
    x = torch.randn(2, 3, requires_grad=True)
    y = node(x)
    inside, done = threading.Event(), threading.Event()
    main = threading.current_thread()

    def hook():
        if threading.current_thread() is main and not inside.is_set():
            inside.set()
            done.wait(0.5)  # (the fixed forward waits for this backward: times out)

    results = []

    def other():
        inside.wait(WAIT)
        try:
            results.append(node(torch.ones(2, 3)))
        except Exception as err:  # noqa: BLE001 - reported below
            results.append(err)
        finally:
            done.set()

    node.hook = hook
    t = threading.Thread(target=other)
    t.start()
    y.sum().backward()
    t.join()
    assert isinstance(results[0], torch.Tensor) and results[0].dtype == torch.float32
    torch.testing.assert_close(results[0], torch.ones(2, 3))
    torch.testing.assert_close(x.grad, torch.ones(2, 3))


def test_declarative_concurrent_backwards_leave_the_parameters_in_place():
    """Two backwards swapping at once: the one leaving last put back the casts the
    other had swapped in, so the node kept a float64 tensor in place of its parameter."""
    node = _Weighted()
    w0 = node.w
    xa, xb = torch.randn(2, 3), torch.randn(2, 3)
    ya, yb = node(xa + 0.5), node(xb + 0.5)  # y = x: dL/dw = 0 at the solution
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    main = threading.current_thread()

    def hook():
        if threading.current_thread() is main and not a_in.is_set():
            a_in.set()
            b_in.wait(0.5)  # (the fixed backward of "b" waits for this one: times out)
        elif threading.current_thread() is not main and not b_in.is_set():
            b_in.set()
            a_done.wait(WAIT)

    errors = []

    other = functools.partial(_backward_after, a_in, yb, errors)
    node.hook = hook
    t = threading.Thread(target=other)
    t.start()
    ya.sum().backward()
    a_done.set()
    t.join()
    node.hook = None
    assert not errors
    assert node.w is w0 and dict(node.named_parameters())["w"] is w0 and w0.dtype == torch.float32
    assert w0.grad is not None and w0.grad.dtype == torch.float32
    torch.testing.assert_close(w0.grad, torch.zeros_like(w0))  # the closed form at y = x


def _use_in_child(node: _Weighted, report) -> None:
    """In a forked child: what ``node.w`` is, then a forward and a backward (y = x).
    On one thread, as a DataLoader's forked workers run: the OpenMP pool an earlier test
    started in the parent does not survive a fork (libgomp hangs in the child's first
    parallel region)."""
    torch.set_num_threads(1)
    w = node.w
    seen = [type(w).__name__, str(w.dtype), w.is_leaf, w is dict(node.named_parameters())["w"]]
    x = torch.randn(2, 3, requires_grad=True)
    y = node(x)
    y.sum().backward()
    report.put(seen + [str(y.dtype), torch.equal(y, x), torch.equal(x.grad, torch.ones(2, 3))])


class _Inner(_Weighted):
    """y = argmin 1/2 sum w (y - x)^2 = x, ``w = [1, 2, 3]``; ``hook`` runs in the objective."""


class _Outer(DeclarativeNode):
    """y = argmin 1/2 |y - w x|^2 = w x, with ``w`` the submodule node's (``self.inner.w``)."""

    hook = None

    def __init__(self):
        super().__init__()
        self.inner = _Inner()

    def objective(self, x, y):
        if self.hook is not None:
            self.hook()
        return 0.5 * ((y - self.inner.w * x) ** 2).sum(-1)

    def solve(self, x):
        return self.inner.w.detach() * x


def _during(node: DeclarativeNode, swap, call) -> list:
    """``call()`` in another thread while ``swap()`` runs here, inside ``node``'s objective (under the
    swap): the hook holds the swap 0.5 s (a fixed ``call`` waits for it: times out). ``call``'s result,
    or its error. Threads are daemons joined with a timeout: never a hang."""
    inside, done = threading.Event(), threading.Event()
    me = threading.current_thread()
    results: list = []

    def hook():
        if threading.current_thread() is me and not inside.is_set():
            inside.set()
            done.wait(0.5)

    def other():
        inside.wait(WAIT)
        try:
            results.append(call())
        except Exception as err:  # noqa: BLE001 - reported by the caller
            results.append(err)
        finally:
            done.set()

    node.hook = hook
    t = threading.Thread(target=other, daemon=True)
    t.start()
    try:
        swap()
    finally:
        node.hook = None
        done.set()
    t.join(2 * WAIT)
    assert not t.is_alive() and inside.is_set()
    return results


@pytest.mark.parametrize("call", ["state_dict", "forward"])
def test_a_submodule_node_waits_for_the_outer_nodes_swap(call):
    """The outer node's backward swaps float64 casts into the inner node's ``w`` too, under the outer's
    guard only: another thread's ``inner.state_dict()`` held the float64 cast (752k of 775k in a loop),
    its forward and backward raised DTypeError (Inner.solve returned float64), or a false InputError."""
    outer = _Outer()
    inner, w0 = outer.inner, outer.inner.w
    x = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]], requires_grad=True)
    y = outer(x)
    calls = {"state_dict": lambda: inner.state_dict()["w"], "forward": lambda: inner(torch.ones(2, 3))}
    got = _during(outer, lambda: y.sum().backward(), calls[call])
    assert not isinstance(got[0], Exception), got[0]
    want = torch.tensor([1.0, 2.0, 3.0]) if call == "state_dict" else torch.ones(2, 3)
    assert got[0].dtype == torch.float32 and torch.equal(got[0], want)
    assert inner.w is w0 and w0.dtype == torch.float32
    # y = w x: dL/dx = w per row; dL/dw = sum_b x_b (inner's own backward adds 0: y = x whatever w)
    torch.testing.assert_close(x.grad, w0.detach().expand(2, 3))
    torch.testing.assert_close(w0.grad, x.detach().sum(0))


def test_an_outer_nodes_forward_waits_for_its_submodule_nodes_swap():
    """The inner node's backward swaps its ``w`` for a float64 cast under its own guard; the outer
    node's forward, in another thread, took only the outer's and read the cast: DTypeError."""
    outer = _Outer()
    inner = outer.inner
    xi = torch.ones(2, 3, requires_grad=True)
    yi = inner(xi)
    x = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])
    got = _during(inner, lambda: yi.sum().backward(), lambda: outer(x))
    assert not isinstance(got[0], Exception), got[0]
    assert got[0].dtype == torch.float32 and torch.equal(got[0], torch.tensor([1.0, 2.0, 3.0]) * x)
    torch.testing.assert_close(xi.grad, torch.ones(2, 3))


def test_the_outer_and_the_inner_nodes_backwards_leave_the_inner_parameter_in_place():
    """The inner node's backward began its swap, the outer's (another thread) began its own over it and
    ended after: the outer's put back what it had found, the inner backward's float64 cast, for good."""
    outer = _Outer()
    inner, w0 = outer.inner, outer.inner.w
    x = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]], requires_grad=True)
    xi = torch.ones(2, 3, requires_grad=True)
    y, yi = outer(x), inner(xi)
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    main = threading.current_thread()

    def inner_hook():
        if threading.current_thread() is main and not a_in.is_set():
            a_in.set()
            b_in.wait(0.5)  # (the fixed outer backward waits for this one: times out)

    def outer_hook():
        if not b_in.is_set():
            b_in.set()
            a_done.wait(WAIT)

    errors = []

    other = functools.partial(_backward_after, a_in, y, errors)
    inner.hook, outer.hook = inner_hook, outer_hook
    t = threading.Thread(target=other, daemon=True)
    t.start()
    try:
        yi.sum().backward()
    finally:
        a_done.set()
        t.join(2 * WAIT)
        inner.hook = outer.hook = None
    assert not t.is_alive() and not errors
    assert inner.w is w0 and dict(inner.named_parameters())["w"] is w0 and w0.dtype == torch.float32
    torch.testing.assert_close(xi.grad, torch.ones(2, 3))
    torch.testing.assert_close(x.grad, w0.detach().expand(2, 3))
    torch.testing.assert_close(w0.grad, x.detach().sum(0))  # (inner's y = x adds 0)


# (the probe's stand-ins for a submodule held twice, inner.w and mid.inner.w, warn the first unread: another matter)
@pytest.mark.filterwarnings("ignore::convexddn.errors.GradientWarning")
def test_nested_nodes_guards_are_taken_in_one_order_from_any_node():
    """A node's guard, then those of its submodule nodes, each before the nodes it holds: ``outer``
    holding ``inner`` and ``mid`` (which holds ``inner`` too) took outer, inner, mid in module order,
    and ``mid``'s swap mid, inner: two threads waiting for each other."""
    from convexddn.nodes._swap_guard import _in_order

    outer = _Outer()
    mid = _Outer()
    mid.inner = outer.inner
    outer.mid = mid
    assert _in_order(outer) == [outer, mid, outer.inner]
    assert _in_order(mid) == [mid, outer.inner]
    assert _in_order(outer.inner) == [outer.inner]
    x = torch.ones(2, 3, requires_grad=True)
    done = []

    def train(node):
        for _ in range(20):
            node(x).sum().backward()
        done.append(node)

    ts = [threading.Thread(target=train, args=(node,), daemon=True) for node in (outer, mid, outer.inner)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(4 * WAIT)
    assert len(done) == 3 and outer.inner.w.dtype == torch.float32


def _in_forked_child(target, *args, timeout: float):
    """What ``target(*args, report)`` puts on its queue in a forked child, or that it hung."""
    ctx = multiprocessing.get_context("fork")
    report = ctx.Queue()
    child = ctx.Process(target=target, args=(*args, report))
    with warnings.catch_warnings():  # (Python >= 3.12: fork with threads running)
        warnings.simplefilter("ignore", DeprecationWarning)
        child.start()
    try:
        return report.get(timeout=timeout)
    except queue.Empty:
        return "no answer: the child hung"
    finally:
        child.join(WAIT)
        if child.is_alive():
            child.kill()
            child.join()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_child_forked_during_another_threads_backward_has_its_parameters_and_runs():
    """The child inherited the swap of a thread it does not have: its module held the
    backward's float64 cast (a non-leaf) in place of the Parameter, and its first forward
    waited for that thread's swap to end, for ever."""
    node = _Weighted()
    y = node(torch.randn(2, 3, requires_grad=True))
    inside, release = threading.Event(), threading.Event()

    def hook():
        if threading.current_thread().name == "bw" and not inside.is_set():
            inside.set()
            release.wait(WAIT)

    node.hook = hook
    t = threading.Thread(target=lambda: y.sum().backward(), name="bw")
    t.start()
    try:
        assert inside.wait(WAIT)
        got = _in_forked_child(_use_in_child, node, timeout=2 * WAIT)
    finally:
        release.set()
        t.join()
    assert got == ["Parameter", "torch.float32", True, True, "torch.float32", True, True]
    assert node.w.dtype == torch.float32 and isinstance(node.w, torch.nn.Parameter)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_child_forked_during_another_threads_forward_can_swap():
    """A read (a forward) of a thread the child does not have: the child's first swap (a
    backward) waited for it to end, for ever."""
    from convexddn.nodes._swap_guard import SwapGuard

    guard = SwapGuard()
    held, release = threading.Event(), threading.Event()

    def reader():
        with guard.reading():
            held.set()
            release.wait(WAIT)

    def swap_in_child(report):
        with guard.swapping():
            report.put("swapped")

    t = threading.Thread(target=reader)
    t.start()
    try:
        assert held.wait(WAIT)
        got = _in_forked_child(swap_in_child, timeout=WAIT)
    finally:
        release.set()
        t.join()
    assert got == "swapped"


class _Offset(DeclarativeNode):
    """½‖y + 1e8 − x‖²: y = x − 1e8; ``solve`` is 1e-5 off, so the backward's solution check
    takes the Newton step of the residual (ImplicitSystem.quiet_step) and warns."""

    def objective(self, x, y):
        return 0.5 * ((y + 1e8 - x) ** 2).sum(-1)

    def solve(self, x):
        return x - 1e8 + 1e-5


def test_declarative_quiet_steps_in_two_threads_leave_warnings_on(monkeypatch):
    """The quiet step held its solve's warnings with catch_warnings + simplefilter("ignore"),
    which save and restore the process-wide filter list: with "a" inside, "b" entering,
    "a" leaving, "b" leaving, "b" put back "a"'s "ignore every warning" for good; and while
    "a" was inside, "b"'s own warnings were dropped."""
    from convexddn.nodes import implicit_system

    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    solve = implicit_system.ImplicitSystem.solve

    def first_solve_waits(self, v):  # a backward's first solve is its quiet step's
        who = threading.current_thread().name
        if who == "a" and not a_in.is_set():
            a_in.set()
            b_in.wait(WAIT)
        elif who == "b" and not b_in.is_set():
            b_in.set()
            a_done.wait(WAIT)
        return solve(self, v)

    stepped = []
    quiet_step = implicit_system.ImplicitSystem.quiet_step

    def noted_quiet_step(self, r):
        stepped.append(threading.current_thread().name)
        return quiet_step(self, r)

    monkeypatch.setattr(implicit_system.ImplicitSystem, "solve", first_solve_waits)
    monkeypatch.setattr(implicit_system.ImplicitSystem, "quiet_step", noted_quiet_step)
    x = 1e8 + torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    errors = []

    def backward(name: str) -> None:
        try:
            if name == "b":
                a_in.wait(WAIT)
                warnings.warn("b, while a is in its quiet step", UserWarning)
            _Offset()(x.clone().requires_grad_()).sum().backward()
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
        finally:
            if name == "a":
                a_done.set()

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        threads = [threading.Thread(target=backward, args=(n,), name=n) for n in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and sorted(stepped) == ["a", "b"]
        assert warnings.filters == filters
        _Offset()(x.clone().requires_grad_()).sum().backward()  # a later call: warns
    messages = [str(w.message) for w in seen]
    assert "b, while a is in its quiet step" in messages
    # One per backward ("a", "b", the later one), none from the quiet steps' solves.
    assert sum("only approximately" in m for m in messages) == 3


# ------------------------------------------------------------------ every node, bitwise


def _qp() -> cddn.ConvexLayer:
    L = cp.Parameter((3, 3), name="L")
    q = cp.Parameter(3, name="q")
    y = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L @ y) + q @ y), [y >= -1, y <= 1, cp.sum(y) == 0.5])
    return cddn.ConvexLayer(prob, [L, q], [y])


def _cases(layer: cddn.ConvexLayer, node: DeclarativeNode) -> dict:
    eye = torch.eye(3, dtype=F64)
    return {
        "robust_pool": (lambda x: F.robust_pool(x, "huber", 0.7) + F.robust_pool(x, "welsch", 0.7), (6, 40)),
        "project_lp": (lambda x: F.project_lp(x, 1) + F.project_lp(x, 2, "sphere"), (6, 9)),
        "entmax": (lambda x: F.entmax(x, 1.5), (6, 9)),
        "sinkhorn": (lambda x: F.sinkhorn(x.abs(), eps=0.5), (3, 5, 6)),
        "eigen": (lambda x: F.eigen_decomposition(x + x.mT, 2).eigenvectors.abs(), (3, 5, 5)),
        "least_squares": (lambda x: F.least_squares(x[..., :3], x[..., 3], ridge=0.1), (4, 8, 4)),
        "vector_pool": (lambda x: F.robust_vector_pool(x, "pseudo_huber"), (3, 2, 12)),
        "tv_denoise": (lambda x: F.tv_denoise(x, 0.3), (4, 20)),
        "convex_layer": (lambda x: layer(x[:, :3] + 2 * eye, x[:, 3]), (8, 4, 3)),
        "declarative": (lambda x: node(x.float()).double(), (4, 3)),
    }


@pytest.mark.parametrize("name", ["robust_pool", "project_lp", "entmax", "sinkhorn", "eigen", "least_squares",
                                  "vector_pool", "tv_denoise", "convex_layer", "declarative"])
def test_nodes_in_threads_match_serial_calls_bitwise(name):
    """4 threads × 3 calls on different inputs, forward and backward: the same bits as
    the same calls made one after another."""
    fn, shape = _cases(_qp(), _Weighted())[name]

    def call(seed: int) -> list[torch.Tensor]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64).requires_grad_(True)
        y = fn(x)
        (grad,) = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)).sum(), x)
        return [y.detach(), grad]

    seeds = [[4 * t + i for i in range(3)] for t in range(4)]
    serial = {s: call(s) for row in seeds for s in row}
    got, errors = {}, []

    def work(row: list[int]) -> None:
        for s in row:
            try:
                got[s] = call(s)
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)

    threads = [threading.Thread(target=work, args=(row,)) for row in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    for s, ref in serial.items():
        assert all(torch.equal(a, b) for a, b in zip(got[s], ref)), s


def test_swap_guard_waiting_swap_goes_before_new_forwards():
    # Writer preference: a forward that arrives while a swap waits for the forwards under
    # way enters after that swap (before, a stream of forwards starved a backward: 4.6 s
    # behind four threads of 10 ms forwards).
    from convexddn.nodes._swap_guard import SwapGuard

    guard, order = SwapGuard(), []
    held, release = threading.Event(), threading.Event()

    def first_reader():
        with guard.reading():
            held.set()
            release.wait(5)

    def swapper():
        with guard.swapping():
            order.append("swap")

    def late_reader():
        with guard.reading():
            order.append("read")

    a = threading.Thread(target=first_reader)
    a.start()
    held.wait(5)
    w = threading.Thread(target=swapper)
    w.start()
    while not getattr(guard, "_waiting", 1):  # the swap is waiting for the first reader
        time.sleep(0.001)
    r = threading.Thread(target=late_reader)
    r.start()
    time.sleep(0.05)
    assert order == []  # neither may run while the first read is held
    release.set()
    for t in (a, w, r):
        t.join(5)
    assert order == ["swap", "read"]


class _ReadsOther(DeclarativeNode):
    """½ (y − w x)², y = w x, dy/dx = w = 2; its objective reads another node's state_dict()."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(2.0, dtype=F64))
        self.other: list = []  # (a list: the other node is no submodule)
        self.meet: threading.Barrier | None = None

    def objective(self, x, y):
        meet, self.meet = self.meet, None
        if meet is not None:  # (the first call's check, in both threads at once, each holding its swap)
            meet.wait(WAIT)
        self.other[0].state_dict()
        return 0.5 * ((y - self.w * x) ** 2).sum(-1)

    def solve(self, x):
        return self.w.detach() * x


def test_two_nodes_reading_each_others_state_in_two_threads_do_not_deadlock():
    """Two nodes whose objectives read each other's state_dict(), run forward+backward in two
    threads: each held its own swap (the first call's check) and waited for the other's, for ever.
    Now the thread that closes the cycle of waits raises a ProblemError saying so, and the other
    finishes (dy/dx = w = 2). Threads are daemons joined with a timeout: the test never hangs."""
    a, b = type("NodeA", (_ReadsOther,), {})(), type("NodeB", (_ReadsOther,), {})()
    a.other, b.other = [b], [a]
    a.meet = b.meet = threading.Barrier(2)
    out: dict = {}

    def run(key, node):
        try:
            x = torch.ones(2, 1, dtype=F64, requires_grad=True)
            node(x).sum().backward()
            out[key] = x.grad.flatten().tolist()
        except Exception as err:  # noqa: BLE001 (reported below)
            out[key] = err

    threads = [threading.Thread(target=run, args=(k, n), daemon=True) for k, n in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * WAIT)
    assert not any(t.is_alive() for t in threads), "deadlocked"
    errors = [v for v in out.values() if isinstance(v, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], cddn.errors.ProblemError), out
    assert re.search(r"Node[AB]: this thread would wait for ever to read Node[AB]'s tensors: the thread that "
                     r"holds them waits for Node[AB], which this thread holds", str(errors[0]))
    assert [v for v in out.values() if not isinstance(v, Exception)] == [[2.0, 2.0]]
    for node in (a, b):  # (each node's own parameter, back in place)
        assert type(node.w) is torch.nn.Parameter and node.w.dtype == F64


def test_swap_guard_cycle_of_three_waits_raises_in_one_thread():
    """Three guards, each swapped by one thread that then reads the next one's: the third wait
    closes the cycle and raises; the other two go on once its holds end."""
    from convexddn.nodes._swap_guard import SwapGuard

    guards = [SwapGuard() for _ in range(3)]
    for i, guard in enumerate(guards):
        guard.name = f"G{i}"
    holding = threading.Barrier(3)
    out: dict = {}

    def run(i):
        try:
            with guards[i].swapping():
                holding.wait(WAIT)
                time.sleep(0.05 * i)  # (the waits begin in order: thread 2 closes the cycle)
                with guards[(i + 1) % 3].reading():
                    out[i] = "ok"
        except cddn.errors.ProblemError as err:
            out[i] = str(err)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * WAIT)
    assert not any(t.is_alive() for t in threads), "deadlocked"
    assert out[0] == out[1] == "ok"
    assert out[2].startswith("G0: this thread would wait for ever to read G0's tensors: the thread that holds them "
                             "waits for G1 -> G2, which this thread holds")


# ------------------------------------------------------------------ after the main thread


_AFTER_MAIN = """
import atexit, json, threading  # (no more: the spawned workers import this file too)

def layer():
    return cddn.layer("simplex", n=3, workers=2, backend="cvxpy", solver="Clarabel")

def call(key, net):
    try:
        x = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.5, 0.5], [0.2, 0.3, 0.2]], dtype=torch.float64)
        x.requires_grad_(True)
        loss = (net(x) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum()
        loss.backward()
        out[key] = [loss.item(), x.grad.tolist()]
    except BaseException as err:
        out[key] = repr(err)

def finish():
    call("atexit, after multiprocessing's", used)
    print(json.dumps(out))

def late():
    threading.main_thread().join()  # (it ends after concurrent.futures' exit hook)
    call("thread, pool started", used)
    call("thread, pool never started", fresh)

if __name__ == "__main__":
    atexit.register(finish)  # registered first: runs last, after multiprocessing's exit hook
    import torch, convexddn as cddn
    out, used, fresh = {}, layer(), layer()
    pool = used._backend._workers
    assert pool.gather(pool.get(3), [(sorted, [2, 1])]) == [1, 2]  # started (its workers import little)
    atexit.register(call, "atexit", used)
    threading.Thread(target=late).start()  # non-daemon: joined after the main thread returns
"""


def test_a_layer_with_workers_called_after_the_main_thread_returned_solves_in_this_process(tmp_path):
    """A non-daemon thread still calling a ``workers=2`` layer after the main thread has
    returned, or an atexit handler calling it: concurrent.futures has stopped every pool
    by then and refuses new ones, and each call raised RuntimeError; they are solved in
    this process now. Closed forms: the projections onto the simplex are interior (x,
    (1/3, 1/3, 1/3), x + 0.1), so the Jacobian is I - 11^T/3 and the gradient of w.y is
    w - mean(w) = (-1, 0, 1), and w.y = 2.6, 2, 2 (sum 6.6)."""
    import json
    import subprocess
    import sys

    script = tmp_path / "after_main.py"  # (a file: spawned workers re-import the main module)
    script.write_text(_AFTER_MAIN)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         check=False)
    assert out.returncode == 0, out.stderr[-1000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(got) == sorted(["atexit", "atexit, after multiprocessing's", "thread, pool started",
                                  "thread, pool never started"])
    for key, value in got.items():
        assert isinstance(value, list), f"{key}: {value}"
        loss, grad = value
        assert loss == pytest.approx(6.6, abs=1e-7), key
        torch.testing.assert_close(torch.tensor(grad, dtype=F64), torch.tensor([[-1.0, 0, 1]] * 3, dtype=F64),
                                   atol=1e-6, rtol=0)


def _backward_after(event: threading.Event, y: torch.Tensor, errors: list) -> None:
    """A thread's target: once ``event`` is set, ``y.sum().backward()``; its error goes to ``errors``."""
    event.wait(WAIT)
    try:
        y.sum().backward()
    except Exception as err:  # noqa: BLE001 - reported by the caller
        errors.append(err)
