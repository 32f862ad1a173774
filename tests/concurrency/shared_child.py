"""A process for tests/concurrency/test_shared.py: one of several writers on one store.

python shared_child.py count ROOT TASKS N     TASKS tasks each add 1 to counter.json N times
python shared_child.py bank ROOT ACCOUNTS     transfers until killed, one "ack NAME" line per
                                              transfer that returned
python shared_child.py die ROOT K TRACE       one transaction; dies (os._exit) at its K-th
                                              file-system call, logging each call to TRACE
python shared_child.py hold ROOT              takes the commit lock after a commit and
                                              prints "held", then waits for EOF on stdin
python shared_child.py eio ROOT ERASE         commits a.json=1, then a.json=2 with its journal
                                              fdatasync failing (EIO; ERASE=no: the zeroing
                                              that erases the record fails too); prints
                                              "failed", waits for EOF on stdin, closes
"""

from __future__ import annotations

import fcntl
import os
import random
import sys
from typing import Any

import anyio

import walstore


async def count(root: str, tasks: int, n: int) -> None:
    async def incr(tx: walstore.Transaction) -> None:
        try:
            value = await tx.read_json("counter.json")
        except FileNotFoundError:
            value = 0
        await tx.write_json("counter.json", value + 1)

    async with walstore.open(root, exclusive=False) as store:

        async def worker() -> None:
            for _ in range(n):
                await store.atomic(incr)

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(worker)
        stats = store.stats()
    print(f"done {stats.commits} {stats.conflicts}", flush=True)


async def bank(root: str, accounts: int) -> None:
    rng = random.Random(os.getpid())
    async with walstore.open(root, exclusive=False) as store:
        seq = 0

        async def transfer(tx: walstore.Transaction) -> str:
            a, b = rng.sample(range(accounts), 2)
            amount = rng.randint(1, 5)
            pa, pb = f"bank/acc{a}.json", f"bank/acc{b}.json"
            va, vb = await tx.read_json(pa), await tx.read_json(pb)
            await tx.write_json(pa, va - amount)
            await tx.write_json(pb, vb + amount)
            name = f"ledger/{os.getpid()}-{seq}.json"
            await tx.write_json(name, {"from": a, "to": b, "amount": amount})
            return name

        while True:
            seq += 1
            name = await store.atomic(transfer)
            print(f"ack {name}", flush=True)


_OWN = ("k", "n", "armed", "trace")


class DyingFS(walstore.OsFileSystem):
    """Logs every call (name, path) to ``trace``, then dies at call ``k``."""

    def __init__(self, k: int, trace: str) -> None:
        super().__init__()
        self.k = k
        self.n = 0
        self.armed = False
        self.trace = open(trace, "a", buffering=1)  # noqa: SIM115

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name.startswith("_") or not callable(attr) or name in _OWN:
            return attr
        if not super().__getattribute__("armed"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.n == self.k:
                os._exit(9)
            self.n += 1
            what = args[0] if args else ""
            if isinstance(what, int):  # a handle: name its file
                what = os.readlink(f"/proc/self/fd/{what}")
            result = attr(*args, **kwargs)
            self.trace.write(f"{name} {what}\n")
            return result

        return call


async def die(root: str, k: int, trace: str) -> None:
    fs = DyingFS(k, trace)
    store = await walstore.open(root, fs=fs, exclusive=False)
    fs.armed = True
    async with store.transaction() as tx:
        await tx.write("a.txt", b"new a")
        await tx.write("b.txt", b"new b")
        await tx.write("big.bin", b"B" * 100_000)  # staged
    fs.armed = False
    await store.aclose()
    print("survived", flush=True)


async def hold(root: str) -> None:
    async with walstore.open(root, exclusive=False) as store:
        await store.write("held.txt", str(os.getpid()).encode())
        fd = os.open(os.path.join(root, ".walstore", "LOCK"), os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
        os.close(fd)


class FailingSyncFS(walstore.OsFileSystem):
    """Once armed: the next journal fdatasync fails with EIO, and with ``erase`` False so
    does every journal write after it (the zeros that would erase the record)."""

    def __init__(self, erase: bool) -> None:
        super().__init__()
        self.erase = erase
        self.armed = False
        self.failed = False

    def fdatasync(self, fd: int) -> None:
        if self.armed and not self.failed and os.readlink(f"/proc/self/fd/{fd}").endswith(".wal"):
            self.failed = True
            raise OSError(5, "injected EIO")
        super().fdatasync(fd)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        if self.failed and not self.erase and os.readlink(f"/proc/self/fd/{fd}").endswith(".wal"):
            raise OSError(5, "injected EIO")
        return super().pwrite(fd, data, offset)


async def eio(root: str, erase: bool) -> None:
    fs = FailingSyncFS(erase)
    async with walstore.open(root, fs=fs) as store:
        await store.write_json("a.json", 1)
        fs.armed = True
        try:
            await store.write_json("a.json", 2)
        except walstore.CommitOutcomeUnknownError as exc:
            assert "outcome unknown" in str(exc), exc
        else:
            raise AssertionError("the failed sync was not reported")
        try:
            await store.write_json("b.json", 1)
        except walstore.StoreFailedError as exc:
            assert type(exc) is walstore.StoreFailedError, exc  # fail-stop: no more writes here
        else:
            raise AssertionError("a failed store took a write")
        print("failed", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
    print("closed", flush=True)


def main() -> None:
    mode, root, *rest = sys.argv[1:]
    if mode == "count":
        anyio.run(count, root, int(rest[0]), int(rest[1]))
    elif mode == "bank":
        anyio.run(bank, root, int(rest[0]))
    elif mode == "die":
        anyio.run(die, root, int(rest[0]), rest[1])
    elif mode == "hold":
        anyio.run(hold, root)
    elif mode == "eio":
        anyio.run(eio, root, rest[0] == "yes")


if __name__ == "__main__":
    main()
