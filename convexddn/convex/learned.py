"""A registry layer some of whose CVXPY parameters are learned: ``nn.Parameter`` s it owns.

:func:`convexddn.layer` returns this module when a registry problem declares learned
parameters (:attr:`~convexddn.ProblemSpec.learned`, e.g. ``layer("qp", learn="Gh")``):
the learned parameters live in :attr:`LearnedLayer.learned` and reach the solver with
every call, the others are passed at call time, and gradients flow to both.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ProblemError, ShapeError
from .layer import ConvexLayer
from .status import SolveInfo

__all__ = ["LearnedLayer"]


class _LearnedDict(nn.ParameterDict):
    """``nn.ParameterDict`` keyed by CVXPY name, which may hold a "." (torch refuses one in
    a parameter's name): each entry is registered under its name with "%" and "."
    escaped as "%25" and "%2E", so ``learned["b.1"]`` works and its ``state_dict`` key
    reads ``learned.b%2E1``."""

    def _key_to_attr(self, key: str) -> str:
        return super()._key_to_attr(key).replace("%", "%25").replace(".", "%2E")


class LearnedLayer(nn.Module):
    """A :class:`ConvexLayer` whose learned parameters are ``nn.Parameter`` s of this module.

    It wraps the layer (at :attr:`layer`) rather than being one: ``isinstance(m, ConvexLayer)``
    is False; :attr:`last_solve` reads the wrapped layer's.

    .. math::

        y(x) = \\operatorname*{argmin}_{u \\in C(x, \\theta)} f(x, \\theta, u)

    with :math:`\\theta` the learned parameters (:attr:`learned`, trained with the rest
    of a model) and :math:`x` the inputs passed at call time. Each learned parameter is
    shared by every batch element.

    Args:
        layer: the :class:`ConvexLayer` of the whole problem (every CVXPY parameter).
        learned: initial value of each learned parameter, by CVXPY name (arrays or
            tensors of the parameter's shape); stored in ``torch.get_default_dtype()``
            in :attr:`learned`, indexed by CVXPY name. A name with a "." is registered
            with it escaped (``"%2E"``, and ``"%"`` as ``"%25"``): ``learned["b.1"]``
            has the ``state_dict`` key ``"learned.b%2E1"``.

    Shape:
        - Input: the non-learned parameters, positionally in the layer's order or by
          CVXPY name, each ``(*batch_i, *param.shape)``.
        - Output: the layer's variables, ``(*batch, *var.shape)``; dtype promoted over
          the inputs and the learned parameters.

    Raises:
        ProblemError: ``learned`` names a parameter the layer does not have, or one whose
            name torch cannot register even escaped (empty, or a method of
            ``nn.ParameterDict`` such as ``"keys"``).
        ShapeError: a learned parameter passed at call time, an unknown name, a missing
            or surplus input (the message lists the inputs), plus :class:`ConvexLayer`'s
            errors, which name each tensor as passed here (``input 1 (h)``, ``learned
            parameter G``).
    """

    def __init__(self, layer: ConvexLayer, learned: Mapping[str, Any]) -> None:
        super().__init__()
        names = [p.name() for p in layer.parameters_]
        unknown = [k for k in learned if k not in names]
        if unknown:
            raise ProblemError(f"learned parameter(s) {unknown} are not parameters of the layer {names}")
        self.layer = layer
        # In the layer's parameter order (a plain dict would be sorted by ParameterDict).
        self.learned = _LearnedDict()
        for k in (k for k in names if k in learned):
            try:
                self.learned[k] = torch.as_tensor(np.asarray(learned[k]), dtype=torch.get_default_dtype()).clone()
            except (KeyError, AttributeError) as err:
                raise ProblemError(f"learned parameter {k!r} cannot be a torch parameter of that name "
                                   f"({err.args[0] if err.args else err}); rename the cp.Parameter") from None
        self._inputs = [k for k in names if k not in learned]

    @property
    def inputs(self) -> list[str]:
        """Names of the parameters passed at call time, in positional order."""
        return list(self._inputs)

    @property
    def last_solve(self) -> SolveInfo | None:
        """The wrapped layer's :attr:`ConvexLayer.last_solve` (read-only): what this thread's
        last call solved, per element. ``convexddn.layer`` returns this module in place of
        that ConvexLayer, so its per-element record is read here (the README's ``layer.last_solve``)."""
        return self.layer.last_solve

    def extra_repr(self) -> str:
        return f"inputs={self._inputs}, learned={list(self.learned)}"

    def _bind(self, values: Sequence[Any], named: dict[str, Any]) -> dict[str, Any]:
        if len(values) > len(self._inputs):
            raise ShapeError(f"expected {len(self._inputs)} input tensor(s) {self._inputs}, got "
                             f"{len(values)} (learned parameters {list(self.learned)} are not passed)")
        bound = dict(zip(self._inputs, values))
        for key, value in named.items():
            if key in self.learned:
                raise ShapeError(f"{key!r} is learned (a parameter of this module, .learned[{key!r}]), "
                                 f"not an input; the inputs are {self._inputs}")
            if key not in self._inputs:
                raise ShapeError(f"unknown input name {key!r}; the inputs are {self._inputs}")
            if key in bound:
                raise ShapeError(f"input {key!r} was given both by position and by name")
            bound[key] = value
        missing = [k for k in self._inputs if k not in bound]
        if missing:
            raise ShapeError(f"expected {len(self._inputs)} input tensor(s) {self._inputs}; missing {missing}")
        return bound

    def forward(self, *values: torch.Tensor, solver_args: dict[str, Any] | None = None,
                **named: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Solve with the learned parameters and the given inputs; see the class docstring.

        ``solver_args`` (per call) go to the :class:`ConvexLayer`, as its own call takes them.
        """
        bound = self._bind(values, named)
        full = [self.learned[p.name()] if p.name() in self.learned else bound[p.name()]
                for p in self.layer.parameters_]
        # The layer's checks (and its backward's warnings) name the tensors as this
        # module's caller passes them, for this thread's call only: called directly, or
        # from another thread meanwhile, the layer keeps its own "parameter i (name)".
        local = self.layer._local
        local.labels = self._labels
        try:
            return self.layer(*full, solver_args=solver_args)
        finally:
            local.labels = None

    @property
    def _labels(self) -> list[str]:
        """The wrapped layer's parameters as this module's caller passes them: the inputs
        by their own positions, the learned ones by name."""
        return [f"learned parameter {n}" if n in self.learned else f"input {self._inputs.index(n)} ({n})"
                for n in (p.name() for p in self.layer.parameters_)]
