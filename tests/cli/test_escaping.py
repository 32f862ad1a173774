"""Every path the CLI prints for people has its control characters escaped: a file name
holding a newline and a terminal escape cannot paint a line of its own (a fake ``OK:``) or
restyle the terminal, in ``log``, ``verify``, ``info``, ``recover`` or an error message."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import walstore

from .helpers import run_in_process

FAKE = "OK: the journal, the staged values and the files agree"
HOSTILE = f"x\n{FAKE}\x1b[2K\r\u2028\x85\udcff"  # newline, escape, CR, separators, a bad byte


def _hostile_store(root: Path) -> None:
    async def write() -> None:
        store = await walstore.open(root)
        await store.write(HOSTILE, b"the committed value")
        await store.write(f"d/{HOSTILE}/f", b"below")
        # Not closed: the journal keeps the commits (log and verify show their paths).
        store._committer.stop()

    anyio.run(write)


def _assert_safe(out: str) -> None:
    for line in out.splitlines():
        assert not line.startswith(FAKE), out
        assert not line.lstrip().startswith("OK: the journal") or line == FAKE, out
    for ch in ("\x1b", "\r", "\u2028", "\x85", "\udcff"):
        assert ch not in out, (ch, out)


@pytest.mark.parametrize("command", ["log", "verify", "info", "recover --dry-run"])
def test_hostile_names_are_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    root = tmp_path / "s"
    _hostile_store(root)
    (root / HOSTILE).write_bytes(b"changed behind the store's back")  # verify reports it
    r = run_in_process(capsys, *command.split(), str(root))
    _assert_safe(r.out)
    _assert_safe(r.err)
    if command in ("log", "verify"):
        assert "x\\nOK: the journal" in r.out  # shown, escaped
    if command == "verify":
        assert r.code != 0 and "PROBLEM" in r.out
        assert not r.out.rstrip().endswith(FAKE)


def test_error_messages_are_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no\x1b[31mstore"
    r = run_in_process(capsys, "info", str(missing))
    assert r.code != 0
    assert "\x1b" not in r.err and "\\x1b[31m" in r.err
