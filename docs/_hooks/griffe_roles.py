"""A griffe extension for the API reference: fedprompt's docstrings use Sphinx roles
(``:class:`~fedprompt.run.RunArgs```) and reST literal blocks (``Example::``); Markdown shows them as code spans and
plain colons."""

from __future__ import annotations

import re

import griffe

#: :class:`~a.b.C` -> `C`; :func:`a.b` -> `a.b`
ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|py:\w+):`(~?)([^`]+)`")
#: a paragraph ending in "::" introduces an indented literal block
LITERAL = re.compile(r"(\S)::$", re.MULTILINE)


def _role(match: re.Match) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def markdown_docstring(text: str) -> str:
    """The docstring with its Sphinx roles as code spans and its ``::`` literal-block markers as one colon."""
    return LITERAL.sub(r"\1:", ROLE.sub(_role, text))


class SphinxRolesToMarkdown(griffe.Extension):
    """Rewrites every loaded object's docstring with :func:`markdown_docstring`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
