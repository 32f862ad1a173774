"""StoreBase: what every part of a Store shares: its state, the worker-thread hops, and the
checks every call makes (the thread, the process, open, writable).

``Store`` (``_store.py``) is built of this and two parts that each keep one concern:
``StoreReads`` (``_store_reads.py``: reads and the read cache) and ``GroupCommit``
(``_group_commit.py``: the commit queue and its leader). All of it runs on the event loop
of the thread that opened the store; what ``_run`` and ``_run_committer`` hand off runs in a
worker thread.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from ._cache import ReadCache
from ._commit_lock import CommitLock
from ._contention import PathLocks
from ._engine import Engine
from ._errors import StoreClosedError, StoreFailedError, StoreMisuseError, StoreReadOnlyError
from ._recovery import RecoveryReport
from ._worker import CommitThread
from ._writers import on_asyncio

if TYPE_CHECKING:
    from ._footprint import Footprint
    from ._group_commit import PendingWrite, Waiter

T = TypeVar("T")

_forks = 0  # fork()s this process came through: a store opened before one is not its own


def _forked() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


class StoreBase:
    """The state and checks of a ``Store`` (see the module docstring)."""

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
        self._xlock = CommitLock(engine.peers, lock_timeout)  # with other processes
        self._recovery = report
        self._inline_threshold = inline_threshold
        self._limits = engine.limits  # names and paths this store takes (``_limits.py``)
        self._readonly = readonly
        self._closed = False
        self._queue: list[Waiter] = []
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
                f"store {self._engine.root} was opened by process {self._pid}, and this is a child "
                f"it forked (pid {os.getpid()}): the child shares the parent's journal and lock "
                "handles, and writing through them loses commits. Open stores after fork(), "
                "in the process that uses them (one writer process at a time)"
            )
        if threading.get_ident() != self._thread:
            raise StoreMisuseError(
                f"store {self._engine.root} is used from another thread than the one that "
                "opened it: its tasks and events belong to that thread's event loop, and two loops "
                "would wait on each other forever. Use a store from the thread (and loop) "
                "that opened it: from another thread, hand the work to that loop "
                "(anyio.from_thread.run)"
            )

    def _forked_since_open(self) -> bool:
        """Whether this is a child process forked after the store was opened."""
        return _forks != self._forks

    def _check_open(self) -> None:
        self._check_context()
        if self._closed:
            raise StoreClosedError(f"store {self._engine.root} is closed")
        self._engine.peers.check_fork()

    def _check_writable(self) -> None:
        self._check_open()
        if self._readonly:
            raise StoreReadOnlyError(f"store {self._engine.root} was opened readonly")
        if self._engine.failed is not None:
            raise StoreFailedError(
                f"store {self._engine.root} failed and refuses writes: {self._engine.failed}; "
                "reopen it to recover"
            )
