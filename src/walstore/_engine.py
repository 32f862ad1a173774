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
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from . import _journal_format as fmt
from ._apply import SYNCFS_MIN, Applier, remove_tree
from ._conflicts import Conflict, ConflictIndex, GroupEffects, Reads
from ._errors import (
    ConflictError,
    InvalidPathError,
    StoreClosedError,
    StoreError,
    StoreFailedError,
    StoreLockedError,
)
from ._fs import FileStat, FileSystem, write_all
from ._journal_writer import AppendFailed, JournalWriter
from ._limits import PathLimits, limits_of
from ._paths import RESERVED, parent, parents
from ._recovery import RecoveryReport, recover

log = logging.getLogger("walstore")


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

    kinds: dict[str, str | None] = field(default_factory=dict)  # path -> "file"/"dir"/None
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
        self.limits = limits_of(fs, self.root, self.staging_dir)
        if readonly:
            return RecoveryReport()
        self._check_mounts_at_open()
        lock_fd = fs.lock(os.path.join(self.meta, "LOCK"))
        if lock_fd is None:
            raise StoreLockedError(self._holder_message())
        try:
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
            raise
        self._lock_fd = lock_fd
        self._journal = rec.journal
        self._applier = rec.applier
        self.next_txid = rec.next_txid
        self.last_lsn = rec.last_lsn
        if not rec.report.clean:
            log.info("recovered %s: %s", self.root, rec.report)
        return rec.report

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
            try:
                j = self._journal
                if j is not None and self.failed is None and j.next_lsn > j.checkpoint_lsn + 1:
                    self._checkpoint_locked()
            finally:
                if self._journal is not None:
                    self._journal.close()
                    self._journal = None
                if self._lock_fd is not None:
                    self.fs.unlock(self._lock_fd)
                    self._lock_fd = None

    # -- staging -------------------------------------------------------------------------

    def stage(self, txid: int, index: int, data: bytes, make_dir: bool) -> fmt.PutStaged:
        """Write a large value to ``staging/<txid>/<index>`` and fsync it (outside the commit
        lock, so many transactions stage in parallel). Returns the op without its path."""
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
        begin LSN of any open transaction (older conflict records are dropped)."""
        with self._lock:
            if self.failed is not None:
                err = StoreFailedError(f"store failed earlier: {self.failed}")
                return [Result(Outcome.REJECTED, error=err) for _ in group]
            if self._journal is None:
                closed = StoreClosedError(f"store {self.root} is closed")
                return [Result(Outcome.REJECTED, error=closed) for _ in group]
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
        st = self.fs.lstat(full)
        if st is None:
            raise FileNotFoundError(2, "No such file or directory", src)
        if st.kind != "file":
            raise InvalidPathError(f"cannot move or keep {src!r}: not a regular file")
        staged = os.path.join(self.staging_dir, name)
        self.fs.link(full, staged)
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
        st = self.fs.lstat(base)
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
        st = self.fs.lstat(self._applier.full(path))
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
                if kind not in (None, "file"):
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
            local.kinds = {k: v for k, v in local.kinds.items() if not k.startswith(op.path + "/")}
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
        return (
            j is not None
            and self.failed is None
            and (
                j.offset > self.checkpoint_bytes
                or len(self._applier.dirty_files) > self.checkpoint_files
                or self._applier.garbage_bytes > GARBAGE_BYTES
            )
        )

    def checkpoint(self) -> None:
        """Make everything applied durable in place and start a new journal segment."""
        with self._lock:
            if self.failed is not None:
                raise StoreFailedError(f"store failed earlier: {self.failed}")
            try:
                self._checkpoint_locked()
            except OSError as exc:
                self._fail(f"checkpoint failed: {exc}", exc)
                raise StoreFailedError(f"checkpoint failed: {exc}") from exc

    def _checkpoint_locked(self) -> None:
        assert self._journal is not None
        old = self._journal
        # Step 1: checkpoint_sync: applied files and directories, so the journal can go.
        if self.sync:
            self._applier.sync(self._lock_fd)
        else:
            self._applier.dirty_files.clear()
            self._applier.dirty_dirs.clear()
        # Step 2: checkpoint_new_segment: HEADER + CHECKPOINT, synced with its dir entry.
        cp = fmt.Checkpoint(old.next_lsn, self.next_txid)
        self._journal = JournalWriter.create(
            self.fs, self.journal_dir, cp, sync=self.sync, preallocate=self.preallocate
        )
        self._journal.bytes_written = old.bytes_written
        self.last_lsn = cp.lsn
        old.close()
        # Step 3: checkpoint_drop_segments, step 4: checkpoint_drop_garbage
        self.fs.unlink(old.path)
        self._applier.drop_garbage()
        self.counters.checkpoints += 1
        log.debug("checkpoint lsn=%d", cp.lsn)

    # -- reads ---------------------------------------------------------------------------

    def _resolve(self, path: str) -> str:
        """The file a store path names, following symlinks only inside the root."""
        full = self._applier.full(path)
        real = self.fs.realpath(full)
        if real != full and real != self._real_root and not real.startswith(self._real_root + "/"):
            raise InvalidPathError(f"{path!r} leads out of the store through a symlink")
        meta = os.path.join(self._real_root, RESERVED)
        if real == meta or real.startswith(meta + "/"):
            raise InvalidPathError(f"{path!r} leads into {RESERVED}/ through a symlink")
        return real

    def _check_whole(self) -> None:
        if self.partial:
            raise StoreFailedError(
                f"store {self.root} failed while applying a commit and would show half of it; "
                "reopen it to recover"
            )

    def read(self, path: str) -> bytes:
        with self._gate.read():
            self._check_whole()
            try:
                return self.fs.read_file(self._resolve(path))
            except NotADirectoryError:
                raise self._blocked(path) from None
            except FileNotFoundError:
                raise FileNotFoundError(2, "No such file or directory", path) from None

    def read_cacheable(self, path: str) -> tuple[bytes, bool]:
        """``read``, and whether its content may be cached under ``path``: no symlink on the
        way, so that a later change of the file is a change of ``path`` itself."""
        with self._gate.read():
            self._check_whole()
            try:
                real = self._resolve(path)
                return self.fs.read_file(real), real == os.path.join(self._real_root, path)
            except NotADirectoryError:
                raise self._blocked(path) from None
            except FileNotFoundError:
                raise FileNotFoundError(2, "No such file or directory", path) from None

    def _blocked(self, path: str) -> InvalidPathError:
        for anc in parents(path):
            st = self.fs.lstat(self._applier.full(anc))
            if st is not None and st.kind != "dir":
                return InvalidPathError(f"{path!r}: {anc!r} is a file, not a directory")
        return InvalidPathError(f"{path!r}: a parent is not a directory")

    def check_parents(self, path: str) -> None:
        """Raise InvalidPathError if an existing parent of ``path`` is not a directory."""
        with self._gate.read():
            for anc in parents(path):
                st = self.fs.lstat(self._applier.full(anc))
                if st is None:
                    return
                if st.kind != "dir":
                    raise self._blocked(path)

    def lstat(self, path: str) -> FileStat | None:
        with self._gate.read():
            self._check_whole()
            return self.fs.lstat(self._resolve(path))

    def listdir(self, path: str) -> list[str]:
        with self._gate.read():
            self._check_whole()
            full = self._resolve(path)
            st = self.fs.lstat(full)
            if st is None:
                raise FileNotFoundError(2, "No such file or directory", path)
            if st.kind != "dir":
                raise NotADirectoryError(20, "Not a directory", path)
            names = self.fs.listdir(full)
        return sorted(n for n in names if path or n != RESERVED)


def conflict_error(txid: int, conflict: Conflict) -> ConflictError:
    return ConflictError(f"txid={txid}: {conflict.what}", paths=(conflict.key,), lsn=conflict.lsn)


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
