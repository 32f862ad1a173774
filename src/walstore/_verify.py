"""``walstore verify``: the files and staged values a store should hold, by its journal,
checked against what it holds. Read-only (the allowances for a store in use by another
process are in ``_inspect.py``'s docstring)."""

from __future__ import annotations

import errno
import os
import stat
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import _inspect
from . import _journal_format as fmt
from ._errors import CorruptionError
from ._fs import FileStat
from ._inspect import JournalView, Layout, Progress, read_journal, reading, space, space_notes
from ._os_fs import OsFileSystem, lstat_result
from ._paths import RESERVED, parents


@dataclass(frozen=True)
class Problem:
    kind: str  # journal, staged, file, dir
    path: str
    detail: str

    def line(self) -> str:
        return f"{self.kind}: {self.path}: {self.detail}"


@dataclass(frozen=True)
class _Expect:
    """The state a store path must be in after every commit in the journal."""

    txid: int
    op: fmt.Put | fmt.PutStaged | None  # None: absent


def expected_state(
    journal: JournalView,
) -> tuple[dict[str, _Expect], dict[str, tuple[int, bool]]]:
    """Apply every op of the journal, in order, to a model of the paths it touches: the last
    op on each path wins, and a directory op decides everything below it. Returns the
    expected files (path -> content or absent) and directories whose contents the journal
    fully decides (path -> (txid, exists): a replaced directory holds exactly the files the
    model puts in it; a deleted one is absent)."""
    files: dict[str, _Expect] = {}
    trees: dict[str, tuple[int, bool]] = {}

    def drop_under(path: str) -> None:
        prefix = path + "/"
        for table in (files, trees):
            for p in [p for p in table if p.startswith(prefix)]:
                del table[p]

    def put(path: str, txid: int, op: fmt.Put | fmt.PutStaged) -> None:
        for a in parents(path):
            if a in trees and not trees[a][1]:
                trees[a] = (trees[a][0], True)  # remade as a directory: holds what is put
            if a in files and files[a].op is None:
                del files[a]  # was a deleted file; a directory now
        trees.pop(path, None)
        files[path] = _Expect(txid, op)

    for _commit, tx in journal.transactions():
        for op in tx.ops:
            if isinstance(op, fmt.Put | fmt.PutStaged):
                put(op.path, tx.txid, op)
            elif isinstance(op, fmt.Delete):
                files[op.path] = _Expect(tx.txid, None)
            elif isinstance(op, fmt.DeleteDir):
                drop_under(op.path)
                files.pop(op.path, None)
                trees[op.path] = (tx.txid, False)
            else:
                drop_under(op.path)
                files.pop(op.path, None)
                for a in parents(op.path):
                    if a in trees and not trees[a][1]:
                        trees[a] = (trees[a][0], True)
                trees[op.path] = (tx.txid, True)
                for e in op.entries:
                    files[f"{op.path}/{e.path}"] = _Expect(tx.txid, e)
    return files, trees


def crc_recorded(op: fmt.PutStaged) -> bool:
    """Values staged by a transaction carry their CRC; files a ``move`` or a
    ``replace_dir(keep=...)`` linked into staging (``<txid>/m<i>``, ``<txid>/k<i>-<j>``) are
    recorded by size only."""
    return op.staged.rpartition("/")[2].isdigit()


def file_crc(
    path: str, advance: Callable[[int], None] | None = None, fs: OsFileSystem | None = None
) -> tuple[int, int]:
    """(size, crc32) of a regular file, read in 1 MiB chunks (through ``fs``: under a
    confined root, not through a symlink; anything but a regular file raises at once)."""
    fs = fs or OsFileSystem()
    crc = size = 0
    fd = fs.open_regular(path)
    try:
        while chunk := fs.pread(fd, _inspect.CHUNK, size):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
            if advance is not None:
                advance(len(chunk))
    finally:
        fs.close(fd)
    return size, crc


@dataclass
class VerifyResult:
    root: str
    in_use_by: int | None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checkpoint_lsn: int | None = None
    transactions: int = 0
    staged_checked: int = 0
    paths_checked: int = 0
    attempts: int = 0
    incomplete: bool = False  # a busy store checkpointed under every attempt

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "ok": self.ok,
            "incomplete": self.incomplete,
            "in_use_by": self.in_use_by,
            "problems": [
                {"kind": p.kind, "path": p.path, "detail": p.detail} for p in self.problems
            ],
            "notes": self.notes,
            "checkpoint_lsn": self.checkpoint_lsn,
            "transactions": self.transactions,
            "staged_checked": self.staged_checked,
            "paths_checked": self.paths_checked,
        }


VERIFY_ATTEMPTS = 10


def verify(layout: Layout, progress: Progress | None = None) -> VerifyResult:
    """Check the journal, the staged values it names, and every path it touches, against
    each other; read-only. See the module docstring for how a store in use is handled."""
    with reading(layout) as fs:
        return _verify(fs, layout, progress or _inspect.NoProgress())


def _verify(fs: OsFileSystem, layout: Layout, progress: Progress) -> VerifyResult:
    lock = _inspect.probe_lock(layout, fs)
    result = VerifyResult(layout.root, lock.holder)
    for attempt in range(1, VERIFY_ATTEMPTS + 1):
        result = VerifyResult(layout.root, lock.holder, attempts=attempt)
        try:
            before = read_journal(layout, retry_corruption=lock.held, fs=fs)
        except CorruptionError as exc:
            result.problems.append(Problem("journal", "journal", str(exc)))
            return result
        if before.live is None:
            result.notes.append("the journal has no segment yet: the store was never opened")
            return result
        result.notes += space_notes(space(layout, before.live, fs))
        result.checkpoint_lsn = before.live.checkpoint.lsn
        result.transactions = sum(1 for _ in before.transactions())
        if before.half_created:
            result.notes.append(
                f"half-created journal segment(s) {', '.join(before.half_created)}: "
                "a checkpoint was cut short; the next open removes them"
            )
        if before.live.torn_bytes:
            result.notes.append(
                f"{before.live.torn_bytes} bytes after the last journal record: "
                + (
                    "a commit being written"
                    if lock.held
                    else "a torn write, discarded by the next open"
                )
            )
        staged_problems = _check_staged(fs, layout, before, result, progress)
        file_problems = _check_paths(fs, layout, before, result, progress, lock.held)
        lock = _inspect.probe_lock(layout, fs)
        result.in_use_by = lock.holder
        try:
            after = read_journal(layout, retry_corruption=lock.held, fs=fs)
        except CorruptionError as exc:
            result.problems.append(Problem("journal", "journal", str(exc)))
            return result
        if after.identity != before.identity:
            continue  # a checkpoint (or another process's open) ran meanwhile: look again
        if not lock.held:
            result.problems = staged_problems + file_problems
            return result
        # Only the last group in the journal can be mid-apply, and groups appended while
        # we looked may have changed what we saw.
        appended = after.live.commits[len(before.live.commits) :] if after.live else []
        moving = _paths_of(before.live.commits[-1:] + appended)
        real = [p for p in file_problems if not _touches(p.path, moving)]
        in_flight = len(file_problems) - len(real)
        result.problems = staged_problems + real
        if in_flight:
            result.notes.append(
                f"{in_flight} path(s) being changed by a commit in flight (the store is in use)"
            )
        return result
    result.incomplete = True
    result.notes.append(
        f"the store checkpointed during each of {VERIFY_ATTEMPTS} attempts; run verify again"
    )
    return result


def _paths_of(commits: list[fmt.Commit]) -> set[str]:
    out: set[str] = set()
    for c in commits:
        for tx in c.txs:
            for op in tx.ops:
                out.add(op.path)
    return out


def _touches(path: str, moving: set[str]) -> bool:
    return path in moving or any(a in moving for a in parents(path))


def _check_staged(
    fs: OsFileSystem,
    layout: Layout,
    journal: JournalView,
    result: VerifyResult,
    progress: Progress,
) -> list[Problem]:
    problems: list[Problem] = []
    names = _inspect.staged_names(journal)
    total = sum(op.size for _txid, op in names.values() if crc_recorded(op))
    advance = progress.task("staged values", total)
    for name, (txid, op) in sorted(names.items()):
        path = os.path.join(layout.staging_dir, name)
        where = f"{RESERVED}/staging/{name}"
        try:
            if crc_recorded(op):
                size, crc = file_crc(path, advance, fs)
            else:
                st = fs.lstat(path)
                if st is None:
                    raise FileNotFoundError(errno.ENOENT, "No such file", path)
                size, crc = st.size, op.crc
        except FileNotFoundError:
            problems.append(
                Problem("staged", where, f"missing (value of {op.path!r}, transaction {txid})")
            )
            continue
        except OSError as exc:
            problems.append(Problem("staged", where, f"unreadable: {exc.strerror}"))
            continue
        result.staged_checked += 1
        if size != op.size:
            problems.append(
                Problem("staged", where, f"{size} bytes, recorded {op.size} (transaction {txid})")
            )
        elif crc != op.crc:
            problems.append(
                Problem(
                    "staged",
                    where,
                    f"CRC {crc:08x}, recorded {op.crc:08x} (transaction {txid})",
                )
            )
    return problems


def _check_paths(
    fs: OsFileSystem,
    layout: Layout,
    journal: JournalView,
    result: VerifyResult,
    progress: Progress,
    in_use: bool,
) -> list[Problem]:
    files, trees = expected_state(journal)
    problems: list[Problem] = []
    advance = progress.task("files", len(files) + len(trees))
    hint = "" if in_use else "; if the writer crashed, `walstore recover` redoes it"
    links = _Symlinks(fs, layout.root)
    for path, exp in sorted(files.items()):
        advance(1)
        result.paths_checked += 1
        detail = links.on_the_way(path) or _check_file(fs, layout, path, exp)
        if detail:
            problems.append(Problem("file", path, f"{detail} (transaction {exp.txid}{hint})"))
    for path, (txid, exists) in sorted(trees.items()):
        advance(1)
        result.paths_checked += 1
        full = os.path.join(layout.root, path)
        detail = links.on_the_way(path)
        if detail:
            problems.append(Problem("dir", path, f"{detail} (transaction {txid})"))
            continue
        try:
            st = fs.lstat(full)
        except OSError as exc:  # a directory on the way became a symlink meanwhile
            problems.append(Problem("dir", path, f"unreadable: {exc.strerror}"))
            continue
        if not exists:
            if st is not None:
                problems.append(
                    Problem("dir", path, f"exists, but was deleted (transaction {txid}{hint})")
                )
            continue
        if st is None or st.kind != "dir":
            problems.append(Problem("dir", path, f"missing (transaction {txid}{hint})"))
            continue
        for rel in _files_under(fs, full):
            p = f"{path}/{rel}"
            if p not in files or files[p].op is None:
                problems.append(
                    Problem(
                        "file",
                        p,
                        f"not in the directory committed by transaction {txid}{hint}",
                    )
                )
    return problems


class _Symlinks:
    """Which directories on the way to a store path are symlinks (looked up once each):
    walstore never follows one, so what lies behind it is not the store's."""

    def __init__(self, fs: OsFileSystem, root: str) -> None:
        self.fs = fs
        self.root = root
        self._kinds: dict[str, bool] = {}

    def on_the_way(self, path: str) -> str | None:
        for anc in parents(path):
            link = self._kinds.get(anc)
            if link is None:
                try:
                    st = self.fs.lstat(os.path.join(self.root, anc))
                    link = st is not None and st.kind == "symlink"
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise
                    link = True  # one above became a symlink since it was looked at
                self._kinds[anc] = link
            if link:
                return (
                    f"behind the symlink {anc!r}, which walstore never follows (put there by "
                    "another process? put the directory back)"
                )
        return None


def _check_file(fs: OsFileSystem, layout: Layout, path: str, exp: _Expect) -> str | None:
    full = os.path.join(layout.root, path)
    try:
        st = lstat_result(fs, full)
    except OSError as exc:  # a directory on the way became a symlink meanwhile
        return f"unreadable: {exc.strerror}"
    if st is None:
        return None if exp.op is None else "missing"
    if exp.op is None:
        return "exists, but was deleted"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    op = exp.op
    want = len(op.data) if isinstance(op, fmt.Put) else op.size
    if isinstance(op, fmt.PutStaged):
        try:
            staged = lstat_result(fs, os.path.join(layout.staging_dir, op.staged))
        except OSError:
            staged = None
        if staged is not None and (staged.st_ino, staged.st_dev) == (st.st_ino, st.st_dev):
            return None  # the very file the commit staged (its content is checked above)
        if not crc_recorded(op):
            return None if st.st_size == want else f"{st.st_size} bytes, committed {want}"
    if st.st_size != want:
        return f"{st.st_size} bytes, committed {want}"
    try:
        size, crc = file_crc(full, fs=fs)
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    expect = zlib.crc32(op.data) if isinstance(op, fmt.Put) else op.crc
    if size != want or crc != expect:
        return f"content differs from the committed value (CRC {crc:08x}, committed {expect:08x})"
    return None


def _files_under(fs: OsFileSystem, path: str) -> Iterator[str]:
    """Files (and other non-directories) below ``path``, as relative paths, in name order.
    Iterative, so a tree of any depth is listed."""
    stack: list[tuple[str, Iterator[str]]] = [("", iter(_sorted_names(fs, path)))]
    while stack:
        rel, names = stack[-1]
        for n in names:
            r = f"{rel}/{n}" if rel else n
            full = os.path.join(path, r)
            st = _lstat_or_none(fs, full)
            if st is not None and st.kind == "dir":
                stack.append((r, iter(_sorted_names(fs, full))))
                break
            yield r
        else:
            stack.pop()


def _sorted_names(fs: OsFileSystem, path: str) -> list[str]:
    try:
        return sorted(fs.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        return []  # became a symlink meanwhile: never followed


def _lstat_or_none(fs: OsFileSystem, path: str) -> FileStat | None:
    """``fs.lstat``; None also where a directory on the way became a symlink meanwhile."""
    try:
        return fs.lstat(path)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        return None
