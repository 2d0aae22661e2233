"""How an experiment runs: device and thread settings, timing, warnings, CLI exit status.

Shared by every experiment so that they validate ``--device`` alike, time GPU work
correctly (a CUDA kernel returns before it finishes: the clock stops only after a
synchronisation), count library warnings instead of printing hundreds of them, and
report a user mistake as one line and exit status 2 (argparse's convention).
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import time
import warnings
from typing import IO, Any, Callable, Iterator, Sequence

import torch

from ..errors import ConvexDDNWarning, OptionError

__all__ = [
    "output_files",
    "prepare_out_dir",
    "save_figure",
    "write_json",
    "write_result",
    "resolve_device",
    "names_option",
    "torch_threads",
    "check_threads",
    "MAX_THREADS",
    "synchronize",
    "Stopwatch",
    "CountLibraryWarnings",
    "run_command",
    "show_progress",
]


def resolve_device(device: str, option: str = "device") -> torch.device:
    """Parse ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` and check that it exists.

    Raises:
        OptionError: naming ``option`` (the CLI's ``--device``), for another spelling, or a
            CUDA device that torch does not see.
    """
    if not isinstance(device, str) or not (device == "cpu" or device.split(":")[0] == "cuda"):
        raise OptionError(f"{option} must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise OptionError(f"{option} must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda":
        asked = f"{option}={device!r}" if option.isidentifier() else f"{option} {device}"
        if not torch.cuda.is_available():
            raise OptionError(f"{asked} was asked for but torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"{asked} was asked for but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


def names_option(option: str, text: str, choices: Sequence[str]) -> tuple[str, ...]:
    """The names of a comma-separated option such as ``--poolings``, checked as the user
    wrote them (a config's own check speaks of its field and a Python list).

    Raises:
        OptionError: naming ``option``, for no name, one not in ``choices``, or one twice.
    """
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise OptionError(f"{option} must name at least one of {','.join(choices)}, got {text!r}")
    for i, name in enumerate(names):
        if name not in choices:
            raise OptionError(f"{option} must be comma-separated names from {','.join(choices)}, got {name!r}")
        if name in names[:i]:
            raise OptionError(f"{option} must not repeat a name, got {name} twice")
    return names


#: The most threads a run may ask for (``torch.set_num_threads`` takes a C int: 10**22
#: raised torch's own ValueError, naming no option). The CLI's bound too.
MAX_THREADS = 4096


def check_threads(threads: Any) -> None:
    """Raise ``OptionError`` unless ``threads`` is ``None`` or an integer in [1, MAX_THREADS]."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= MAX_THREADS):
        raise OptionError(f"threads must be a positive int (at most {MAX_THREADS}) or None, got {threads!r}")


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (``None``: leave as is), then restore."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def show_progress(progress: bool | None) -> bool:
    """Whether to draw progress bars: as asked, or (``None``) only when stderr is a terminal.

    A bar redraws itself with carriage returns, which garble logs and captured output.
    """
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work on ``device``; nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Split wall time into named laps, synchronising the device at every lap.

    ``lap(name)`` adds the time since the previous lap (or :meth:`start`) to ``name``.
    Synchronising costs a little on CUDA but without it a lap would measure only the
    launch of its kernels, not their run.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._last = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self._last = time.perf_counter()

    def lap(self, name: str) -> float:
        synchronize(self.device)
        now = time.perf_counter()
        dt = now - self._last
        self.seconds[name] = self.seconds.get(name, 0.0) + dt
        self._last = now
        return dt


class CountLibraryWarnings(warnings.catch_warnings):
    """Count convexddn warnings (by class name) instead of printing each one.

    A solver warning from a declarative node can fire on many training steps; the count
    goes into the JSON and one summary line rather than interleaving with progress
    bars. Other warnings are shown as usual when the block ends.
    """

    def __init__(self) -> None:
        super().__init__(record=True)
        self.counts: dict[str, int] = {}

    def __enter__(self) -> "CountLibraryWarnings":
        self._log = super().__enter__()
        warnings.simplefilter("always", ConvexDDNWarning)
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for w in self._log:
            if issubclass(w.category, ConvexDDNWarning):
                name = w.category.__name__
                self.counts[name] = self.counts.get(name, 0) + 1
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def run_command(prog: str, prepare: Callable[[], Any], execute: Callable[[Any], int]) -> int:
    """Validate, then run: a user mistake found by ``prepare`` prints one line, exits 2.

    ``prepare()`` turns the parsed options into a validated config and may raise
    :class:`~convexddn.errors.OptionError` (an unknown pooling, a CUDA device that is
    not there, ...) or ``ImportError`` (a package the experiment needs is not
    installed); either is reported as ``"<prog>: error: <message>"`` on stderr with
    exit status 2, like argparse's own errors. Errors raised later by ``execute`` are
    not user mistakes and propagate with their traceback.
    """
    try:
        config = prepare()
    except (OptionError, ImportError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return execute(config)


def output_files(name: str) -> tuple[str, str]:
    """The files a run called ``name`` writes into its ``out``: ``<name>.json``, ``<name>.png``."""
    return f"{name}.json", f"{name}.png"


def prepare_out_dir(out: Any, option: str = "--out", files: Sequence[str] = ()) -> None:
    """Create the output directory ``out`` (if missing) and check that ``files`` (names)
    can be written into it; ``None`` (write nothing) passes.

    Called before a run starts: a run writes its results only at the end, so a bad
    ``out`` found there would throw away minutes of work with a traceback.

    Raises:
        OptionError: naming ``option``, if ``out`` is not a path, is a file, lies under a
            file, cannot be created, or is not writable; or if one of ``files`` already
            exists there as a directory or a file that cannot be written.
    """
    if out is None:
        return
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise OptionError(f"{option} must be a directory path, got {out!r}")
    path = os.fspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OptionError(f"{option} must be a directory, got {path!r}, which is a file")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:  # a file on the way (NotADirectoryError), no permission, ...
        raise OptionError(
            f"{option} must be a directory that can be created, got {path!r} "
            f"({type(err).__name__}: {err.strerror or err})"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OptionError(f"{option} must be a writable directory, got {path!r} (not writable)")
    # os.access answers yes for root on a folder no file can be made in (/sys, a read-only
    # mount): the run completed, then its write failed with a PermissionError traceback.
    # A file made and removed there is the test.
    try:
        fd, probe = _new_beside(path, "convexddn-probe")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise OptionError(f"{option} must be a directory where files can be written, got {path!r} "
                          f"({type(err).__name__}: {err.strerror or err})") from None
    # The folder alone passed a directory named pointcloud.png: the run completed, then
    # the write failed with an IsADirectoryError traceback and the results were lost.
    for name in files:
        target = os.path.join(path, name)
        if os.path.isdir(target):
            raise OptionError(f"{option} must be a directory where {name} can be written, got {path!r}, "
                              f"where {name} is a directory")
        if os.path.lexists(target) and not os.access(target, os.W_OK):
            raise OptionError(f"{option} must be a directory where {name} can be written, got {path!r}, "
                              f"where {name} is not writable")


def write_result(result: dict[str, Any], out: str, name: str,
                 plot: Callable[[dict[str, Any], str], None]) -> dict[str, str]:
    """Write ``<name>.json`` (the result with its file paths) and ``<name>.png`` (``plot``)
    into ``out``; return their paths.

    The JSON is written first: if the plot fails, the raw results are kept.

    Raises:
        OptionError: if ``out`` is not a directory where both files can be written (see
            :func:`prepare_out_dir`; the commands check it before they run).
    """
    json_name, png_name = output_files(name)
    prepare_out_dir(out, "out", (json_name, png_name))
    files = {"json": os.path.join(out, json_name), "png": os.path.join(out, png_name)}
    write_json(files["json"], {**result, "files": files})
    plot(result, files["png"])
    return files


def _new_beside(folder: str, base: str) -> tuple[int, str]:
    """``(fd, path)`` of a new file beside ``base`` in ``folder``, created as ``open(path, "w")``
    creates one: mode 0666, less the umask, which the kernel applies (no umask read here)."""
    while True:
        tmp = os.path.join(folder, f".{base}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # (48 random bits taken: another name)
            continue


def _write_whole(path: str, write: Callable[[IO[Any]], None], binary: bool = False) -> None:
    """Write ``path`` whole or not at all: ``write(f)`` into a temporary file beside it, then
    renamed over it. Written in place, an interrupted or failed write (Ctrl-C during
    ``json.dump`` or a figure's ``savefig``, a full disk, a value JSON cannot encode) left a
    truncated file where the previous run's result had been. The file gets the mode a plain
    ``open(path, "w")`` gives it (:func:`_new_beside`; mkstemp creates 0600, which the rename
    kept: result files came out unreadable to the group and others whatever the umask, and an
    existing 0644 file turned 0600)."""
    folder, base = os.path.split(os.path.abspath(path))
    fd, tmp = _new_beside(folder, base)
    try:
        with contextlib.suppress(FileNotFoundError):  # (an existing file keeps its mode, as open() leaves it)
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path``, whole or not at all (:func:`_write_whole`)."""
    _write_whole(path, lambda f: json.dump(obj, f, indent=2))


def save_figure(fig: Any, path: str) -> None:
    """Save the matplotlib figure ``fig`` as a PNG at ``path``, whole or not at all
    (:func:`_write_whole`: the plot beside a result's JSON was written in place, and an
    interrupted write left a truncated PNG over the previous run's)."""
    _write_whole(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
