"""Several processes on one store, on both backends, the other process running the same
backend as the test, the store opened ``exclusive=True``: one writer at a time (flock on LOCK),
readonly readers alongside.

tests/unit/test_lock.py covers the lock on asyncio with an idle holder; here the other
process is a writer that keeps working, and the test and the child run on trio as well.
Processes are coordinated with pipes only (commands on stdin, one line per answer on
stdout); nothing sleeps. ``fail_after`` is only a guard against a hung child.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import walstore

from .helpers import GUARD

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.guarantee(name="One writer process, with exclusive=True"),
]

CHILD = textwrap.dedent(
    """
    import os, sys
    import anyio
    import walstore

    class CountingFS(walstore.OsFileSystem):
        refused = 0

        def lock(self, path):
            fd = super().lock(path)
            if fd is None:
                self.refused += 1
            return fd

    async def transfer(tx):
        a = await tx.read_json("a.json")
        b = await tx.read_json("b.json")
        seq = a["seq"] + 1
        amount = 1 if seq % 2 else -1
        await tx.write_json("a.json", {"seq": seq, "amount": a["amount"] - amount})
        await tx.write_json("b.json", {"seq": seq, "amount": b["amount"] + amount})
        return seq

    async def worker(root):
        # A writer that works on command: "step", "burst N"; closes at EOF.
        async with walstore.open(root, exclusive=True) as store:
            if not await store.exists("a.json"):
                async with store.transaction() as tx:
                    await tx.write_json("a.json", {"seq": 0, "amount": 50})
                    await tx.write_json("b.json", {"seq": 0, "amount": 50})
            await store.write_text("worker.txt", str(os.getpid()))
            print("READY", os.getpid(), flush=True)
            seq = 0
            while True:
                line = await anyio.to_thread.run_sync(sys.stdin.readline)
                if not line:
                    break
                cmd, *arg = line.split()
                for _ in range(int(arg[0]) if arg else 1):
                    seq = await store.atomic(transfer)
                print("DONE", seq, flush=True)
        print("CLOSED", flush=True)

    async def try_open(root, timeout):
        fs = CountingFS()
        try:
            store = await walstore.open(root, exclusive=True, fs=fs, lock_timeout=timeout)
        except walstore.StoreLockedError as exc:
            print("LOCKED", fs.refused, exc, flush=True)
            return
        async with store:
            await store.write_text("tried.txt", str(os.getpid()))
        print("OPENED", fs.refused, os.getpid(), flush=True)

    mode, root, backend, *rest = sys.argv[1:]
    if mode == "worker":
        anyio.run(worker, root, backend=backend)
    else:
        anyio.run(try_open, root, float(rest[0]), backend=backend)
    """
)


class Child:
    """A child process running CHILD; ``line()`` reads one line of its stdout."""

    def __init__(self, proc: anyio.abc.Process) -> None:
        self.proc = proc
        assert proc.stdout is not None and proc.stdin is not None
        self._out = BufferedByteReceiveStream(proc.stdout)

    async def line(self) -> str:
        try:
            return (await self._out.receive_until(b"\n", 1 << 16)).decode()
        except anyio.IncompleteRead:
            err = b""
            if self.proc.stderr is not None:
                err = b"".join([chunk async for chunk in self.proc.stderr])
            raise AssertionError(f"child exited early: {err.decode()}") from None

    async def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send(command.encode() + b"\n")

    async def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.aclose()

    async def finish(self) -> None:
        """Close its stdin and wait for it: it closes its store and exits."""
        await self.close_stdin()
        assert await self.line() == "CLOSED"
        assert await self.proc.wait() == 0


async def start(mode: str, root: Path, backend: str, *args: str) -> anyio.abc.Process:
    return await anyio.open_process(
        [sys.executable, "-c", CHILD, mode, str(root), backend, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def start_worker(root: Path, backend: str) -> tuple[anyio.abc.Process, Child, int]:
    proc = await start("worker", root, backend)
    child = Child(proc)
    ready = (await child.line()).split()
    assert ready[0] == "READY", ready
    return proc, child, int(ready[1])


class CountingFS(walstore.OsFileSystem):
    """Counts refused lock attempts; sets ``refused_once`` at the first."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0
        self.refused_once = threading.Event()

    def lock(self, path: str) -> int | None:
        fd = super().lock(path)
        if fd is None:
            self.refused += 1
            self.refused_once.set()
        return fd


def lock_pid(root: Path) -> int:
    return int((root / ".walstore" / "LOCK").read_text().strip())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


async def test_writer_process_waits_then_gets_locked_error_with_our_pid(
    root: Path, anyio_backend: str
) -> None:
    """We hold the store and keep committing; another writer process waits its
    lock_timeout (retrying), then gets StoreLockedError naming our pid."""
    with anyio.fail_after(GUARD):
        async with walstore.open(root, exclusive=True) as store:
            await store.write("ours", b"0")
            answer: list[str] = []

            async def other() -> None:
                async with await start("try", root, anyio_backend, "0.3") as proc:
                    answer.append(await Child(proc).line())

            n = 0
            async with anyio.create_task_group() as tg:
                tg.start_soon(other)
                while not answer:  # we keep working while it waits
                    n += 1
                    await store.write("ours", str(n).encode())
            word, refused, message = answer[0].split(" ", 2)
            assert word == "LOCKED", answer
            assert int(refused) >= 2, answer  # it waited and retried before giving up
            assert re.search(rf"\bpid {os.getpid()}\b", message), message
            assert lock_pid(root) == os.getpid()
            await store.write("ours", b"last")
        assert (root / "ours").read_bytes() == b"last"
        assert not (root / "tried.txt").exists()


async def test_we_wait_then_get_locked_error_while_a_writer_process_works(
    root: Path, anyio_backend: str
) -> None:
    with anyio.fail_after(GUARD):
        proc, child, pid = await start_worker(root, anyio_backend)
        async with proc:
            fs = CountingFS()
            with pytest.raises(walstore.StoreLockedError, match=rf"\bpid {pid}\b"):
                await walstore.open(root, exclusive=True, fs=fs, lock_timeout=0.3)
            assert fs.refused >= 2  # it retried before giving up
            assert lock_pid(root) == pid
            await child.send("step")  # the worker is unharmed and still working
            assert await child.line() == "DONE 1"
            await child.finish()
        async with walstore.open(root, exclusive=True) as store:
            assert (await store.read_json("a.json"))["seq"] == 1
            assert await store.read_text("worker.txt") == str(pid)


async def test_a_waiting_writer_gets_the_store_when_the_worker_exits(
    root: Path, anyio_backend: str
) -> None:
    """We wait (lock_timeout) while the worker holds the store; once we have been refused,
    the worker does some more work and exits, and our open succeeds."""
    with anyio.fail_after(GUARD):
        proc, child, pid = await start_worker(root, anyio_backend)
        fs = CountingFS()
        opened: list[walstore.Store] = []

        async def wait_for_store() -> None:
            opened.append(await walstore.open(root, exclusive=True, fs=fs, lock_timeout=GUARD))

        async with proc, anyio.create_task_group() as tg:
            tg.start_soon(wait_for_store)
            ok = await anyio.to_thread.run_sync(fs.refused_once.wait, GUARD)
            assert ok and not opened
            await child.send("burst 20")
            assert await child.line() == "DONE 20"
            await child.finish()
        store = opened[0]
        async with store:
            assert fs.refused >= 1
            assert lock_pid(root) == os.getpid()
            assert (await store.read_json("a.json"))["seq"] == 20
            assert await store.read_text("worker.txt") == str(pid)
            await store.write("mine", b"after waiting")


async def test_readonly_reads_while_a_writer_process_works(root: Path, anyio_backend: str) -> None:
    with anyio.fail_after(GUARD):
        proc, child, pid = await start_worker(root, anyio_backend)
        async with proc:
            async with walstore.open(root, exclusive=True, readonly=True) as ro:
                assert lock_pid(root) == pid  # readonly did not take the lock

                async def both() -> tuple[dict[str, Any], dict[str, Any]]:
                    return await ro.read_json("a.json"), await ro.read_json("b.json")

                # Lockstep: each commit of the other process is visible as soon as it
                # returns.
                for i in range(1, 6):
                    await child.send("step")
                    assert await child.line() == f"DONE {i}"
                    a, b = await both()
                    assert a["seq"] == b["seq"] == i
                    assert a["amount"] + b["amount"] == 100
                    assert await ro.read_text("worker.txt") == str(pid)

                # While it works: every read is a whole file, never going back.
                done = anyio.Event()
                answer: list[str] = []
                reads = 0

                async def wait_done() -> None:
                    answer.append(await child.line())
                    done.set()

                last = {"a.json": 5, "b.json": 5}
                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait_done)
                    await child.send("burst 200")
                    while not done.is_set():
                        for name in last:
                            doc = json.loads(await ro.read(name))  # never torn
                            assert doc["seq"] >= last[name], (name, doc, last)
                            last[name] = doc["seq"]
                        reads += 1
                assert answer == ["DONE 205"]
                a, b = await both()
                assert a["seq"] == b["seq"] == 205
                assert a["amount"] + b["amount"] == 100
                assert await ro.list() == ["a.json", "b.json", "worker.txt"]
                with pytest.raises(walstore.StoreReadOnlyError):
                    await ro.write("x", b"")
                with pytest.raises(walstore.StoreLockedError, match=rf"\bpid {pid}\b"):
                    await walstore.open(root, exclusive=True)
            await child.finish()
        assert reads >= 1
