"""Locate and import the DDN reference implementation of robust pooling, if present.

The reference is ``ddn/pytorch/robustpool.py`` of https://github.com/anucvml/ddn
(Gould, Hartley & Campbell). It is never vendored and never a dependency: the
benchmark compares against it only when the environment variable
``CONVEXDDN_DDN_REFERENCE`` names a folder holding ``ddn/pytorch/robustpool.py`` (a
clone of that repository, say), or when a package ``ddn`` is importable.

The reference pools over the last *two* dimensions of a ``(b, ..., H, W)`` tensor; the
benchmark feeds it ``x.unsqueeze(-2)`` so that both implementations pool the same rows.
Its forward runs L-BFGS on the sum of all rows' objectives (one joint problem), its
backward is the closed form of Table 1.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from types import ModuleType

import torch

__all__ = ["ENV_VAR", "load_reference", "reference_pool"]

ENV_VAR = "CONVEXDDN_DDN_REFERENCE"

# Our penalty names -> the reference's class names.
_CLASSES = {"quadratic": "Quadratic", "pseudo_huber": "PseudoHuber", "huber": "Huber",
            "welsch": "Welsch", "trunc_quad": "TruncatedQuadratic"}

_CACHE: dict[str, tuple[ModuleType | None, str]] = {}


def load_reference(folder: str | None = None) -> tuple[ModuleType | None, str]:
    """Return ``(module, note)``: the reference's ``robustpool`` module, or ``None`` and
    a sentence saying why it is not available.

    Args:
        folder: a folder holding ``ddn/pytorch/robustpool.py``. Default: the
            environment variable ``CONVEXDDN_DDN_REFERENCE``, else an importable
            ``ddn.pytorch.robustpool``.
    """
    folder = folder if folder is not None else os.environ.get(ENV_VAR)
    key = folder or ""
    if key in _CACHE:
        return _CACHE[key]
    if folder:
        path = os.path.join(folder, "ddn", "pytorch", "robustpool.py")
        if not os.path.isfile(path):
            result: tuple[ModuleType | None, str] = (
                None, f"{ENV_VAR}={folder!r} holds no ddn/pytorch/robustpool.py")
        else:
            # Imported from its file under a private name: no package 'ddn' enters sys.modules.
            spec = importlib.util.spec_from_file_location("_ddn_reference_robustpool", path)
            module = importlib.util.module_from_spec(spec)
            assert spec.loader is not None  # a file location always has a loader
            spec.loader.exec_module(module)
            result = (module, f"DDN reference from {path}")
    else:
        try:
            module = importlib.import_module("ddn.pytorch.robustpool")
            result = (module, f"DDN reference from {module.__file__}")
        except ImportError:
            why = (f"DDN reference not found: set {ENV_VAR} to a folder holding "
                   "ddn/pytorch/robustpool.py (github.com/anucvml/ddn) to compare")
            result = (None, why)
    _CACHE[key] = result
    return result


def reference_pool(module: ModuleType, penalty: str, alpha: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reference's robust pooling of ``x (..., N)`` over its last dim, ``-> (...)``."""
    method = getattr(module, _CLASSES[penalty])
    fn = module.RobustGlobalPool2dFn.apply

    def pool(x: torch.Tensor) -> torch.Tensor:
        a = torch.tensor([alpha], dtype=x.dtype, device=x.device)
        return fn(x.unsqueeze(-2), method, a)

    return pool
