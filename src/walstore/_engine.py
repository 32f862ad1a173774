"""Engine: the blocking core of a store, run from worker threads.

It owns the journal writer, the applier and the lock, and runs the commit protocol of
docs/commit-protocol.md for one group of transactions at a time. Steps are named as in the doc:

1. ``validate``      check each transaction's paths on disk and its reads for conflicts
2. ``sync_staged``   fsync the staging directories of large values (their files were fsynced
                     when they were staged)
3. ``append_commit`` append one COMMIT record for the whole group, in one write
   ``sync_journal``  fdatasync the journal. This is the commit point.
4. ``apply``         rename every change into place, readers held off by the apply gate
5. ``acknowledge``   hand each transaction its outcome (done by the caller with the results)

``checkpoint`` runs between groups; ``open`` runs recovery.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from . import _journal_format as fmt
from ._apply import SYNCFS_MIN, Applier, remove_tree
from ._conflicts import Conflict, ConflictIndex, GroupEffects, Reads
from ._errors import (
    ConflictError,
    CorruptionError,
    InvalidPathError,
    StoreClosedError,
    StoreError,
    StoreFailedError,
    StoreLockedError,
)
from ._fs import FileStat, FileSystem, NotRegularFileError, write_all
from ._journal_reader import TornSegment, read_tail, scan_segment
from ._journal_writer import (
    NO_SPACE,
    AppendFailed,
    FailStop,
    JournalWriter,
    new_segment,
    retire,
    segment_lsn,
    segment_name,
    synced,
)
from ._limits import PathLimits, limits_of
from ._paths import RESERVED, PathDict, parent, parents
from ._recovery import Recovered, RecoveryReport, recover
from ._shared import (
    SLOT_SHIFT,
    SharedFile,
    SharedHeader,
    boot_id,
    effects_of,
    slot_of,
    staged_dirs,
    touched,
)

log = logging.getLogger("walstore")

_forks = [0]  # bumped in every child of os.fork(): a store opened before it refuses use
os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


@dataclass
class LockTicket:
    """One wait for the commit lock (``Engine.xlock_acquire``); abandoned if the waiter is
    cancelled or times out, in which case the thread releases what it then gets."""

    abandoned: bool = False
    fd: int | None = None


class Durability(enum.Enum):
    """How much a returned commit survives."""

    FULL = "full"  # fsync at every group commit: a returned commit survives power loss
    NORMAL = "normal"  # atomic; on power loss the newest commits may be lost (today: as FULL)
    OFF = "off"  # no fsync: survives a process crash, not a power loss (tests, caches)


class Outcome(enum.Enum):
    COMMITTED = "committed"  # durable in the journal (and applied unless error is set)
    REJECTED = "rejected"  # nothing written: error says why
    UNKNOWN = "unknown"  # the commit record was written but its sync failed


@dataclass(frozen=True, slots=True)
class Move:
    """``tx.move``: resolved at step 2 into a PutStaged of a hard link of ``src``."""

    path: str  # the destination
    src: str


Keep = frozenset[str] | Callable[[str], bool] | None


@dataclass(frozen=True, slots=True)
class PendingReplace:
    """``tx.replace_dir``: resolved at step 2 into a ReplaceDir, kept files linked in."""

    path: str
    entries: tuple[fmt.Put | fmt.PutStaged, ...]
    keep: Keep


TxOp = fmt.Put | fmt.PutStaged | fmt.Delete | fmt.DeleteDir | Move | PendingReplace


@dataclass(frozen=True)
class PreparedTx:
    """A transaction handed to the committer: its ops and what it read, each read with the
    LSN visible when it was made (``_conflicts.py``)."""

    txid: int
    begin_lsn: int
    ops: tuple[TxOp, ...]
    staged: bool = False  # has files under staging/<txid>/
    reads: Reads = field(default_factory=dict)  # files read, or found missing
    listed: Reads = field(default_factory=dict)  # directories listed
    subtrees: Reads = field(default_factory=dict)  # directories read as a whole
    # Files read as a transaction ahead in the group wrote them, by path -> its txid.
    deps: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    lsn: int = 0
    error: BaseException | None = None


@dataclass
class Counters:
    commits: int = 0
    groups: int = 0
    conflicts: int = 0
    checkpoints: int = 0
    journal_bytes: int = 0
    journal_syncs: int = 0


class _Gate:
    """Readers share it; the apply step takes it alone, so no reader sees half a group."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writer = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class _Overlay:
    """Paths as a group's validated transactions leave them, before they are applied."""

    kinds: PathDict = field(default_factory=PathDict)  # path -> "file"/"dir"/None
    cleared: set[str] = field(default_factory=set)  # directories deleted or replaced


@dataclass
class _Validation:
    """Effects of the transactions validated so far in a group."""

    overlay: _Overlay = field(default_factory=_Overlay)
    effects: GroupEffects = field(default_factory=GroupEffects)  # for conflict checks
    disk_dirs: set[str] = field(default_factory=set)  # seen on disk as directories
    # (txid, op index) of the puts whose target is a file when they are applied: apply
    # exchanges those into place without looking the target up again.
    replacing: set[tuple[int, int]] = field(default_factory=set)


def _collides(rel: str, names: set[str]) -> bool:
    """Whether ``rel`` is one of ``names``, or a directory above or below one of them."""
    return rel in names or any(n.startswith(rel + "/") or rel.startswith(n + "/") for n in names)


# A checkpoint is due once old versions and staged values kept until it hold this much.
GARBAGE_BYTES = 256 << 20
# A checkpoint that found no space is tried again after this many seconds (or when called).
CHECKPOINT_RETRY = 1.0
_BLOCK = 4096  # what a new file or directory entry may cost on disk, beyond its data
# A commit looks at free space again (statvfs) after this many groups, or once the groups
# since the last look may have used an eighth of what was left above the reserve; between
# looks it counts down from the last one (a look cost 11-18 µs of a 1 KiB commit's ~1 ms).
SPACE_LOOK_EVERY = 64


def reserve_for(total: int) -> int:
    """Free bytes that commits and staging leave to recovery, checkpoints and deletes: 1/64
    of the file system, at least 1 MiB, at most 64 MiB."""
    return min(64 << 20, max(1 << 20, total // 64))


def _space_needed(ops: tuple[TxOp, ...]) -> int:
    """About what applying ``ops`` allocates on disk after the commit point: a block per new
    file or directory entry and the inline values' data. Deletes need nothing."""
    need = 0
    for op in ops:
        if isinstance(op, fmt.Put):
            need += _BLOCK + -(-len(op.data) // _BLOCK) * _BLOCK
        elif isinstance(op, fmt.ReplaceDir | PendingReplace):
            need += _BLOCK + sum(
                _BLOCK + (-(-len(e.data) // _BLOCK) * _BLOCK if isinstance(e, fmt.Put) else 0)
                for e in op.entries
            )
        elif not isinstance(op, fmt.Delete | fmt.DeleteDir):
            need += _BLOCK
    return need


def _no_space(exc: OSError) -> bool:
    return exc.errno in NO_SPACE and not isinstance(exc, FailStop)


def no_space_error(what: str, free: int, need: int, reserve: int) -> OSError:
    return OSError(
        errno.ENOSPC,
        f"no space for {what}: {free} bytes free on the store's file system, it needs about "
        f"{need} and {reserve} stay in reserve for recovery, checkpoints and deletes; delete "
        "files (and checkpoint) or free space on the disk",
    )


class Engine:
    """The blocking core. Every method runs in a worker thread, never on the event loop."""

    def __init__(
        self,
        fs: FileSystem,
        root: str,
        durability: Durability,
        *,
        checkpoint_bytes: int = 8 << 20,
        checkpoint_files: int = 20_000,
        syncfs_min: int | None = SYNCFS_MIN,
        exclusive: bool = True,
    ) -> None:
        self.fs = fs
        self.root = os.path.abspath(root)
        self.meta = os.path.join(self.root, RESERVED)
        self.journal_dir = os.path.join(self.meta, "journal")
        self.staging_dir = os.path.join(self.meta, "staging")
        self.durability = durability
        self.sync = durability is not Durability.OFF
        self.checkpoint_bytes = checkpoint_bytes
        self.checkpoint_files = checkpoint_files
        self.syncfs_min = syncfs_min  # checkpoints of this many changes use syncfs; None: never
        # Segments are zero-filled to about where the next checkpoint starts a new one, so
        # commits overwrite allocated blocks (their fdatasync then writes data only).
        size = min(checkpoint_bytes + min(checkpoint_bytes, 1 << 20), 65 << 20)
        hint = getattr(fs, "journal_preallocation", None)  # a simulated disk keeps it small
        self.preallocate = (size if hint is None else min(size, int(hint))) if self.sync else 0
        self.counters = Counters()
        self.failed: StoreFailedError | None = None
        self.partial = False  # a group is half applied: reads would show half of it
        self.next_txid = 1
        self.last_lsn = 0  # LSN of the last applied COMMIT (or checkpoint)
        self._lock = threading.Lock()  # the commit lock: groups, checkpoints, close
        self._gate = _Gate()
        self._lock_fd: int | None = None
        self._journal: JournalWriter | None = None
        self._applier = Applier(fs, self.root, self.staging_dir)
        self._real_root = self.root
        self._dev = 0  # the device of the root and .walstore/ (every rename starts there)
        self._mounts: frozenset[str] = frozenset()  # mount points below the root, at open
        self.conflicts = ConflictIndex()  # what each commit changed, for validation
        self.free: int | None = None  # free bytes at the last look (free_space), None: not yet
        self._spent = 0  # bytes the groups admitted since the last look may allocate
        self._groups_unlooked = 0  # groups admitted since the last look
        self.reserve = 1 << 20  # reserve_for() the file system's size, at the last look
        self._spare_dirty: int | None = None  # how far old records in journal/spare reach
        self._stale: list[str] = []  # retired segments a checkpoint failed to rename or unlink
        self._checkpoint_retry = 0.0  # monotonic time before which no checkpoint is due
        # Several processes (``_shared.py``); exclusive: the LOCK is held for life instead.
        self.exclusive = exclusive
        self.lock_path = os.path.join(self.meta, "LOCK")
        self.gate_path = os.path.join(self.meta, "GATE")
        self._shared: SharedFile | None = None
        self._header: SharedHeader | None = None
        self._slot_fd: int | None = None
        self._slot_path = ""
        self._xlock_fd: int | None = None  # the commit lock, while this process holds it
        self._xmutex = threading.Lock()
        self._forks = _forks[0]
        # Paths other processes changed, for the Store to drop from its read cache (files,
        # trees); cache_stale: drop everything.
        self.foreign: list[tuple[set[str], set[str]]] = []
        self.cache_stale = False
        self.limits = PathLimits()  # the file system's, once open

    # -- open and close ------------------------------------------------------------------

    def open(self, *, create: bool, readonly: bool) -> RecoveryReport:
        """Step 1, recover_lock, then recovery (or, read-only, just check it is a store)."""
        fs = self.fs
        if readonly or not create:
            if fs.lstat(self.journal_dir) is None:
                raise StoreError(f"{self.root} is not a walstore store (no {RESERVED}/journal)")
        else:
            self._make_layout()
        self._real_root = fs.realpath(self.root)
        # From here every path under the root is resolved beneath it, through no symlink
        # (the resolution rule, _fs.py): commits, apply, recovery, checkpoints and reads.
        fs.confine(self.root)
        self.limits = limits_of(fs, self.root, self.staging_dir)
        if readonly:
            return RecoveryReport()
        try:
            self._check_mounts_at_open()
            if not self.exclusive:
                return self._open_shared()
            lock_fd = fs.lock(self.lock_path)
        except BaseException:
            fs.release(self.root)
            raise
        if lock_fd is None:
            fs.release(self.root)
            raise StoreLockedError(self._holder_message())
        try:
            alive = self._live_slots()
            if alive:
                raise StoreLockedError(
                    f"store {self.root} is open in {len(alive)} other process(es) (shared): "
                    "exclusive=True needs it to itself"
                )
            fs.truncate(lock_fd, 0)
            write_all(fs, lock_fd, f"{os.getpid()}\n".encode(), 0)
            rec = recover(
                fs,
                self.root,
                self.journal_dir,
                self.staging_dir,
                sync=self.sync,
                preallocate=self.preallocate,
                fs_fd=lock_fd,
                syncfs_min=self.syncfs_min,
            )
        except BaseException:
            fs.unlock(lock_fd)
            fs.release(self.root)
            raise
        self._lock_fd = lock_fd
        self._adopt(rec)
        return rec.report

    def _adopt(self, rec: Recovered) -> None:
        self._journal = rec.journal
        self._applier = rec.applier
        self.next_txid = rec.next_txid
        self.last_lsn = rec.last_lsn
        self._spare_dirty = rec.spare_dirty
        if not rec.report.clean:
            log.info("recovered %s: %s", self.root, rec.report)

    # -- several processes (``_shared.py``) -------------------------------------------------

    def check_fork(self) -> None:
        if _forks[0] != self._forks:
            raise StoreError(
                f"store {self.root} was opened before os.fork(): a child process must open "
                "the store itself (with gunicorn --preload, open it after the fork)"
            )

    # Fairness: a process waiting for the commit lock holds GATE while it waits, and a
    # process takes GATE before LOCK, so one that just released LOCK cannot take it again
    # before the waiter (flock hands a released lock to whoever asks first, not in order).

    def xlock_try(self) -> bool:
        """Take the commit lock if it and its gate are free, without waiting (on the event
        loop)."""
        gate = self.fs.lock(self.gate_path)
        if gate is None:
            return False
        try:
            fd = self.fs.lock(self.lock_path)
        finally:
            self.fs.unlock(gate)
        if fd is None:
            return False
        self._xlock_fd = fd
        return True

    def xlock_acquire(self, ticket: LockTicket) -> None:
        """Wait for the commit lock, in turn (in a worker thread the waiter may abandon)."""
        gate = self.fs.lock(self.gate_path, wait=True)
        try:
            fd = self.fs.lock(self.lock_path, wait=True)
        finally:
            if gate is not None:
                self.fs.unlock(gate)
        assert fd is not None
        with self._xmutex:
            if ticket.abandoned:
                self.fs.unlock(fd)
                return
            ticket.fd = self._xlock_fd = fd

    def xlock_abandon(self, ticket: LockTicket) -> None:
        with self._xmutex:
            ticket.abandoned = True
            if ticket.fd is not None and self._xlock_fd == ticket.fd:
                self._xlock_fd = None
                self.fs.unlock(ticket.fd)

    def xlock_release(self) -> None:
        fd, self._xlock_fd = self._xlock_fd, None
        if fd is not None:
            self.fs.unlock(fd)

    def _assert_xlock(self) -> None:
        assert self.exclusive or self._xlock_fd is not None, "REQUIRES: commit lock held"

    def holder_message(self) -> str:
        header = self._shared.read() if self._shared is not None else None
        pid = header.holder_pid if header is not None else "?"
        return (
            f"store {self.root}: the commit lock is held by another process (last holder: "
            f"pid {pid}) past lock_timeout"
        )

    def shared_applied(self) -> int:
        """The last LSN applied by any process (0 if unknown); read outside the lock."""
        header = self._shared.read() if self._shared is not None else None
        return header.applied_lsn if header is not None else 0

    def _live_slots(self) -> set[int]:
        """Slots of the processes that have the store open (shared), from the files of
        ``procs/`` whose lock is held. Requires: commit lock held."""
        fs = self.fs
        procs = os.path.join(self.meta, "procs")
        alive: set[int] = set()
        if fs.lstat(procs) is None:
            return alive
        for name in fs.listdir(procs):
            if not name.isdigit():
                continue
            fd = fs.lock(os.path.join(procs, name))
            if fd is None:
                alive.add(int(name))
            else:
                fs.unlock(fd)
        return alive

    def _drop_dead_slots(self, alive: set[int]) -> None:
        """Remove the ``procs/`` files of processes that died with the store open."""
        procs = os.path.join(self.meta, "procs")
        for name in self.fs.listdir(procs):
            if name.isdigit() and int(name) not in alive:
                path = os.path.join(procs, name)
                if path != self._slot_path:
                    with suppress(FileNotFoundError):
                        self.fs.unlink(path)

    def _open_shared(self) -> RecoveryReport:
        """Open beside other processes: under the commit lock, recover in full if no other
        process has the store open (or the shared header is from another boot), else join
        the live segment. Then take a slot for life."""
        fs = self.fs
        procs = os.path.join(self.meta, "procs")
        if fs.lstat(procs) is None:
            with suppress(FileExistsError):
                fs.mkdir(procs)
        if self._xlock_fd is None and not self.xlock_try():  # Store's open waits for it
            raise StoreLockedError(self.holder_message())
        lock_fd = self._xlock_fd
        assert lock_fd is not None
        shared: SharedFile | None = None
        try:
            # The last opener's pid, for `walstore info` (and a holder the open waits for).
            fs.truncate(lock_fd, 0)
            write_all(fs, lock_fd, f"{os.getpid()}\n".encode(), 0)
            shared = self._shared = SharedFile(fs, os.path.join(self.meta, "shared"))
            header = shared.read()
            alive = self._live_slots()
            boot = boot_id()
            if header is None or header.boot != boot or not alive:
                rec = recover(
                    fs,
                    self.root,
                    self.journal_dir,
                    self.staging_dir,
                    sync=self.sync,
                    preallocate=self.preallocate,
                    fs_fd=shared.fd,
                    syncfs_min=self.syncfs_min,
                )
                self._adopt(rec)
                report = rec.report
                slot = rec.next_txid >> SLOT_SHIFT
                next_slot = slot + 1
                if header is not None and header.boot == boot:
                    next_slot = max(next_slot, header.next_slot)
                assert self._journal is not None
                header = SharedHeader(
                    boot, self._journal.checkpoint_lsn, self.last_lsn, next_slot, os.getpid()
                )
            else:
                slot = header.next_slot
                report = self._join(header, alive)
                self.next_txid = (slot << SLOT_SHIFT) | 1
                header = self._header or header
                header = header.advanced(next_slot=slot + 1, applied_lsn=self.last_lsn)
            self._slot_path = os.path.join(procs, str(slot))
            slot_fd = fs.lock(self._slot_path)
            if slot_fd is None:
                raise StoreError(f"slot {slot} of {self.root} is taken: {procs} was changed")
            self._slot_fd = slot_fd
            write_all(fs, slot_fd, f"{os.getpid()}\n".encode(), 0)
            self._write_header(header)
            self._drop_dead_slots(alive)
        except BaseException:
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            if shared is not None:
                shared.close()
                self._shared = None
            self.xlock_release()
            raise
        self.xlock_release()
        if not report.clean:
            log.info("opened %s beside other processes: %s", self.root, report)
        return report

    def _write_header(self, header: SharedHeader) -> None:
        assert self._shared is not None
        self._header = header
        self._shared.write(header)

    def _live_segment(self, header: SharedHeader) -> tuple[str, bytes]:
        """The live segment's name and content: the one the header names, or (a checkpoint
        that died before creating it) the newest one that parses."""
        fs = self.fs
        name = segment_name(header.segment_lsn)
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

    def _join(self, header: SharedHeader, alive: set[int]) -> RecoveryReport:
        """Open the live segment beside the processes in ``alive``: finish the commits a
        dead holder left unapplied, clear a torn tail and the staging of dead processes.
        Requires: commit lock held."""
        fs = self.fs
        name, data = self._live_segment(header)
        scan = scan_segment(name, data)
        path = os.path.join(self.journal_dir, name)
        fd = fs.open(path)
        self._journal = JournalWriter.resume(
            fs, path, fd, scan, offset=scan.valid_end, next_lsn=scan.next_lsn
        )
        self._header = header
        unapplied = self._take_in(scan.commits, header.applied_lsn)
        if scan.torn_bytes:
            write_all(fs, fd, bytes(scan.torn_bytes), scan.valid_end)
        keep = {d for c in scan.commits for d in staged_dirs(c)}
        orphans = 0
        for entry in fs.listdir(self.staging_dir):
            slot = slot_of(entry)
            if slot is None or slot in alive or entry.split("-")[0] in keep:
                continue
            orphans += remove_tree(fs, os.path.join(self.staging_dir, entry))
        self.last_lsn = scan.next_lsn - 1
        return RecoveryReport(
            rolled_forward=tuple(tx.txid for c in unapplied for tx in c.txs),
            torn_bytes=scan.torn_bytes,
            orphans_removed=orphans,
        )

    def _take_in(self, commits: list[fmt.Commit], applied: int) -> list[fmt.Commit]:
        """Records other processes appended: apply those above ``applied`` (their writer
        died after the commit point), and note all of them as this process's own (conflict
        index, read cache, what the next checkpoint syncs and drops). Returns the applied."""
        unapplied = [c for c in commits if c.lsn > applied]
        if unapplied and self.sync:
            assert self._journal is not None
            self._journal.sync()  # its writer may have died before its fdatasync
        with self._gate.write():
            for c in commits:
                for tx in c.txs:
                    if c.lsn > applied:
                        self._applier.apply(tx.txid, tx.ops, replay=True)
                    self._applier.note_foreign(tx.txid, tx.ops)
                self.conflicts.observe(c.lsn, effects_of(c))
                self.foreign.append(touched(c))
                self.last_lsn = c.lsn
        self._applier.drop_replaced()
        if unapplied:
            log.info("applied %d commit(s) a dead process left unapplied", len(unapplied))
        return unapplied

    def _catch_up(self) -> None:
        """Take in what other processes committed since this one last held the commit lock.
        Requires: commit lock held."""
        self._assert_xlock()
        if self.exclusive:
            return
        assert self._shared is not None and self._journal is not None
        header = self._shared.read() or self._header
        assert header is not None
        j = self._journal
        self._read_on(j, header)
        if header.segment_lsn != j.checkpoint_lsn:
            self._follow(header)
            j = self._journal
            header = self._shared.read() or header
        if self._header is None or header.applied_lsn < self.last_lsn:
            self._write_header(header.advanced(applied_lsn=self.last_lsn))
        else:
            self._header = header

    def _read_on(self, j: JournalWriter, header: SharedHeader) -> None:
        """Take in the records after ``j.offset`` of ``j``'s segment."""
        fs = self.fs
        tail = read_tail(
            lambda n, off: fs.pread(j.fd, n, off),
            os.path.basename(j.path),
            j.offset,
            j.salt,
            j.next_lsn,
        )
        if tail.commits:
            # Commits of a segment that a checkpoint has since closed are all applied.
            same = header.segment_lsn == j.checkpoint_lsn
            self._take_in(tail.commits, header.applied_lsn if same else 1 << 63)
            j.next_lsn = tail.commits[-1].lsn + 1
        j.offset = tail.end
        if tail.torn_bytes:  # a record torn by a process that died mid-append
            write_all(fs, j.fd, bytes(tail.torn_bytes), tail.end)

    def _follow(self, header: SharedHeader) -> None:
        """Another process took a checkpoint: append to its new segment from now on."""
        fs = self.fs
        old = self._journal
        assert old is not None
        name, data = self._live_segment(header)
        if os.path.join(self.journal_dir, name) == old.path:
            return  # the checkpoint died before its segment existed
        scan = scan_segment(name, data)
        if scan.checkpoint.lsn > old.next_lsn:
            # A segment in between came and went: its commits are unknown here.
            self.conflicts.barrier = scan.checkpoint.lsn
            self.cache_stale = True
        self._applier.forget_all()  # the checkpoint made all of it durable, dropped garbage
        path = os.path.join(self.journal_dir, name)
        fd = fs.open(path)
        self._journal = JournalWriter.resume(
            fs, path, fd, scan, offset=scan.checkpoint_end, next_lsn=scan.checkpoint.lsn + 1
        )
        self._journal.bytes_written = old.bytes_written
        old.close()
        self.last_lsn = max(self.last_lsn, scan.checkpoint.lsn)
        self._read_on(self._journal, header)

    def _check_mounts_at_open(self) -> None:
        """Commits rename from ``staging/`` into place, which works within one mount only: the
        root and its ``.walstore/`` must be one, and changes at or under a mount point below
        the root are refused (``_check_mount_points``, and ``_kind`` for mounts made later)."""
        fs = self.fs
        devs: dict[str, int] = {}
        for d in (self._real_root, self.meta, self.journal_dir, self.staging_dir):
            st = fs.lstat(d)
            if st is not None and st.kind != "dir":  # a symlink could lead to another mount
                raise StoreError(
                    f"{d} is a {st.kind}, not a directory: the store's root and {RESERVED}/ "
                    "must be real directories on one mount (commits rename between them)"
                )
            if st is not None:
                devs[d] = st.dev
        self._dev = devs.get(self._real_root, 0)
        other = [d for d, dev in devs.items() if dev != self._dev]
        mounts = [os.path.relpath(m, self._real_root) for m in fs.mount_points(self._real_root)]
        inside = [os.path.join(self.root, m) for m in mounts if m.split(os.sep)[0] == RESERVED]
        if other or inside:
            raise StoreError(
                f"{(other or inside)[0]} is on another file system or mount than the store's "
                f"root {self.root}: walstore commits by renaming from {RESERVED}/staging into "
                "place, which cannot cross mounts"
            )
        self._mounts = frozenset(mounts)

    def _check_mount_points(self, op: TxOp) -> None:
        """Step 1: refuse an op at or under a mount point below the root (any file system,
        bind mounts too), or a directory op with one inside it."""
        for p in (op.path, op.src) if isinstance(op, Move) else (op.path,):
            for a in (p, *parents(p)):
                if a in self._mounts:
                    raise InvalidPathError(_across_mounts(a))
        if isinstance(op, fmt.DeleteDir | fmt.ReplaceDir | PendingReplace):
            for m in self._mounts:
                if m.startswith(op.path + "/"):
                    raise InvalidPathError(_across_mounts(m))

    def _holder_message(self) -> str:
        try:
            pid = self.fs.read_file(os.path.join(self.meta, "LOCK")).decode().strip()
        except (OSError, UnicodeDecodeError):
            pid = "?"
        if pid == str(os.getpid()):
            return (
                f"store {self.root} is locked by pid {pid}, this process's own: most likely "
                "it is already open in this process (a store opened earlier and not closed "
                "holds its LOCK until await store.aclose() or the process exits)"
            )
        return f"store {self.root} is locked by another process (pid {pid or '?'})"

    def _make_layout(self) -> None:
        fs = self.fs
        for d in (self.root, self.meta, self.journal_dir, self.staging_dir):
            st = fs.lstat(d)
            if st is None:
                with suppress(FileExistsError):
                    fs.mkdir(d)
            elif st.kind != "dir":
                raise StoreError(f"{d} exists and is not a directory")
        if self.sync:
            # Every time, not only when made: a first open that crashed after its mkdirs
            # left them unsynced, and a store last used with Durability.OFF left its live
            # segment's name unsynced; this open cannot tell.
            for d in (os.path.dirname(self.root), self.root, self.meta, self.journal_dir):
                fs.fsync_dir(d)

    def close(self) -> None:
        """Checkpoint if anything was committed, release the LOCK. Requires: no group runs."""
        with self._lock:
            shared = self._shared is not None and self._forks == _forks[0]
            try:
                if shared and self._journal is not None:
                    ticket = LockTicket()
                    self.xlock_acquire(ticket)
                    self._catch_up()
                j = self._journal
                if j is not None and self.failed is None and j.next_lsn > j.checkpoint_lsn + 1:
                    try:
                        self._checkpoint_locked()
                    except OSError as exc:
                        if not _no_space(exc):
                            raise
                        # Nothing is at risk: the journal holds every commit and the next
                        # open recovers from it, without new space (journal/spare).
                        log.warning("store %s closed without a checkpoint: %s", self.root, exc)
            finally:
                if self._journal is not None:
                    self._journal.close()
                    self._journal = None
                if self._lock_fd is not None:
                    self.fs.unlock(self._lock_fd)
                    self._lock_fd = None
                if self._slot_fd is not None:
                    if shared:
                        with suppress(FileNotFoundError):
                            self.fs.unlink(self._slot_path)
                    self.fs.unlock(self._slot_fd)
                    self._slot_fd = None
                if self._shared is not None:
                    self._shared.close()
                    self._shared = None
                if shared:
                    self.xlock_release()
                self.fs.release(self.root)

    # -- staging -------------------------------------------------------------------------

    def stage(self, txid: int, index: int, data: bytes, make_dir: bool) -> fmt.PutStaged:
        """Write a large value to ``staging/<txid>/<index>`` and fsync it (outside the commit
        lock, so many transactions stage in parallel). Returns the op without its path. Raises
        OSError ENOSPC if it would eat into the reserve (nothing written)."""
        self.check_space(len(data))
        if make_dir:
            self.make_staging_dir(txid)
        name = f"{txid}/{index}"
        fd = self.fs.open(os.path.join(self.staging_dir, name), create=True, truncate=True)
        try:
            write_all(self.fs, fd, data, 0)
            if self.sync:
                self.fs.fsync(fd)
        finally:
            self.fs.close(fd)
        return fmt.PutStaged("", name, len(data), zlib.crc32(data))

    def look_at_space(self) -> tuple[int, int]:
        """(free bytes, reserve) of the store's file system now; remembered for the checkpoint
        triggers and ``walstore info``."""
        free, total = self.fs.free_space(self.meta)
        self.free, self.reserve = free, reserve_for(total)
        self._spent = self._groups_unlooked = 0
        return free, self.reserve

    def check_space(self, size: int, what: str = "this value") -> None:
        """Raise OSError ENOSPC if writing ``size`` bytes would leave less than the reserve."""
        free, reserve = self.look_at_space()
        if free - size - _BLOCK < reserve:
            raise no_space_error(what, free, size + _BLOCK, reserve)

    def make_staging_dir(self, txid: int) -> str:
        """``staging/<txid>/`` (made if missing); returns its path."""
        d = os.path.join(self.staging_dir, str(txid))
        with contextlib.suppress(FileExistsError):
            self.fs.mkdir(d)
        return d

    def discard(self, txid: int) -> None:
        """Remove what a rolled-back transaction staged."""
        remove_tree(self.fs, os.path.join(self.staging_dir, str(txid)))

    # -- the commit protocol -------------------------------------------------------------

    def commit_group(self, group: list[PreparedTx], oldest_begin: int) -> list[Result]:
        """Run steps 1-4 for a group, in one worker call. ``oldest_begin`` is the smallest
        begin LSN of any open transaction (older conflict records are dropped).

        Under ``fs.hold()``: each directory the group's paths go through is resolved
        (beneath the root, through no symlink) once for the group instead of at every call;
        dropped when the group renames or removes it, closed when the group ends."""
        with self._lock, self.fs.hold():
            if self.failed is not None:
                err = StoreFailedError(f"store failed earlier: {self.failed}")
                return [Result(Outcome.REJECTED, error=err) for _ in group]
            if self._journal is None:
                closed = StoreClosedError(f"store {self.root} is closed")
                return [Result(Outcome.REJECTED, error=closed) for _ in group]
            # Step 0: catch_up on what other processes committed (``_shared.py``)
            try:
                self._catch_up()
            except OSError as exc:
                return [Result(Outcome.REJECTED, error=exc) for _ in group]
            except CorruptionError as exc:
                self._fail(f"the journal is damaged: {exc}", exc)
                return [Result(Outcome.REJECTED, error=exc) for _ in group]
            journal = self._journal
            lsn = journal.next_lsn
            results: list[Result | None] = [None] * len(group)

            # Step 1: validate
            state = _Validation()
            for i, tx in enumerate(group):
                try:
                    self._validate(tx, state)
                except (InvalidPathError, ConflictError, OSError) as exc:
                    if isinstance(exc, ConflictError):
                        self.counters.conflicts += 1
                    results[i] = Result(Outcome.REJECTED, error=exc)

            try:
                self._check_group_space(group, results, journal)
            except FailStop as exc:  # nothing is committed, but a failed sync is never retried
                self._fail(f"sync before the commit point failed: {exc}", exc)
                return self._fill(results, Result(Outcome.REJECTED, error=exc))

            # Step 2: sync_staged (moved and kept files are linked into staging first)
            resolved: dict[int, tuple[fmt.Op, ...]] = {}
            staged: list[int] = []
            for i, tx in enumerate(group):
                if results[i] is not None or not tx.ops:
                    continue
                try:
                    resolved[i] = self._link_sources(tx)
                except (InvalidPathError, OSError) as exc:
                    results[i] = Result(Outcome.REJECTED, error=exc)
                    continue
                if tx.staged or resolved[i] is not tx.ops:
                    staged.append(tx.txid)
            writers = [(group[i].txid, ops) for i, ops in resolved.items() if results[i] is None]
            if not writers:
                return self._fill(results, Result(Outcome.COMMITTED, self.last_lsn))
            try:
                if self.sync and staged:
                    for txid in staged:
                        self.fs.fsync_dir(os.path.join(self.staging_dir, str(txid)))
                    self.fs.fsync_dir(self.staging_dir)
            except OSError as exc:
                # Nothing is committed, but a failed fsync is never retried: what it covered
                # may be lost while a retry reports success (fsyncgate).
                self._fail(f"staging fsync failed: {exc}", exc)
                return self._fill(results, Result(Outcome.REJECTED, error=exc))
            # Step 3: append_commit. Each transaction is encoded on its own, so that one the
            # record cannot hold (the op calls and the store refuse those first; this is the
            # last line) is refused alone, before the commit point, and the others go on.
            parts: list[bytes] = []
            size = fmt.GROUP_HEADER_SIZE
            for i, ops in resolved.items():
                if results[i] is not None:
                    continue
                txid = group[i].txid
                try:
                    part = fmt.encode_tx(fmt.TxRecord(txid, ops))
                except (struct.error, OverflowError, UnicodeEncodeError) as exc:
                    results[i] = Result(Outcome.REJECTED, error=_unrecordable(txid, exc))
                    continue
                if size + len(part) > fmt.MAX_PAYLOAD:
                    big = InvalidPathError(
                        f"txid={txid}: its {len(part)} bytes do not fit the commit record"
                    )
                    results[i] = Result(Outcome.REJECTED, error=big)
                    continue
                parts.append(part)
                size += len(part)
            writers = [(group[i].txid, ops) for i, ops in resolved.items() if results[i] is None]
            if not writers:
                return self._fill(results, Result(Outcome.COMMITTED, self.last_lsn))
            try:
                payload = fmt.encode_group(lsn, parts)
                journal.append(fmt.RecordType.COMMIT, payload)
            except OSError as exc:
                return self._fill(results, Result(Outcome.REJECTED, error=exc))
            except AppendFailed as exc:
                self._fail(f"journal append failed and could not be undone: {exc}", exc)
                err = StoreFailedError(f"commit outcome unknown: {exc}")
                return self._fill(results, Result(Outcome.UNKNOWN, error=err))
            # Step 3: sync_journal. This is the commit point.
            try:
                if self.sync:
                    journal.sync()
                    self.counters.journal_syncs += 1
            except OSError as exc:
                self._fail(f"journal fdatasync failed: {exc}", exc)
                err = StoreFailedError(
                    f"commit outcome unknown: the journal sync failed ({exc}); "
                    "reopen the store to learn whether it committed"
                )
                err.__cause__ = exc
                return self._fill(results, Result(Outcome.UNKNOWN, error=err))
            journal.next_lsn = lsn + 1

            # Step 4: apply
            applied = False
            try:
                with self._gate.write():
                    # Step 1 looked these up already: apply need not lstat them again.
                    self._applier.forget_dir_cache(known=state.disk_dirs)
                    for txid, ops in writers:
                        self._applier.apply(txid, ops, replacing=state.replacing)
                    for txid in staged:  # dropped at the next checkpoint
                        self._applier.garbage.add(os.path.join(self.staging_dir, str(txid)))
                    self.last_lsn = lsn
                    # Still under the gate: whoever saw this group's files sees it here too
                    # (the early check on the event loop relies on it).
                    self.conflicts.observe(lsn, state.effects)
                    if self._header is not None:  # other processes: it is applied
                        self._write_header(self._header.advanced(applied_lsn=lsn))
                applied = True
                self._applier.drop_replaced()
            except OSError as exc:
                self.partial = not applied
                self._fail(f"apply failed after the commit point: {exc}", exc)
                err = StoreFailedError(
                    f"committed (journal LSN {lsn}) and applied, but an old file could not be "
                    f"removed: {exc}; reopen the store to recover"
                    if applied
                    else f"committed (journal LSN {lsn}) but not applied: {exc}; "
                    "reopen the store to finish applying it"
                )
                err.__cause__ = exc
                return self._fill(results, Result(Outcome.COMMITTED, lsn, err))
            self.conflicts.prune(oldest_begin)
            self.counters.groups += 1
            self.counters.commits += len(writers)
            self.counters.journal_bytes = journal.bytes_written
            for txid, ops in writers:
                log.debug("txid=%d committed lsn=%d ops=%d", txid, lsn, len(ops))
            return self._fill(results, Result(Outcome.COMMITTED, lsn))

    def _check_group_space(
        self, group: list[PreparedTx], results: list[Result | None], journal: JournalWriter
    ) -> None:
        """Step 1, space: refuse (ENOSPC, rolled back) each transaction whose apply would eat
        into the reserve, so that nothing after the commit point runs out of space and every
        replay of the journal finds the space its puts need. Deletes always pass; the journal
        appends into its preallocated segment, and past it counts the record too."""
        needs = [(i, _space_needed(tx.ops)) for i, tx in enumerate(group) if results[i] is None]
        total = sum(n for _, n in needs)
        if not total:
            return
        try:
            last = self.free
            if (
                last is None
                or self._groups_unlooked >= SPACE_LOOK_EVERY
                or (self._spent + total) * 8 > last - self.reserve
            ):
                free, reserve = self.look_at_space()
            else:
                free, reserve = last - self._spent, self.reserve
            a = self._applier
            if free - reserve < 2 * total and self.sync and (a.dirty_files or a.dirty_dirs):
                # Checkpoint step 1, early: the file system may hold back blocks for data not
                # yet written back (XFS reserves tens of KiB per small file until then: a
                # 48 MiB disk looked full at 15 MiB). Its sync errors fail the store.
                lock_fd = self._lock_fd
                synced(lambda: a.sync(lock_fd))
                free, reserve = self.look_at_space()
        except FailStop:
            raise
        except OSError as exc:
            for i, n in needs:
                if n:
                    results[i] = Result(Outcome.REJECTED, error=exc)
            return
        left = free - reserve
        room = journal.size - journal.offset  # preallocated journal bytes left
        for i, n in needs:
            if not n:
                continue
            room -= n
            cost = n if room >= 0 else 2 * n  # past the preallocation the record takes space
            if cost > left:
                err = no_space_error("this transaction", free, cost, reserve)
                results[i] = Result(Outcome.REJECTED, error=err)
            else:
                left -= cost
                self._spent += cost
        self._groups_unlooked += 1

    def _link_sources(self, tx: PreparedTx) -> tuple[fmt.Op, ...]:
        """Step 2 for one transaction: hard-link the source of each move and each file a
        directory replacement keeps into ``staging/<txid>/``, fsynced, so that the commit
        record can name them as staged values. Returns ``tx.ops`` itself if none."""
        if not any(isinstance(op, Move | PendingReplace) for op in tx.ops):
            return tx.ops  # type: ignore[return-value]
        d = os.path.join(self.staging_dir, str(tx.txid))
        if self.fs.lstat(d) is None:
            self.fs.mkdir(d)
        out: list[fmt.Op] = []
        for i, op in enumerate(tx.ops):
            if isinstance(op, Move):
                out.append(self._link(op.src, f"{tx.txid}/m{i}", op.path))
            elif isinstance(op, PendingReplace):
                entries = list(op.entries)
                named = {e.path for e in entries}
                for j, rel in enumerate(self._kept(op)):
                    if not _collides(rel, named):  # what the new directory holds wins
                        entries.append(self._link(f"{op.path}/{rel}", f"{tx.txid}/k{i}-{j}", rel))
                out.append(fmt.ReplaceDir(op.path, tuple(entries)))
            else:
                out.append(op)
        return tuple(out)

    def _link(self, src: str, name: str, as_path: str) -> fmt.PutStaged:
        full = self._applier.full(src)
        st = self._lstat(src)
        if st is None:
            raise FileNotFoundError(2, "No such file or directory", src)
        if st.kind != "file":
            raise InvalidPathError(f"cannot move or keep {src!r}: not a regular file")
        staged = os.path.join(self.staging_dir, name)
        try:  # resolved again: it may have moved behind a symlink since the lstat
            self.fs.link(full, staged)
        except OSError as exc:
            raise _refused(exc, src) from None
        if self.sync:  # it may hold data applied since the last checkpoint, not yet synced
            fd = self.fs.open(staged)
            try:
                self.fs.fsync(fd)
            finally:
                self.fs.close(fd)
        return fmt.PutStaged(as_path, name, st.size, 0)

    def _kept(self, op: PendingReplace) -> list[str]:
        """Files of the existing directory that ``op.keep`` carries over, relative paths."""
        if op.keep is None:
            return []
        base = self._applier.full(op.path)
        st = self._lstat(op.path)
        if st is None or st.kind != "dir":
            return []
        out: list[str] = []
        for name in sorted(self.fs.listdir(base)):
            if not (op.keep(name) if callable(op.keep) else name in op.keep):
                continue
            stack = [name]
            while stack:
                rel = stack.pop()
                kind = self.fs.lstat(os.path.join(base, rel))
                if kind is not None and kind.kind == "dir":
                    stack += [f"{rel}/{c}" for c in self.fs.listdir(os.path.join(base, rel))]
                elif kind is not None and kind.kind == "file":
                    out.append(rel)
        return out

    @staticmethod
    def _fill(results: list[Result | None], value: Result) -> list[Result]:
        return [value if r is None else r for r in results]

    def _fail(self, message: str, exc: BaseException) -> None:
        log.error("store %s failed: %s", self.root, message)
        self.failed = StoreFailedError(message)
        self.failed.__cause__ = exc

    def _kind(self, path: str, state: _Validation, local: _Overlay) -> str | None:
        """What ``path`` is once the group so far (and this transaction so far) applied."""
        for layer in (local, state.overlay):
            if path in layer.kinds:
                return layer.kinds[path]
        for layer in (local, state.overlay):
            if layer.cleared and any(a in layer.cleared for a in parents(path)):
                return None
        if path in state.disk_dirs:  # seen on disk in this group, under the commit lock
            return "dir"
        st = self._lstat(path)
        if st is not None and st.kind == "dir":
            if st.dev != self._dev:  # a file system mounted after the open
                # Refused here, before the commit point: a rename from staging into it would
                # fail with EXDEV after it, and so would every replay at every open.
                raise InvalidPathError(_across_mounts(path))
            state.disk_dirs.add(path)
        return st.kind if st is not None else None

    def _check_reads(self, tx: PreparedTx, state: _Validation) -> None:
        conflict = self.conflicts.check(tx.reads, tx.listed, tx.subtrees, state.effects, tx.deps)
        if conflict is not None:
            raise conflict_error(tx.txid, conflict)

    def _validate(self, tx: PreparedTx, state: _Validation) -> None:
        """Step 1 for one transaction: raise ConflictError, InvalidPathError or
        FileNotFoundError, else record its effects in ``state``. Nothing on disk is touched."""
        self._check_reads(tx, state)
        local = _Overlay()
        modified: set[str] = set()
        listing: set[str] = set()
        trees: set[str] = set()
        replacing: set[tuple[int, int]] = set()
        for index, op in enumerate(tx.ops):
            self.limits.check_op(op)
            if self._mounts:
                self._check_mount_points(op)
            if not isinstance(op, fmt.Delete):  # a delete makes no directories
                self._check_parents(op.path, state, local, listing, modified)
            elif "/" in op.path:  # nor unlink on another file system, which no checkpoint
                self._kind(parent(op.path), state, local)  # syncs (a mount above: the same)
            kind = self._kind(op.path, state, local)
            if isinstance(op, fmt.Put | fmt.PutStaged | fmt.Delete | Move):
                # A symlink is a plain entry: a delete removes the link itself (never what it
                # points to); anything else refuses to replace it.
                if kind not in (None, "file") and not (
                    kind == "symlink" and isinstance(op, fmt.Delete)
                ):
                    what = {"dir": "a directory", "symlink": "a symlink"}.get(kind, "not a file")
                    raise InvalidPathError(f"cannot change {op.path!r}: it is {what}")
                # The source is linked at step 2, before anything of this transaction is
                # applied: check it as the group before this transaction leaves it.
                if isinstance(op, Move) and self._kind(op.src, state, _Overlay()) != "file":
                    raise FileNotFoundError(2, "No such file to move", op.src)
                if (kind is None) != isinstance(op, fmt.Delete):
                    listing.add(parent(op.path))
                if kind == "file" and not isinstance(op, fmt.Delete):
                    replacing.add((tx.txid, index))
                local.kinds[op.path] = None if isinstance(op, fmt.Delete) else "file"
                modified.add(op.path)
                continue
            if isinstance(op, fmt.DeleteDir) and kind != "dir":
                if kind is None and any(
                    a in layer.cleared for layer in (local, state.overlay) for a in parents(op.path)
                ):
                    continue  # inside a directory replaced or deleted first: nothing left
                if kind is None:
                    raise FileNotFoundError(2, "No such directory", op.path)
                raise InvalidPathError(f"cannot delete_dir {op.path!r}: it is not a directory")
            if isinstance(op, PendingReplace | fmt.ReplaceDir) and kind not in (None, "dir"):
                raise InvalidPathError(f"cannot replace {op.path!r}: it is not a directory")
            if (kind is None) != isinstance(op, fmt.DeleteDir):
                listing.add(parent(op.path))
            local.cleared.add(op.path)
            local.kinds.drop_under(op.path)
            if isinstance(op, fmt.DeleteDir):
                local.kinds[op.path] = None
            else:
                local.kinds[op.path] = "dir"
                rels = [e.path for e in op.entries]
                if isinstance(op, PendingReplace):
                    named = set(rels)
                    rels += [r for r in self._kept(op) if not _collides(r, named)]
                for rel in rels:
                    local.kinds.update((f"{op.path}/{a}", "dir") for a in parents(rel))
                    local.kinds[f"{op.path}/{rel}"] = "file"
            trees.add(op.path)
        state.overlay.kinds.update(local.kinds)
        state.overlay.cleared |= local.cleared
        state.effects.modified |= modified
        state.effects.writer.update(dict.fromkeys(modified, tx.txid))
        state.effects.listing_changed |= listing
        state.effects.trees |= trees
        state.replacing |= replacing

    def _check_parents(
        self,
        path: str,
        state: _Validation,
        local: _Overlay,
        listing: set[str],
        modified: set[str],
    ) -> None:
        for anc in parents(path):
            kind = self._kind(anc, state, local)
            if kind is None:
                local.kinds[anc] = "dir"
                listing.add(parent(anc))
                # Made on the way: a transaction that found it missing read something stale.
                modified.add(anc)
            elif kind != "dir":
                what = "a symlink" if kind == "symlink" else "not a directory"
                raise InvalidPathError(f"cannot write {path!r}: {anc!r} is {what}")

    def checkpoint_due(self) -> bool:
        j = self._journal
        if j is None or self.failed is not None:
            return False
        if self._checkpoint_retry and time.monotonic() < self._checkpoint_retry:
            return False
        a = self._applier
        garbage_limit = GARBAGE_BYTES
        if self.free is not None:
            # Staged values (and trees moved away) hold their space until the checkpoint:
            # free them once they hold a quarter of what is left above the reserve.
            spare = max(0, self.free - self.reserve)
            garbage_limit = min(GARBAGE_BYTES, spare // 4)
            if spare < self.reserve and a.garbage:
                return True
        return (
            j.offset > self.checkpoint_bytes
            or len(a.dirty_files) > self.checkpoint_files
            or a.garbage_bytes > garbage_limit
        )

    def checkpoint(self) -> None:
        """Make everything applied durable in place and start a new journal segment. Raises
        OSError ENOSPC/EDQUOT if there was no space for the segment or for removing what it
        frees: nothing committed is at risk, the store carries on and the checkpoint is tried
        again later. Any other error fails the store (StoreFailedError)."""
        with self._lock:
            if self.failed is not None:
                raise StoreFailedError(f"store failed earlier: {self.failed}")
            try:
                self._catch_up()
                self._checkpoint_locked()
            except OSError as exc:
                if _no_space(exc):
                    self._checkpoint_retry = time.monotonic() + CHECKPOINT_RETRY
                    log.warning("checkpoint of %s postponed: %s", self.root, exc)
                    raise OSError(
                        exc.errno,
                        f"checkpoint postponed, no space: {exc}; nothing committed is at risk "
                        "and the store carries on",
                    ) from exc
                self._fail(f"checkpoint failed: {exc}", exc)
                raise StoreFailedError(f"checkpoint failed: {exc}") from exc

    def _checkpoint_locked(self) -> None:
        assert self._journal is not None
        old = self._journal
        # Step 1: checkpoint_sync: applied files and directories, so the journal can go.
        if self.sync:
            # A handle open since the open, so write-back errors since are reported on it.
            fd = self._shared.fd if self._shared is not None else self._lock_fd
            synced(lambda: self._applier.sync(fd))
        else:
            self._applier.dirty_files.clear()
            self._applier.dirty_dirs.clear()
        # Step 2: checkpoint_new_segment: HEADER + CHECKPOINT, synced with its dir entry, in
        # the blocks of journal/spare (recycled: no space needed) or, without one, allocated.
        if self._header is not None:
            # Named before it exists: a process that finds it missing (this one died)
            # goes on with the old segment, which holds every commit.
            self._write_header(self._header.advanced(segment_lsn=old.next_lsn))
        cp = fmt.Checkpoint(old.next_lsn, self.next_txid)
        dirty, self._spare_dirty = self._spare_dirty, None  # unknown if it fails half-way
        self._journal = new_segment(
            self.fs,
            self.journal_dir,
            cp,
            sync=self.sync,
            preallocate=self.preallocate,
            dirty_end=dirty,
        )
        self._journal.bytes_written = old.bytes_written
        self.last_lsn = cp.lsn
        if self._header is not None:
            self._write_header(self._header.advanced(applied_lsn=cp.lsn))
        self._stale.append(old.path)
        old.close()
        # Step 3: checkpoint_drop_segments: the old segment becomes the spare (or goes).
        while self._stale:
            # Several processes: others may still read the old segment through their handle,
            # so it goes as before (no spare to recycle under them).
            keep = bool(self.preallocate) and self.exclusive
            if retire(self.fs, self.journal_dir, self._stale[-1], keep=keep):
                self._spare_dirty = old.high if self._stale[-1] == old.path else None
            self._stale.pop()
        # Step 4: checkpoint_drop_garbage
        self._applier.drop_garbage()
        self.counters.checkpoints += 1
        if self.free is not None:  # what the checkpoint freed, for the next triggers
            with contextlib.suppress(OSError):
                self.look_at_space()
        self._checkpoint_retry = 0.0
        log.debug("checkpoint lsn=%d", cp.lsn)

    # -- reads ---------------------------------------------------------------------------

    def _lstat(self, path: str) -> FileStat | None:
        """lstat of a store path, resolved beneath the root now; a symlink on the way is
        InvalidPathError (a symlink as the last name is reported, not followed)."""
        try:
            return self.fs.lstat(self._applier.full(path))
        except OSError as exc:
            raise _refused(exc, path) from None

    def _check_whole(self) -> None:
        if self.partial:
            raise StoreFailedError(
                f"store {self.root} failed while applying a commit and would show half of it; "
                "reopen it to recover"
            )

    def read(self, path: str) -> bytes:
        with self._gate.read():
            self._check_whole()
            return self._read(path)

    def read_cacheable(self, path: str) -> tuple[bytes, bool]:
        """``read``, and whether its content may be cached under ``path``: always, as no
        symlink is followed, so a path names one file and a change of it is a change of
        ``path`` itself (what isolation records too)."""
        with self._gate.read():
            self._check_whole()
            return self._read(path), True

    def _read(self, path: str) -> bytes:
        """One regular file, resolved beneath the root now, through no symlink; a FIFO or a
        device is refused without being opened for a blocking read."""
        try:
            return self.fs.read_file(self._applier.full(path))
        except NotRegularFileError as exc:
            if exc.errno == errno.EISDIR:
                raise IsADirectoryError(errno.EISDIR, "Is a directory", path) from None
            raise InvalidPathError(
                f"cannot read {path!r}: {exc.strerror} (walstore reads regular files only)"
            ) from None
        except NotADirectoryError:
            raise self._blocked(path) from None
        except FileNotFoundError:
            raise FileNotFoundError(2, "No such file or directory", path) from None
        except OSError as exc:
            raise _refused(exc, path) from None

    def _blocked(self, path: str) -> InvalidPathError:
        for anc in parents(path):
            st = self._lstat(anc)
            if st is not None and st.kind != "dir":
                return InvalidPathError(f"{path!r}: {anc!r} is a {st.kind}, not a directory")
        return InvalidPathError(f"{path!r}: a parent is not a directory")

    def check_parents(self, path: str) -> None:
        """Raise InvalidPathError if an existing parent of ``path`` is not a directory."""
        with self._gate.read():
            for anc in parents(path):
                st = self._lstat(anc)
                if st is None:
                    return
                if st.kind != "dir":
                    raise self._blocked(path)

    def lstat(self, path: str) -> FileStat | None:
        with self._gate.read():
            self._check_whole()
            return self._lstat(path)

    def listdir(self, path: str) -> list[str]:
        with self._gate.read():
            self._check_whole()
            st = self._lstat(path)
            if st is None:
                raise FileNotFoundError(2, "No such file or directory", path)
            if st.kind == "symlink":
                raise _refused(OSError(errno.ELOOP, "a symlink"), path)
            if st.kind != "dir":
                raise NotADirectoryError(20, "Not a directory", path)
            try:  # resolved again: it may have become a symlink since the lstat
                names = self.fs.listdir(self._applier.full(path))
            except OSError as exc:
                raise _refused(exc, path) from None
        return sorted(n for n in names if path or n != RESERVED)


def conflict_error(txid: int, conflict: Conflict) -> ConflictError:
    return ConflictError(f"txid={txid}: {conflict.what}", paths=(conflict.key,), lsn=conflict.lsn)


def _refused(exc: OSError, path: str) -> Exception:
    """InvalidPathError for a symlink met on the way to ``path`` (ELOOP from the file
    system's resolution rule); any other error as it is."""
    if exc.errno == errno.ELOOP:
        return InvalidPathError(
            f"{path!r} goes through a symlink, or is one: walstore never follows a symlink "
            "inside the store (delete removes one as a plain entry)"
        )
    return exc


def _unrecordable(txid: int, exc: BaseException) -> InvalidPathError:
    err = InvalidPathError(
        f"txid={txid}: a path, count or size does not fit the journal's record format ({exc})"
    )
    err.__cause__ = exc
    return err


def _across_mounts(path: str) -> str:
    return (
        f"{path!r} is a mount point: walstore commits by renaming into place, which cannot "
        "cross mounts (another file system, or a bind mount)"
    )
