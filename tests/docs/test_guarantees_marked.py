"""The guarantees table and the tests that prove it stay in step.

Each row of the table in docs/guarantees.md names, in its third column, the test files (or
directories) that check it; those tests carry ``@pytest.mark.guarantee(name="<row>")``, at
module level or per test, so ``pytest -m "guarantee(name='Fail-stop')"`` runs one row's
tests. This fails when a row has no marked test, when a file a row names holds none marked
with it, when a marked test lives in a file its row does not name, when a marker names no
row, when README.md's copy of the table has other rows or names other tests, and when a
row's tests are all in the slow tier (tests/profile.py).

The markers are read from a ``--collect-only`` run in a subprocess (tests/docs/
markers_plugin.py writes them out): the collection is pytest's own, whatever marks it (module
``pytestmark``, decorators, parametrization), and no test runs. One collection serves every
test here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.profile import SLOW

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "guarantees.md"
README = REPO / "README.md"
HEADER = "| guarantee | what it means | checked by |"


def table(path: Path) -> dict[str, list[str]]:
    """The guarantees table of ``path``: each row's name (its first column, without the
    backticks of code spans) and the test paths its third column names, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index(HEADER) + 2  # after the header and its |---| line
    rows: dict[str, list[str]] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = line.strip().strip("|").split(" | ")
        assert len(cells) == 3, f"{path.name}: a row without three cells: {line[:80]}"
        name = cells[0].strip().replace("`", "")
        assert name not in rows, f"{path.name}: two rows named {name!r}"
        rows[name] = re.findall(r"`(tests/[^`\s]*)`", cells[2])
    assert rows, f"{path.name}: no guarantees table"
    return rows


def _holds(path: str, nodeid: str) -> bool:
    """Whether the test ``nodeid`` is in ``path`` (a file, or a directory ending in /)."""
    file = nodeid.split("::", 1)[0]
    return file.startswith(path) if path.endswith("/") else file == path


@pytest.fixture(scope="module")
def marked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Each collected test that carries a guarantee marker, and the rows it names."""
    out = tmp_path_factory.mktemp("guarantees") / "marked.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env["WALSTORE_GUARANTEES_OUT"] = str(out)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:xdist",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.docs.markers_plugin",
            "tests",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found: dict[str, set[str]] = {}
    bad: list[str] = []
    for nodeid, marks in json.loads(out.read_text(encoding="utf-8")).items():
        names = set()
        for mark in marks:
            if mark["args"] or set(mark["kwargs"]) != {"name"}:
                bad.append(f"{nodeid}: guarantee{mark['args'] or ''}{mark['kwargs']}")
            names.add(str(mark["kwargs"].get("name", mark["args"][:1] or "")))
        found[nodeid] = names
    assert bad == [], "write the marker as guarantee(name=...), which -m can select:\n" + "\n".join(
        bad
    )
    return found


def test_every_marker_names_a_row_and_every_row_has_marked_tests(
    marked: dict[str, set[str]],
) -> None:
    rows = table(DOCS)
    by_row: dict[str, set[str]] = defaultdict(set)
    for nodeid, names in marked.items():
        for name in names:
            by_row[name].add(nodeid)
    unknown = {name: sorted(ids)[:3] for name, ids in by_row.items() if name not in rows}
    assert unknown == {}, f"markers that name no row of docs/guarantees.md: {unknown}"
    unproven = [name for name in rows if not by_row.get(name)]
    assert unproven == [], f"rows of docs/guarantees.md no test is marked with: {unproven}"


def test_the_files_a_row_names_are_the_files_of_its_marked_tests(
    marked: dict[str, set[str]],
) -> None:
    problems = []
    for name, paths in table(DOCS).items():
        tests = [nodeid for nodeid, names in marked.items() if name in names]
        for path in paths:
            if not (REPO / path).exists():
                problems.append(f"{name}: names {path}, which does not exist")
            elif not any(_holds(path, nodeid) for nodeid in tests):
                problems.append(f"{name}: names {path}, where no test is marked with it")
        for file in sorted({nodeid.split("::", 1)[0] for nodeid in tests}):
            if not any(_holds(path, file) for path in paths):
                problems.append(f"{name}: {file} has tests marked with it; the row names it not")
    assert problems == [], "\n".join(problems)


def test_the_readme_table_has_the_same_rows_and_tests() -> None:
    docs, readme = table(DOCS), table(README)
    assert list(readme) == list(docs), "README.md's rows differ from docs/guarantees.md's"
    differ = {
        name: (sorted(set(readme[name])), sorted(set(paths)))
        for name, paths in docs.items()
        if set(readme[name]) != set(paths)
    }
    assert differ == {}, f"README.md names other tests (README, docs): {differ}"


def test_every_row_keeps_a_test_in_the_default_profile(marked: dict[str, set[str]]) -> None:
    """tests/profile.py's promise: the slow tier runs the same checks longer, so leaving it
    out leaves no guarantee unchecked."""
    default = [nodeid for nodeid in marked if not any(nodeid.startswith(p) for p in SLOW)]
    only_slow = [name for name in table(DOCS) if not any(name in marked[n] for n in default)]
    assert only_slow == [], f"rows whose marked tests are all in the slow tier: {only_slow}"
