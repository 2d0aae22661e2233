"""Replaying the step of an iterative solver as a CUDA graph.

An iteration of a batched solver on small problems is hundreds of tiny kernels: on a
GPU each costs its launch (the host's Python and dispatch, ~10-20 µs), not its
arithmetic, so the device idles most of the time. A CUDA graph records the kernels of
one step once and replays them with a single launch.

:class:`StepGraphs` runs ``body(*consts, *state) -> (*new_state, *extras)`` (``consts``:
the data, which the body reads and leaves alone; none by default): eagerly on the CPU
(or where capture is off), and on CUDA by capturing each variant of the body (a key
such as the number of refinement steps) the first time it is asked for and replaying
it after. The state lives in buffers the graphs share: a replay reads them and writes
the new state back into them, so consecutive replays need no copies and the variants
can alternate. The body must be a pure function of its arguments and of tensors that
outlive the loop (the data), with no host synchronisation (no ``.item()``, ``bool()``
or data-dependent shapes); its extras (e.g. the counts the loop reads on the host) are
the graph's own outputs, overwritten by the next replay.

A loop run many times on the same shapes (a layer in training) keeps its graphs:
:meth:`StepGraphs.kept` hands out the graphs of an earlier run with the same key (the
last :data:`KEEP` keys, per process), and the loop passes its data as ``consts``,
copied into the graphs' own buffers once per run. The body must then read no other
tensor that a run makes (only the data, the state and what outlives every run, such as
a layout's cached index tensors).

A variant whose capture fails (an operation that cannot be captured) runs eagerly from
then on, as do the other variants of that loop and that site's later loops in the
process, with one :class:`~convexddn.errors.ConvexDDNWarning` (same results, slower);
``reason`` says why. Set the environment
variable ``CONVEXDDN_CUDA_GRAPHS=0`` to run every step eagerly.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch

from ._warn import warn
from .errors import ConvexDDNWarning

__all__ = ["KEEP", "StepGraphs", "capture_wanted"]

#: How many keys' graphs a process keeps (each holds its buffers and its graphs' memory).
KEEP = 4


def capture_wanted(like: torch.Tensor) -> bool:
    """Whether steps on ``like``'s device are captured: CUDA, unless the environment
    variable ``CONVEXDDN_CUDA_GRAPHS`` is ``0`` or the caller is capturing a graph itself
    (captures do not nest)."""
    return (like.is_cuda and os.environ.get("CONVEXDDN_CUDA_GRAPHS", "1") != "0"
            and not torch.cuda.is_current_stream_capturing())


class StepGraphs:
    """The captured variants of one loop's step (see the module's docstring).

    Args:
        capture: capture on CUDA; ``False`` runs every body eagerly (the same results,
            one launch per kernel).
        site: which loop this is; once a capture at a site has failed, that site's
            later loops in this process run eagerly without trying again (and warn once).
    """

    _failed: dict[str, str] = {}  # for the whole process: site -> why its capture failed
    _kept: OrderedDict = OrderedDict()  # (site, key) -> StepGraphs, least recently used first
    _lock = threading.Lock()

    def __init__(self, capture: bool, site: str = "") -> None:
        self.site = site
        self.reason: str | None = self._failed.get(site) if capture else None
        self.capture = capture and self.reason is None
        self.replays = 0
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self._buffers: list[torch.Tensor] | None = None
        self._consts: list[torch.Tensor] | None = None  # the data's buffers
        self._const_src: list[torch.Tensor] | None = None  # what was last copied into them
        self._key: tuple | None = None
        self._holds: object = None

    @classmethod
    def kept(cls, site: str, key: Hashable, holds: object = None) -> "StepGraphs":
        """The graphs of an earlier run with the same ``site`` and ``key`` (which must
        determine every shape, dtype and constant of the body), or new ones; hand them
        back with :meth:`release` after the run. ``holds``: an object the graphs read
        from (a layout's cached tensors), kept alive with them. Runs in several threads
        at once each get their own."""
        with cls._lock:
            graphs = cls._kept.pop((site, key), None)
            if site in cls._failed:
                # A capture at this site failed after these were kept: its loops run eagerly
                # (kept ones replayed on, and captured their other variants, warning again).
                graphs = None
                for stale in [k for k in cls._kept if k[0] == site]:
                    del cls._kept[stale]
        if graphs is None:
            graphs = cls(True, site)
            graphs._key, graphs._holds = (site, key), holds
        graphs.replays = 0
        return graphs

    def release(self) -> None:
        """Keep these graphs for the next run with the same key (unless a capture failed)."""
        self._const_src = None  # (the run's data may go)
        if self._key is None or not self.capture or not self._graphs:
            return
        with self._lock:
            self._kept[self._key] = self
            self._kept.move_to_end(self._key)
            while len(self._kept) > KEEP:
                self._kept.popitem(last=False)

    def run(self, key: Hashable, body: Callable[..., Sequence[torch.Tensor]],
            state: Sequence[torch.Tensor], consts: Sequence[torch.Tensor] = ()
            ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        """``(new_state, extras)`` of ``body(*consts, *state)`` (which returns the new
        state, then the extras); ``key`` names the variant, ``consts`` are the data,
        which the body reads and does not change (pass the same tensors on every call of
        a run: they are copied into the graphs' buffers once).

        On the captured path ``new_state`` are the shared buffers (valid until the next
        call) and ``extras`` the graph's outputs."""
        if self.capture:
            self._load(state)
            self._load_consts(consts)
            # (the data's device, which need not be the current one)
            with torch.cuda.device(self._buffers[0].device):
                graph = self._graphs.get(key)
                if graph is None:
                    graph = self._capture(lambda *st: body(*self._consts, *st))
                    if graph is not None:
                        self._graphs[key] = graph
                if graph is not None:
                    graph[0].replay()
                    self.replays += 1
                    return self._buffers, graph[1]
            state = self._buffers
        out = body(*consts, *state)
        return list(out[:len(state)]), tuple(out[len(state):])

    def _load(self, state: Sequence[torch.Tensor]) -> None:
        """Put ``state`` into the buffers (nothing to do where it already is there)."""
        if self._buffers is None:
            self._buffers = _copies(state)
            return
        for buf, t in zip(self._buffers, state):
            if t is not buf:
                buf.copy_(t)

    def _load_consts(self, consts: Sequence[torch.Tensor]) -> None:
        """Copy the run's data into the buffers the graphs read, once per run."""
        if self._consts is None:
            self._consts = _copies(consts)
        elif self._const_src is None or any(a is not b for a, b in zip(consts, self._const_src)):
            for buf, t in zip(self._consts, consts):
                buf.copy_(t)
        self._const_src = list(consts)

    def _capture(self, body):
        """The graph of ``body`` on the buffers and its extras, or None (``reason`` set).

        By hand rather than through ``torch.cuda.graph``, whose entry synchronises and
        empties the allocator's cache: every later allocation of the solve would then
        go back to the driver."""
        graph = torch.cuda.CUDAGraph()
        bufs = self._buffers
        here = torch.cuda.current_stream(bufs[0].device)
        side = torch.cuda.Stream(bufs[0].device)  # (the default stream cannot be captured)
        side.wait_stream(here)
        try:
            with torch.cuda.stream(side):
                # thread_local: other threads' CUDA calls meanwhile are theirs, not an error here.
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    out = body(*bufs)
                    # A new value that is another slot's buffer (u_prev = u) is copied
                    # before any buffer is overwritten.
                    held = {b.untyped_storage().data_ptr() for b in bufs}
                    news = [v if v is buf or v.untyped_storage().data_ptr() not in held else v.clone()
                            for buf, v in zip(bufs, out[:len(bufs)])]
                    for buf, v in zip(bufs, news):
                        if v is not buf:
                            buf.copy_(v)
                finally:
                    graph.capture_end()
        except Exception as exc:  # noqa: BLE001 -- an op that cannot be captured: run eagerly
            self.reason, self.capture = f"{type(exc).__name__}: {exc}", False
            warn(f"a loop's step could not be captured as a CUDA graph ({self.reason}); it runs eagerly: the "
                 "same results, more slowly (set CONVEXDDN_CUDA_GRAPHS=0 to skip capturing)", ConvexDDNWarning)
            # The site is marked once the warning returned: where warnings are errors it raised, the
            # call failed, and a failed call changes nothing (marked first, later loops ran eagerly, unsaid).
            self._failed.setdefault(self.site, self.reason)
            return None
        finally:
            here.wait_stream(side)
        return graph, tuple(out[len(bufs):])


def _copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Buffers holding ``tensors``: normal tensors even under ``torch.inference_mode()``,
    so that kept graphs made in an evaluation pass still take a training step's data."""
    with torch.inference_mode(False):
        return [t.clone() for t in tensors]
