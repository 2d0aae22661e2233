"""Modules imported on their first attribute access.

The registry's problem modules and the option checkers name cvxpy and torch at module
level, but listing the registry (``convexddn list``, ``--help``) needs neither: cvxpy's
import alone takes seconds (it loads every installed solver interface). Once loaded,
the real module's attributes are copied in, so later lookups are plain attribute hits.
"""
from __future__ import annotations

import importlib
import types
from typing import Any

__all__ = ["LazyModule", "cvxpy", "torch"]


class LazyModule(types.ModuleType):
    """Stands for the module ``name`` and imports it on first attribute access."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_lazy_target"] = name

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__dict__["_lazy_target"])
        self.__dict__.update(module.__dict__)
        return getattr(module, attr)


cvxpy = LazyModule("cvxpy")
torch = LazyModule("torch")
