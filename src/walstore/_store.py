"""Store: the async facade. Hands out transactions, reads, one-op writes, ``atomic``,
checkpoints and closes; ``walstore.open`` (``_open.py``) makes one.

A Store is built of parts that each keep one concern: ``StoreBase`` (its state and the
checks every call makes), ``StoreReads`` (reads and the read cache), ``GroupCommit`` (the
commit queue and its leader), and a ``CommitLock`` (``_commit_lock.py``) for the lock it
shares with other processes. ``_Link`` is the only way a ``Transaction`` reaches its store.
Every method runs on the event loop of the thread that opened the store.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

from . import _journal_format as fmt
from ._conflicts import Conflict
from ._contention import Claim, DeadlinePassed
from ._engine import Durability, TxOp
from ._errors import ConflictError
from ._footprint import Footprint, TxState
from ._fs import AsyncWriter, FileStat
from ._group_commit import GroupCommit, PendingWrite
from ._limits import PathLimits
from ._paths import check_path
from ._recovery import RecoveryReport
from ._store_reads import StoreReads
from ._transaction import Transaction
from ._tx_writers import Path, encode_json, to_bytes

log = logging.getLogger("walstore")
T = TypeVar("T")

# Store.atomic retries a transaction that conflicted until this many seconds have passed.
# Conflicting retries take turns (_contention.py), so contention alone does not reach it.
DEFAULT_ATOMIC_TIMEOUT = 60.0


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


class Store(GroupCommit, StoreReads):
    """An open store. Get one with ``walstore.open(root)``; close it with ``aclose()``."""

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
                        await self._xlock.hold(join=False)
                    try:
                        if hot:
                            await self._locks.acquire_all(claim, hot)
                        async with self._transaction(claim) as tx:
                            result = await fn(tx, *args, **kwargs)
                    finally:
                        if locked:
                            self._xlock.drop()
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
                await self._xlock.hold()
                held = True
            with anyio.CancelScope(shield=True):
                await self._run(self._engine.checkpoint)
        finally:
            try:
                if held:
                    self._xlock.drop()
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
        if self._forked_since_open():  # a forked child: close without touching a file or the
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

    @functools.cached_property
    def _link(self) -> _Link:
        """What its transactions see of it (made on first use)."""
        return _Link(self)


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
    def sync_enabled(self) -> bool:
        return self._store._engine.sync_enabled

    async def open_stream(self, tx: Footprint, index: int) -> tuple[str, AsyncWriter]:
        return await self._store._open_stream(tx, index)

    async def discard(self, tx: Footprint) -> None:
        await self._store._discard(tx)

    # -- ending

    async def commit(self, tx: Footprint, ops: tuple[TxOp, ...]) -> None:
        await self._store._commit(tx, ops)

    async def roll_back(self, tx: Footprint) -> None:
        await self._store._end(tx)
