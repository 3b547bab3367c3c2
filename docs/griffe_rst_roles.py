"""Griffe extension for the API pages: the docstrings' Sphinx markup, read as Markdown.

agsopt's docstrings follow the Google style (``Args:``, ``Returns:``, ``Raises:``), which
mkdocstrings parses, but they cross-reference with Sphinx roles (``:func:`ags```,
``:class:`~agsopt.covariance_rules.CovarianceRule```) and introduce literal blocks with
``::``. Markdown has neither, so before parsing:

- a role becomes a code span of its target (``~`` keeps the last component, as in Sphinx);
- a paragraph ending in ``::`` ends in ``:`` (the indented block after it is already a
  Markdown code block);
- an ``Args:`` entry that documents several parameters at once (``min_ratio, max_ratio:
  …``, a common Google-style shorthand the parser does not know) becomes one entry per
  parameter with the same text.

Only the text shown changes; nothing in the package does.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|obj|exc|const|type):`(~?)([^`]+)`")
_LITERAL = re.compile(r"(\S)::[ \t]*$", re.M)
_JOINED = re.compile(r"^(?P<indent>[ \t]+)(?P<names>\w+(?:, \w+)+):(?P<rest>.*)$")


def _role(match: re.Match[str]) -> str:
    target = match[2]
    if match[1]:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _split_joined_params(text: str) -> str:
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        match = _JOINED.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent = len(match["indent"])
        end = i + 1
        while end < len(lines) and (
            not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent
        ):
            end += 1
        for name in match["names"].split(", "):
            out.append(f"{match['indent']}{name}:{match['rest']}")
            out.extend(lines[i + 1 : end])
        i = end
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    return _split_joined_params(_LITERAL.sub(r"\1:", _ROLE.sub(_role, text)))


class RstRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
