"""Misuse gets a clear error instead of a deadlock or silent loss.

* A store used from another thread (so another event loop) than the one that opened it:
  StoreMisuseError, at once (the two loops deadlocked on each other).
* A transaction committed while one of its own ops still runs (a write staging a large
  value in another task): TransactionBusyError, rolled back, and the late op raises
  TransactionClosedError (the write returned normally and its value was dropped).
* A store used in a child made by a real ``os.fork()``: StoreMisuseError; the child writes
  nothing through the handles it inherited, and its aclose leaves the parent's lock alone.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

import walstore
from walstore import StoreMisuseError, TransactionBusyError, TransactionClosedError, TxState
from walstore.testing import MemoryFileSystem

from .helpers import GUARD, open_memory, user_files

pytestmark = pytest.mark.guarantee(name="Misuse is an error, not a hang or a loss")


@pytest.mark.anyio
async def test_a_store_used_from_another_thread_raises(anyio_backend: str) -> None:
    """Reads, writes, transactions and close from a second thread's own event loop raise
    StoreMisuseError while the store's own loop goes on committing."""
    fs = MemoryFileSystem()
    store = await open_memory(fs)
    await store.write("a.txt", b"a")
    tx = store.transaction()
    await tx.write("t.txt", b"t")

    async def make_transaction() -> None:
        store.transaction()

    async def other_loop() -> list[str]:
        refused = []
        attempts = {
            "read": lambda: store.read("a.txt"),
            "write": lambda: store.write("b.txt", b"b"),
            "list": lambda: store.list(),
            "transaction": make_transaction,
            "tx.write": lambda: tx.write("u.txt", b"u"),
            "tx.commit": lambda: tx.commit(),
            "aclose": lambda: store.aclose(),
        }
        for name, attempt in attempts.items():
            try:
                await attempt()
            except StoreMisuseError as exc:
                assert "another thread" in str(exc)
                refused.append(name)
        return refused

    def in_a_thread() -> list[str]:
        return anyio.run(other_loop, backend=anyio_backend)

    async with anyio.create_task_group() as tg:
        tg.start_soon(store.write, "c.txt", b"c")  # the store's own loop keeps working
        with anyio.fail_after(GUARD):
            refused = await anyio.to_thread.run_sync(in_a_thread, abandon_on_cancel=True)
    assert refused == [
        "read", "write", "list", "transaction", "tx.write", "tx.commit", "aclose"
    ]  # fmt: skip
    await tx.commit()  # the transaction was not touched: it commits on its own loop
    await store.aclose()
    assert user_files(fs) == {"a.txt": b"a", "c.txt": b"c", "t.txt": b"t"}


@pytest.mark.anyio
async def test_a_commit_while_a_write_of_the_transaction_runs_is_refused() -> None:
    """The write is held in its staging call while another task commits the transaction."""
    fs = MemoryFileSystem()
    store = await open_memory(fs, inline_threshold=64)
    # Held before its first file-system call (a blocked call would hold the simulated disk's
    # lock, which the rollback needs too).
    entered, released = threading.Event(), threading.Event()
    stage = store._engine.stage

    def held_stage(*args: Any) -> Any:
        entered.set()
        assert released.wait(GUARD)
        return stage(*args)

    store._engine.stage = held_stage  # type: ignore[method-assign]
    tx = store.transaction()
    await tx.write("small.txt", b"small")
    late: list[BaseException] = []

    async def write_big() -> None:
        try:
            await tx.write("big.bin", b"B" * 4096)
        except TransactionClosedError as exc:
            late.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(write_big)
        assert await anyio.to_thread.run_sync(entered.wait, GUARD)  # being staged now
        with pytest.raises(TransactionBusyError, match="still ran"):
            await tx.commit()
        assert tx.state is TxState.ROLLED_BACK
        released.set()
    assert len(late) == 1 and "not recorded" in str(late[0])
    assert user_files(fs) == {}  # nothing committed, the staged value gone too
    assert fs.listdir("/store/.walstore/staging") == []
    await store.write("after.txt", b"the store goes on")
    await store.aclose()


@pytest.mark.anyio
async def test_a_commit_inside_its_own_open_write_block_is_refused() -> None:
    fs = MemoryFileSystem()
    store = await open_memory(fs)
    tx = store.transaction()
    with pytest.raises(TransactionClosedError):
        async with tx.open_write("streamed.bin") as f:
            await f.write(b"x" * 100)
            with pytest.raises(TransactionBusyError):
                await tx.commit()
    with pytest.raises(TransactionClosedError):
        async with tx.replace_dir("d") as d:
            await d.write("x", b"x")
    assert tx.state is TxState.ROLLED_BACK
    await store.aclose()
    assert user_files(fs) == {}


# -- fork ------------------------------------------------------------------------------------

_CHILD_OK = 0
_CHILD_NOT_REFUSED = 3


def _child(store: walstore.Store) -> int:
    async def use() -> int:
        attempts = {
            "write": lambda: store.write("child.txt", b"from the child"),
            "read": lambda: store.read("a.txt"),
            "list": lambda: store.list(),
            "checkpoint": lambda: store.checkpoint(),
        }
        for attempt in attempts.values():
            try:
                await attempt()
            except StoreMisuseError as exc:
                if "fork" not in str(exc):
                    return _CHILD_NOT_REFUSED
            else:
                return _CHILD_NOT_REFUSED
        try:
            store.transaction()
        except StoreMisuseError:
            pass
        else:
            return _CHILD_NOT_REFUSED
        await store.aclose()  # closes without a file-system call: the handles are the parent's
        return _CHILD_OK

    return anyio.run(use)


def _journal(root: Path) -> dict[str, bytes]:
    d = root / ".walstore" / "journal"
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


def _lock_is_held(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@pytest.mark.parametrize("exclusive", [False, True], ids=["shared", "exclusive"])
def test_a_store_used_after_fork_raises_in_the_child(tmp_path: Path, exclusive: bool) -> None:
    root = tmp_path / "s"
    # opened, then used, by loops run one by one
    store = anyio.run(partial(walstore.open, root, exclusive=exclusive))
    anyio.run(store.write, "a.txt", b"a")
    before = _journal(root)
    pid = os.fork()
    if pid == 0:  # the child: report by exit status, never return into pytest
        code = 99
        try:
            signal.alarm(int(GUARD))  # a hang (writing through the parent's committer) dies
            code = _child(store)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == _CHILD_OK
    assert _journal(root) == before  # the child wrote nothing through the shared handles
    # and its close did not unlock what the parent holds for life: LOCK, or shared, its
    # slot among the processes that have the store open
    meta = root / ".walstore"
    assert _lock_is_held(meta / "LOCK" if exclusive else next((meta / "procs").iterdir()))
    anyio.run(store.write, "b.txt", b"b")  # the parent goes on
    anyio.run(store.aclose)

    async def reopen() -> list[str]:
        async with walstore.open(root) as again:
            return await again.list()

    assert anyio.run(reopen) == ["a.txt", "b.txt"]
