"""Read-only inspection of a store's journal and staging area, for the ``walstore`` command:
the layout, the lock, the journal, the staging area and the space they take. What the
command prints from them is in ``_info.py``; ``walstore verify`` is ``_verify.py``.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import _journal_format as fmt
from ._engine import reserve_for
from ._errors import CorruptionError, NotAStoreError, StoreError
from ._journal_reader import SegmentScan, TornSegment, scan_segment
from ._journal_writer import MIN_SPARE, SPARE
from ._os_fs import OsFileSystem
from ._paths import RESERVED
from ._recovery import _segments, check_reaches

SCAN_ATTEMPTS = 20  # journal scans retried when a checkpoint swaps the segment under us
CHUNK = 1 << 20


class JournalBusyError(StoreError):
    """The journal changed under every one of ``SCAN_ATTEMPTS`` scans of it (checkpoints of
    a busy store swapping segments): try again when it is quieter."""


class Progress(Protocol):
    """Where long work reports how far it got (the CLI draws a bar on a TTY)."""

    def task(self, label: str, total: int | None) -> Callable[[int], None]:
        """Start a task; returns a function to call with each amount done."""


class NoProgress:
    def task(self, label: str, total: int | None) -> Callable[[int], None]:
        return lambda n: None


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


def staged_names(journal: JournalView) -> dict[str, tuple[int, fmt.PutStaged]]:
    """Every staged value the journal names: staging name -> (txid, op)."""
    out: dict[str, tuple[int, fmt.PutStaged]] = {}
    for _commit, tx in journal.transactions():
        for op in tx.ops:
            for e in op.entries if isinstance(op, fmt.ReplaceDir) else (op,):
                if isinstance(e, fmt.PutStaged):
                    out[e.staged] = (tx.txid, e)
    return out


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
