"""The ``convexddn`` command's parser: usage errors on one line, commands set up when
chosen, and an option placed before its command's name told where it goes.

Used by :mod:`convexddn.cli` and by the other command-line entry points
(``python -m convexddn.bench.memory_probe``), so that every usage mistake reads alike:
``PROG: error: MESSAGE (see 'PROG --help')``, exit status 2.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence

__all__ = ["LazyCommands", "Parser", "unrecognized"]


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line (argparse prints the usage first), and an
    option's value that argparse took for a command's name reported as the misplaced option."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        # This level's own arguments (a command's parser gets those after its name), for
        # _check_value, which argparse gives only the one token it refuses.
        self._level_args = None if args is None else list(args)
        return super().parse_known_args(args, namespace)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # `convexddn --out /tmp/x bench`: --out is not this level's, so argparse leaves it
        # and reads its value as the command's name ("invalid choice: '/tmp/x'"), blaming
        # the value. (argparse checks a command's name here, before the action runs.)
        args = getattr(self, "_level_args", None)
        if isinstance(action, LazyCommands) and value not in action.choices and args is not None:
            line = _misplaced_value(self, action, args, value)
            if line is not None:
                self.exit(2, line + "\n")
        super()._check_value(action, value)


class LazyCommands(argparse._SubParsersAction):
    """Subcommands whose options are added when the subcommand is chosen, not before.

    ``add_lazy_parser(name, setup, help=...)`` registers ``name`` with its one-line help
    (enough for the parent's ``--help``); ``setup(parser)`` runs — and imports what it
    needs — only when ``name`` appears on the command line (or :meth:`parser_for` asks).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setups: dict[str, Callable[[argparse.ArgumentParser], None]] = {}

    def add_lazy_parser(self, name: str, setup: Callable[[argparse.ArgumentParser], None],
                        **kwargs: Any) -> argparse.ArgumentParser:
        parser = self.add_parser(name, **kwargs)
        self._setups[name] = setup
        return parser

    def parser_for(self, name: str) -> argparse.ArgumentParser:
        """The parser of command ``name``, with its options added."""
        setup = self._setups.pop(name, None)
        if setup is not None:
            setup(self._name_parser_map[name])
        return self._name_parser_map[name]

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Sequence[str], option_string: str | None = None) -> None:
        # argparse has checked values[0] against the choices before calling the action.
        chosen = self.parser_for(values[0])
        super().__call__(parser, namespace, values, option_string)
        # The commands chosen, outermost first (the inner levels' list was copied into
        # namespace by the call above): the CLI needs them to place an unknown option and
        # to name the command in an error.
        chain = getattr(namespace, "command_chain", [])
        namespace.command_chain = [(values[0], chosen)] + chain


def _matching(parser: argparse.ArgumentParser, option: str) -> list[argparse.Action]:
    """The actions of ``parser`` that ``option`` (``--name`` or ``--name=value``) names: its
    own, or those whose long option it abbreviates, as argparse accepts."""
    name = option.split("=", 1)[0]
    # (argparse has no public list of a parser's option strings.)
    known = parser._option_string_actions
    if name in known:
        return [known[name]]
    if name.startswith("--") and len(name) > 2 and parser.allow_abbrev:
        return [a for o, a in known.items() if o.startswith(name)]
    return []


def knows(parser: argparse.ArgumentParser, option: str) -> bool:
    """Whether ``parser`` accepts ``option`` (``--name``, ``--name=value`` or a prefix)."""
    return bool(_matching(parser, option))


def _takes_value(parser: argparse.ArgumentParser, option: str) -> bool:
    """Whether ``option``, written without ``=value``, takes the next token as its value."""
    return "=" not in option and any(a.nargs != 0 for a in _matching(parser, option))


def _misplaced(prog: str, options: Sequence[str], name: str, owner: str) -> str:
    """The error line for ``options`` (each with its value, if written apart) written before
    ``name``, the command ``owner`` that has them."""
    return (f"{prog}: error: {' '.join(options)} must come after '{name}': "
            f"{'they are options' if len(options) > 1 else 'it is an option'} of '{owner}' "
            f"(see '{owner} --help')")


def _misplaced_value(parser: Parser, commands: LazyCommands, args: Sequence[str], value: str) -> str | None:
    """The error line when ``value``, refused as a command's name, is the value of an option
    that a command named later in ``args`` (or one of its own commands) has; else None."""
    at = next((i for i, t in enumerate(args) if t == value and i > 0 and args[i - 1].startswith("-")
               and "=" not in args[i - 1] and not knows(parser, args[i - 1])), None)
    if at is None:
        return None
    option = args[at - 1]
    level: argparse.ArgumentParser = parser
    level_commands: LazyCommands | None = commands
    for i in range(at + 1, len(args)):
        if level_commands is None or args[i] not in level_commands.choices:
            continue
        level = level_commands.parser_for(args[i])
        if knows(level, option):
            # Every option before the name that this command has, each with its value.
            options, j = [], 0
            while j < i:
                if args[j].startswith("-") and knows(level, args[j]):
                    taken = 2 if _takes_value(level, args[j]) and j + 1 < i else 1
                    options.append(" ".join(args[j:j + taken]))
                    j += taken
                else:
                    j += 1
            return _misplaced(parser.prog, options, args[i], level.prog)
        level_commands = next((a for a in level._actions if isinstance(a, LazyCommands)), None)
    return None


def unrecognized(argv: Sequence[str], top: argparse.ArgumentParser, args: argparse.Namespace,
                 extra: Sequence[str]) -> str:
    """The error line for the arguments no parser took, from the level that rejected them.

    An option is rejected by the level where it stands: ``convexddn experiment --quick
    pointcloud`` gives ``--quick`` to ``convexddn experiment``, which has no such option,
    though ``convexddn experiment pointcloud --help`` lists it. Such an option is told to
    move after the command that has it; the others are named as unrecognized by their level.
    """
    chain = getattr(args, "command_chain", [])
    progs = [top.prog] + [p.prog for _, p in chain]
    parsers = [top] + [p for _, p in chain]
    # argparse hands everything after a command's name to that command: each name's
    # first occurrence, in order, splits argv into levels.
    argv = list(argv)
    names, i = [], 0
    for name, _ in chain:
        i = argv.index(name, i)
        names.append(i)
        i += 1
    at, position = [], 0
    for token in extra:  # (in argv order: each level's own, then its command's)
        while position < len(argv) and (argv[position] != token or position in names):
            position += 1
        at.append(sum(position > n for n in names))
        position += 1
    for token, level in zip(extra, at):
        owner = next((k for k in range(level + 1, len(parsers)) if knows(parsers[k], token)), None)
        if owner is not None:
            misplaced = [t for t, lv in zip(extra, at) if lv == level and knows(parsers[owner], t)]
            return _misplaced(progs[level], misplaced, chain[owner - 1][0], progs[owner])
    level = at[0]
    tokens = [t for t, lv in zip(extra, at) if lv == level]
    return f"{progs[level]}: error: unrecognized arguments: {' '.join(tokens)} (see '{progs[level]} --help')"
