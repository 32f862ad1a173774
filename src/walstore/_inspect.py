"""Read-only inspection of a store's journal and staging area, for the ``walstore`` command.

Nothing here takes the store's LOCK or changes a file, so every function works while another
process has the store open. What that process does meanwhile is allowed for:

* The journal is read by scanning the live segment (``_journal_reader``), exactly as recovery
  does. A checkpoint may unlink the segment between the listing and the read: the scan is
  retried. A record being appended shows up as a torn tail, which is not a problem.
* Commit groups are appended, synced and applied under one lock, so when a COMMIT record is
  in the journal every earlier group is fully applied: only the last group can be mid-apply.
  ``verify`` re-reads the journal after checking the files and counts a mismatch on a path
  touched by that last group, or by a group appended while it checked, as "in flight" (a note),
  not as a problem, while the store is in use.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import _journal_format as fmt
from ._engine import reserve_for
from ._errors import CorruptionError, NotAStoreError, StoreError
from ._fs import FileStat, OsFileSystem, lstat_result
from ._journal_reader import SegmentScan, TornSegment, scan_segment
from ._journal_writer import MIN_SPARE, SPARE, segment_name
from ._paths import RESERVED, parents
from ._recovery import _segments, _superseded, check_reaches

SCAN_ATTEMPTS = 20  # journal scans retried when a checkpoint swaps the segment under us
CHUNK = 1 << 20


class JournalBusyError(StoreError):
    """The journal changed under every one of ``SCAN_ATTEMPTS`` scans of it (checkpoints of
    a busy store swapping segments): try again when it is quieter."""


# -- progress ----------------------------------------------------------------------------------


class Progress(Protocol):
    """Where long work reports how far it got (the CLI draws a bar on a TTY)."""

    def task(self, label: str, total: int | None) -> Callable[[int], None]:
        """Start a task; returns a function to call with each amount done."""


class NoProgress:
    def task(self, label: str, total: int | None) -> Callable[[int], None]:
        return lambda n: None


# -- layout and lock ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    root: str
    meta: str
    journal_dir: str
    staging_dir: str
    lock_path: str

    @classmethod
    def of(cls, root: str) -> Layout:
        """The layout of the store at ``root``; NotAStoreError if there is none."""
        root = os.path.abspath(root)
        meta = os.path.join(root, RESERVED)
        journal = os.path.join(meta, "journal")
        if not os.path.exists(root):
            raise NotAStoreError(f"{root} does not exist")
        if not os.path.isdir(root):
            raise NotAStoreError(f"{root} is not a directory")
        if not os.path.isdir(journal):
            raise NotAStoreError(f"{root} is not a walstore store (no {RESERVED}/journal)")
        return cls(root, meta, journal, os.path.join(meta, "staging"), os.path.join(meta, "LOCK"))


@contextmanager
def reading(layout: Layout, fs: OsFileSystem | None = None) -> Iterator[OsFileSystem]:
    """``fs``, or for the block an OsFileSystem confined to the store's root: every path
    below the root is resolved beneath it at each call, through no symlink (the store's own
    rule, ``_fs.py``), so nothing read can be a file outside the store put in its way."""
    if fs is not None:
        yield fs
        return
    fs = OsFileSystem()
    fs.confine(layout.root)
    try:
        yield fs
    finally:
        fs.release(layout.root)


@dataclass(frozen=True)
class LockState:
    held: bool  # a process has the store open to write
    pid: int | None  # exclusive: the pid in LOCK; shared: the first process that has it open
    pids: tuple[int, ...] = ()  # every process that has it open (shared: .walstore/procs/)

    @property
    def holder(self) -> int | None:
        """The holder's pid while the store is held, else None."""
        return self.pid if self.held else None


def _held_by_another(fs: OsFileSystem, path: str) -> tuple[bool, bytes] | None:
    """(whether another open file holds ``path``'s flock, its first bytes); None if the
    file does not exist. A shared, non-blocking flock on our own descriptor: it fails while
    an owner holds its exclusive lock, and is released at once."""
    try:
        fd = fs.open_regular(path)
    except FileNotFoundError:
        return None
    try:
        raw = fs.pread(fd, 64, 0)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            return True, raw
        return False, raw
    finally:
        fs.close(fd)  # releases our shared lock, if we got it


def _pid(raw: bytes) -> int | None:
    try:
        return int(raw.decode().strip())
    except ValueError:
        return None


def probe_lock(layout: Layout, fs: OsFileSystem | None = None) -> LockState:
    """Whether the store is open for writing, and by whom, without disturbing the holders:
    a process that opened it exclusive holds LOCK for life; processes that share it each
    hold a file of ``.walstore/procs/`` for life (LOCK only while they commit). (An opener
    racing these few microseconds would find the store locked; ``lock_timeout`` waits that
    out.)"""
    with reading(layout, fs) as fs:
        pids: list[int] = []
        procs = os.path.join(os.path.dirname(layout.lock_path), "procs")
        try:
            names = sorted(fs.listdir(procs), key=lambda n: (len(n), n))
        except FileNotFoundError:
            names = []
        for name in names:
            probe = _held_by_another(fs, os.path.join(procs, name))
            if probe is not None and probe[0]:
                pid = _pid(probe[1])
                if pid is not None:
                    pids.append(pid)
        lock = _held_by_another(fs, layout.lock_path)
    if pids:
        return LockState(True, pids[0], tuple(pids))
    if lock is None:
        return LockState(False, None)  # never opened for writing
    return LockState(lock[0], _pid(lock[1]), ())


# -- the journal -------------------------------------------------------------------------------


@dataclass
class JournalView:
    """The journal at one moment: every segment file and the live segment's scan."""

    segments: list[tuple[str, int]]  # (name, size) of every segment file, oldest first
    live: SegmentScan | None
    half_created: list[str] = field(default_factory=list)  # newer segments cut short

    @property
    def identity(self) -> tuple[str, int] | None:
        """(name, salt) of the live segment: changes at every checkpoint."""
        return (self.live.name, self.live.header.salt) if self.live else None

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.segments)

    @property
    def others(self) -> list[str]:
        """Segment files other than the live one (recovery removes them)."""
        live = self.live.name if self.live else None
        return [n for n, _ in self.segments if n != live]

    def transactions(self) -> Iterator[tuple[fmt.Commit, fmt.TxRecord]]:
        for commit in self.live.commits if self.live else ():
            for tx in commit.txs:
                yield commit, tx


def read_journal(
    layout: Layout, *, retry_corruption: bool = False, fs: OsFileSystem | None = None
) -> JournalView:
    """Scan the journal as recovery does (``recover_scan``), without changing it. Raises
    CorruptionError; with ``retry_corruption`` (the store is in use) only if it persists."""
    last: CorruptionError | None = None
    with reading(layout, fs) as fs:
        for _ in range(SCAN_ATTEMPTS):
            try:
                return _read_journal_once(fs, layout)
            except FileNotFoundError:
                continue  # a checkpoint dropped a segment between the listing and the read
            except CorruptionError as exc:
                if not retry_corruption:
                    raise
                last = exc
    if last is not None:
        raise last
    raise JournalBusyError(f"the journal of {layout.root} kept changing while it was read")


def _read_journal_once(fs: OsFileSystem, layout: Layout) -> JournalView:
    segs = _segments(fs, layout.journal_dir)
    sizes: list[tuple[str, int]] = []
    live: SegmentScan | None = None
    half: list[str] = []
    for _lsn, name in reversed(segs):
        path = os.path.join(layout.journal_dir, name)
        if live is None:
            data = fs.read_file(path)
            sizes.append((name, len(data)))
            try:
                live = scan_segment(name, data)
            except TornSegment:
                half.append(name)
        else:
            st = fs.lstat(path)
            if st is None:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
            sizes.append((name, st.size))
    sizes.reverse()
    check_reaches(live, [lsn for lsn, n in segs if n in half])
    return JournalView(sizes, live, half)


@dataclass(frozen=True)
class Space:
    """The store's file system, as the store sees it (``Engine.look_at_space``)."""

    free: int  # bytes an unprivileged writer may still allocate
    total: int
    reserve: int  # what commits and staging leave free (``reserve_for``)
    spare: int  # bytes of journal/spare, recycled by the next checkpoint (0: none)
    live_room: int  # preallocated bytes left in the live segment (commits need no space)

    @property
    def checkpoint_needs(self) -> int:
        """Free bytes the next checkpoint needs: none with a spare, else a new segment's."""
        return 0 if self.spare >= MIN_SPARE else 4096

    @property
    def full(self) -> bool:
        """Under twice the reserve free: commits that write are refused, or soon will be
        (deletes still commit)."""
        return self.free < 2 * self.reserve

    def as_json(self) -> dict[str, Any]:
        return {
            "free_bytes": self.free,
            "total_bytes": self.total,
            "reserve_bytes": self.reserve,
            "spare_segment_bytes": self.spare,
            "live_segment_room_bytes": self.live_room,
            "checkpoint_needs_bytes": self.checkpoint_needs,
            "full": self.full,
        }


def space(layout: Layout, live: SegmentScan | None, fs: OsFileSystem | None = None) -> Space:
    with reading(layout, fs) as fs:
        free, total = fs.free_space(layout.meta)
        st = fs.lstat(os.path.join(layout.journal_dir, SPARE))
    spare = st.size if st is not None and st.kind == "file" else 0
    room = max(0, live.header.size - live.valid_end) if live is not None else 0
    return Space(free, total, reserve_for(total), spare, room)


def space_notes(s: Space) -> list[str]:
    """What ``verify`` says of the disk: when it is full, and when too full to checkpoint."""
    notes = []
    if s.free < s.checkpoint_needs:
        notes.append(
            f"disk too full to checkpoint: {s.free} bytes free and no spare journal segment; "
            "the store keeps its commits in the journal and retries, and opens do too: free "
            "space on the disk (deleting through the store frees nothing until a checkpoint)"
        )
    elif s.full:
        notes.append(
            f"disk full: {s.free} bytes free, {s.reserve} of them kept in reserve; commits "
            "that would write into the reserve are refused with ENOSPC, deletes and "
            "checkpoints still work (delete through the store, then checkpoint, to free space)"
        )
    return notes


def read_segment(
    layout: Layout, name: str, fs: OsFileSystem | None = None
) -> tuple[bytes, SegmentScan]:
    """Read and scan one segment by name (FileNotFoundError if a checkpoint dropped it)."""
    with reading(layout, fs) as fs:
        data = fs.read_file(os.path.join(layout.journal_dir, name))
    return data, scan_segment(name, data)


# -- staging -----------------------------------------------------------------------------------


@dataclass
class StagingView:
    """What ``staging/`` holds: per-transaction directories of staged values, and the
    temporaries of applies (``<txid>-<i>.tmp``, ``.dir``, ``.del``, ``.old``)."""

    txids: dict[int, tuple[int, int]] = field(default_factory=dict)  # txid -> (files, bytes)
    other: list[str] = field(default_factory=list)
    entries: int = 0  # files and directories, counted as remove_tree counts them
    bytes: int = 0


def read_staging(layout: Layout, fs: OsFileSystem | None = None) -> StagingView:
    with reading(layout, fs) as fs:
        return _read_staging(fs, layout)


def _read_staging(fs: OsFileSystem, layout: Layout) -> StagingView:
    view = StagingView()
    try:
        names = sorted(fs.listdir(layout.staging_dir))
    except FileNotFoundError:
        return view
    for name in names:
        files, size, entries = _tree_size(fs, os.path.join(layout.staging_dir, name))
        if entries == 0:
            continue  # removed meanwhile
        view.entries += entries
        view.bytes += size
        if name.isdigit():
            view.txids[int(name)] = (files, size)
        else:
            view.other.append(name)
    return view


def _tree_size(fs: OsFileSystem, path: str) -> tuple[int, int, int]:
    """(files, bytes, entries) under ``path``, tolerating entries that vanish meanwhile.
    Iterative, so a tree of any depth is counted."""
    files = size = entries = 0
    stack = [path]
    while stack:
        p = stack.pop()
        st = fs.lstat(p)
        if st is None:
            continue
        if st.kind != "dir":
            files, size, entries = files + 1, size + st.size, entries + 1
            continue
        try:
            children = fs.listdir(p)
        except (FileNotFoundError, NotADirectoryError):
            continue
        entries += 1
        stack += [os.path.join(p, c) for c in children]
    return files, size, entries


# -- info --------------------------------------------------------------------------------------


def info(layout: Layout) -> dict[str, Any]:
    with reading(layout) as fs:
        return _info(fs, layout)


def _info(fs: OsFileSystem, layout: Layout) -> dict[str, Any]:
    lock = probe_lock(layout, fs)
    journal = read_journal(layout, retry_corruption=lock.held, fs=fs)
    staging = read_staging(layout, fs)
    live = journal.live
    pending = [tx.txid for _, tx in journal.transactions()]
    return {
        "root": layout.root,
        "in_use_by": lock.holder,
        "lock": {"held": lock.held, "pid": lock.pid, "processes": list(lock.pids)},
        "journal_bytes": journal.bytes,
        "segments": [{"name": n, "bytes": s} for n, s in journal.segments],
        "live_segment": live.name if live else None,
        "checkpoint_lsn": live.checkpoint.lsn if live else None,
        "last_lsn": live.next_lsn - 1 if live else None,
        "commit_groups": len(live.commits) if live else 0,
        "pending_transactions": len(pending),
        "pending_txids": pending,
        "torn_tail_bytes": live.torn_bytes if live else 0,
        "staged_bytes": staging.bytes,
        "staging_transactions": len(staging.txids),
        "staging_other_entries": len(staging.other),
        "space": space(layout, live, fs).as_json(),
    }


# -- log ---------------------------------------------------------------------------------------


def describe_op(op: fmt.Op) -> dict[str, Any]:
    if isinstance(op, fmt.Put):
        return {"kind": "put", "path": op.path, "size": len(op.data)}
    if isinstance(op, fmt.PutStaged):
        return {"kind": "put-staged", "path": op.path, "size": op.size, "staged": op.staged}
    if isinstance(op, fmt.Delete):
        return {"kind": "delete", "path": op.path, "size": None}
    if isinstance(op, fmt.DeleteDir):
        return {"kind": "delete-dir", "path": op.path, "size": None}
    entries = [describe_op(e) for e in op.entries]
    return {
        "kind": "replace-dir",
        "path": op.path,
        "size": sum(e["size"] for e in entries),
        "entries": entries,
    }


def log(layout: Layout, since: int | None = None) -> dict[str, Any]:
    lock = probe_lock(layout)
    journal = read_journal(layout, retry_corruption=lock.held)
    live = journal.live
    txs = [
        {"txid": tx.txid, "lsn": commit.lsn, "ops": [describe_op(op) for op in tx.ops]}
        for commit, tx in journal.transactions()
        if since is None or tx.txid > since
    ]
    return {
        "root": layout.root,
        "in_use_by": lock.holder,
        "checkpoint_lsn": live.checkpoint.lsn if live else None,
        "transactions": txs,
    }


# -- recover --dry-run -------------------------------------------------------------------------


def recovery_plan(layout: Layout) -> dict[str, Any]:
    """What opening the store would do now (``_recovery.recover``), computed from the journal
    and the staging area without touching them. The count of staging entries removed is a
    lower bound: directories a replayed ``delete_dir``/``replace_dir`` moves into staging are
    removed too."""
    lock = probe_lock(layout)
    journal = read_journal(layout, retry_corruption=lock.held)
    staging = read_staging(layout)
    live = journal.live
    commits = live.commits if live else []
    torn = live.torn_bytes if live else 0
    staged_any = bool(staging.txids or staging.other)
    segs = [n for n, _ in journal.segments]
    if live is not None and not commits and not torn and not staged_any and not journal.others:
        return _plan(layout, lock, clean=True)
    skip = _superseded(commits)
    rolled_forward = [tx.txid for _, tx in journal.transactions()]
    replayed = sum(
        1
        for ri, c in enumerate(commits)
        for ti, tx in enumerate(c.txs)
        for oi in range(len(tx.ops))
        if (ri, ti, oi) not in skip
    )
    began_after = live.checkpoint.next_txid if live else 1
    committed = set(rolled_forward)
    rolled_back = sorted(t for t in staging.txids if t >= began_after and t not in committed)
    new_segment = segment_name(live.next_lsn if live else 1)
    return _plan(
        layout,
        lock,
        clean=False,
        rolled_forward=rolled_forward,
        rolled_back=rolled_back,
        torn_bytes=torn,
        segments_removed=sum(1 for n in segs if n != new_segment),
        ops_replayed=replayed,
        orphans_removed_at_least=staging.entries,
    )


def _plan(layout: Layout, lock: LockState, *, clean: bool, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "root": layout.root,
        "in_use_by": lock.holder,
        "clean": clean,
        "rolled_forward": [],
        "rolled_back": [],
        "torn_bytes": 0,
        "segments_removed": 0,
        "ops_replayed": 0,
        "orphans_removed_at_least": 0,
    }
    out.update(fields)
    return out


# -- verify ------------------------------------------------------------------------------------


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


def staged_names(journal: JournalView) -> dict[str, tuple[int, fmt.PutStaged]]:
    """Every staged value the journal names: staging name -> (txid, op)."""
    out: dict[str, tuple[int, fmt.PutStaged]] = {}
    for _commit, tx in journal.transactions():
        for op in tx.ops:
            for e in op.entries if isinstance(op, fmt.ReplaceDir) else (op,):
                if isinstance(e, fmt.PutStaged):
                    out[e.staged] = (tx.txid, e)
    return out


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
        while chunk := fs.pread(fd, CHUNK, size):
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
        return _verify(fs, layout, progress or NoProgress())


def _verify(fs: OsFileSystem, layout: Layout, progress: Progress) -> VerifyResult:
    lock = probe_lock(layout, fs)
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
        lock = probe_lock(layout, fs)
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
    names = staged_names(journal)
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
