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
:func:`refuse_reference_hooks` refuses such a class where it is defined.

:data:`REFERENCE_HOOKS` is the one table of those names: the check reads it and the
migration guide (``docs/migrating-from-ddn.md``) prints it, so the two cannot differ.
"""
from __future__ import annotations

from ..errors import ProblemError

__all__ = ["REFERENCE_HOOKS", "refuse_reference_hooks"]

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
    """The table's Markdown as an error message's plain text."""
    return text.replace("`", "")


def refuse_reference_hooks(cls: type) -> None:
    """Raise :class:`~convexddn.errors.ProblemError` if ``cls`` has a method of :data:`REFERENCE_HOOKS`.

    The whole class is read (its own methods and the ones it inherits, a mixin's too), at
    its definition, before any call could silently ignore the method.

    Raises:
        ProblemError: naming each such method, where the reference has it and what to write instead.
    """
    found = [name for name in REFERENCE_HOOKS if getattr(cls, name, None) is not None]
    if not found:
        return
    lines = [f"- {name} (the reference's {_plain(REFERENCE_HOOKS[name][0])}); convexddn: "
             f"{_plain(REFERENCE_HOOKS[name][1])}" for name in found]
    raise ProblemError(
        f"{cls.__name__} defines {', '.join(found)}: {'methods' if len(found) > 1 else 'a method'} of the DDN "
        "reference's node API that DeclarativeNode never calls (it calls only objective, solve, "
        "equality_constraints and inequality_constraints): kept, it would be silently ignored. Remove or "
        "rename it (see 'Migrating from the DDN reference' in the docs):\n" + "\n".join(lines)
    )
