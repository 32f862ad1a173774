"""Each example runs as a script, as its docstring says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.examples.conftest import EXAMPLES


@pytest.mark.parametrize(
    ("script", "says"),
    [
        ("trio_app.py", "100 jobs claimed by 8 workers; 100 in done/"),
        ("conversations.py", "conversations/c1: 10 turns"),
        ("graph_registry.py", "registry.json: {'g1': {'nodes': 2, 'relations': 1}}"),
    ],
)
def test_script(script: str, says: str, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert says in out.stdout
