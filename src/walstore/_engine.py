"""Engine: the blocking core of a store, run from worker threads.

Layout: the engine owns the commit log (``_commit_log.py``) and the applier (``_apply.py``),
and is made of one concern per module, imported one way (the engine imports them, none of
them imports the engine): ``_checkpoint.py`` (when one is due, and the checkpoint itself),
``_group_steps.py`` (the commit protocol, a step per method),
``_validate.py`` (step 1 per transaction), ``_space.py`` (the reserve), ``_reads.py`` (reads,
the apply gate), ``_peers.py`` (other processes, which sees the engine only as its ``Host``)
and ``_prepared.py`` (what a group takes and returns).

Invariants (what the code keeps; each names where it is kept):

1. ``last_lsn`` is the LSN of the last COMMIT applied in place, or of the last checkpoint
   if none came since. It only grows, and is set under ``_lock`` only: by step 4 (under the
   apply gate), by ``take_in`` and ``followed`` (other processes' commits and checkpoints),
   by the checkpoint, and by recovery at open.
2. The engine's ``_lock`` is held from step 0 of a group through step 4 (``commit_group``),
   through a checkpoint and through ``close``: one of them runs at a time. With other
   processes the commit lock (``_peers.py``) is held across the same span; the leader takes
   it on the event loop (``CommitLock.hold``) before it hands the group to the committer
   thread. ``_assert_held`` checks both (LevelDB's ``AssertHeld``).
3. Before a group's commit point (step 3, ``sync_journal``) nothing outside
   ``.walstore/staging/`` and the journal has changed on its behalf: a crash before it
   leaves the store as it was, one after it leaves a journal that recovery applies.
4. A failed fsync or fdatasync is never retried (what it covered may be lost while a retry
   reports success): it fails the store (``_fail`` sets ``failed``), and every later group
   is refused before step 0.
5. Readers never see part of a group: step 4 applies under the apply gate's write side and
   every read takes its read side; an apply that stopped half way sets ``partial``, and
   reads then refuse (``ReadSide._check_whole``) until a reopen recovers.
6. The conflict index holds the effects of every group committed since the oldest open
   transaction began (``prune(oldest_begin)``), and a group's effects are observed under the
   apply gate, before a reader can see its files: a read tagged with LSN n is checked
   against every commit after n.
7. Txids only grow, across reopens and processes: ``new_txid`` takes them under
   ``_txids``; each checkpoint records ``next_txid`` in the new segment's header, and
   recovery starts above every txid the journal and the staging area name.

Threads:

* the committer thread (``Store._run_committer``), one call at a time under ``_lock`` (and,
  with other processes, the commit lock):
  ``commit_group`` and its ``_step_*``, ``checkpoint``, and ``take_in`` and ``followed``
  (called by ``Peers`` from step 0);
* worker threads (``Store._run``): ``open``, ``close``, ``stage``, ``make_staging_dir``,
  ``discard``, ``check_space`` and the reads (``_reads.py``), beside the committer thread;
* the event loop: ``new_txid``, ``checkpoint_due`` and what ``Peers`` lists as its own; the
  Store also reads ``last_lsn``, ``failed``, ``partial``, ``conflicts`` (single-key lookups)
  and takes ``foreign`` there.

It runs the commit protocol of docs/commit-protocol.md for one group of transactions at a
time (``commit_group``), under its lock. Steps are named as in the doc, each a method
``_step_<name>``:

0. ``catch_up``      with other processes: take in what they committed (section 7)
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
import logging
import os
import threading
import zlib
from contextlib import suppress

from . import _journal_format as fmt
from ._apply import SYNCFS_MIN, Applier, remove_tree
from ._checkpoint import Checkpoints
from ._commit_log import JournalLog
from ._conflicts import ConflictIndex
from ._errors import (
    NotAStoreError,
    StoreFailedError,
    StoreLayoutError,
    StoreLockedError,
)
from ._fs import FileSystem, write_all
from ._group_steps import Counters
from ._limits import PathLimits, limits_of
from ._paths import RESERVED
from ._peers import Peers
from ._prepared import Durability as Durability
from ._prepared import Keep as Keep
from ._prepared import Move as Move
from ._prepared import Outcome as Outcome
from ._prepared import PendingReplace as PendingReplace
from ._prepared import PreparedTx as PreparedTx
from ._prepared import Result as Result
from ._prepared import TxOp as TxOp
from ._prepared import conflict_error as conflict_error
from ._reads import ApplyGate
from ._recovery import Recovered, RecoveryReport, recover
from ._shared import (
    effects_of,
    touched,
)
from ._space import out_of_space
from ._space import reserve_for as reserve_for

log = logging.getLogger("walstore")


class Engine(Checkpoints):
    """The blocking core. Which thread runs what: the module docstring."""

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
        self.sync_enabled = durability is not Durability.OFF
        self.checkpoint_bytes = checkpoint_bytes
        self.checkpoint_files = checkpoint_files
        self.syncfs_min = syncfs_min  # checkpoints of this many changes use syncfs; None: never
        # Segments are zero-filled to about where the next checkpoint starts a new one, so
        # commits overwrite allocated blocks (their fdatasync then writes data only).
        size = min(checkpoint_bytes + min(checkpoint_bytes, 1 << 20), 65 << 20)
        hint = getattr(fs, "journal_preallocation", None)  # a simulated disk keeps it small
        size = size if hint is None else min(size, int(hint))
        self.preallocate = size if self.sync_enabled else 0
        self.counters = Counters()
        self.failed: StoreFailedError | None = None
        self.partial = False  # a group is half applied: reads would show half of it
        self.next_txid = 1  # the next ``new_txid``; set by recovery or a slot at open
        self._txids = threading.Lock()
        self.last_lsn = 0  # LSN of the last applied COMMIT (or checkpoint)
        self._lock = threading.Lock()  # the commit lock: groups, checkpoints, close
        self._gate = ApplyGate()
        self._lock_fd: int | None = None
        self.commit_log: JournalLog | None = None  # the commit log (``_commit_log.py``)
        self._applier = Applier(fs, self.root, self.staging_dir)
        self._real_root = self.root
        self._dev = 0  # the device of the root and .walstore/ (every rename starts there)
        self._mounts: frozenset[str] = frozenset()  # mount points below the root, at open
        self.conflicts = ConflictIndex()  # what each commit changed, for validation
        self.free: int | None = None  # free bytes at the last look (free_space), None: not yet
        self._spent = 0  # bytes the groups admitted since the last look may allocate
        self._groups_unlooked = 0  # groups admitted since the last look
        self.reserve = 1 << 20  # reserve_for() the file system's size, at the last look
        self._checkpoint_retry = 0.0  # monotonic time before which no checkpoint is due
        # Several processes (``_peers.py``); exclusive: the LOCK is held for life instead.
        self.exclusive = exclusive
        self.peers = Peers(self)
        # Paths other processes changed, for the Store to drop from its read cache (files,
        # trees); cache_stale: drop everything.
        self.foreign: list[tuple[set[str], set[str]]] = []
        self.cache_stale = False
        self.limits = PathLimits()  # the file system's, once open

    # -- open and close ------------------------------------------------------------------

    def open(self, *, create: bool, readonly: bool) -> RecoveryReport:
        """Step 1, recover_lock, then recovery (or, read-only, just check it is a store). In a
        worker thread, once, before anything else runs."""
        fs = self.fs
        if readonly or not create:
            if fs.lstat(self.journal_dir) is None:
                raise NotAStoreError(f"{self.root} is not a walstore store (no {RESERVED}/journal)")
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
                return self.peers.open()
            lock_fd = fs.lock(self.peers.lock_path)
        except BaseException:
            fs.release(self.root)
            raise
        if lock_fd is None:
            fs.release(self.root)
            raise StoreLockedError(self._holder_message())
        try:
            alive = self.peers.live_slots()
            if alive:
                raise StoreLockedError(
                    f"store {self.root} is open in {len(alive)} other process(es) (shared): "
                    "exclusive=True needs it to itself"
                )
            fs.truncate(lock_fd, 0)
            write_all(fs, lock_fd, f"{os.getpid()}\n".encode(), 0)
            report = self.recover(lock_fd)
        except BaseException:
            fs.unlock(lock_fd)
            fs.release(self.root)
            raise
        self._lock_fd = lock_fd
        return report

    def _adopt(self, rec: Recovered) -> None:
        """Take the state recovery left (at open, in its worker thread)."""
        self.commit_log = rec.journal
        # Several processes: others may still read an old segment through their handle, so
        # it goes as before (no spare to recycle under them).
        self.commit_log.recycle = bool(self.preallocate) and self.exclusive
        self._applier = rec.applier
        self.next_txid = rec.next_txid
        self.last_lsn = rec.last_lsn
        if not rec.report.clean:
            log.info("recovered %s: %s", self.root, rec.report)

    def recover(self, fs_fd: int) -> RecoveryReport:
        """Run recovery (steps 2-4) and take its state; ``fs_fd``: a handle for ``syncfs``.
        REQUIRES: the LOCK or the commit lock held. In a worker thread."""
        rec = recover(
            self.fs,
            self.root,
            self.journal_dir,
            self.staging_dir,
            sync=self.sync_enabled,
            preallocate=self.preallocate,
            fs_fd=fs_fd,
            syncfs_min=self.syncfs_min,
        )
        self._adopt(rec)
        return rec.report

    # -- other processes' commits (``_peers.py`` finds them) ------------------------------

    def take_in(self, commits: list[fmt.Commit], applied: int) -> list[fmt.Commit]:
        """Records other processes appended: apply those above ``applied`` (their writer
        died after the commit point), and note all of them as this process's own (conflict
        index, read cache, what the next checkpoint syncs and drops). Returns the applied.
        In the committer thread (or the opening one). REQUIRES: commit lock held."""
        self.peers.assert_xlock()
        unapplied = [c for c in commits if c.lsn > applied]
        if unapplied and self.sync_enabled:
            assert self.commit_log is not None
            self.commit_log.sync()  # its writer may have died before its fdatasync
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

    def followed(self, checkpoint_lsn: int, gap: bool) -> None:
        """Another process took a checkpoint at ``checkpoint_lsn``; ``gap``: a segment in
        between came and went, its commits unknown here. In the committer thread. REQUIRES:
        commit lock held."""
        self.peers.assert_xlock()
        if gap:
            self.conflicts.barrier = checkpoint_lsn
            self.cache_stale = True
        self._applier.forget_all()  # the checkpoint made all of it durable, dropped garbage
        self.last_lsn = max(self.last_lsn, checkpoint_lsn)

    def _check_mounts_at_open(self) -> None:
        """Commits rename from ``staging/`` into place, which works within one mount only: the
        root and its ``.walstore/`` must be one, and changes at or under a mount point below
        the root are refused (``_check_mount_points``, and ``Validator._kind_after`` for
        mounts made later)."""
        fs = self.fs
        devs: dict[str, int] = {}
        for d in (self._real_root, self.meta, self.journal_dir, self.staging_dir):
            st = fs.lstat(d)
            if st is not None and st.kind != "dir":  # a symlink could lead to another mount
                raise StoreLayoutError(
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
            raise StoreLayoutError(
                f"{(other or inside)[0]} is on another file system or mount than the store's "
                f"root {self.root}: walstore commits by renaming from {RESERVED}/staging into "
                "place, which cannot cross mounts"
            )
        self._mounts = frozenset(mounts)

    def _holder_message(self) -> str:
        try:
            pid = self.fs.read_file(self.peers.lock_path).decode().strip()
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
                bad = NotAStoreError if d == self.root else StoreLayoutError
                raise bad(f"{d} exists and is not a directory")
        if self.sync_enabled:
            # Every time, not only when made: a first open that crashed after its mkdirs
            # left them unsynced, and a store last used with Durability.OFF left its live
            # segment's name unsynced; this open cannot tell.
            for d in (os.path.dirname(self.root), self.root, self.meta, self.journal_dir):
                fs.fsync_dir(d)

    def close(self) -> None:
        """Checkpoint if anything was committed, release the LOCK. In a worker thread.
        Requires: no group runs."""
        with self._lock:
            shared = self.peers.sharing()
            try:
                if shared and self.commit_log is not None and self.failed is None:
                    self.peers.leave()  # failed: nothing more is applied or checkpointed
                j = self.commit_log
                if j is not None and self.failed is None and j.head > j.checkpoint_lsn:
                    try:
                        self._checkpoint_locked()
                    except OSError as exc:
                        if not out_of_space(exc):
                            raise
                        # Nothing is at risk: the journal holds every commit and the next
                        # open recovers from it, without new space (journal/spare).
                        log.warning("store %s closed without a checkpoint: %s", self.root, exc)
            finally:
                if self.commit_log is not None:
                    self.commit_log.close()
                    self.commit_log = None
                if self._lock_fd is not None:
                    self.fs.unlock(self._lock_fd)
                    self._lock_fd = None
                self.peers.close(shared)
                self.fs.release(self.root)

    def new_txid(self) -> int:
        """A txid for a new transaction: unique across reopens and, with other processes,
        across processes (``_peers.py``). On the event loop (or any thread)."""
        with self._txids:
            txid = self.next_txid
            self.next_txid += 1
        return txid

    # -- staging -------------------------------------------------------------------------

    def stage(self, txid: int, index: int, data: bytes, make_dir: bool) -> fmt.PutStaged:
        """Write a large value to ``staging/<txid>/<index>`` and fsync it (outside the commit
        lock, so many transactions stage in parallel: in worker threads, beside the committer
        thread). Returns the op without its path. Raises OSError ENOSPC if it would eat into
        the reserve (nothing written)."""
        self.check_space(len(data))
        if make_dir:
            self.make_staging_dir(txid)
        name = f"{txid}/{index}"
        fd = self.fs.open(os.path.join(self.staging_dir, name), create=True, truncate=True)
        try:
            write_all(self.fs, fd, data, 0)
            if self.sync_enabled:
                self.fs.fsync(fd)
        finally:
            self.fs.close(fd)
        return fmt.PutStaged("", name, len(data), zlib.crc32(data))

    def make_staging_dir(self, txid: int) -> str:
        """``staging/<txid>/`` (made if missing); returns its path. In a worker thread."""
        d = os.path.join(self.staging_dir, str(txid))
        with contextlib.suppress(FileExistsError):
            self.fs.mkdir(d)
        return d

    def discard(self, txid: int) -> None:
        """Remove what a rolled-back transaction staged. In a worker thread."""
        remove_tree(self.fs, os.path.join(self.staging_dir, str(txid)))

    # -- the commit protocol -------------------------------------------------------------
