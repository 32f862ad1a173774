"""CommitSteps: the commit protocol for one group (docs/commit-protocol.md), a step per
method, ``_step_<name>``, as ``_engine.py``'s docstring lists them. Mixed into ``Engine``.

In the committer thread, one group at a time. REQUIRES (each step): the engine's ``_lock``
held (``commit_group`` takes it), and with other processes the commit lock.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from dataclasses import dataclass, field

from . import _journal_format as fmt
from ._apply import Applier
from ._commit_log import JournalLog, LogConflict
from ._conflicts import ConflictIndex
from ._errors import (
    CommitOutcomeUnknownError,
    CommittedNotAppliedError,
    ConflictError,
    CorruptionError,
    InvalidPathError,
    StoreClosedError,
    StoreFailedError,
)
from ._fs import FileSystem
from ._journal_writer import AppendFailed, FailStop
from ._peers import Peers
from ._prepared import Move, Outcome, PendingReplace, PreparedTx, Result
from ._reads import ApplyGate, refused
from ._space import SpaceAccount
from ._validate import GroupValidation, Validator, collides

log = logging.getLogger("walstore")


@dataclass
class Counters:
    commits: int = 0
    groups: int = 0
    conflicts: int = 0
    checkpoints: int = 0
    journal_bytes: int = 0
    journal_syncs: int = 0


@dataclass
class _Group:
    """One group as ``commit_group`` takes it through its steps."""

    txs: list[PreparedTx]
    results: list[Result | None]  # set once a transaction is refused (or the group ends)
    log: JournalLog
    head: int = 0  # the log's head before the group: it appends after it
    lsn: int = 0  # the group's LSN
    state: GroupValidation = field(default_factory=GroupValidation)
    resolved: dict[int, tuple[fmt.Op, ...]] = field(default_factory=dict)  # index -> ops
    staged: list[int] = field(default_factory=list)  # txids with a staging directory
    writers: list[tuple[int, tuple[fmt.Op, ...]]] = field(default_factory=list)


class _GroupEnded(Exception):
    """A step ended the group early: ``results`` are every transaction's outcome."""

    def __init__(self, results: list[Result]) -> None:
        super().__init__("group ended")
        self.results = results


class CommitSteps(Validator, SpaceAccount):
    """``commit_group`` and its steps (see the module docstring)."""

    fs: FileSystem
    root: str
    staging_dir: str
    sync_enabled: bool
    counters: Counters
    conflicts: ConflictIndex
    peers: Peers
    commit_log: JournalLog | None
    failed: StoreFailedError | None
    partial: bool
    last_lsn: int
    _lock: threading.Lock
    _gate: ApplyGate
    _applier: Applier

    def commit_group(self, group: list[PreparedTx], oldest_begin: int) -> list[Result]:
        """Run steps 0-4 for a group, in one worker call (in the committer thread, never on
        the event loop), and return each transaction's outcome for step 5, ``acknowledge``,
        which the Store does. ``oldest_begin`` is the smallest begin LSN of any open
        transaction (older conflict records are dropped).

        Under ``fs.hold()``: each directory the group's paths go through is resolved
        (beneath the root, through no symlink) once for the group instead of at every call;
        dropped when the group renames or removes it, closed when the group ends."""
        with self._lock, self.fs.hold():
            if self.failed is not None:
                err = StoreFailedError(f"store failed earlier: {self.failed}")
                return [Result(Outcome.REJECTED, error=err) for _ in group]
            if self.commit_log is None:
                closed = StoreClosedError(f"store {self.root} is closed")
                return [Result(Outcome.REJECTED, error=closed) for _ in group]
            g = _Group(group, [None] * len(group), self.commit_log)
            try:
                self._step_catch_up(g)  # step 0
                self._step_validate(g)  # step 1
                self._step_sync_staged(g)  # step 2
                self._step_append_commit(g)  # step 3
                self._step_sync_journal(g)  # step 3, the commit point
                self._step_apply(g)  # step 4
            except _GroupEnded as ended:
                return ended.results
            self.conflicts.prune(oldest_begin)
            self.counters.groups += 1
            self.counters.commits += len(g.writers)
            self.counters.journal_bytes = g.log.bytes_written
            for txid, ops in g.writers:
                log.debug("txid=%d committed lsn=%d ops=%d", txid, g.lsn, len(ops))
            return self._fill(g.results, Result(Outcome.COMMITTED, g.lsn))

    def _assert_held(self) -> None:
        """LevelDB's ``AssertHeld``: the engine's ``_lock`` is held (by some thread: a
        ``threading.Lock`` records no owner) and, with other processes, the commit lock."""
        assert self._lock.locked(), "REQUIRES: the engine's _lock held"
        self.peers.assert_xlock()

    def _end_group(self, g: _Group, value: Result) -> _GroupEnded:
        """End the group early: every transaction not refused yet gets ``value``."""
        return _GroupEnded(self._fill(g.results, value))

    def _step_catch_up(self, g: _Group) -> None:
        """Step 0, ``catch_up``: take in what other processes committed (``_peers.py``)."""
        self._assert_held()
        try:
            self.peers.catch_up()
        except OSError as exc:
            raise self._end_group(g, Result(Outcome.REJECTED, error=exc)) from None
        except CorruptionError as exc:
            self._fail(f"the journal is damaged: {exc}", exc)
            raise self._end_group(g, Result(Outcome.REJECTED, error=exc)) from None
        g.head = g.log.head
        g.lsn = g.head + 1

    def _step_validate(self, g: _Group) -> None:
        """Step 1, ``validate``: refuse each transaction whose reads are stale, whose paths
        do not fit what is on disk (plus what the transactions ahead of it change), or whose
        apply would eat into the space reserve. Nothing on disk is touched."""
        self._assert_held()
        for i, tx in enumerate(g.txs):
            try:
                self._validate_tx(tx, g.state)
            except (InvalidPathError, ConflictError, OSError) as exc:
                if isinstance(exc, ConflictError):
                    self.counters.conflicts += 1
                g.results[i] = Result(Outcome.REJECTED, error=exc)
        try:
            self._check_group_space(g.txs, g.results, g.log)
        except FailStop as exc:  # nothing is committed, but a failed sync is never retried
            self._fail(f"sync before the commit point failed: {exc}", exc)
            raise self._end_group(g, Result(Outcome.REJECTED, error=exc)) from None

    def _step_sync_staged(self, g: _Group) -> None:
        """Step 2, ``sync_staged``: link moved and kept files into staging, then fsync the
        staging directories of the transactions that staged anything, and ``staging/``."""
        self._assert_held()
        results = g.results
        for i, tx in enumerate(g.txs):
            if results[i] is not None or not tx.ops:
                continue
            try:
                g.resolved[i] = self._link_sources(tx)
            except (InvalidPathError, OSError) as exc:
                results[i] = Result(Outcome.REJECTED, error=exc)
                continue
            if tx.staged or g.resolved[i] is not tx.ops:
                g.staged.append(tx.txid)
        if not self._writers(g):
            raise self._end_group(g, Result(Outcome.COMMITTED, self.last_lsn))
        try:
            if self.sync_enabled and g.staged:
                for txid in g.staged:
                    self.fs.fsync_dir(os.path.join(self.staging_dir, str(txid)))
                self.fs.fsync_dir(self.staging_dir)
        except OSError as exc:
            # Nothing is committed, but a failed fsync is never retried: what it covered
            # may be lost while a retry reports success (fsyncgate).
            self._fail(f"staging fsync failed: {exc}", exc)
            raise self._end_group(g, Result(Outcome.REJECTED, error=exc)) from None

    def _writers(self, g: _Group) -> list[tuple[int, tuple[fmt.Op, ...]]]:
        """The transactions still in the group, with their resolved ops."""
        g.writers = [(g.txs[i].txid, ops) for i, ops in g.resolved.items() if g.results[i] is None]
        return g.writers

    def _step_append_commit(self, g: _Group) -> None:
        """Step 3, ``append_commit``: one COMMIT record for the group, appended in one write.
        Each transaction is encoded on its own, so that one the record cannot hold (the op
        calls and the store refuse those first; this is the last line) is refused alone,
        before the commit point, and the others go on."""
        self._assert_held()
        parts: list[bytes] = []
        size = fmt.GROUP_HEADER_SIZE
        results = g.results
        for i, ops in g.resolved.items():
            if results[i] is not None:
                continue
            txid = g.txs[i].txid
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
        if not self._writers(g):
            raise self._end_group(g, Result(Outcome.COMMITTED, self.last_lsn))
        try:
            g.log.append(parts, g.head)
        except LogConflict as exc:  # nothing written: the group is validated again
            stale = ConflictError(f"another writer committed first: {exc}")
            raise self._end_group(g, Result(Outcome.REJECTED, error=stale)) from None
        except OSError as exc:
            raise self._end_group(g, Result(Outcome.REJECTED, error=exc)) from None
        except AppendFailed as exc:
            self._fail(f"journal append failed and could not be undone: {exc}", exc)
            err = CommitOutcomeUnknownError(f"commit outcome unknown: {exc}")
            raise self._end_group(g, Result(Outcome.UNKNOWN, error=err)) from None

    def _step_sync_journal(self, g: _Group) -> None:
        """Step 3, ``sync_journal``: fdatasync the journal. This is the commit point."""
        self._assert_held()
        try:
            if self.sync_enabled:
                g.log.sync()
                self.counters.journal_syncs += 1
        except OSError as exc:
            self._fail(f"journal fdatasync failed: {exc}", exc)
            # The record is in the page cache, maybe on disk: erase it, so that no process
            # (other processes catching up, this one closing) applies what a power loss
            # could still take back. If that fails too it may or may not be durable.
            try:
                g.log.unappend()
                log.error("store %s: the record of the failed sync is erased", self.root)
            except OSError as exc2:
                log.error(
                    "store %s: erasing the record of the failed sync failed too: %s",
                    self.root,
                    exc2,
                )
            err = CommitOutcomeUnknownError(
                f"commit outcome unknown: the journal sync failed ({exc}); "
                "reopen the store to learn whether it committed"
            )
            err.__cause__ = exc
            raise self._end_group(g, Result(Outcome.UNKNOWN, error=err)) from None

    def _step_apply(self, g: _Group) -> None:
        """Step 4, ``apply``: rename every change into place with readers held off by the
        apply gate, then (readers let in) ``drop_replaced``."""
        self._assert_held()
        lsn = g.lsn
        applied = False
        try:
            with self._gate.write():
                # Step 1 looked these up already: apply need not lstat them again.
                self._applier.forget_dir_cache(known=g.state.disk_dirs)
                for txid, ops in g.writers:
                    self._applier.apply(txid, ops, replacing=g.state.replacing)
                for txid in g.staged:  # dropped at the next checkpoint
                    self._applier.garbage.add(os.path.join(self.staging_dir, str(txid)))
                self.last_lsn = lsn
                # Still under the gate: whoever saw this group's files sees it here too
                # (the early check on the event loop relies on it).
                self.conflicts.observe(lsn, g.state.effects)
                self.peers.note_applied(lsn)  # other processes: it is applied
            applied = True
            self._applier.drop_replaced()
        except OSError as exc:
            self.partial = not applied
            self._fail(f"apply failed after the commit point: {exc}", exc)
            err = CommittedNotAppliedError(
                f"committed (journal LSN {lsn}) and applied, but an old file could not be "
                f"removed: {exc}; reopen the store to recover"
                if applied
                else f"committed (journal LSN {lsn}) but not applied: {exc}; "
                "reopen the store to finish applying it"
            )
            err.__cause__ = exc
            raise self._end_group(g, Result(Outcome.COMMITTED, lsn, err)) from None

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
                    if not collides(rel, named):  # what the new directory holds wins
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
            raise refused(exc, src) from None
        if self.sync_enabled:  # it may hold data applied since the last checkpoint, not yet synced
            fd = self.fs.open(staged)
            try:
                self.fs.fsync(fd)
            finally:
                self.fs.close(fd)
        return fmt.PutStaged(as_path, name, st.size, 0)

    @staticmethod
    def _fill(results: list[Result | None], value: Result) -> list[Result]:
        return [value if r is None else r for r in results]

    def _fail(self, message: str, exc: BaseException) -> None:
        """Fail the store: every later commit is refused. In the committer thread."""
        log.error("store %s failed: %s", self.root, message)
        self.failed = StoreFailedError(message)
        self.failed.__cause__ = exc


def _unrecordable(txid: int, exc: BaseException) -> InvalidPathError:
    err = InvalidPathError(
        f"txid={txid}: a path, count or size does not fit the journal's record format ({exc})"
    )
    err.__cause__ = exc
    return err
