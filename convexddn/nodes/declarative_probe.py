"""The first-call probe of a :class:`~convexddn.nodes.declarative.DeclarativeNode`: the
objective and constraints evaluated once with autograd, to check their shapes and
their dependence on ``y``, refuse tensors they close over, and learn which inputs,
parameters and buffers they read, and which tensors from outside the node (the in-place
guard, :mod:`._read_guard`, watches those from this call on)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.utils.stateless import _reparametrize_module

from .._autograd import outside_compile, plain, without_autocast
from .._warn import warn
from ..errors import GradientWarning, ProblemError
from ._read_guard import Reads
from ._swap_guard import guarded, named_state, read_as
from .graph import check_graph
from .krylov import pseudo_random_directions
from .lagrangian import _constraint, _objective

__all__ = ["probe"]

Tensor = torch.Tensor


@contextlib.contextmanager
def _own_saved_tensors() -> Iterator[None]:
    """The probe's own graph is thrown away: its saved tensors bypass any hooks around the call (a
    non-reentrant torch.utils.checkpoint counted them in the first forward only, not in its
    recomputation: CheckpointError on a node's first call). Under
    ``torch.autograd.graph.disable_saved_tensors_hooks`` none can be around it (torch refuses to
    disable them while any are registered), and registering one raises the caller's message (a
    node's first call there failed): nothing to do.

    The saved tensors are kept in a list of the call's, and the graph holds their positions: a
    hook that returned the tensor itself made an op's saved output hold itself through its
    ``grad_fn``, a cycle through torch's graph that Python's collector cannot free (every probe
    leaked its outputs of ``exp``, ``tanh``, ...: 3 input-sized tensors a call). The list is
    emptied as the probe ends, with the graph."""
    enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", lambda: True)  # (private)
    if not enabled():
        yield
        return
    kept: list[Tensor] = []

    def pack(t: Tensor) -> int:
        kept.append(t)
        return len(kept) - 1

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, kept.__getitem__):
            yield
    finally:
        kept.clear()


def _groups(batch: int, device: torch.device) -> list[Tensor]:
    """Row masks ``(B,)`` whose seeds, each alone, reveal any coupling of two rows: row 0
    against the rest, then even against odd rows, then every third row (a coupling among
    rows 1 and 2 passed the first alone, 1/3 off); two rows coupled escape only where
    they agree in all three (indices ≡ mod 6, both nonzero)."""
    idx = torch.arange(batch, device="cpu")  # host-side (read by tolist), whatever the default device
    groups, seen = [], set()
    for mask in (idx == 0, idx % 2 == 0, idx % 3 == 0):
        for m in (mask, ~mask):
            key = tuple(m.tolist())
            if any(key) and key not in seen:  # (at B = 2 the three splits are one)
                seen.add(key)
                groups.append(m.to(device))
    return groups


def _cross_rows(outputs, leaves: tuple[Tensor, ...], make) -> int | None:
    """The index in ``leaves`` of one whose rows the vector-Jacobian products of ``outputs``
    mix: with a seed ``make(t, rows)`` on each group of rows of :func:`_groups` (zero
    elsewhere), the result must vanish off those rows; ``None`` where none does. Exactly
    zero where rows are separate (a zero seed contributes exact zeros; NaN, from
    ``0 · ∞``, does not count)."""
    for own in _groups(outputs.shape[0], outputs.device):
        grads = torch.autograd.grad(outputs, leaves, make(outputs, own), retain_graph=True, allow_unused=True)
        for k, g in enumerate(grads):
            if g is not None:
                cross = g.detach().clone()
                cross[own] = 0.0
                if bool((cross.abs() > 0).any()):
                    return k
    return None


def _check_rows(name: str, outputs: dict, xg: tuple[Tensor, ...], yg: Tensor) -> bool:
    """Raise where row ``b`` of the objective or of a constraint reads another row of ``y``
    or of an input (``y.mean(0)``, a BatchNorm in train mode).

    The implicit backward treats each batch element as its own problem (block-diagonal
    ``H = ∇²_yy L`` and ``B = ∇²_xy L``): such a coupling was differentiated as if absent,
    35 % off with no warning. Two vector-Jacobian products per output tell where its
    value's rows mix (the constraints enter through their Jacobian), and for the objective
    two Hessian-vector products of ``∇_y f`` along directions confined to row 0 and to the
    others (its gradient may vanish at the solution where its curvature mixes rows:
    ``½‖y_b − x_b + x̄‖²``). A missing second derivative is left to the backward to report.

    Returns whether the check was made: not for a batch of 0 or 1 rows (nothing to
    couple there; the node checks again at its first batch of two or more).
    """
    if yg.shape[0] < 2:
        return False
    leaves = (yg, *xg)

    def on_rows(out: Tensor, rows: Tensor, value=None) -> Tensor:
        seed = torch.zeros_like(out)
        seed[rows] = 1.0 if value is None else value[rows]
        return seed

    for method, out in outputs.items():
        if out is None or not out.requires_grad:
            continue
        k = _cross_rows(out, leaves, on_rows)
        if k is None and method == "objective":
            # (unused: an objective that reads the inputs but not y, a problem its constraints define)
            (gy,) = torch.autograd.grad(out, yg, torch.ones_like(out), create_graph=True, allow_unused=True)
            try:
                if gy is not None and gy.requires_grad:
                    u = pseudo_random_directions(gy[0].numel(), gy.shape[0], gy.dtype, gy.device).view(gy.shape)
                    k = _cross_rows(gy, leaves, lambda t, rows: on_rows(t, rows, u))
            except (RuntimeError, NotImplementedError):
                k = None
        if k is not None:
            what = "y" if k == 0 else f"input {k - 1}"
            raise ProblemError(
                f"{name}.{method}: batch elements depend on each other's rows of {what} (e.g. "
                "y.mean(0), x.sum(0), a BatchNorm in train mode), but row b may depend only on row b of the "
                "inputs and of y: the implicit backward (and forward mode's jvp) solves each element's problem on "
                "its own, and would differentiate the coupling as if it were absent. Write it row by row, or pass "
                "batch_dims=0 to make the whole batch one problem")
    return True


def _same(a: Tensor, b: Tensor) -> bool:
    if a.device.type == "meta" or a.shape != b.shape:
        return a.shape == b.shape
    if a.layout != torch.strided:  # (sparse: no elementwise comparison; a write moves the counter)
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return torch.equal(a, b.to(a.device))
    b = b.to(a.device)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _check_kept(name: str, fixed: dict, state: dict, versions: dict) -> None:
    """Raise where the problem wrote to a parameter or buffer (a stand-in's version counter
    moved, or a buffer's copy no longer equals the buffer: native_batch_norm writes its running
    statistics without moving the counter): the backward evaluates the problem again, several
    times, each time writing again (a BatchNorm in train mode moves its running statistics once
    per evaluation)."""
    written = [n for n, t in fixed.items()
               if t._version != versions[n] or (not t.requires_grad and not _same(t, state[n]))]
    if written:
        raise ProblemError(
            f"{name}: the objective or constraints modified {written} in place (e.g. a BatchNorm in train mode "
            "updates its running statistics): the backward evaluates them again, several times, each time changing "
            "them again; they must not change the node's state: call such a submodule in eval mode (or with "
            "track_running_stats=False), or update the state in solve")


@outside_compile  # (it differentiates the objective several times: see outside_compile)
@without_autocast  # (as the backward: the problem's derivatives in its own dtype)
def probe(node, xs: tuple[Tensor, ...], y: Tensor) -> tuple[frozenset[str], bool, list[Tensor]]:
    """Probe ``node``'s problem at the inputs ``xs`` (flattened, ``(B, ...)``) and its
    solution ``y``; warn where inputs or parameters that require grad are not read.

    Returns ``(names, rows, outside)``: the names of the parameters and buffers at the probe (one
    added later: the node probes again), whether the rows' independence was checked (a batch of two
    rows or more), and the tensors from outside the node's parameters and buffers that the problem
    reads (closed over, plain attributes: the in-place guard watches them)."""
    name = type(node).__name__
    dtype = node.implicit_dtype
    with guarded(node, swap=True), _own_saved_tensors():
        known = tuple(node.parameters())
        # Every floating parameter stands in as a leaf that requires grad, so the graph
        # tells which of them the problem reads (one that requires grad, unread: warned below).
        # Every buffer stands in as a copy (Reads tells which are read), not one that requires
        # grad: a BatchNorm in train mode, which writes its running statistics, raised torch's
        # raw "not differentiable with respect to argument 'running_mean'"; the copy takes the
        # write, which raises below, and the node's own buffer is left as it was.
        # (Not a buffer that requires grad: the problem closes over it, an error below.)
        # (a submodule under two names once: a swap by both names did not restore it)
        params = dict(named_state(node, ("_parameters",)))
        state = {**params, **dict(named_state(node, ("_buffers",)))}
        # (an inference tensor cannot require grad: a plain copy of it can)
        # (an integer parameter, which cannot require grad, stands in as a copy, as a buffer)
        fixed = {n: plain(t).detach().requires_grad_(True) if n in params and t.is_floating_point()
                 else plain(t).detach().clone()
                 for n, t in state.items() if (t.is_floating_point() and n in params) or not t.requires_grad}
        versions = {n: t._version for n, t in fixed.items()}
        with torch.enable_grad(), _reparametrize_module(node, fixed), read_as(node, dtype):
            # The node's own tensors as the problem sees them (read_as's casts, the stand-ins, the
            # rest): Reads' other tensors, not made within, are from outside the node.
            sees = [*named_state(node), *fixed.items(), *state.items()]
            names = {id(t): n for n, t in sees}
            xg = tuple(plain(x).detach().to(dtype).requires_grad_(True) for x in xs)
            yg = y.detach().to(dtype).requires_grad_(True)
            # (a deep copy of a stand-in: a ProblemError where the tensor it stands for requires grad)
            reads = Reads((*xg, yg), swapped={i: (n, state[n].requires_grad) for i, n in names.items()}, node=name)
            with reads:
                f = _objective(f"{name}.objective", node._call("objective"), xg, yg)
                cons = {m: _constraint(f"{name}.{m}", node._call(m), xg, yg)
                        for m in ("equality_constraints", "inequality_constraints")}
            _check_kept(name, fixed, state, versions)
            of_f, of_c = check_graph(name, f, cons, yg, allowed=xg + known + tuple(fixed.values()))
            leaves = {**of_f, **of_c}
            rows = _check_rows(name, {"objective": f, **cons}, xg, yg)
        # (read through autograd: the stand-ins' own tensors, and those closed over, not swapped)
        read_ids = {id(state[n]) for n, t in fixed.items() if id(t) in leaves} | set(leaves)
        # From the parameters as this guard saw them, not the node's now: past the guard another
        # thread's probe may hold its stand-ins there, which require grad (a frozen parameter was
        # named as requiring grad, unread: a false GradientWarning in 4 of 30 runs of 4 threads).
        first: dict[int, tuple[str, Tensor]] = {}  # (each tied parameter once, by its first name)
        for n, p in params.items():
            first.setdefault(id(p), (n, p))
        idle = [n for n, p in first.values() if p.requires_grad and id(p) not in read_ids]
    outside = [t for i, t in reads.outside.items() if i not in names]
    unused = [i for i, (x, g) in enumerate(zip(xs, xg)) if x.requires_grad and id(g) not in leaves]
    # Tensor attributes of the node the problem reads: one computed from a parameter in solve (which runs
    # without gradient tracking) carries no graph back to it (the warning names them).
    attributes = {id(v): k for k, v in vars(node).items() if isinstance(v, Tensor)}
    read_attributes = sorted(attributes[id(t)] for t in outside if id(t) in attributes)
    via = (f" (they read the tensor attribute(s) {read_attributes} of the node: one computed from a parameter in "
           "solve, which runs without gradient tracking, or with .detach(), carries no graph back to it; compute "
           "it from the parameter in the objective or constraints)") if read_attributes else ""
    for kind, which, also, hint in (("input(s)", unused, "", ""), ("parameter(s)", idle, "expected if solve uses "
                                                                  "them only to start its iterations; ", via)):
        if which:
            warn(
                f"{name}: {kind} {which} require grad but neither the objective nor the constraints "
                f"depend on them (through autograd), so this node gives them a zero gradient; {also}if "
                "solve uses them as problem data, the objective or constraints must use them too (not "
                f".item(), .detach() or numpy){hint}", GradientWarning)
    return frozenset(state), rows, outside
