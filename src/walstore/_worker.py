"""CommitThread: the committer's own worker thread on asyncio, as aiosqlite keeps one per
connection.

A round trip through ``anyio.to_thread.run_sync`` finds an idle worker, takes a
capacity-limiter token and opens a cancel scope every time; a thread that waits on a
``SimpleQueue`` and answers through ``call_soon_threadsafe`` does less, and a commit is one
such round trip (the costs of both: benchmarks/RESULTS.md). On trio the store keeps anyio's threads.

A call handed to the thread always runs to its end and its outcome is always collected: the
committer must learn every group's. Callers wait for it inside a shielded cancel scope.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _deliver(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.cancelled():  # pragma: no cover - the waiter shields it; never cancelled
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class CommitThread:
    """One daemon thread running blocking calls in the order they are handed to it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the thread; its result, or its exception raised here. Requires:
        the running loop is asyncio's, and the caller is shielded from cancellation."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if self._thread is None or not self._thread.is_alive():  # first call, or after fork
            self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put((loop, fut, fn, args))
        # asyncio.shield: even a cancellation from outside anyio leaves the future to be set.
        return await asyncio.shield(fut)

    def stop(self) -> None:
        """Let the thread end once the calls handed to it are done. Idempotent."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, fut, fn, args = job
            try:
                outcome: tuple[bool, Any] = (True, fn(*args))
            except BaseException as exc:  # handed to the waiter, which raises it
                outcome = (False, exc)
            with contextlib.suppress(RuntimeError):  # the loop closed under a running call
                loop.call_soon_threadsafe(_deliver, fut, *outcome)
            del job, fut, fn, args, outcome  # drop references before blocking again
