"""Locate and import files of the DDN reference implementation, if present.

The reference is ``ddn/pytorch/*.py`` of https://github.com/anucvml/ddn (Gould, Hartley
& Campbell). It is never vendored and never a dependency: the benchmark compares
against it only when the environment variable ``CONVEXDDN_DDN_REFERENCE`` names a
folder holding ``ddn/pytorch/<file>`` (a clone of that repository, say), or when a
package ``ddn`` is importable. A file that is absent or fails to import is reported
(``(None, why)``), never raised: the bench goes on without that comparison. So is a
file that imports but lacks a name the bench calls (:func:`load_reference_names`), and
an exception the reference raises when called (:func:`reference_raised` words the note
for the row the call was timing).

Robust pooling (``robustpool.py``) pools over the last *two* dimensions of a
``(b, ..., H, W)`` tensor; the benchmark feeds it ``x.unsqueeze(-2)`` so that both
implementations pool the same rows. Its forward runs L-BFGS on the sum of all rows'
objectives (one joint problem), its backward is the closed form of Table 1.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

__all__ = ["ENV_VAR", "call_guarded", "load_reference", "load_reference_file", "load_reference_names",
           "reference_pool", "reference_raised"]

ENV_VAR = "CONVEXDDN_DDN_REFERENCE"


def _within(module: str, name: str) -> bool:
    """Whether ``name`` is ``module`` or one of the packages holding it (``ddn``, ``ddn.pytorch``)."""
    return module == name or module.startswith(name + ".")

# Our penalty names -> the reference's class names.
_CLASSES = {"quadratic": "Quadratic", "pseudo_huber": "PseudoHuber", "huber": "Huber",
            "welsch": "Welsch", "trunc_quad": "TruncatedQuadratic"}

_CACHE: dict[tuple[str, str], tuple[ModuleType | None, str]] = {}


def _failed(where: str, err: BaseException) -> str:
    return f"DDN reference {where} failed to import ({type(err).__name__}: {err})"


def load_reference_file(filename: str, folder: str | None = None) -> tuple[ModuleType | None, str]:
    """Return ``(module, note)``: the reference's ``ddn/pytorch/<filename>`` imported, or
    ``None`` and a sentence saying why it is not available (not found, or the error it
    raised on import).

    Args:
        filename: a file of ``ddn/pytorch``, e.g. ``"robustpool.py"``.
        folder: a folder holding ``ddn/pytorch/<filename>``. Default: the environment
            variable ``CONVEXDDN_DDN_REFERENCE``, else an importable ``ddn.pytorch``.
    """
    folder = folder if folder is not None else os.environ.get(ENV_VAR)
    key = (folder or "", filename)
    if key in _CACHE:
        return _CACHE[key]
    stem = filename.removesuffix(".py")
    result: tuple[ModuleType | None, str]
    if folder:
        path = os.path.join(folder, "ddn", "pytorch", filename)
        if not os.path.isfile(path):
            result = (None, f"{ENV_VAR}={folder!r} holds no ddn/pytorch/{filename}")
        else:
            # Imported from its file under a private name: no package 'ddn' enters sys.modules.
            spec = importlib.util.spec_from_file_location(f"_ddn_reference_{stem}", path)
            module = importlib.util.module_from_spec(spec)
            assert spec.loader is not None  # a file location always has a loader
            try:
                spec.loader.exec_module(module)
                result = (module, f"DDN reference from {path}")
            except Exception as err:  # noqa: BLE001 - a broken reference skips the comparison
                result = (None, _failed(path, err))
    else:
        try:
            module = importlib.import_module(f"ddn.pytorch.{stem}")
            result = (module, f"DDN reference from {module.__file__}")
        except ModuleNotFoundError as err:
            if err.name is not None and not _within(f"ddn.pytorch.{stem}", err.name):
                result = (None, _failed(f"ddn.pytorch.{stem}", err))  # it imports something absent
            else:
                why = (f"DDN reference not found: set {ENV_VAR} to a folder holding "
                       f"ddn/pytorch/{filename} (github.com/anucvml/ddn) to compare")
                result = (None, why)
        except Exception as err:  # noqa: BLE001 - a broken reference skips the comparison
            result = (None, _failed(f"ddn.pytorch.{stem}", err))
    _CACHE[key] = result
    return result


def load_reference_names(filename: str, names: tuple[str, ...],
                         folder: str | None = None) -> tuple[ModuleType | None, str]:
    """As :func:`load_reference_file`, and ``None`` with a note naming what is missing
    where the file imports but lacks one of ``names`` (another version of the reference,
    a file cut short): the bench's calls would end in an AttributeError otherwise. The one
    check of both the node-library rows and the robust-pooling comparison."""
    module, note = load_reference_file(filename, folder)
    if module is None:
        return None, note
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        return None, f"the DDN reference's ddn/pytorch/{filename} has no {', '.join(missing)}"
    return module, note


# What reference_pool takes from robustpool.py: its autograd function and every class
# of _CLASSES.
POOL_NAMES = ("RobustGlobalPool2dFn",) + tuple(_CLASSES.values())


def load_reference(folder: str | None = None) -> tuple[ModuleType | None, str]:
    """Return ``(module, note)``: the reference's ``robustpool`` module holding every name
    :func:`reference_pool` uses, or ``None`` and a sentence saying why it is not available
    (see :func:`load_reference_names`)."""
    return load_reference_names("robustpool.py", POOL_NAMES, folder)


def reference_raised(err: Exception) -> str:
    """The note of a row whose reference call raised ``err`` at run time (a bug of the
    reference, or an input it does not take): the bench goes on without its figures."""
    return f"the DDN reference raised {type(err).__name__}: {str(err)[:200]}"


def call_guarded(call: Callable[[], Any], reference: bool) -> tuple[Any, str | None]:
    """``(call(), None)``; where the reference's call raises, ``(None, note)``
    (:func:`reference_raised`): its bug is a note, not a crash. Ours raising is this library's
    bug and stops the bench (``reference`` False: re-raised)."""
    try:
        return call(), None
    except Exception as err:  # noqa: BLE001 - the reference's bug is a note, not a crash
        if not reference:
            raise
        return None, reference_raised(err)


def reference_pool(module: ModuleType, penalty: str, alpha: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reference's robust pooling of ``x (..., N)`` over its last dim, ``-> (...)``."""
    method = getattr(module, _CLASSES[penalty])
    fn = module.RobustGlobalPool2dFn.apply

    def pool(x: torch.Tensor) -> torch.Tensor:
        a = torch.tensor([alpha], dtype=x.dtype, device=x.device)
        return fn(x.unsqueeze(-2), method, a)

    return pool
