"""Griffe extension: the reST inside convexddn's Google-style docstrings, as Markdown.

The docstrings follow the PyTorch convention: Google sections (Args, Returns, Raises …)
with reST for maths, cross-references and literal blocks. mkdocstrings renders
docstring text as Markdown, so before rendering this extension rewrites, in every
docstring of the loaded package:

- ``.. math::`` blocks -> ``$$ … $$`` and ``:math:`…``` -> ``$…$`` (pymdownx.arithmatex
  turns both into MathJax input);
- ``:class:`~a.b.C```, ``:func:``, ``:meth:``, ``:mod:``, ``:data:``, ``:attr:``,
  ``:exc:`` -> an optional cross-reference (an ``<autoref … optional>`` element,
  which mkdocs-autorefs links when the target is rendered somewhere in the site and
  leaves as plain code otherwise). Relative targets (``.penalties.Penalty``,
  ``robust_pool``) are resolved like Sphinx does: in the current class and module, then
  in the enclosing packages;
- ``.. note::`` / ``.. warning::`` / ``.. seealso::`` -> Material admonitions;
- ``Examples::`` -> griffe's ``Examples:`` section; any other ``para::`` literal
  block -> a fenced code block;
- an ``Args:`` entry naming several parameters (``tol, max_iter: …``, PyTorch's
  habit) -> one entry per parameter, each with the shared description.

Nothing is changed in the source; only the text griffe hands to mkdocstrings.
"""
from __future__ import annotations

import html
import re
import textwrap
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?P<role>class|func|meth|mod|data|attr|exc|obj|const):`(?P<body>[^`]+)`")
_MATH_ROLE = re.compile(r":math:`(?P<body>[^`]*)`")
_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. (?P<name>[a-z]+)::[ \t]*(?P<rest>.*)$")
_ADMONITIONS = {"note": "note", "warning": "warning", "seealso": "info", "tip": "tip",
                "important": "important", "caution": "warning", "hint": "tip"}
_EXAMPLES_HEADER = re.compile(r"^(?P<indent>[ \t]*)Examples?::[ \t]*$")
_ARGS_HEADER = re.compile(r"^[ \t]*(Args|Arguments|Parameters|Keyword Args|Keyword Arguments|"
                          r"Other Parameters):[ \t]*$")
_SHARED_ENTRY = re.compile(r"^(?P<indent>[ \t]+)(?P<names>\*{0,2}\w+(?:,[ \t]*\*{0,2}\w+)+):(?P<rest>.*)$")


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block(lines: list[str], start: int, indent: int) -> tuple[list[str], int]:
    """The lines after ``start`` that are blank or indented deeper than ``indent``."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent_of(lines[end]) > indent):
        end += 1
    while end > start and not lines[end - 1].strip():  # trailing blanks stay outside
        end -= 1
    return lines[start:end], end


def _rewrite_blocks(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = _DIRECTIVE.match(line)
        examples = _EXAMPLES_HEADER.match(line)
        if directive and directive["name"] == "math":
            pad = directive["indent"]
            body, i = _block(lines, i + 1, len(pad))
            body = [b for b in body if not re.match(r"^\s*:[a-z]+:", b)]  # :label: and the like
            maths = ([directive["rest"]] if directive["rest"] else []) + \
                textwrap.dedent("\n".join(body)).strip("\n").splitlines()
            out += ["", pad + "$$"] + [pad + m if m.strip() else "" for m in maths] + [pad + "$$", ""]
        elif directive and directive["name"] in _ADMONITIONS:
            pad = directive["indent"]
            body, i = _block(lines, i + 1, len(pad))
            content = ([directive["rest"]] if directive["rest"] else []) + \
                textwrap.dedent("\n".join(body)).strip("\n").splitlines()
            out += ["", f"{pad}!!! {_ADMONITIONS[directive['name']]}", ""]
            out += [f"{pad}    {c}" if c.strip() else "" for c in content] + [""]
        elif _ARGS_HEADER.match(line):
            body, i = _block(lines, i + 1, _indent_of(line))
            out += [line] + _split_shared_entries(body)
        elif examples:
            # griffe's Google parser turns "Examples:" + ">>>" lines into a code section.
            out.append(f"{examples['indent']}Examples:")
            i += 1
        elif line.rstrip().endswith("::") and not directive:
            # A reST literal block: "text::" keeps one colon, "::" alone disappears.
            pad = " " * _indent_of(line)
            head = line.rstrip()[:-1]
            if head.strip() != ":":
                out.append(head)
            body, end = _block(lines, i + 1, _indent_of(line))
            code = textwrap.dedent("\n".join(body)).strip("\n")
            if code:
                lang = "pycon" if code.lstrip().startswith(">>>") else "python"
                out += ["", f"{pad}```{lang}"] + [pad + c if c.strip() else "" for c in code.splitlines()]
                out += [f"{pad}```", ""]
                i = end
            else:
                i += 1
        else:
            out.append(line)
            i += 1
    return "\n".join(out)


def _split_shared_entries(body: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(body):
        entry = _SHARED_ENTRY.match(body[i])
        if not entry:
            out.append(body[i])
            i += 1
            continue
        more, i = _block(body, i + 1, len(entry["indent"]))
        for name in entry["names"].split(","):
            out += [f"{entry['indent']}{name.strip()}:{entry['rest']}"] + more
    return out


class RstToMarkdown(griffe.Extension):
    """Rewrite reST constructs of docstrings into the Markdown mkdocstrings renders."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._package = pkg
        self._visit(pkg, seen=set())

    def _visit(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = self.convert(obj.docstring.value, obj)
        for member in obj.members.values():
            if not member.is_alias:
                self._visit(member, seen)

    def convert(self, text: str, obj: griffe.Object) -> str:
        text = _rewrite_blocks(text)
        text = _MATH_ROLE.sub(lambda m: f"${m['body'].strip()}$", text)
        return _ROLE.sub(lambda m: self._reference(m["role"], m["body"], obj), text)

    def _reference(self, role: str, body: str, obj: griffe.Object) -> str:
        explicit = re.match(r"^(?P<title>.+?)\s*<(?P<target>[^>]+)>$", body)
        target = explicit["target"] if explicit else body
        short = target.startswith("~")
        target = target.lstrip("~")
        if explicit:
            title = explicit["title"]
        else:
            title = target.lstrip(".").rsplit(".", 1)[-1] if short else target
            if role in ("func", "meth"):
                title += "()"
        identifier = self._resolve(target, obj)
        return (f'<autoref identifier="{html.escape(identifier)}" optional>'
                f"<code>{html.escape(title)}</code></autoref>")

    def _resolve(self, target: str, obj: griffe.Object) -> str:
        # Sphinx's order: the current class, its module, then each enclosing package.
        name = target.lstrip(".")
        scopes: list[str] = []
        scope: griffe.Object | None = obj if obj.is_class or obj.is_module else obj.parent
        while scope is not None:
            scopes.append(scope.path)
            scope = scope.parent
        for prefix in scopes + [""]:
            path = f"{prefix}.{name}" if prefix else name
            if self._exists(path):
                return path
        return name

    def _exists(self, path: str) -> bool:
        root, _, rest = path.partition(".")
        if root != self._package.name:
            return False
        try:
            self._package[rest] if rest else self._package
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return False
        return True
