"""Shared pieces of the CLI tests: stores made by a child process, running the command."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from walstore._cli import main

WRITER = str(Path(__file__).with_name("writer.py"))
SRC = str(Path(__file__).resolve().parents[2] / "src")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def crashed_store(root: Path) -> Path:
    """A store whose writer exited after its last commit without checkpointing: four
    transactions (puts inline and staged, delete, move, delete_dir, replace_dir with keep)
    are in the journal and applied."""
    subprocess.run(
        [sys.executable, WRITER, "crash", str(root)], check=True, timeout=60, env=child_env()
    )
    return root


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run_in_process(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    code = main([*argv])
    out, err = capsys.readouterr()
    return Run(code, out, err)


def run_cli(*argv: str, timeout: float = 120) -> Run:
    """``python -m walstore ARGV`` in a child process."""
    p = subprocess.run(
        [sys.executable, "-m", "walstore", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=child_env(),
    )
    return Run(p.returncode, p.stdout, p.stderr)


def one_line_error(r: Run) -> str:
    """The error a failed command printed: exactly one line on stderr, no traceback."""
    assert "Traceback" not in r.err, r.err
    assert r.err.startswith("walstore: "), r.err
    assert r.err.count("\n") == 1, r.err
    return r.err


def tree_state(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """Every entry under ``root`` (``.walstore`` included) with its kind, inode, mtime and a
    content hash: equal before and after means nothing was touched."""
    out: dict[str, tuple[str, int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if os.path.isdir(p):
                out[os.path.relpath(p, root)] = ("dir", st.st_ino, st.st_mtime_ns, "")
            else:
                digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()
                out[os.path.relpath(p, root)] = ("file", st.st_ino, st.st_mtime_ns, digest)
    return out


def user_files(root: Path) -> dict[str, bytes]:
    """The store's plain files (``.walstore`` left out)."""
    out: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d != ".walstore"]
        for n in filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


class Holder:
    """A child process that has the store open until stopped (``exclusive``: its LOCK held)."""

    def __init__(self, root: Path, *, exclusive: bool = False) -> None:
        mode = "hold-exclusive" if exclusive else "hold"
        self.proc = subprocess.Popen(
            [sys.executable, WRITER, mode, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == "READY\n", line
        self.pid = self.proc.pid

    def stop(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()
