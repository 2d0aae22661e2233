"""The library's code under ``torch.compile``: functions it must run eagerly
(:func:`outside_compile`), ``autograd.Function`` classes with a forward mode, whose
``jvp`` only an eager call runs (:func:`eager_with_tangents`), and whether the graph being
traced may break (:func:`may_break_graph`). The refusals of tracing and
``torch.export`` are in :mod:`convexddn._autograd`."""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["constant_result", "eager_with_tangents", "may_break_graph", "outside_compile"]


def outside_compile(fn: Callable) -> Callable:
    """``fn`` (a decorator), never captured by torch.compile: a graph break around it, and every
    call it makes runs eagerly, as ``torch.compiler.disable(fn)`` does.

    For code that differentiates the user's functions more than once (``retain_graph=True``,
    ``create_graph=True``): traced, they became a compiled graph whose backward donates its
    buffers and refuses a second pass (torch's raw "This backward function was compiled with
    non-empty donated buffers" at a DeclarativeNode's first compiled call). Such code tests
    on the host anyway; compiling it gains nothing. ``torch.compiler.disable`` is applied at
    the first call after torch._dynamo is imported (it imports torch._dynamo, 1.3 s, which an
    eager user need not pay; before that, nothing can be compiling); the wrapper adds ~0.4 us.
    """
    disabled: list[Callable] = []

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return wrapper


def eager_with_tangents(cls: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Class decorator (:func:`~convexddn._autograd.bind_fast` applies it): make ``cls``, a
    Function with a ``jvp``, run outside torch.compile's graph where a
    ``torch.autograd.forward_ad`` dual level is open, and its ``setup_context`` never
    compiled as a frame of its own, so that forward mode gives the eager tangents.

    Dynamo never runs a Function's ``jvp``: with inputs that do not require grad it traces
    the forward alone, whose ops forward mode then differentiated (project_lp(p=inf) passed
    the tangent at a tie |x_i| = r, where the derivative is 0; p=1 raised torch's "forward
    AD with minimum_out" error). There the forward now calls itself through
    :func:`outside_compile`, which dynamo cannot inline: the whole call runs eagerly (a
    graph break; dynamo guards on the dual level, so the graph without one is kept). An
    eager call compiles each Python frame it runs on its own, and a compiled
    ``setup_context`` drops ``ctx.mark_non_differentiable`` (dynamo records it on its
    stand-in for the ``ctx``, torch 2.13): forward mode then set a tangent on the bool and
    index outputs, torch's "INTERNAL ASSERT FAILED at autograd_meta.cpp" (tv_denoise,
    eigen_decomposition, least_squares, sinkhorn; a DeclarativeNode's output had no tangent
    at all). (Not for the Functions without a jvp: dynamo traces those whole,
    ``setup_context`` included, as fullgraph=True needs.)
    """
    forward = cls.forward
    eager = outside_compile(forward)

    @functools.wraps(forward)
    def forward_eager_with_tangents(*args: Any) -> Any:
        if torch.compiler.is_compiling() and torch.autograd.forward_ad._current_level >= 0:
            return eager(*args)
        return forward(*args)

    cls.forward = staticmethod(forward_eager_with_tangents)  # type: ignore[method-assign]
    setup = cls.__dict__.get("setup_context")
    if isinstance(setup, staticmethod):  # (bookkeeping: nothing to gain from compiling it)
        cls.setup_context = staticmethod(outside_compile(setup.__func__))  # type: ignore[method-assign]
    return cls


def constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)``: dynamo calls ``fn`` while it traces
    instead of tracing it (its result is a constant of the graph). That function imports
    torch._dynamo (1.3 s at ``import convexddn``, which an eager user need not pay) to set
    one attribute, ``fn._dynamo_marked_constant`` (torch 2.13), which dynamo reads when it
    meets the call: set here as it does, or through it where dynamo is loaded already."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@constant_result
def may_break_graph() -> bool:
    """Whether the code running now may break its graph for a host read: outside
    torch.compile, or inside a torch.compile trace with ``fullgraph=False``; not with
    ``fullgraph=True`` (a break is an error there), under ``torch.export``, or where this
    cannot be told (dynamo's tracer state is private: a torch that moved it answers False).
    Called by dynamo while it traces, not traced (the flags are read from its tracer)."""
    if not torch.compiler.is_compiling():
        return True
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return not (tx.one_graph or tx.export or getattr(tx, "error_on_graph_break", False))
    except Exception:  # noqa: BLE001 - non-strict export (no tracer), or another torch: no break
        return False
