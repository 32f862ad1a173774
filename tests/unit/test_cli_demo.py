"""The README's main job: ``walstore demo DIR`` kills a writer mid-commit and checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_survives_sigkills(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "walstore", "demo", str(tmp_path / "d"), "--rounds", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("then SIGKILL") == 2
    assert out.stdout.count("check: money 800 == 800") == 2
    assert out.stdout.rstrip().endswith("none was half-applied")


def _demo(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "walstore", "demo", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_runs_again_in_the_same_directory(tmp_path: Path) -> None:
    """A second run continues from the store the first left (its balances, its ledger) and
    numbers its transfers after the first run's, so its checks hold again."""
    for run in ("first", "second"):
        out = _demo(tmp_path / "d", "--rounds", "2", "--acks", "20")
        assert out.returncode == 0, f"{run} run:\n{out.stdout}{out.stderr}"
        assert "PROBLEMS" not in out.stdout
        assert out.stdout.count("check: money 800 == 800") == 2
    assert "the store of an earlier demo run" in out.stdout


def test_demo_refuses_a_directory_holding_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")
    out = _demo(tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("walstore: demo: ") and "notes.txt" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written


def test_cli_reports_store_errors_in_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "walstore", "info", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("walstore: ") and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1
