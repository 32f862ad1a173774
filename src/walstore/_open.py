"""``walstore.open``: make the engine, wait for the commit lock, recover, hand back a Store.

On the event loop; the open and recovery run in a worker thread, shielded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Generator
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel

from ._apply import SYNCFS_MIN
from ._commit_lock import wait_for_commit_lock
from ._engine import Durability, Engine
from ._errors import StoreLockedError
from ._fs import FileSystem
from ._os_fs import OsFileSystem
from ._store import Store

DEFAULT_INLINE_THRESHOLD = 128 * 1024
DEFAULT_CACHE_BYTES = 32 << 20

# How long a process waits for the commit lock another process holds (a group, a checkpoint
# or an open takes milliseconds; a holder stopped by SIGSTOP or a debugger can take any time).
DEFAULT_LOCK_TIMEOUT = 10.0


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
        await wait_for_commit_lock(engine.peers, lock_timeout)
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
