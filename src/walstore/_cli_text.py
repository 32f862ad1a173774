"""What the command line prints for people: sizes, txid lists, recovery reports, progress
bars on a terminal, and the escaping every printed line goes through (``_cli.py`` runs the
commands)."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from . import _inspect


def size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n_f = n / 1024
        if n_f < 1024 or unit == "TiB":
            return f"{n_f:.1f} {unit}"
        n //= 1024
    raise AssertionError


def txids(ids: list[int], limit: int = 12) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


class _RichProgress:
    """Progress bars on stderr (only made when stderr is a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )

    def task(self, label: str, total: int | None) -> Callable[[int], None]:
        tid = self._progress.add_task(label, total=total)
        return lambda n: self._progress.advance(tid, n)

    def __enter__(self) -> _RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


@contextlib.contextmanager
def progress(json_out: bool) -> Iterator[_inspect.Progress]:
    if json_out or not sys.stderr.isatty():
        yield _inspect.NoProgress()
        return
    with _RichProgress() as bar:
        yield bar


def in_use(pid: int | None) -> str:
    return f"in use by pid {pid}" if pid is not None else "in use by another process"


def op_lines(op: dict[str, Any], indent: str) -> list[str]:
    shown = "" if op["size"] is None else size(op["size"])
    extra = ""
    if op["kind"] == "put-staged":
        extra = f"  (staged {op['staged']})"
    elif op["kind"] == "replace-dir":
        shown = f"{len(op['entries'])} entries, {shown}"
    out = [f"{indent}{op['kind']:<12} {op['path']}  {shown}{extra}".rstrip()]
    for e in op.get("entries", ()):
        out += op_lines(e, indent + "    ")
    return out


def report_lines(d: dict[str, Any], verb: str) -> list[str]:
    if d["clean"]:
        return ["  clean: nothing to recover"]
    would = "would " if verb == "plan" else ""
    past = verb != "plan"
    fwd, back = d["rolled_forward"], d["rolled_back"]
    lines = [
        f"  {would}{'rolled' if past else 'roll'} forward {len(fwd)} transaction(s)"
        + (f": {txids(fwd)}" if fwd else "")
        + f" ({d['ops_replayed']} op(s) {'replayed' if past else 'to replay'})",
        f"  {would}{'rolled' if past else 'roll'} back {len(back)} transaction(s)"
        + (f": {txids(back)}" if back else "")
        + " (staged, never committed)",
    ]
    if d["torn_bytes"]:
        lines.append(
            f"  {would}{'discarded' if past else 'discard'} {d['torn_bytes']} bytes "
            "of torn journal tail"
        )
    lines += [
        f"  SKIPPED an op no file system can apply (committed unchecked by an older walstore): {s}"
        for s in d.get("ops_skipped", ())
    ]
    orphans = d.get("orphans_removed", d.get("orphans_removed_at_least", 0))
    lines.append(
        f"  {would}{'removed' if past else 'remove'} {d['segments_removed']} old journal "
        f"segment(s) and {'at least ' if not past else ''}{orphans} staging entr(ies)"
    )
    return lines


def report_dict(report: Any) -> dict[str, Any]:
    return {
        "clean": report.clean,
        "rolled_forward": list(report.rolled_forward),
        "rolled_back": list(report.rolled_back),
        "torn_bytes": report.torn_bytes,
        "orphans_removed": report.orphans_removed,
        "segments_removed": report.segments_removed,
        "ops_replayed": report.ops_replayed,
        "ops_skipped": list(report.ops_skipped),
    }


_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)


def escape(line: str) -> str:
    """``line`` with every control, format or line-separator character and every
    undecodable byte (a surrogate) written as an escape (``\\n``, ``\\x1b``, ``\\udcff``):
    a file name that holds a newline or a terminal escape cannot paint a line of its own
    (a fake ``OK:``) or restyle the terminal. Every line printed for people goes through it;
    JSON output escapes them already."""
    if not _UNSAFE.search(line):
        return line
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode(), line)
