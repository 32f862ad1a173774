"""One install story in every doc: walstore is not on PyPI, so it installs from a clone."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DOCS += sorted((REPO / "examples").glob("*.py"))


def _pip_installs() -> list[tuple[str, list[str]]]:
    """Every ``pip install ...`` command in the docs: (file, its arguments)."""
    found = []
    for doc in DOCS:
        for m in re.finditer(r"pip3? install ([^\n`#&|;]*)", doc.read_text()):
            args = [a for a in shlex.split(m.group(1)) if not a.startswith("-")]
            found.append((doc.name, args))
    return found


def test_no_doc_installs_walstore_from_an_index() -> None:
    installs = _pip_installs()
    assert len(installs) >= 3  # README, quickstart, examples: the scan finds them
    by_name = [
        (name, arg)
        for name, args in installs
        for arg in args
        if re.fullmatch(r"walstore(\[.*\])?([<>=!~].*)?", arg)
    ]
    assert by_name == [], "walstore is not on PyPI: install it from a clone (pip install -e .)"


def test_the_quickstart_installs_from_a_clone() -> None:
    commands = [args for name, args in _pip_installs() if name == "quickstart.md"]
    assert commands[0] == ["path/to/walstore"]
