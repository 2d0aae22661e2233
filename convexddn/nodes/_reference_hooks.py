"""The DDN reference's hook methods that a :class:`~convexddn.DeclarativeNode` never calls.

A node ported from the DDN reference code (``anucvml/ddn``, ``ddn/pytorch/node.py`` and
``ddn/basic/node.py``) keeps working only where its methods have the names convexddn
calls: ``objective``, ``solve``, ``equality_constraints`` and ``inequality_constraints``.
The reference also declares its problem, or computes its derivatives, in methods of other
names. Kept in a ported subclass, such a method was silently ignored: tutorial 08's MinKL
(``linear_constraint_parameters`` returning ``A = 1ᵀ, d = 1`` for ``Σ y = 1``) was
differentiated as an unconstrained problem, its KKT check failing with causes that never
named the method, and with ``check_solution=False`` it gave ``dy₀/dx = [0.417, 0, 0, 0]``
at ``x = [0.9, 0.3, 0.5, 0.7]`` where the closed form ``(e₀ − y₀)/Σx`` is ``[0.260, −0.156,
−0.156, −0.156]``, without a warning; an analytic ``gradient`` was never called.
:func:`warn_reference_hooks` warns where such a class is defined. It warns rather than
refuses: a method of one of these names may as well be the user's own helper that their
``solve`` calls (a gradient-descent step named ``gradient``), which is fine; renaming it
silences the warning. Only methods count (plain functions, static, class and partial methods,
any attribute the class hands out as a callable; the class's own or its bases', not the
library's): a data attribute, a property or a metaclass method of such a name is no hook of
the reference's.

:data:`REFERENCE_HOOKS` is the one table of those names: the check reads it and the
migration guide (``docs/migrating-from-ddn.md``) prints it, so the two cannot differ.
"""
from __future__ import annotations

import warnings

import torch

from ..errors import ConvexDDNWarning

__all__ = ["REFERENCE_HOOKS", "warn_reference_hooks"]

#: The reference's method name -> (where the reference defines it and what it means,
#: what a convexddn DeclarativeNode has instead). Markdown: the guide prints it as is.
REFERENCE_HOOKS: dict[str, tuple[str, str]] = {
    "linear_constraint_parameters": (
        "`ddn.pytorch` `LinEqConstDeclarativeNode.linear_constraint_parameters(self, y)`: returns "
        "`(A, d)`, shapes `(p, m)` and `(p,)`, for the constraint `A y = d`",
        "`equality_constraints(self, *xs, y)` returning the residual `A y − d`, shape `(B, p)`: "
        "`y @ A.T - d` (for tutorial 08's MinKL, `y.sum(-1, keepdim=True) - 1`)"),
    "gradient": (
        "every node's `gradient(self, *xs, y, v, ctx)` (`ddn.basic`: `gradient(self, x, y, ctx)`), "
        "the hand-written or generic vector–Jacobian product",
        "nothing: convexddn differentiates implicitly from `objective` and the constraints (never calls a "
        "`gradient`); call `.backward()` or `torch.autograd.grad` on the node's output"),
    "jacobian": (
        "`ddn.pytorch` `AbstractDeclarativeNode.jacobian(self, *xs, y, ctx)`: the Jacobians `Dy(x)`",
        "nothing in the node (not used): `torch.autograd.functional.jacobian(node, x)`, shape "
        "`(B, *S_y, B, *S_x)`, zero between different batch rows"),
    "constraint": (
        "`ddn.basic` `EqConstDeclarativeNode`, `MultiEqConstDeclarativeNode` (`h(x, y) = 0`) and "
        "`IneqConstDeclarativeNode` (`h(x, y) <= 0`) `constraint(self, x, y)`",
        "`equality_constraints(self, *xs, y)` (feasible where `h = 0`) or `inequality_constraints(self, *xs, y)` "
        "(feasible where `g <= 0`), batched: shape `(B, p)`"),
    "eq_constraints": (
        "`ddn.basic` `GeneralConstDeclarativeNode.eq_constraints(self, x, y)`: feasible where `= 0`",
        "`equality_constraints(self, *xs, y)`, batched: shape `(B, p)`"),
    "ineq_constraints": (
        "`ddn.basic` `GeneralConstDeclarativeNode.ineq_constraints(self, x, y)`: feasible where `<= 0`",
        "`inequality_constraints(self, *xs, y)`, batched: shape `(B, q)`"),
}


def _plain(text: str) -> str:
    """The table's Markdown as a warning message's plain text."""
    return text.replace("`", "")


def _is_method(attr: object, owner: type) -> bool:
    """Whether the class attribute ``attr`` (of ``owner``'s own ``__dict__``) is a method: what the class
    hands out for it is callable (a function; a static, class or partial method, ``partialmethod``,
    ``singledispatchmethod``, any descriptor that gives a callable, or a callable object), and it is not a
    data descriptor (a property: an instance reads its value, whatever ``property`` itself is). Only
    functions, static and class methods counted: a ``partialmethod`` named ``gradient`` was not warned."""
    kind = type(attr)
    if hasattr(kind, "__set__") or hasattr(kind, "__delete__"):
        return False
    try:
        got = kind.__get__(attr, None, owner) if hasattr(kind, "__get__") else attr
    except Exception:  # (a descriptor that needs an instance: not a method the class hands out)
        return False
    return callable(got)


def _owner(cls: type, name: str) -> type | None:
    """The class along ``cls.__mro__`` whose own ``__dict__`` has ``name``, as attribute access finds it."""
    return next((klass for klass in cls.__mro__ if name in vars(klass)), None)


def _hook_methods(cls: type, root: type) -> dict[str, type]:
    """The names of :data:`REFERENCE_HOOKS` that ``cls`` resolves to a method -> the class that defines it.

    Each name is looked up along ``cls.__mro__`` as attribute access does, in the classes'
    own ``__dict__`` (not the metaclass's: an instance never sees its methods); the first
    class that has the name decides, and only a function there counts (a data attribute or
    a property of that name shadows any method further along). A method that ``root``
    (DeclarativeNode), ``nn.Module`` or ``object`` defines is the library's; one that a base
    of ``cls`` below ``root`` resolves the same way was reported where that base was defined.
    """
    found: dict[str, type] = {}
    for name in REFERENCE_HOOKS:
        owner = _owner(cls, name)
        if owner is None or owner in (root, torch.nn.Module, object):
            continue
        if any(base is not root and issubclass(base, root) and _owner(base, name) is owner
               for base in cls.__mro__[1:]):
            continue  # (warned at that base's definition)
        if _is_method(vars(owner)[name], owner):
            found[name] = owner
    return found


def warn_reference_hooks(cls: type, root: type) -> None:
    """Warn (:class:`~convexddn.errors.ConvexDDNWarning`) if ``cls`` has a method named in :data:`REFERENCE_HOOKS`.

    Called from ``root.__init_subclass__`` (``root`` is :class:`~convexddn.DeclarativeNode`),
    at the class's definition, before any call could silently ignore the method. The
    warning names each such method, where the reference has it and what to write instead,
    and says that a helper of that name which the node's own code calls is fine.
    """
    found = _hook_methods(cls, root)
    if not found:
        return
    lines = [f"- {name}{'' if owner is cls else f' (from {owner.__name__})'}: the reference's "
             f"{_plain(REFERENCE_HOOKS[name][0])}; convexddn: {_plain(REFERENCE_HOOKS[name][1])}"
             for name, owner in found.items()]
    names = ", ".join(found)
    warnings.warn(
        f"{cls.__name__} defines {names}: the name of {'hooks' if len(found) > 1 else 'a hook'} of the DDN "
        "reference's node API that DeclarativeNode never calls (it calls only objective, solve, "
        "equality_constraints and inequality_constraints). Ported from the reference, such a method is "
        "silently ignored (a kept linear_constraint_parameters gives the unconstrained problem's gradient); "
        "write instead (see 'Migrating from the DDN reference' in the docs):\n" + "\n".join(lines) + "\n"
        "A helper of that name which the node's own code calls (its solve, say) is fine: rename it to "
        "silence this warning.",
        ConvexDDNWarning, stacklevel=3)
