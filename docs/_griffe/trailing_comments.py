"""A griffe extension for the API reference: a member's trailing comment is its docstring.

walstore documents enum members and dataclass fields with a comment on the same line
(``FULL = "full"  # fsync at every group commit: ...``), as its style asks. mkdocstrings shows
only members with a docstring, so without this the reference listed ``Durability`` and
``TxState`` without their members. No published griffe extension reads trailing comments
(griffe-sphinx reads ``#:`` comments above an attribute), hence these few lines.
"""

from __future__ import annotations

import io
import tokenize
from typing import Any

import griffe

# Comments addressed to tools, not readers.
TOOL_PREFIXES = ("type:", "noqa", "pragma", "fmt:", "pyright:")


def trailing_comment(line: str) -> str | None:
    """The comment ending ``line`` (one line of source), without its ``#``; None if none."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip()).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    comments = [t.string for t in tokens if t.type == tokenize.COMMENT]
    if not comments:
        return None
    text = comments[-1].lstrip("#").strip()
    if not text or text.startswith(TOOL_PREFIXES):
        return None
    return text.replace("&", "&amp;").replace("<", "&lt;")  # docstrings are Markdown: no HTML


class TrailingComments(griffe.Extension):
    """Give a class attribute written on one line its trailing comment as a docstring."""

    def on_attribute_instance(
        self,
        *,
        node: Any,
        attr: griffe.Attribute,
        agent: griffe.Visitor | griffe.Inspector,
        **kwargs: Any,
    ) -> None:
        if attr.docstring is not None or not attr.parent or not attr.parent.is_class:
            return
        if attr.lineno is None or attr.lineno != attr.endlineno:
            return
        lines = attr.lines
        text = trailing_comment(lines[0]) if lines else None
        if text:
            attr.docstring = griffe.Docstring(
                text, lineno=attr.lineno, endlineno=attr.lineno, parent=attr
            )
