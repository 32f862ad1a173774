"""Shared pieces of the concurrency tests: a fault hook that blocks one file-system call, a
runner that cancels an operation while that call is blocked, and store/file-system helpers.

Nothing here sleeps to wait for something: a blocked call signals a ``threading.Event`` that
the test waits for in a worker thread; ``GUARD`` only stops a broken test from hanging.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio

import walstore
from walstore.testing import MemoryFileSystem

ROOT = "/store"
GUARD = 30.0  # seconds; a hang guard, never waited out when the test is right

Call = tuple[int, str, str]

STRESS = os.environ.get("WALSTORE_STRESS") == "1"
"""Full-size contention tests (``WALSTORE_STRESS=1``): 64 tasks x 50 increments of one
counter, 16 writers x 128 transfers. By default they run at a size that keeps this directory
fast on a small machine (under heavy contention a commit costs ~15 worker-thread hops)."""


class Blocker:
    """A MemoryFileSystem fault hook: the first call matching ``at`` (the ``at``-th call made
    off the event loop's thread, or a predicate on (index, name, path)) blocks its worker
    thread until ``release()``.

    Only calls made in worker threads count and block: the store makes a few calls on the
    event loop itself (taking and releasing the commit lock when it is free, without a thread
    hop), and nothing can be delivered to the loop while such a call runs, so no cancellation
    can land inside one. ``reached`` is set when the call blocks, or when ``done()`` says the
    operation ended without getting there, so a waiting test never hangs."""

    def __init__(self, at: int | Callable[[int, str, str], bool]) -> None:
        self._at = at
        self._loop_thread = threading.current_thread()  # made by the test, on its loop
        self._seen = 0
        self.reached = threading.Event()
        self._released = threading.Event()
        self.call: Call | None = None  # the call that blocked
        self._mutex = threading.Lock()

    def _matches(self, index: int, name: str, path: str) -> bool:
        if isinstance(self._at, int):
            self._seen += 1
            return self._seen - 1 == self._at
        return self._at(index, name, path)

    def __call__(self, index: int, name: str, path: str) -> BaseException | None:
        if threading.current_thread() is self._loop_thread:
            return None
        with self._mutex:
            if self.call is not None or not self._matches(index, name, path):
                return None
            self.call = (index, name, path)
        self.reached.set()
        if not self._released.wait(GUARD):
            raise AssertionError(f"blocked call {self.call} was never released")
        return None

    def release(self) -> None:
        self._released.set()

    def done(self) -> None:
        """The operation under test ended: wake a waiting test even if nothing blocked."""
        self.reached.set()

    async def wait(self) -> None:
        ok = await anyio.to_thread.run_sync(self.reached.wait, GUARD)
        assert ok, "the blocking call was never reached"


def nth_call(name: str, n: int = 1, path_part: str = "") -> Callable[[int, str, str], bool]:
    """A predicate for Blocker: the ``n``-th call named ``name`` (whose path contains
    ``path_part``), counted from when the predicate is made."""
    seen = 0

    def match(index: int, call: str, path: str) -> bool:
        nonlocal seen
        if call == name and path_part in path:
            seen += 1
            return seen == n
        return False

    return match


@dataclass
class Cancelled:
    """What happened to an operation cancelled while a file-system call was blocked."""

    blocked: Call | None  # the call that blocked (None: the operation never reached it)
    cancelled_caught: bool  # the cancellation came out of the operation
    error: BaseException | None = None  # anything else the operation raised
    result: Any = None


async def cancel_at_call(
    fs: MemoryFileSystem,
    at: int | Callable[[int, str, str], bool],
    op: Callable[[], Awaitable[Any]],
) -> Cancelled:
    """Run ``op``; when the file-system call ``at`` blocks, cancel the scope around ``op``,
    then let the call go on. An int ``at`` counts the calls ``op`` makes in worker threads
    (``Blocker``), from 0."""
    blocker = Blocker(at)
    fs.fault = blocker
    scope = anyio.CancelScope()
    out = Cancelled(blocked=None, cancelled_caught=False)

    async def run() -> None:
        try:
            with scope:
                out.result = await op()
        except Exception as exc:  # recorded for the test to judge
            out.error = exc
        finally:
            blocker.done()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await blocker.wait()
            scope.cancel()
            blocker.release()
    finally:
        blocker.release()
        fs.fault = None
    out.blocked = blocker.call
    out.cancelled_caught = scope.cancelled_caught
    return out


async def count_calls(fs: MemoryFileSystem, op: Callable[[], Awaitable[Any]]) -> int:
    """How many file-system calls ``op`` makes in worker threads (the dry run of a sweep:
    the calls a cancellation can arrive during, as ``Blocker`` counts them)."""
    loop_thread = threading.current_thread()
    calls = 0

    def count(index: int, name: str, path: str) -> None:
        nonlocal calls
        if threading.current_thread() is not loop_thread:
            calls += 1

    fs.fault = count
    try:
        await op()
    finally:
        fs.fault = None
    return calls


def user_files(fs: MemoryFileSystem, root: str = ROOT) -> dict[str, bytes]:
    return {p: v for p, v in fs.files(root).items() if not p.endswith("/")}


def staging_leftovers(fs: MemoryFileSystem, root: str = ROOT) -> dict[str, bytes]:
    """Files and empty directories under ``.walstore/staging/``."""
    return fs.files(root + "/.walstore/staging", skip=())


async def open_memory(fs: MemoryFileSystem, **kwargs: Any) -> walstore.Store:
    return await walstore.open(ROOT, fs=fs, **kwargs)
