"""Store: the async facade. Opens and recovers, hands out transactions, serialises commits.

Commits are grouped as LevelDB's ``DBImpl::Write`` groups its ``writers_``: a transaction
queues itself; if no commit is running it leads, taking every transaction queued at that
moment as one group (one journal write, one fdatasync, one worker-thread hop), and when the
group is done it hands the lead to the head of the queue.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import threading
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

from . import _journal_format as fmt
from ._apply import SYNCFS_MIN
from ._cache import ReadCache
from ._conflicts import Conflict, listing_key
from ._contention import Claim, DeadlinePassed, PathLocks
from ._engine import (
    Durability,
    Engine,
    Move,
    Outcome,
    PendingReplace,
    PreparedTx,
    Result,
    TxOp,
    conflict_error,
)
from ._errors import (
    CommitOutcomeUnknownError,
    ConflictError,
    StoreClosedError,
    StoreFailedError,
    StoreLockedError,
    StoreMisuseError,
    StoreReadOnlyError,
)
from ._fs import AsyncWriter, FileStat, FileSystem, OsFileSystem, on_asyncio
from ._limits import PathLimits, check_tx_size
from ._paths import check_path
from ._peers import LockTicket
from ._recovery import RecoveryReport
from ._transaction import Footprint, Path, Transaction, TxState, encode_json, to_bytes
from ._worker import CommitThread

log = logging.getLogger("walstore")
T = TypeVar("T")

DEFAULT_INLINE_THRESHOLD = 128 * 1024
DEFAULT_CACHE_BYTES = 32 << 20
# Store.atomic retries a transaction that conflicted until this many seconds have passed.
# Conflicting retries take turns (_contention.py), so contention alone does not reach it.
DEFAULT_ATOMIC_TIMEOUT = 60.0


_forks = 0  # fork()s this process came through: a store opened before one is not its own


def _forked() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


class _WaiterState(enum.Enum):
    QUEUED = "queued"  # in the queue, may still leave it (cancellation rolls back)
    LEADING = "leading"  # handed the lead: must run the next group
    TAKEN = "taken"  # in a group being committed: waits shielded
    DONE = "done"  # result is set


@dataclass(eq=False)
class _Waiter:
    tx: Footprint
    prepared: PreparedTx
    event: anyio.Event
    size: int = 0  # the journal bytes of its ops, at most (``_limits.tx_bytes``)
    state: _WaiterState = _WaiterState.QUEUED
    result: Result | None = None


@dataclass(frozen=True, eq=False)
class PendingWrite:
    """A queued transaction's write of a hot file, handed on to the next holder of its key
    before the transaction commits (``_contention.py`` rule 5)."""

    tx: Footprint
    op: fmt.Put | fmt.Delete
    waiter: _Waiter


# How long a process waits for the commit lock another process holds (a group, a checkpoint
# or an open takes milliseconds; a holder stopped by SIGSTOP or a debugger can take any time).
DEFAULT_LOCK_TIMEOUT = 10.0


@dataclass(frozen=True)
class StoreStats:
    """Counters of one store instance since it was opened (``store.stats()``)."""

    commits: int  # transactions committed (a rollback or an empty transaction is none)
    groups: int  # commit groups: one journal write each (and, durable, one fdatasync)
    mean_group_size: float  # commits per group (0.0 before the first)
    conflicts: int  # transactions refused with ConflictError
    checkpoints: int  # checkpoints run (background, ``checkpoint()`` and the close's)
    journal_bytes: int  # bytes this instance wrote to the journal
    journal_syncs: int  # fdatasyncs of the journal: the commit points
    fsyncs: int  # every fsync/fdatasync the store made, directory syncs and syncfs included
    thread_hops: int  # calls handed to a worker thread (a whole commit group is one)
    turn_waits: int  # times a transaction waited for its turn on a hot path


class Store:
    """An open store. Get one with ``walstore.open(root)``; close it with ``aclose()``."""

    def __init__(
        self,
        engine: Engine,
        report: RecoveryReport,
        *,
        inline_threshold: int,
        readonly: bool,
        cache_bytes: int = 0,
        cache_max_file: int = 0,
        lock_timeout: float = 10.0,
    ) -> None:
        self._engine = engine
        self._lock_timeout = lock_timeout  # for the commit lock, with other processes
        # The commit lock is held by this process while _xdepth > 0: by the leader of a
        # group, or by an atomic retry that runs under it (``atomic``); taken under _xtake.
        # _xfree is set whenever _xdepth drops to 0.
        self._xdepth = 0
        self._xtake = anyio.Lock()
        self._xfree = anyio.Event()
        self._recovery = report
        self._inline_threshold = inline_threshold
        self._limits = engine.limits  # names and paths this store takes (``_limits.py``)
        self._readonly = readonly
        self._closed = False
        self._queue: list[_Waiter] = []
        self._leading = False
        self._idle = anyio.Event()  # set whenever no commit is running or queued
        self._idle.set()
        self._active: Counter[int] = Counter()  # begin LSNs of open transactions
        self._open_txs: set[Footprint] = set()
        self._hops = 0
        self._committer = CommitThread(f"walstore-commit {engine.root}")
        # A store dropped without aclose() must not leave its thread waiting forever. (Its
        # LOCK and journal stay open: releasing them would be file-system calls at whatever
        # moment the garbage collector runs.)
        self._finalizer = weakref.finalize(self, self._committer.stop)
        # Another process may write a store opened readonly: nothing is cached then.
        self._cache = (
            ReadCache(cache_bytes, cache_max_file) if cache_bytes > 0 and not readonly else None
        )
        # Set while a group (and the checkpoint after it) runs in a worker thread; cache hits
        # wait for it (``_read_raw``).
        self._committing: anyio.Event | None = None
        # The LSN of the last group whose changes readers on the event loop may see (the
        # cache is updated with it): transactions begin there, and reads are tagged with it.
        self._visible_lsn = engine.last_lsn
        # Other processes (``_shared.py``): the applied LSN last read from the shared header.
        self._shared_seen = engine.last_lsn
        self._published = anyio.Event()  # set (and replaced) whenever a group is published
        self._locks = PathLocks()  # queues on hot paths
        # Writes of hot files by queued transactions, in queue order, by path; and the paths
        # of each transaction's entries.
        self._pending: dict[str, list[PendingWrite]] = {}
        self._pending_of: dict[Footprint, list[str]] = {}
        # Where it may be used: this thread (so its event loop), this process.
        self._thread = threading.get_ident()
        self._forks = _forks
        self._pid = os.getpid()
        self._link = _Link(self)  # what its transactions see of it

    @property
    def root(self) -> str:
        return self._engine.root

    @property
    def durability(self) -> Durability:
        return self._engine.durability

    @property
    def recovery(self) -> RecoveryReport:
        """What opening this store recovered."""
        return self._recovery

    def __repr__(self) -> str:
        state = "closed" if self._closed else "readonly" if self._readonly else "open"
        return f"<walstore.Store {self.root!r} {state}>"

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        self._hops += 1
        return await anyio.to_thread.run_sync(fn, *args)

    async def _run_committer(self, fn: Callable[..., T], *args: Any) -> T:
        """``_run`` for the committer's calls: on asyncio through its own thread (a cheaper
        round trip, ``_worker.py``). Requires: shielded from cancellation."""
        if not on_asyncio():
            return await self._run(fn, *args)
        self._hops += 1
        return await self._committer.run(fn, *args)

    def _check_context(self) -> None:
        """Raise StoreMisuseError unless in the thread and the process that opened it (one
        thread runs one event loop at a time: loops run one after the other in it, as
        ``anyio.run`` calls do, may share the store). Two compares: on every op."""
        if _forks != self._forks:
            raise StoreMisuseError(
                f"store {self.root} was opened by process {self._pid}, and this is a child "
                f"it forked (pid {os.getpid()}): the child shares the parent's journal and lock "
                "handles, and writing through them loses commits. Open stores after fork(), "
                "in the process that uses them (one writer process at a time)"
            )
        if threading.get_ident() != self._thread:
            raise StoreMisuseError(
                f"store {self.root} is used from another thread than the one that opened it: "
                "its tasks and events belong to that thread's event loop, and two loops "
                "would wait on each other forever. Use a store from the thread (and loop) "
                "that opened it: from another thread, hand the work to that loop "
                "(anyio.from_thread.run)"
            )

    def _check_open(self) -> None:
        self._check_context()
        if self._closed:
            raise StoreClosedError(f"store {self.root} is closed")
        self._engine.peers.check_fork()

    def _see_others(self) -> None:
        """Before a read, with other processes: their commits since this one last looked
        are visible on disk, so reads from here on are tagged with the header's applied
        LSN; the read cache may hold files they changed, so it is dropped. One pread."""
        engine = self._engine
        if engine.exclusive or self._readonly:
            return
        applied = engine.peers.shared_applied()
        if applied <= self._shared_seen:
            return
        self._shared_seen = applied
        if applied > engine.last_lsn and self._cache is not None:
            self._cache.clear()
        self._visible_lsn = max(self._visible_lsn, applied)

    async def _take_xlock(self) -> None:
        """The commit lock, held against other processes until ``_lead`` ends. Waits up to
        ``lock_timeout`` (then StoreLockedError naming the last holder). Cancellation: the
        wait is abandoned and nothing is held."""
        peers = self._engine.peers
        if peers.xlock_try():
            return
        ticket = LockTicket()
        try:
            with anyio.fail_after(self._lock_timeout):
                await anyio.to_thread.run_sync(peers.xlock_acquire, ticket, abandon_on_cancel=True)
        except BaseException as exc:
            peers.xlock_abandon(ticket)
            if isinstance(exc, TimeoutError):
                raise StoreLockedError(peers.holder_message()) from None
            raise

    async def _hold_xlock(self, *, join: bool = True) -> None:
        """Hold the commit lock. ``join``: share it if this process holds it already (a
        group's leader joins the atomic retry whose commit it carries). Without ``join`` (an
        atomic retry that runs under the lock), wait until this process has let it go and
        take it afresh, behind any other process that waits for it: retries that joined
        each other could hold it for ever. Cancellation: as ``_take_xlock``."""
        if not self._xtake.locked():  # the fast paths: no wait, no checkpoint
            if join and self._xdepth:
                self._xdepth += 1  # held here already
                return
            if not self._xdepth and self._engine.peers.xlock_try():
                self._xdepth = 1  # free, and no other process waits for it
                return
        while True:
            while not join and self._xdepth:
                await self._xfree.wait()
            async with self._xtake:
                if self._xdepth and not join:
                    continue  # another retry took it first: wait for it again
                if not self._xdepth:
                    await self._take_xlock()
                self._xdepth += 1
                return

    def _drop_xlock(self) -> None:
        self._xdepth -= 1
        if not self._xdepth:
            self._engine.peers.xlock_release()
            self._xfree.set()
            self._xfree = anyio.Event()

    def _pass_lead(self) -> None:
        """Hand the committer's role to the next queued transaction, or give it up."""
        if self._queue:
            head = self._queue[0]
            head.state = _WaiterState.LEADING
            head.event.set()
        else:
            self._leading = False
            self._idle.set()

    def _check_writable(self) -> None:
        self._check_open()
        if self._readonly:
            raise StoreReadOnlyError(f"store {self.root} was opened readonly")
        if self._engine.failed is not None:
            raise StoreFailedError(
                f"store {self.root} failed and refuses writes: {self._engine.failed}; "
                "reopen it to recover"
            )

    # -- transactions ----------------------------------------------------------------------

    def transaction(self) -> Transaction:
        """A new transaction; use it as ``async with store.transaction() as tx:``."""
        return self._transaction(self._locks.claim())

    def _transaction(self, claim: Claim) -> Transaction:
        """A transaction with a txid from the engine and its Footprint (on the event loop)."""
        self._check_writable()
        fp = Footprint(self._engine.new_txid(), self._visible_lsn, claim)
        self._active[fp.begin_lsn] += 1
        self._open_txs.add(fp)
        return Transaction(self._link, fp)

    def _forget(self, tx: Footprint) -> None:
        """The transaction is over and its outcome published: let go of its hot paths."""
        if tx in self._open_txs:
            self._open_txs.discard(tx)
            self._active[tx.begin_lsn] -= 1
            if not self._active[tx.begin_lsn]:
                del self._active[tx.begin_lsn]
        self._locks.release_all(tx.claim)

    async def _admit(self, claim: Claim, key: str) -> None:
        """Before a transaction reads ``key``: wait for its turn if the key is hot."""
        if self._locks:
            await self._locks.admit(claim, key)

    def _pending_write(self, claim: Claim, path: str) -> PendingWrite | None:
        """The newest queued write of ``path``, if ``claim`` holds its key: that is what the
        holder reads (rule 5). With other processes, a commit of theirs that lands first can
        fail the writer and with it every reader down the chain: those retry, and from their
        third try on run under the commit lock (``atomic``), where no other process commits."""
        chain = self._pending.get(path)
        return chain[-1] if chain and path in claim.held else None

    def _hand_on(self, w: _Waiter) -> None:
        """Rule 5: a transaction just queued for commit lets go of its hot keys, handing on
        the small values and deletes it writes as pending writes."""
        claim = w.tx.claim
        if not claim.held:
            return
        tx = w.tx
        if any(
            k not in claim.held and self._locks.hot(k)
            for k in (*tx.reads, *map(listing_key, tx.listed), *map(listing_key, tx.subtrees))
        ):
            return  # it read a hot key out of turn: it may well fail, so hand nothing on
        ops = w.prepared.ops
        for key in sorted(claim.held):
            if key.endswith("/"):  # a listing or a tree: kept if this commit changes it
                if any(_covers(op.path, key) for op in ops):
                    continue
            else:
                changed = [op for op in ops if _covers(op.path, key + "/")]
                if len(changed) == 1 and isinstance(changed[0], fmt.Put | fmt.Delete):
                    if changed[0].path != key:
                        continue  # a directory above it, changed as a whole: kept
                    self._pending.setdefault(key, []).append(PendingWrite(w.tx, changed[0], w))
                    self._pending_of.setdefault(w.tx, []).append(key)
                    self._locks.pin(key)
                elif changed:  # a staged value, a move or a directory op: kept
                    continue
            self._locks.release(claim, key)

    def _drop_pending(self, tx: Footprint) -> None:
        for path in self._pending_of.pop(tx, ()):
            chain = [pw for pw in self._pending.get(path, ()) if pw.tx is not tx]
            if chain:
                self._pending[path] = chain
            else:
                self._pending.pop(path, None)
            self._locks.unpin(path)

    def _resolve_deps(self, group: list[_Waiter]) -> dict[_Waiter, Result]:
        """As a group forms: a read of a pending write (rule 5) whose writer committed in an
        earlier group becomes a read at that group's LSN; one whose writer is ahead in this
        group stays a dependency for validation; one whose writer failed is a conflict."""
        rejected: dict[_Waiter, Result] = {}
        ahead: set[_Waiter] = set()
        for w in group:
            for path, pw in w.tx.deps.items():
                r = pw.waiter.result
                if r is not None and r.outcome is Outcome.COMMITTED:
                    w.tx.reads[path] = r.lsn
                elif pw.waiter in ahead:
                    w.prepared.deps[path] = pw.tx.txid
                else:
                    conflict = Conflict(path, 0, f"{path!r} was read before its writer failed")
                    self._engine.counters.conflicts += 1
                    error = conflict_error(w.tx.txid, conflict)
                    rejected[w] = Result(Outcome.REJECTED, error=error)
                    break
            ahead.add(w)
        return rejected

    async def _await_deps(self, tx: Footprint) -> None:
        """A read-only transaction that read pending writes returns once they committed
        (else ConflictError), so it never shows what was not committed. Cancellation:
        propagates (the caller rolls back)."""
        for path, pw in tx.deps.items():
            while pw.waiter.result is None and pw.tx.state is TxState.COMMITTING:
                await self._published.wait()
            r = pw.waiter.result
            if r is None or r.outcome is not Outcome.COMMITTED:
                self._engine.counters.conflicts += 1
                raise conflict_error(tx.txid, Conflict(path, 0, f"{path!r}: its writer failed"))
            tx.reads[path] = r.lsn
        conflict = self._stale(tx.reads, tx.listed)
        if conflict is not None:
            self._engine.counters.conflicts += 1
            raise conflict_error(tx.txid, conflict)

    def _stale(self, reads: Mapping[str, int], listed: Mapping[str, int]) -> Conflict | None:
        """Whether a commit changed one of these files or listings since they were read.
        On the event loop: single-key lookups of the conflict index (``_conflicts.py``)."""
        return self._engine.conflicts.check(reads, listed, {})

    async def _wait_visible(self, lsn: int) -> None:
        """Wait until the group that committed ``lsn`` is published (a retry then reads what
        it wrote), or nothing more will be."""
        while self._visible_lsn < lsn and self._leading and not self._closed:
            await self._published.wait()

    async def _stage(self, tx: Footprint, index: int, data: bytes) -> fmt.PutStaged:
        self._check_writable()
        op = await self._run(self._engine.stage, tx.txid, index, data, not tx.staging_made)
        tx.staging_made = True
        return op

    async def _discard(self, tx: Footprint) -> None:
        """Remove what a transaction that already ended staged since (shielded)."""
        with anyio.CancelScope(shield=True):
            try:
                await self._run(self._engine.discard, tx.txid)
            except OSError as exc:  # the next open removes it as an orphan
                log.warning("txid=%d: could not remove staged files: %s", tx.txid, exc)

    async def _read_staged(self, name: str) -> bytes:
        return await self._run(
            self._engine.fs.read_file, os.path.join(self._engine.staging_dir, name)
        )

    async def _read_raw(self, path: str) -> bytes:
        self._check_open()
        cache = self._cache
        if cache is None or self._engine.partial:
            self._see_others()
            return await self._run(self._engine.read, path)
        self._see_others()
        hit = cache.get(path)
        if hit is not None:
            committing = self._committing
            if committing is None:
                await anyio.lowlevel.checkpoint()  # still a checkpoint, as every await here is
                return hit
            # A group is being committed in a worker thread, which needs the GIL at every
            # step. Readers served from memory in a loop would hold it: each of the thread's
            # syscalls would then wait out the 5 ms switch interval, and commits would crawl
            # (16 writers beside two such readers: 2,000 transfers took over 120 s). So a hit
            # waits for that group, once, and reads what it left: as fresh, and the loop is
            # idle while the thread runs.
            await committing.wait()
            hit = cache.get(path)
            if hit is not None:
                return hit
        generation = cache.generation
        data, cacheable = await self._run(self._engine.read_cacheable, path)
        if cacheable:
            cache.insert(path, data, generation)
        return data

    async def _lstat_raw(self, path: str) -> FileStat | None:
        self._check_open()
        self._see_others()
        return await self._run(self._engine.lstat, path)

    async def _open_stream(self, tx: Footprint, index: int) -> tuple[str, AsyncWriter]:
        self._check_writable()
        engine = self._engine
        await self._run(engine.check_space, 0, "a streamed value")
        if not tx.staging_made:
            await self._run(engine.make_staging_dir, tx.txid)
            tx.staging_made = True
        name = f"{tx.txid}/{index}"
        self._hops += 1
        return name, await engine.fs.open_writer(os.path.join(engine.staging_dir, name))

    async def _check_parents(self, path: str) -> None:
        self._check_open()
        await self._run(self._engine.check_parents, path)

    async def _list_raw(self, path: str) -> list[str]:
        self._check_open()
        self._see_others()
        return await self._run(self._engine.listdir, path)

    async def _end(self, tx: Footprint, *, by_close: bool = False) -> None:
        """Roll back: drop the transaction and whatever it staged (shielded; on the event
        loop, the removal in a worker thread)."""
        tx.rolled_back(by_close=by_close)
        self._drop_pending(tx)
        self._forget(tx)
        if tx.staged:
            with anyio.CancelScope(shield=True):
                try:
                    await self._run(self._engine.discard, tx.txid)
                except OSError as exc:  # the next open removes it as an orphan
                    log.warning("txid=%d: could not remove staged files: %s", tx.txid, exc)
        log.debug("txid=%d rolled back", tx.txid)

    async def _commit(self, tx: Footprint, ops: tuple[TxOp, ...]) -> None:
        """``Transaction.commit``: queue, lead or wait for the group, settle (on the event
        loop; the group runs in the committer thread)."""
        try:
            self._check_writable()
            # A cancellation already pending (say, delivered in the block's last await) is
            # before the commit point: roll back.
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            await self._end(tx)
            raise
        tx.committing()
        prepared = PreparedTx(
            tx.txid,
            tx.begin_lsn,
            ops,
            staged=tx.staged > 0,
            reads=tx.reads,
            listed=tx.listed,
            subtrees=tx.subtrees,
        )
        try:
            size = check_tx_size(tx.txid, prepared.ops)
            await self._check_early(tx, prepared)
            read_only = not prepared.ops and not prepared.subtrees
            if read_only and tx.deps:
                await self._await_deps(tx)
            engine = self._engine
            if (
                read_only
                and not engine.exclusive
                and engine.peers.shared_applied() > engine.last_lsn
            ):
                # Other processes committed since this one caught up: what it read may have
                # changed after it read it; the committer validates it against their commits.
                read_only = False
        except BaseException:
            await self._end(tx)
            raise
        if read_only:  # no journal, no thread
            tx.committed()
            self._forget(tx)
            return
        w = _Waiter(tx, prepared, anyio.Event(), size)
        self._queue.append(w)
        self._hand_on(w)
        cancelled: BaseException | None = None
        if self._leading:
            try:
                await w.event.wait()
            except BaseException as exc:  # a cancellation while waiting for the committer
                if w.state is _WaiterState.QUEUED:
                    self._queue.remove(w)
                    await self._end(tx)
                    raise
                cancelled = exc  # taken or handed the lead: finish first, deliver after
        else:
            self._leading = True
            self._idle = anyio.Event()
            w.state = _WaiterState.LEADING
        if w.state is _WaiterState.LEADING and not self._engine.exclusive:
            try:
                await self._hold_xlock()
            except BaseException:  # cancelled or timed out before the commit point
                self._queue.remove(w)
                self._pass_lead()
                await self._end(tx)
                raise
        with anyio.CancelScope(shield=True):
            if w.state is _WaiterState.LEADING:
                try:
                    await self._lead()
                except BaseException:  # e.g. a simulated crash: the outcome is unknown
                    tx.failed()
                    self._forget(tx)
                    raise
            elif w.state is _WaiterState.TAKEN:
                await w.event.wait()
        assert w.result is not None
        await self._settle(tx, w.result)
        if cancelled is not None:
            raise cancelled
        await anyio.lowlevel.checkpoint()  # deliver a cancellation that arrived while shielded

    async def _check_early(self, tx: Footprint, prepared: PreparedTx) -> None:
        """Before queueing, on the event loop: a transaction whose reads are stale already
        fails here (ConflictError), with no thread hop and no journal work. One that writes
        a hot path it does not hold (rule 3 of ``_contention.py``) fails if it read the
        path out of turn, and takes its turn if it wrote blindly (a blind write never
        conflicts: where it cannot wait, say for its own task, it goes ahead). Cancellation:
        propagates (the caller rolls back)."""
        conflict = self._stale(tx.reads, tx.listed)
        claim = tx.claim
        if conflict is None and self._locks:
            for op in prepared.ops:
                if op.path in claim.held or not self._locks.hot(op.path):
                    continue
                if op.path in tx.reads:
                    conflict = Conflict(op.path, 0, f"{op.path!r} is being changed in turn")
                    break
                if await self._locks.admit(claim, op.path):  # it may have waited
                    conflict = self._stale(tx.reads, tx.listed)
                    if conflict is not None:
                        break
        if conflict is not None:
            self._engine.counters.conflicts += 1
            raise conflict_error(tx.txid, conflict)

    async def _lead(self) -> None:
        """Commit one group: every transaction queued now. Requires: self._leading is ours."""
        # One turn of the event loop first: the tasks the last group just released run their
        # next transactions into the queue and this group, instead of waiting out a whole
        # commit for the next one (16 writers: groups of 16 instead of 8).
        await anyio.lowlevel.cancel_shielded_checkpoint()
        group, self._queue = _take_group(self._queue)
        for w in group:
            w.state = _WaiterState.TAKEN
        rejected = self._resolve_deps(group)
        oldest = min(self._active, default=self._engine.last_lsn)
        committing = self._committing = anyio.Event()
        try:
            try:
                sent = [w for w in group if w not in rejected]
                done = await self._run_committer(
                    self._engine.commit_group, [w.prepared for w in sent], oldest
                )
            except BaseException as exc:
                if self._cache is not None:
                    self._cache.clear()
                err = CommitOutcomeUnknownError(f"commit outcome unknown: {exc!r}")
                err.__cause__ = exc
                for w in group:
                    w.result = rejected.get(w) or Result(Outcome.UNKNOWN, error=err)
                    w.state = _WaiterState.DONE
                    self._drop_pending(w.tx)
                    w.event.set()
                raise
            by_waiter = dict(zip(sent, done, strict=True))
            results = [rejected.get(w) or by_waiter[w] for w in group]
            self._publish(group, results)
            for w, r in zip(group, results, strict=True):
                w.result = r
                w.state = _WaiterState.DONE
                w.event.set()
            if self._engine.checkpoint_due():
                try:
                    await self._run_committer(self._engine.checkpoint)
                except StoreFailedError as exc:
                    log.error("background checkpoint failed: %s", exc)
                except OSError:
                    pass  # no space (logged): nothing is at risk, it is tried again later
        finally:
            try:
                if not self._engine.exclusive:
                    self._drop_xlock()
            finally:
                self._committing = None
                committing.set()
                self._published.set()
                self._published = anyio.Event()
                self._pass_lead()

    def _publish(self, group: list[_Waiter], results: list[Result]) -> None:
        """Show a group's changes to event-loop readers, in one step: update the read cache,
        then the LSN new transactions begin at; the group's pending writes are now committed
        (or never will be)."""
        for w in group:
            self._drop_pending(w.tx)
        cache = self._cache
        engine = self._engine
        foreign, engine.foreign = engine.foreign, []
        if cache is not None:
            if engine.cache_stale:
                engine.cache_stale = False
                cache.clear()
            for files, trees in foreign:  # changed by other processes
                for p in files:
                    cache.dropped(p)
                for p in trees:
                    cache.dropped_tree(p)
            for w, r in zip(group, results, strict=True):
                if r.outcome is not Outcome.COMMITTED:
                    continue
                if r.error is not None:  # committed but not (wholly) applied
                    cache.clear()
                    break
                for op in w.prepared.ops:
                    if isinstance(op, fmt.Put):
                        cache.written(op.path, op.data)
                    elif isinstance(op, PendingReplace | fmt.DeleteDir | fmt.ReplaceDir):
                        cache.dropped_tree(op.path)
                    else:
                        cache.dropped(op.path)
                        if isinstance(op, Move):
                            cache.dropped(op.src)
        self._visible_lsn = max(self._visible_lsn, self._engine.last_lsn)

    async def _settle(self, tx: Footprint, result: Result) -> None:
        """Move the transaction to its outcome (on the event loop)."""
        self._forget(tx)
        if result.outcome is Outcome.COMMITTED:
            tx.committed(result.lsn)
        elif result.outcome is Outcome.UNKNOWN:
            tx.failed()
        else:
            await self._end(tx)
        if result.error is not None:
            raise result.error

    # -- reads -------------------------------------------------------------------------------

    async def read(self, path: Path) -> bytes:
        """The content of ``path``; FileNotFoundError if missing. Never shows part of a
        transaction. Cancellation: the read in flight finishes in its worker thread; the
        cancellation is delivered then or at the caller's next await."""
        return await self._read_raw(check_path(path, limits=self._limits))

    async def read_text(self, path: Path, encoding: str = "utf-8") -> str:
        """``read`` decoded. Cancellation: as ``read``."""
        return (await self.read(path)).decode(encoding)

    async def read_json(self, path: Path) -> Any:
        """``read`` parsed as JSON. Cancellation: as ``read``."""
        return json.loads(await self.read(path))

    async def exists(self, path: Path) -> bool:
        """Whether a file or directory exists at ``path``. Cancellation: as ``read``."""
        p = check_path(path, allow_root=True, limits=self._limits)
        return await self._lstat_raw(p) is not None

    async def list(self, path: Path = "") -> list[str]:
        """Sorted names in directory ``path`` (``.walstore`` hidden). Cancellation: as
        ``read``."""
        return await self._list_raw(check_path(path, allow_root=True, limits=self._limits))

    async def stat(self, path: Path) -> FileStat:
        """Kind, size and mtime of ``path``; FileNotFoundError if missing. Cancellation: as
        ``read``."""
        p = check_path(path, allow_root=True, limits=self._limits)
        st = await self._lstat_raw(p)
        if st is None:
            raise FileNotFoundError(2, "No such file or directory", p)
        return st

    # -- one-op transactions -----------------------------------------------------------------

    async def write(self, path: Path, data: bytes | bytearray | memoryview) -> None:
        """Write one file as its own transaction. Cancellation: as ``Transaction.commit``."""
        value = to_bytes(data)
        async with self.transaction() as tx:
            await tx.write(path, value)

    async def write_text(self, path: Path, text: str, encoding: str = "utf-8") -> None:
        """Write one text file as its own transaction. Cancellation: as ``write``."""
        async with self.transaction() as tx:
            await tx.write_text(path, text, encoding)

    async def write_json(self, path: Path, obj: Any, *, indent: int | None = 2) -> None:
        """Write one JSON file as its own transaction. Cancellation: as ``write``."""
        value = encode_json(obj, indent)
        async with self.transaction() as tx:
            await tx.write(path, value)

    async def delete(self, path: Path, missing_ok: bool = False) -> None:
        """Delete one file as its own transaction. Cancellation: as ``write``."""
        async with self.transaction() as tx:
            await tx.delete(path, missing_ok=missing_ok)

    async def atomic(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        attempts: int | None = None,
        timeout: float | None = DEFAULT_ATOMIC_TIMEOUT,
        **kwargs: Any,
    ) -> T:
        """Run ``await fn(tx, *args, **kwargs)`` in a transaction and commit it, retrying it
        while it fails with ConflictError. Returns what ``fn`` returned. ``fn`` may run
        several times: keep its side effects in ``tx``.

        Under contention the retries take turns: a retry waits until the commit that beat
        it is visible, then queues, oldest caller first, on the paths it conflicted on, and
        a transaction that reads a path others queue on waits there for its turn too. So
        with the defaults (no limit on ``attempts``, a ``timeout`` of 60 s) contention alone
        never makes it raise, however many tasks contend; the cost is that transactions on
        a hot path commit one at a time, as in SQLite. Give ``attempts`` (tries in all) or
        ``timeout`` (seconds, or None for no deadline) to bound it: reaching either raises
        ConflictError, saying how many attempts ran for how long. Cancellation: as
        ``Transaction.commit``; a wait for a turn is abandoned."""
        if attempts is not None and attempts < 1:
            raise ValueError(f"attempts must be >= 1 or None, not {attempts}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, not {timeout}")
        start = anyio.current_time()
        claim = self._locks.claim(math.inf if timeout is None else start + timeout)
        hot: set[str] = set()  # keys it conflicted on: taken, in turn, before each retry
        tries = 0
        last: ConflictError | None = None
        try:
            while True:
                try:
                    tries += 1
                    # With other processes, turns taken here do not hold them off: from the
                    # third try on, the try runs under the commit lock (SQLite's BEGIN
                    # IMMEDIATE), so what it reads stays as it read it until it commits. The
                    # lock is taken first, with no turn held: a retry that holds it may wait
                    # for a turn, never a turn holder for it.
                    locked = tries > 2 and not self._engine.exclusive
                    if locked:
                        self._locks.release_all(claim)
                        await self._hold_xlock(join=False)
                    try:
                        if hot:
                            await self._locks.acquire_all(claim, hot)
                        async with self._transaction(claim) as tx:
                            result = await fn(tx, *args, **kwargs)
                    finally:
                        if locked:
                            self._drop_xlock()
                    return result
                except DeadlinePassed:
                    raise self._gave_up(tries, attempts, timeout, start, last) from last
                except ConflictError as exc:
                    last = exc
                    if (attempts is not None and tries >= attempts) or (
                        anyio.current_time() >= claim.deadline
                    ):
                        raise self._gave_up(tries, attempts, timeout, start, exc) from exc
                    log.debug("txid=%d conflicted (%s); retry %d", tx.txid, exc, tries)
                    hot.update(exc.paths)
                    await self._wait_visible(exc._lsn)
        finally:
            self._locks.release_all(claim)

    @staticmethod
    def _gave_up(
        tries: int,
        attempts: int | None,
        timeout: float | None,
        start: float,
        last: ConflictError | None,
    ) -> ConflictError:
        limit = (
            f"attempts={attempts}"
            if attempts is not None and tries >= attempts
            else (f"timeout={timeout} s")
        )
        why = f"; the last conflict: {last}" if last is not None else ""
        return ConflictError(
            f"Store.atomic gave up after {tries} attempt(s) in "
            f"{anyio.current_time() - start:.3f} s, its limit {limit} reached{why}. "
            "Other commits kept changing what it read: raise the limit, or leave attempts "
            "and timeout at their defaults to wait for a turn",
            paths=last.paths if last is not None else (),
        )

    # -- maintenance -------------------------------------------------------------------------

    async def checkpoint(self) -> None:
        """Make everything committed durable in place and start a new journal segment.
        Cancellation: the checkpoint runs to its end shielded, then it is delivered."""
        self._check_writable()
        while self._leading:  # the commit lock is the leader's; checkpoint between groups
            await self._idle.wait()
        self._leading = True
        self._idle = anyio.Event()
        held = False
        try:
            if not self._engine.exclusive:
                await self._hold_xlock()
                held = True
            with anyio.CancelScope(shield=True):
                await self._run(self._engine.checkpoint)
        finally:
            try:
                if held:
                    self._drop_xlock()
            finally:
                self._pass_lead()
        await anyio.lowlevel.checkpoint()

    def stats(self) -> StoreStats:
        """Counters since open: see ``StoreStats``."""
        c = self._engine.counters
        calls = self._engine.fs.calls
        return StoreStats(
            commits=c.commits,
            groups=c.groups,
            mean_group_size=c.commits / c.groups if c.groups else 0.0,
            conflicts=c.conflicts,
            checkpoints=c.checkpoints,
            journal_bytes=c.journal_bytes,
            journal_syncs=c.journal_syncs,
            fsyncs=calls["fsync"] + calls["fdatasync"] + calls["fsync_dir"] + calls["syncfs"],
            thread_hops=self._hops,
            turn_waits=self._locks.waits,
        )

    async def aclose(self) -> None:
        """Checkpoint (unless readonly or failed) and release the lock. Idempotent. Transactions
        still open are rolled back. Cancellation: closing runs shielded, then it is delivered."""
        if self._closed:
            return
        if _forks != self._forks:  # a forked child: close without touching a file or the
            self._closed = True  # lock (its handles are the parent's; unlocking is theirs)
            self._finalizer.detach()
            return
        self._check_context()
        self._closed = True
        with anyio.CancelScope(shield=True):
            while self._leading:  # let queued and running commits finish first
                await self._idle.wait()
            for tx in list(self._open_txs):
                if tx.state is TxState.ACTIVE:
                    await self._end(tx, by_close=True)
            try:
                if not self._readonly:
                    await self._run(self._engine.close)
                else:
                    self._engine.fs.release(self._engine.root)  # only a descriptor to close
            finally:
                self._committer.stop()
                self._finalizer.detach()
        await anyio.lowlevel.checkpoint()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _Link:
    """``TxLink``: what a transaction sees of its store, and the only way it reaches it. On
    the event loop; the reads and writes hop to worker threads (``Store._run``)."""

    __slots__ = ("_store",)

    def __init__(self, store: Store) -> None:
        self._store = store

    def check_context(self) -> None:
        self._store._check_context()

    @property
    def limits(self) -> PathLimits:
        return self._store._limits

    # -- reads

    def stale(self, reads: Mapping[str, int], listed: Mapping[str, int]) -> Conflict | None:
        return self._store._stale(reads, listed)

    async def admit(self, claim: Claim, key: str) -> None:
        await self._store._admit(claim, key)

    @property
    def visible_lsn(self) -> int:
        return self._store._visible_lsn

    def pending_write(self, claim: Claim, path: str) -> PendingWrite | None:
        return self._store._pending_write(claim, path)

    async def read(self, path: str) -> bytes:
        return await self._store._read_raw(path)

    async def read_staged(self, name: str) -> bytes:
        return await self._store._read_staged(name)

    async def lstat(self, path: str) -> FileStat | None:
        return await self._store._lstat_raw(path)

    async def listdir(self, path: str) -> list[str]:
        return await self._store._list_raw(path)

    async def check_parents(self, path: str) -> None:
        await self._store._check_parents(path)

    # -- staging

    @property
    def inline_threshold(self) -> int:
        return self._store._inline_threshold

    async def stage(self, tx: Footprint, index: int, data: bytes) -> fmt.PutStaged:
        return await self._store._stage(tx, index, data)

    @property
    def sync(self) -> bool:
        return self._store._engine.sync

    async def open_stream(self, tx: Footprint, index: int) -> tuple[str, AsyncWriter]:
        return await self._store._open_stream(tx, index)

    async def discard(self, tx: Footprint) -> None:
        await self._store._discard(tx)

    # -- ending

    async def commit(self, tx: Footprint, ops: tuple[TxOp, ...]) -> None:
        await self._store._commit(tx, ops)

    async def roll_back(self, tx: Footprint) -> None:
        await self._store._end(tx)


def _take_group(queue: list[_Waiter]) -> tuple[list[_Waiter], list[_Waiter]]:
    """The next group (the queue's head, and as many after it as one COMMIT record holds)
    and what stays queued for the next: a group too big for its record would fail whole."""
    if not queue:
        return [], []
    room = fmt.MAX_PAYLOAD - fmt.GROUP_HEADER_SIZE - queue[0].size
    for n, w in enumerate(queue[1:], 1):
        room -= w.size
        if room < 0:
            return queue[:n], queue[n:]
    return queue, []


def _covers(path: str, key: str) -> bool:
    """Whether a change at ``path`` can change what ``key`` (``a/b`` or ``dir/``, with a
    slash) covers: a path at or below the directory, or a directory above it."""
    return key == "/" or (path + "/").startswith(key) or key.startswith(path + "/")


async def _open(
    root: str | os.PathLike[str],
    *,
    durability: Durability,
    create: bool,
    lock_timeout: float | None,
    readonly: bool,
    fs: FileSystem | None,
    inline_threshold: int,
    checkpoint_bytes: int,
    cache_bytes: int,
    cache_max_file: int,
    checkpoint_syncfs: bool,
    exclusive: bool,
) -> Store:
    if not isinstance(durability, Durability):
        raise TypeError(f"durability must be a walstore.Durability, not {durability!r}")
    if lock_timeout is None:
        lock_timeout = 0.0 if exclusive else DEFAULT_LOCK_TIMEOUT
    if lock_timeout < 0 or math.isnan(lock_timeout):
        raise ValueError(f"lock_timeout must be >= 0, not {lock_timeout}")
    engine = Engine(
        fs or OsFileSystem(),
        os.fspath(root),
        durability,
        checkpoint_bytes=checkpoint_bytes,
        syncfs_min=SYNCFS_MIN if checkpoint_syncfs else None,
        exclusive=exclusive,
    )
    deadline = anyio.current_time() + lock_timeout
    if not exclusive and not readonly:  # wait in turn for the commit lock, then open
        await _wait_for_commit_lock(engine, lock_timeout)
    while True:
        try:
            with anyio.CancelScope(shield=True):
                try:
                    report = await anyio.to_thread.run_sync(
                        lambda: engine.open(create=create, readonly=readonly)
                    )
                except BaseException:
                    engine.peers.xlock_release()  # held for it, if it failed before taking it over
                    raise
            break
        except StoreLockedError:
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                raise
            await anyio.sleep(min(0.02, remaining))  # flock has no timeout: poll
    store = Store(
        engine,
        report,
        inline_threshold=inline_threshold,
        readonly=readonly,
        cache_bytes=cache_bytes,
        cache_max_file=cache_max_file,
        lock_timeout=lock_timeout,
    )
    try:
        await anyio.lowlevel.checkpoint()
    except BaseException:
        await store.aclose()
        raise
    return store


async def _wait_for_commit_lock(engine: Engine, timeout: float) -> None:
    """Hold the commit lock for ``engine.open`` (which releases it). StoreLockedError after
    ``timeout`` seconds; cancellation: the wait is abandoned."""
    ticket = LockTicket()
    try:
        if engine.peers.xlock_try():  # free: taken without a wait (lock_timeout=0 can open)
            return
        with anyio.fail_after(timeout):
            await anyio.to_thread.run_sync(
                engine.peers.xlock_acquire, ticket, abandon_on_cancel=True
            )
    except (FileNotFoundError, NotADirectoryError):
        return  # no store there yet: the open makes it, or says why it cannot
    except BaseException as exc:
        engine.peers.xlock_abandon(ticket)
        if isinstance(exc, TimeoutError):
            raise StoreLockedError(engine.peers.holder_message()) from None
        raise


class _Opener:
    """What ``walstore.open`` returns: await it, or use it as ``async with``."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._store: Store | None = None

    def __await__(self) -> Generator[Any, None, Store]:
        return _open(**self._kwargs).__await__()

    async def __aenter__(self) -> Store:
        self._store = await _open(**self._kwargs)
        return self._store

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._store is not None
        await self._store.aclose()


def open(
    root: str | os.PathLike[str],
    *,
    durability: Durability = Durability.FULL,
    create: bool = True,
    lock_timeout: float | None = None,
    readonly: bool = False,
    fs: FileSystem | None = None,
    inline_threshold: int = DEFAULT_INLINE_THRESHOLD,
    checkpoint_bytes: int = 8 << 20,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    cache_max_file: int = 64 << 10,
    checkpoint_syncfs: bool = True,
    exclusive: bool = False,
) -> _Opener:
    """Open (creating if ``create``) the store at ``root`` and recover it.

    Use ``async with walstore.open(root) as store:`` or ``store = await walstore.open(root)``.
    Raises StoreLockedError if another process holds the store for longer than
    ``lock_timeout`` seconds, CorruptionError if the journal is damaged beyond a torn tail.
    ``readonly`` opens without the lock and without recovery, for reading only. ``fs``
    replaces the file system (see ``walstore.testing``). Files of up to ``cache_max_file``
    bytes that the store reads or writes are kept in a read cache of ``cache_bytes`` (32 MiB;
    0 turns it off), so their reads need no worker thread; files changed behind the store's
    back (not through it) may then read stale until it is reopened (a ``readonly`` store never
    caches). A checkpoint (and recovery) that has
    ``SYNCFS_MIN`` (16) or more files and directories to make durable does it with one
    ``syncfs`` of the store's file system, where that reports errors (Linux 5.8+);
    ``checkpoint_syncfs=False`` fsyncs each instead, for a file system shared with writers
    whose dirty data a syncfs should not wait for. Any number of processes may open the
    store for writing at once: each holds the commit lock only while it commits, and
    ``lock_timeout`` (default 10 s) bounds each wait for it (docs/commit-protocol.md,
    section 7). ``exclusive=True`` holds the lock for the process's life instead: another
    writer process gets StoreLockedError (``lock_timeout`` default 0 then). Cancellation:
    recovery runs to its end shielded; the store is then closed again and the cancellation
    delivered.
    """
    return _Opener(
        root=root,
        durability=durability,
        create=create,
        lock_timeout=lock_timeout,
        readonly=readonly,
        fs=fs,
        inline_threshold=inline_threshold,
        checkpoint_bytes=checkpoint_bytes,
        cache_bytes=cache_bytes,
        cache_max_file=cache_max_file,
        checkpoint_syncfs=checkpoint_syncfs,
        exclusive=exclusive,
    )
