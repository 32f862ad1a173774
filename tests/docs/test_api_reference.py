"""The API reference shows what the API has: each enum's members, each dataclass's fields and
each method of the FileSystem protocol get their own entry on the built page.

mkdocstrings leaves out members without a docstring, and walstore documents enum members and
fields with a trailing comment: without docs/_griffe/trailing_comments.py, ``Durability`` and
``TxState`` rendered as a base class and one sentence.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import walstore
from walstore import _errors

REPO = Path(__file__).resolve().parents[2]
API_MD = REPO / "docs" / "api.md"


def _documented() -> list[tuple[str, Any]]:
    """Every object docs/api.md renders (``::: walstore.X``): its path and the object."""
    found = []
    for path in re.findall(r"^::: (\S+)$", API_MD.read_text(), re.MULTILINE):
        module, _, name = path.rpartition(".")
        found.append((path, getattr(importlib.import_module(module), name)))
    return found


def _is_enum(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, enum.Enum)


def _members(obj: Any) -> list[str]:
    """The members a reader of the reference needs listed, by kind of object."""
    if _is_enum(obj):
        return list(obj.__members__)
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    if getattr(obj, "_is_protocol", False):
        own = [n for n, v in vars(obj).items() if callable(v)] + list(obj.__annotations__)
        return [n for n in own if not n.startswith("_")]
    return []


WITH_MEMBERS = [(path, _members(obj)) for path, obj in _documented() if _members(obj)]


@pytest.fixture(scope="module")
def api_html(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed: .[docs]")
    pytest.importorskip("material", reason="the docs extra is not installed: .[docs]")
    site = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    return (site / "api" / "index.html").read_text()


def test_the_reference_documents_enums_dataclasses_and_the_protocol() -> None:
    names = {path.rsplit(".", 1)[1] for path, _ in WITH_MEMBERS}
    assert {"Durability", "TxState", "RecoveryReport", "FileSystem"} <= names
    assert {path for path, _ in ENUMS} == {"walstore.Durability", "walstore.TxState"}


@pytest.mark.parametrize(("path", "members"), WITH_MEMBERS, ids=[p for p, _ in WITH_MEMBERS])
def test_every_member_has_an_entry(api_html: str, path: str, members: list[str]) -> None:
    missing = [m for m in members if f'id="{path}.{m}"' not in api_html]
    assert missing == [], f"{path}: the API reference leaves out {missing}"


ENUMS = [(path, list(obj.__members__)) for path, obj in _documented() if _is_enum(obj)]


@pytest.mark.parametrize(("path", "members"), ENUMS, ids=[p for p, _ in ENUMS])
def test_enum_members_say_what_they_mean(api_html: str, path: str, members: list[str]) -> None:
    """Each member's entry has a description (its trailing comment), not only its value."""
    for member in members:
        _, found, after = api_html.partition(f'id="{path}.{member}"')
        assert found, f"{path}.{member} is not in the reference"
        entry = after.split('<div class="doc doc-object', 1)[0]
        assert re.search(r"<p>\s*\S", entry), f"{path}.{member} has no description"


def _tree(text: str) -> str:
    """The error tree drawn in ``text``: the block of lines from the one naming StoreError."""
    start = text.rindex("\n", 0, text.index("StoreError\n")) + 1
    return textwrap.dedent(text[start:].split("\n\n", 1)[0].split("\n```", 1)[0])


def test_the_reference_draws_the_error_tree_of_the_code() -> None:
    """docs/api.md shows the tree walstore/_errors.py draws (tests/unit/test_exported_members
    checks that one against the classes), and an entry for each error."""
    assert _tree(API_MD.read_text()) == _tree(_errors.__doc__ or "")
    documented = {path for path, _ in _documented()}
    errors = {
        f"walstore.{name}"
        for name in walstore.__all__
        if isinstance(getattr(walstore, name), type)
        and issubclass(getattr(walstore, name), BaseException)
    }
    assert errors - documented == set()
