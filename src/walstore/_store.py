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
import random
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

from . import _journal_format as fmt
from ._apply import SYNCFS_MIN
from ._cache import ReadCache
from ._engine import Durability, Engine, Move, Outcome, PendingReplace, PreparedTx, Result
from ._errors import (
    ConflictError,
    StoreClosedError,
    StoreError,
    StoreFailedError,
    StoreLockedError,
)
from ._fs import AsyncWriter, FileStat, FileSystem, OsFileSystem, on_asyncio
from ._paths import check_path
from ._recovery import RecoveryReport
from ._transaction import Path, Transaction, TxState, encode_json, to_bytes
from ._worker import CommitThread

log = logging.getLogger("walstore")
T = TypeVar("T")

DEFAULT_INLINE_THRESHOLD = 128 * 1024
DEFAULT_CACHE_BYTES = 32 << 20


class _WaiterState(enum.Enum):
    QUEUED = "queued"  # in the queue, may still leave it (cancellation rolls back)
    LEADING = "leading"  # handed the lead: must run the next group
    TAKEN = "taken"  # in a group being committed: waits shielded
    DONE = "done"  # result is set


@dataclass(eq=False)
class _Waiter:
    tx: Transaction
    prepared: PreparedTx
    event: anyio.Event
    state: _WaiterState = _WaiterState.QUEUED
    result: Result | None = None


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
    ) -> None:
        self._engine = engine
        self._recovery = report
        self._inline_threshold = inline_threshold
        self._readonly = readonly
        self._closed = False
        self._queue: list[_Waiter] = []
        self._leading = False
        self._idle = anyio.Event()  # set whenever no commit is running or queued
        self._idle.set()
        self._active: Counter[int] = Counter()  # begin LSNs of open transactions
        self._open_txs: set[Transaction] = set()
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
        # cache is updated with it): transactions begin there.
        self._visible_lsn = engine.last_lsn

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

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"store {self.root} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._readonly:
            raise StoreError(f"store {self.root} was opened readonly")
        if self._engine.failed is not None:
            raise StoreFailedError(
                f"store {self.root} failed and refuses writes: {self._engine.failed}; "
                "reopen it to recover"
            )

    # -- transactions ----------------------------------------------------------------------

    def transaction(self) -> Transaction:
        """A new transaction; use it as ``async with store.transaction() as tx:``."""
        self._check_writable()
        engine = self._engine
        tx = Transaction(self, engine.next_txid, self._visible_lsn)
        engine.next_txid += 1
        self._active[tx.begin_lsn] += 1
        self._open_txs.add(tx)
        return tx

    def _forget(self, tx: Transaction) -> None:
        if tx in self._open_txs:
            self._open_txs.discard(tx)
            self._active[tx.begin_lsn] -= 1
            if not self._active[tx.begin_lsn]:
                del self._active[tx.begin_lsn]

    async def _stage(self, tx: Transaction, index: int, data: bytes) -> fmt.PutStaged:
        self._check_writable()
        op = await self._run(self._engine.stage, tx.txid, index, data, not tx._staging_made)
        tx._staging_made = True
        return op

    async def _read_staged(self, name: str) -> bytes:
        return await self._run(
            self._engine.fs.read_file, os.path.join(self._engine.staging_dir, name)
        )

    async def _read_raw(self, path: str) -> bytes:
        self._check_open()
        cache = self._cache
        if cache is None or self._engine.partial:
            return await self._run(self._engine.read, path)
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
        return await self._run(self._engine.lstat, path)

    async def _open_stream(self, tx: Transaction, index: int) -> tuple[str, AsyncWriter]:
        self._check_writable()
        engine = self._engine
        if not tx._staging_made:
            await self._run(engine.make_staging_dir, tx.txid)
            tx._staging_made = True
        name = f"{tx.txid}/{index}"
        self._hops += 1
        return name, await engine.fs.open_writer(os.path.join(engine.staging_dir, name))

    async def _check_parents(self, path: str) -> None:
        self._check_open()
        await self._run(self._engine.check_parents, path)

    async def _list_raw(self, path: str) -> list[str]:
        self._check_open()
        return await self._run(self._engine.listdir, path)

    async def _end(self, tx: Transaction, state: TxState) -> None:
        """Roll back: drop the transaction and whatever it staged (shielded)."""
        tx.state = state
        self._forget(tx)
        if tx._staged:
            with anyio.CancelScope(shield=True):
                try:
                    await self._run(self._engine.discard, tx.txid)
                except OSError as exc:  # the next open removes it as an orphan
                    log.warning("txid=%d: could not remove staged files: %s", tx.txid, exc)
        log.debug("txid=%d rolled back", tx.txid)

    async def _commit(self, tx: Transaction) -> None:
        try:
            self._check_writable()
            # A cancellation already pending (say, delivered in the block's last await) is
            # before the commit point: roll back.
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            await self._end(tx, TxState.ROLLED_BACK)
            raise
        tx.state = TxState.COMMITTING
        prepared = PreparedTx(
            tx.txid,
            tx.begin_lsn,
            tx._prepared(),
            staged=tx._staged > 0,
            reads=frozenset(tx._reads),
            listed=frozenset(tx._listed),
            subtrees=frozenset(tx._subtrees),
        )
        if not prepared.ops and not prepared.subtrees:  # read only: no journal, no thread
            try:
                self._engine.validate_reads(prepared)
            except ConflictError:
                await self._end(tx, TxState.ROLLED_BACK)
                raise
            tx.state = TxState.COMMITTED
            self._forget(tx)
            return
        w = _Waiter(tx, prepared, anyio.Event())
        self._queue.append(w)
        cancelled: BaseException | None = None
        if self._leading:
            try:
                await w.event.wait()
            except BaseException as exc:  # a cancellation while waiting for the committer
                if w.state is _WaiterState.QUEUED:
                    self._queue.remove(w)
                    await self._end(tx, TxState.ROLLED_BACK)
                    raise
                cancelled = exc  # taken or handed the lead: finish first, deliver after
        else:
            self._leading = True
            self._idle = anyio.Event()
            w.state = _WaiterState.LEADING
        with anyio.CancelScope(shield=True):
            if w.state is _WaiterState.LEADING:
                try:
                    await self._lead()
                except BaseException:  # e.g. a simulated crash: the outcome is unknown
                    tx.state = TxState.FAILED
                    self._forget(tx)
                    raise
            elif w.state is _WaiterState.TAKEN:
                await w.event.wait()
        assert w.result is not None
        await self._settle(tx, w.result)
        if cancelled is not None:
            raise cancelled
        await anyio.lowlevel.checkpoint()  # deliver a cancellation that arrived while shielded

    async def _lead(self) -> None:
        """Commit one group: every transaction queued now. Requires: self._leading is ours."""
        # One turn of the event loop first: the tasks the last group just released run their
        # next transactions into the queue and this group, instead of waiting out a whole
        # commit for the next one (16 writers: groups of 16 instead of 8).
        await anyio.lowlevel.cancel_shielded_checkpoint()
        group, self._queue = self._queue, []
        for w in group:
            w.state = _WaiterState.TAKEN
        oldest = min(self._active, default=self._engine.last_lsn)
        committing = self._committing = anyio.Event()
        try:
            try:
                results = await self._run_committer(
                    self._engine.commit_group, [w.prepared for w in group], oldest
                )
            except BaseException as exc:
                if self._cache is not None:
                    self._cache.clear()
                err = StoreFailedError(f"commit outcome unknown: {exc!r}")
                err.__cause__ = exc
                for w in group:
                    w.result = Result(Outcome.UNKNOWN, error=err)
                    w.state = _WaiterState.DONE
                    w.event.set()
                raise
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
        finally:
            self._committing = None
            committing.set()
            if self._queue:
                head = self._queue[0]
                head.state = _WaiterState.LEADING
                head.event.set()
            else:
                self._leading = False
                self._idle.set()

    def _publish(self, group: list[_Waiter], results: list[Result]) -> None:
        """Show a group's changes to event-loop readers, in one step: update the read cache,
        then the LSN new transactions begin at."""
        cache = self._cache
        if cache is not None:
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

    async def _settle(self, tx: Transaction, result: Result) -> None:
        self._forget(tx)
        if result.outcome is Outcome.COMMITTED:
            tx.state = TxState.COMMITTED
            tx.lsn = result.lsn
        elif result.outcome is Outcome.UNKNOWN:
            tx.state = TxState.FAILED
        else:
            await self._end(tx, TxState.ROLLED_BACK)
        if result.error is not None:
            raise result.error

    # -- reads -------------------------------------------------------------------------------

    async def read(self, path: Path) -> bytes:
        """The content of ``path``; FileNotFoundError if missing. Never shows part of a
        transaction. Cancellation: the read in flight finishes in its worker thread; the
        cancellation is delivered then or at the caller's next await."""
        return await self._read_raw(check_path(path))

    async def read_text(self, path: Path, encoding: str = "utf-8") -> str:
        """``read`` decoded. Cancellation: as ``read``."""
        return (await self.read(path)).decode(encoding)

    async def read_json(self, path: Path) -> Any:
        """``read`` parsed as JSON. Cancellation: as ``read``."""
        return json.loads(await self.read(path))

    async def exists(self, path: Path) -> bool:
        """Whether a file or directory exists at ``path``. Cancellation: as ``read``."""
        return await self._lstat_raw(check_path(path, allow_root=True)) is not None

    async def list(self, path: Path = "") -> list[str]:
        """Sorted names in directory ``path`` (``.walstore`` hidden). Cancellation: as
        ``read``."""
        return await self._list_raw(check_path(path, allow_root=True))

    async def stat(self, path: Path) -> FileStat:
        """Kind, size and mtime of ``path``; FileNotFoundError if missing. Cancellation: as
        ``read``."""
        p = check_path(path, allow_root=True)
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
        attempts: int = 10,
        **kwargs: Any,
    ) -> T:
        """Run ``await fn(tx, *args, **kwargs)`` in a transaction and commit it, retrying on
        ConflictError with jittered exponential backoff; after ``attempts`` tries the last
        ConflictError propagates. ``fn`` may run several times: keep its side effects in
        ``tx``. Returns what ``fn`` returned. Cancellation: as ``Transaction.commit``."""
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, not {attempts}")
        for attempt in range(attempts):
            try:
                async with self.transaction() as tx:
                    result = await fn(tx, *args, **kwargs)
                return result
            except ConflictError:
                if attempt == attempts - 1:
                    raise
                log.debug("txid=%d conflicted; retry %d", tx.txid, attempt + 1)
                await anyio.sleep(random.uniform(0, min(0.05, 0.0005 * 2**attempt)))
        raise AssertionError("unreachable")

    # -- maintenance -------------------------------------------------------------------------

    async def checkpoint(self) -> None:
        """Make everything committed durable in place and start a new journal segment.
        Cancellation: the checkpoint runs to its end shielded, then it is delivered."""
        self._check_writable()
        with anyio.CancelScope(shield=True):
            await self._run(self._engine.checkpoint)
        await anyio.lowlevel.checkpoint()

    def stats(self) -> dict[str, float]:
        """Counters since open: commits, groups, mean_group_size, conflicts, checkpoints,
        journal_bytes, journal_syncs, fsyncs (every fsync/fdatasync the store made, directory
        syncs and syncfs included) and thread_hops."""
        c = self._engine.counters
        calls = self._engine.fs.calls
        return {
            "commits": c.commits,
            "groups": c.groups,
            "mean_group_size": c.commits / c.groups if c.groups else 0.0,
            "conflicts": c.conflicts,
            "checkpoints": c.checkpoints,
            "journal_bytes": c.journal_bytes,
            "journal_syncs": c.journal_syncs,
            "fsyncs": calls["fsync"] + calls["fdatasync"] + calls["fsync_dir"] + calls["syncfs"],
            "thread_hops": self._hops,
        }

    async def aclose(self) -> None:
        """Checkpoint (unless readonly or failed) and release the lock. Idempotent. Transactions
        still open are rolled back. Cancellation: closing runs shielded, then it is delivered."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            while self._leading:  # let queued and running commits finish first
                await self._idle.wait()
            for tx in list(self._open_txs):
                if tx.state is TxState.ACTIVE:
                    tx._closed_with_store = True
                    await self._end(tx, TxState.ROLLED_BACK)
            try:
                if not self._readonly:
                    await self._run(self._engine.close)
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


async def _open(
    root: str | os.PathLike[str],
    *,
    durability: Durability,
    create: bool,
    lock_timeout: float,
    readonly: bool,
    fs: FileSystem | None,
    inline_threshold: int,
    checkpoint_bytes: int,
    cache_bytes: int,
    cache_max_file: int,
    checkpoint_syncfs: bool,
) -> Store:
    if not isinstance(durability, Durability):
        raise TypeError(f"durability must be a walstore.Durability, not {durability!r}")
    if lock_timeout < 0 or math.isnan(lock_timeout):
        raise ValueError(f"lock_timeout must be >= 0, not {lock_timeout}")
    engine = Engine(
        fs or OsFileSystem(),
        os.fspath(root),
        durability,
        checkpoint_bytes=checkpoint_bytes,
        syncfs_min=SYNCFS_MIN if checkpoint_syncfs else None,
    )
    deadline = anyio.current_time() + lock_timeout
    while True:
        try:
            with anyio.CancelScope(shield=True):
                report = await anyio.to_thread.run_sync(
                    lambda: engine.open(create=create, readonly=readonly)
                )
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
    )
    try:
        await anyio.lowlevel.checkpoint()
    except BaseException:
        await store.aclose()
        raise
    return store


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
    lock_timeout: float = 0.0,
    readonly: bool = False,
    fs: FileSystem | None = None,
    inline_threshold: int = DEFAULT_INLINE_THRESHOLD,
    checkpoint_bytes: int = 8 << 20,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    cache_max_file: int = 64 << 10,
    checkpoint_syncfs: bool = True,
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
    whose dirty data a syncfs should not wait for. Cancellation: recovery runs to its
    end shielded; the store is then closed again and the cancellation delivered.
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
    )
