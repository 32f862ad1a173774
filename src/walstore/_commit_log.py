"""The commit log: where committed groups are recorded, in LSN order, before they are applied.

``CommitLog`` is the interface the engine commits and recovers through; it owns the LSNs.
``JournalLog`` implements it over the journal segments of ``.walstore/journal/``
(``_journal_writer.py`` appends, ``_journal_reader.py`` parses). Another log (one kept in a
database, shared by machines) implements the same five calls:

* ``append(records, expect_lsn)`` writes one group (``records``: its transactions, each
  encoded by ``_journal_format.encode_tx``) as the record after ``expect_lsn`` and returns
  its LSN. It raises ``LogConflict``, writing nothing, if ``expect_lsn`` is not the head: a
  writer this one has not read appended first.
* ``read_after(lsn)`` returns the committed groups after ``lsn`` that the log holds, in order.
* ``sync()`` makes what was appended durable. That is the commit point.
* ``checkpoint(next_txid)`` records that everything up to the head is applied and durable
  in place: the records before it are no longer needed, and recovery starts after it.

Threads: every method runs in a worker thread, never on the event loop; the caller holds the
commit lock (the engine's, and with other processes the cross-process one), so one caller at a
time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Protocol

from . import _journal_format as fmt
from ._errors import CorruptionError
from ._fs import FileSystem, write_all
from ._journal_reader import SegmentScan, TornSegment, read_tail, scan_segment
from ._journal_writer import (
    PREALLOCATING,
    JournalWriter,
    new_segment,
    retire,
    segment_lsn,
    segment_name,
)


class LogConflict(Exception):
    """``append``'s ``expect_lsn`` is not the log's head: another writer appended first.
    Nothing was written; read on (``read_after``) and validate again."""

    def __init__(self, expect_lsn: int, head: int) -> None:
        super().__init__(f"commit log: expected to append after LSN {expect_lsn}, head is {head}")
        self.expect_lsn = expect_lsn
        self.head = head


class CommitLog(Protocol):
    """The seam the engine commits and recovers through (this module's docstring)."""

    @property
    def head(self) -> int:
        """The LSN of the last record this log knows of (a COMMIT or the CHECKPOINT)."""
        ...

    @property
    def checkpoint_lsn(self) -> int:
        """The LSN of the last checkpoint: recovery reads after it."""
        ...

    def append(self, records: Sequence[bytes], expect_lsn: int) -> int: ...

    def read_after(self, lsn: int) -> list[fmt.Commit]: ...

    def sync(self) -> None: ...

    def unappend(self) -> None:
        """After a failed ``sync``: erase what was appended since the last good one."""

    def checkpoint(self, next_txid: int) -> int: ...

    def close(self) -> None: ...


class JournalLog:
    """``CommitLog`` over the journal: the live segment (``HEADER CHECKPOINT COMMIT*``) and
    the older ones that a checkpoint has not dropped yet.

    Made by ``open`` (recovery's ``recover_scan``: the live segment found, not yet open for
    appending; ``resume`` opens it as it is, ``checkpoint`` starts a new one) or by ``join``
    (another process has the store open: append to its live segment). Requires: the caller
    holds the commit lock for every call."""

    def __init__(self, fs: FileSystem, journal_dir: str, *, sync: bool, preallocate: int) -> None:
        self.fs = fs
        self.journal_dir = journal_dir
        self.sync_enabled = sync
        self.preallocate = preallocate
        # A retired segment becomes journal/spare for the next checkpoint to recycle. Off with
        # other processes: they may still read an old segment through their handle.
        self.recycle = bool(preallocate)
        self.spare_dirty: int | None = None  # how far the old records in journal/spare reach
        self.retired = 0  # segments the checkpoints retired (renamed to spare or unlinked)
        self.torn_cleared = 0  # bytes of torn tail the last ``read_after`` cleared
        self._writer: JournalWriter | None = None
        self._found: SegmentScan | None = None  # open: the live segment, until resumed
        self._head = 0
        self._synced_head = self._head  # the head as of the last good sync
        self._checkpoint_lsn = 0
        self._start = 0  # offset of the live segment's first COMMIT
        self._bytes_written = 0  # by the segments closed so far
        # The records of the last read: ``read_after`` an LSN among them needs no new read.
        self._known: list[fmt.Commit] = []
        # Segments a checkpoint retires (the oldest last), each with how far its records
        # reach (None: unknown); those a checkpoint failed to retire stay for the next one.
        self._stale: list[tuple[str, int | None]] = []
        self._unfinished: list[str] = []  # preallocations cut short (recovery drops them)
        self._old: JournalWriter | None = None  # the segment a checkpoint just closed

    # -- making one -------------------------------------------------------------------------

    @classmethod
    def open(cls, fs: FileSystem, journal_dir: str, *, sync: bool, preallocate: int) -> JournalLog:
        """Recovery step 2, ``recover_scan``: find the live segment, the newest one whose
        HEADER and CHECKPOINT parse (``found``). Raises CorruptionError."""
        log = cls(fs, journal_dir, sync=sync, preallocate=preallocate)
        names = fs.listdir(journal_dir)
        segs = _segments(fs, journal_dir, names)
        log._unfinished = [n for n in names if n.endswith(PREALLOCATING)]
        live = _find_live(fs, journal_dir, segs)
        log._found = live
        if live is not None:
            log._head = log._synced_head = live.next_lsn - 1
            log._checkpoint_lsn = live.checkpoint.lsn
            log._known = live.commits
        # Retired by the first checkpoint: the live segment first (it becomes the spare if
        # there is none), then the others, oldest first.
        others: list[tuple[str, int | None]] = [
            (os.path.join(journal_dir, n), None) for _, n in reversed(segs)
        ]
        if live is not None:
            path = os.path.join(journal_dir, live.name)
            others = [o for o in others if o[0] != path]
            others.append((path, live.valid_end + live.torn_bytes))
        log._stale = others
        return log

    @property
    def found(self) -> SegmentScan | None:
        """The live segment as ``open`` found it (None: there is none, a new store)."""
        return self._found

    @property
    def left_over(self) -> bool:
        """Whether anything besides a cleanly closed live segment is there: records after its
        checkpoint, a torn tail, older segments, preallocations cut short."""
        live = self._found
        if live is None:
            return True
        return bool(live.commits or live.torn_bytes or len(self._stale) > 1 or self._unfinished)

    def resume(self) -> None:
        """Append to the live segment ``open`` found, as it is (a store closed cleanly); with
        sync, fsync it first (a store opened with Durability.OFF may have written it)."""
        live = self._found
        assert live is not None
        fs = self.fs
        path = os.path.join(self.journal_dir, live.name)
        fd = fs.open(path)
        if self.sync_enabled:
            try:
                fs.fsync(fd)
            except BaseException:
                fs.close(fd)
                raise
        self._writer = JournalWriter.resume(
            fs, path, fd, live, offset=live.valid_end, next_lsn=live.next_lsn
        )
        self._found = None
        self._stale = []
        self._start = live.checkpoint_end

    @classmethod
    def join(
        cls, fs: FileSystem, journal_dir: str, segment: int, *, sync: bool, preallocate: int
    ) -> JournalLog:
        """Append to the live segment of a store other processes have open: the one whose
        first LSN is ``segment``, or the newest that parses. ``read_after`` then reads its
        records (and clears a torn tail)."""
        log = cls(fs, journal_dir, sync=sync, preallocate=preallocate)
        name, data = log._live_segment(segment)
        scan = scan_segment(name, data)
        log._switch(scan, offset=scan.valid_end, next_lsn=scan.next_lsn)
        log._known = scan.commits
        return log

    def follow(self, segment: int) -> int | None:
        """Another process checkpointed and named ``segment`` live: append to it from now
        on (the rest of the old one must have been read). Returns its checkpoint's LSN, or
        None if that checkpoint died before its segment existed."""
        old = self._writer
        assert old is not None
        name, data = self._live_segment(segment)
        if os.path.join(self.journal_dir, name) == old.path:
            return None
        scan = scan_segment(name, data)
        self._switch(scan, offset=scan.checkpoint_end, next_lsn=scan.checkpoint.lsn + 1)
        self._bytes_written += old.bytes_written
        old.close()
        return scan.checkpoint.lsn

    def _switch(self, scan: SegmentScan, *, offset: int, next_lsn: int) -> None:
        path = os.path.join(self.journal_dir, scan.name)
        fd = self.fs.open(path)
        self._writer = JournalWriter.resume(
            self.fs, path, fd, scan, offset=offset, next_lsn=next_lsn
        )
        self._head = next_lsn - 1
        self._synced_head = self._head  # the head as of the last good sync
        self._checkpoint_lsn = scan.checkpoint.lsn
        self._start = scan.checkpoint_end
        self._known = []

    def _live_segment(self, segment: int) -> tuple[str, bytes]:
        """The live segment's name and content: the one starting at ``segment``, or (a
        checkpoint that died before creating it) the newest one that parses."""
        fs = self.fs
        name = segment_name(segment)
        try:
            return name, fs.read_file(os.path.join(self.journal_dir, name))
        except FileNotFoundError:
            pass
        names = sorted(
            (n for n in fs.listdir(self.journal_dir) if segment_lsn(n) is not None), reverse=True
        )
        for n in names:
            data = fs.read_file(os.path.join(self.journal_dir, n))
            try:
                scan_segment(n, data)
            except TornSegment:
                continue
            return n, data
        raise CorruptionError(f"{self.journal_dir} holds no journal segment")

    # -- the interface ----------------------------------------------------------------------

    @property
    def head(self) -> int:
        return self._head

    @property
    def checkpoint_lsn(self) -> int:
        return self._checkpoint_lsn

    def append(self, records: Sequence[bytes], expect_lsn: int) -> int:
        """Write one COMMIT record of ``records`` (encoded transactions) in one write, at LSN
        ``expect_lsn + 1``. Raises LogConflict if ``expect_lsn`` is not the head this log
        knows (the records other processes appended are known once ``read_after`` read
        them: the commit lock holder reads on before it validates); OSError, the segment
        cut back to its last good record; AppendFailed if that failed too."""
        if expect_lsn != self._head:
            raise LogConflict(expect_lsn, self._head)
        w = self._writer
        assert w is not None and w.next_lsn == expect_lsn + 1
        w.append(fmt.RecordType.COMMIT, fmt.encode_group(expect_lsn + 1, list(records)))
        self._head = expect_lsn + 1
        w.next_lsn = self._head + 1
        return self._head

    def read_after(self, lsn: int) -> list[fmt.Commit]:
        """The COMMIT records after ``lsn``. Those this log knows of (from the last read, or
        its segment again) and those other processes appended since: read on from the end
        of the last record known, clearing a torn tail a dead process left (zeros, as the
        segment was preallocated). Before ``resume`` or the first checkpoint: the live
        segment as ``open`` found it. Raises ValueError for an LSN before the checkpoint,
        CorruptionError on a record out of order."""
        if lsn < self._checkpoint_lsn:
            raise ValueError(f"LSN {lsn} is before the checkpoint at {self._checkpoint_lsn}")
        if self._writer is None:  # opened: the live segment as found (None: a new store)
            found = self._found.commits if self._found is not None else []
            return [c for c in found if c.lsn > lsn]
        out: list[fmt.Commit] = []
        if lsn < self._head:
            known = self._known
            if known and known[0].lsn <= lsn + 1 and known[-1].lsn == self._head:
                out = [c for c in known if c.lsn > lsn]
            else:  # read the segment again, from its checkpoint
                out = [c for c in self._read_known() if c.lsn > lsn]
        w = self._writer
        assert w is not None
        new, end, torn = self._read(w.offset, w.next_lsn)
        if new:
            w.next_lsn = new[-1].lsn + 1
            self._head = new[-1].lsn
        w.offset = w.synced = end  # theirs: synced by their writer
        self._synced_head = self._head
        self.torn_cleared = torn
        if torn:  # a record torn by a process that died mid-append
            write_all(self.fs, w.fd, bytes(torn), end)
        out += new
        self._known = out
        return out

    def _read_known(self) -> list[fmt.Commit]:
        """The records of the live segment up to the end of the last one known."""
        w = self._writer
        assert w is not None
        out: list[fmt.Commit] = []
        offset, lsn = self._start, self._checkpoint_lsn + 1
        while offset < w.offset:
            commits, offset, _ = self._read(offset, lsn)
            if not commits:
                raise CorruptionError(f"journal segment {w.path}: records known are gone")
            out += commits
            lsn = commits[-1].lsn + 1
        return out

    def _read(self, offset: int, next_lsn: int) -> tuple[list[fmt.Commit], int, int]:
        w = self._writer
        assert w is not None
        fs, fd = self.fs, w.fd
        tail = read_tail(
            lambda n, off: fs.pread(fd, n, off), os.path.basename(w.path), offset, w.salt, next_lsn
        )
        return tail.commits, tail.end, tail.torn_bytes

    def sync(self) -> None:
        """fdatasync the live segment: the commit point. Raises OSError; the caller must then
        fail the store, never retry (a retried fsync can report success for data the kernel
        already dropped)."""
        assert self._writer is not None
        self._writer.sync()
        self._synced_head = self._head

    def unappend(self) -> None:
        """After a failed ``sync``: erase what was appended since the last good one, so that
        no process, this one included, ever applies it, and sync the erasure; the head goes
        back. Raises OSError if that fails too (the records may then be durable or not)."""
        w = self._writer
        assert w is not None
        w.unappend()
        self._head = self._synced_head
        w.next_lsn = self._head + 1
        self._known = [c for c in self._known if c.lsn <= self._head]
        w.fdatasync_at(w.offset)  # the erasure is durable: the records are gone for good

    def checkpoint(self, next_txid: int) -> int:
        """Checkpoint steps 2 and 3 (``new_segment``, ``drop_segments``). Requires: every
        record is applied and durable in place (step 1). Returns the checkpoint's LSN."""
        lsn = self.new_segment(next_txid)
        self.drop_segments()
        return lsn

    def new_segment(self, next_txid: int) -> int:
        """Checkpoint step 2, ``checkpoint_new_segment``: HEADER + CHECKPOINT at the head's
        next LSN, synced with its directory entry, in the blocks of journal/spare (recycled:
        no space needed) or, without one, allocated. Raises OSError (ENOSPC: nothing
        changed, the old segment stays live)."""
        cp = fmt.Checkpoint(self._head + 1, next_txid)
        dirty, self.spare_dirty = self.spare_dirty, None  # unknown if it fails half-way
        writer = new_segment(
            self.fs,
            self.journal_dir,
            cp,
            sync=self.sync_enabled,
            preallocate=self.preallocate,
            dirty_end=dirty,
        )
        old, self._writer = self._writer, writer
        if old is not None:
            self._bytes_written += old.bytes_written
        if self._old is not None:  # a checkpoint failed before it dropped its old segment
            self._stale.append((self._old.path, self._old.high))
            self._old.close()
        self._old = old
        self._found = None
        self._head = self._checkpoint_lsn = cp.lsn
        self._synced_head = self._head
        self._start = writer.offset
        self._known = []
        return cp.lsn

    def drop_segments(self) -> None:
        """Checkpoint step 3, ``checkpoint_drop_segments``: the old segment becomes the spare
        (or goes), and so do older ones a checkpoint failed to drop; preallocations cut short
        are removed."""
        old, self._old = self._old, None
        if old is not None:
            self._stale.append((old.path, old.high))
            old.close()
        live = self._writer.path if self._writer is not None else ""
        while self._stale:
            path, dirty = self._stale[-1]
            if path != live:
                if retire(self.fs, self.journal_dir, path, keep=self.recycle):
                    self.spare_dirty = dirty
                self.retired += 1
            self._stale.pop()
        for name in self._unfinished:  # a preallocation cut short: never a segment
            with contextlib.suppress(FileNotFoundError):  # reused by new_segment
                self.fs.unlink(os.path.join(self.journal_dir, name))
        self._unfinished = []

    def close(self) -> None:
        if self._old is not None:
            self._old.close()
            self._old = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- what the engine reads of the journal ---------------------------------------------

    @property
    def bytes_written(self) -> int:
        """Bytes appended since open, over every segment."""
        w = self._writer
        return self._bytes_written + (w.bytes_written if w is not None else 0)

    @property
    def segment_bytes(self) -> int:
        """How far the live segment's records reach: a checkpoint is due past a limit."""
        w = self._writer
        return w.offset if w is not None else 0

    @property
    def preallocated_room(self) -> int:
        """Zero-filled bytes left in the live segment: appends there allocate nothing."""
        w = self._writer
        return w.size - w.offset if w is not None else 0


def _segments(
    fs: FileSystem, journal_dir: str, names: list[str] | None = None
) -> list[tuple[int, str]]:
    """(first LSN, name) of the segments in ``journal_dir`` (listed unless ``names``), oldest
    first."""
    if names is None:
        names = fs.listdir(journal_dir)
    lsns = [(segment_lsn(n), n) for n in names]
    return sorted((lsn, n) for lsn, n in lsns if lsn is not None)


def _find_live(fs: FileSystem, journal_dir: str, segs: list[tuple[int, str]]) -> SegmentScan | None:
    """The newest segment that parses (half-created newer ones are dropped by the first
    checkpoint). Raises CorruptionError if an older one is taken for live that does not reach
    where a newer one begins."""
    cut_short: list[int] = []
    for lsn, name in reversed(segs):
        try:
            live = scan_segment(name, fs.read_file(os.path.join(journal_dir, name)))
        except TornSegment:
            cut_short.append(lsn)
            continue
        check_reaches(live, cut_short)
        return live
    check_reaches(None, cut_short)
    return None


def check_reaches(live: SegmentScan | None, cut_short: list[int]) -> None:
    """A segment's creation is cut short only right after the one before it ended: its first
    LSN is that one's next LSN (1 for a new store). A newer segment that does not parse with
    records missing between the live one and it is damage, not a crash."""
    if not cut_short:
        return
    expected = live.next_lsn if live is not None else 1
    if min(cut_short) != expected:
        raise CorruptionError(
            f"journal segment {min(cut_short):016d}.wal does not parse, and the segment before "
            f"it ends at LSN {expected - 1}: the records between are missing (media damage), "
            "not a segment whose creation was cut short"
        )


def _conforms(log: JournalLog) -> CommitLog:
    return log  # mypy checks that JournalLog implements CommitLog
