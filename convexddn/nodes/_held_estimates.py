"""Submodules whose training-mode forward refines an estimate kept in buffers, held while a
:class:`~.declarative.DeclarativeNode` evaluates its problem.

Spectral normalisation (``torch.nn.utils.spectral_norm`` and
``torch.nn.utils.parametrizations.spectral_norm``) divides a weight by
:math:`\\sigma = u^\\top W v`, where ``u`` and ``v`` are buffers that each training-mode call
refines by a step of power iteration, in place, before it uses them. In the node's objective
that step ran at every evaluation of the problem: the first call's check refused the write
(``ProblemError`` naming ``weight_u``, ``weight_v``), and had it not, each of the backward's
evaluations would have moved ``u`` and ``v`` again and seen another ``σ`` than ``solve`` did.
Within :func:`held_estimates` such submodules run as in eval mode: the weight is
:math:`W / (u^\\top W v)` at the ``u``, ``v`` the forward left (those ``solve`` used where it
calls the submodule in training mode, which refines them once per forward, as a plain forward
would), and the problem's evaluations never write them. ``u`` and ``v`` are constants of the
gradient, as in torch's own backward (which differentiates through their clones).

Each call holds its own: :func:`held_per_call` gives the state a forward saves for its backward with
copies of ``u`` and ``v`` as they were at that forward. Two forwards before one backward (a
discriminator applied to real and to generated data, then one backward of the sum) stepped ``u`` and
``v`` again in the second forward, and the first call's backward, which reads them, raised an
``InputError`` (modified in place since its forward); its problem is the one its forward solved, at
its own estimate, as torch's graph of a plain forward keeps it (clones of ``u``, ``v`` per call).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.utils import parametrizations
from torch.nn.utils.spectral_norm import SpectralNorm

__all__ = ["held_estimates", "held_per_call"]

# The parametrization's class is private to torch: where it moves, only the hook form is held.
_PARAMETRIZATIONS = tuple(c for c in (getattr(parametrizations, "_SpectralNorm", None),) if c is not None)


def _refines(module: torch.nn.Module) -> bool:
    """Whether ``module``'s training flag only turns on a power iteration on its buffers."""
    return isinstance(module, _PARAMETRIZATIONS) or any(
        isinstance(hook, SpectralNorm) for hook in module._forward_pre_hooks.values())


def _estimates(module: torch.nn.Module) -> list[torch.Tensor]:
    """The buffers ``u``, ``v`` that ``module``'s power iteration refines (none where it has none)."""
    keys = [k for hook in module._forward_pre_hooks.values() if isinstance(hook, SpectralNorm)
            for k in (f"{hook.name}_u", f"{hook.name}_v")]
    if isinstance(module, _PARAMETRIZATIONS):
        keys += ["_u", "_v"]  # (absent for a 1-d weight: it is only divided by its norm)
    return [module._buffers[k] for k in keys if module._buffers.get(k) is not None]


def held_per_call(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (``module``'s parameters and buffers by name, as a forward saw them) with each power-iteration
    estimate that ``module``'s spectral norms hold now replaced by a copy of its value now: what this
    forward's backward reads, whatever later forwards make of the buffer (one copy per tensor, under each
    of its names)."""
    ids = {id(t) for m in module.modules() if _refines(m) for t in _estimates(m)}
    if not ids:
        return state
    copies: dict[int, torch.Tensor] = {}
    return {n: copies.setdefault(id(t), t.detach().clone()) if id(t) in ids else t for n, t in state.items()}


@contextlib.contextmanager
def held_estimates(module: torch.nn.Module) -> Iterator[None]:
    """Within: the submodules of ``module`` that refine a power-iteration estimate in training mode
    (spectral norms) in eval mode, reading it as it is; restored after (to be held under the swap
    guard, :func:`~._swap_guard.guarded` with ``swap=True``: other threads' forwards wait)."""
    held = [m for m in module.modules() if m.training and _refines(m)]
    for m in held:
        m.training = False
    try:
        yield
    finally:
        for m in held:
            m.training = True
