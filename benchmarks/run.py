"""Benchmarks: walstore beside its peers, same workloads, same run, full durability.

    python benchmarks/run.py [--quick] [--json]

Peers: plain atomic writes (tmp, fsync, rename, dir fsync, in one thread hop), aiosqlite
(WAL, synchronous=FULL, one shared connection), aiosqlite with application-level group commit,
LMDB (sync=True, via a thread), and the raw floor (4 KiB append + fdatasync). Not collected by
pytest. Install the peers with ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

import walstore

VALUE = os.urandom(1024)
VALUE4 = os.urandom(4096)
Result = dict[str, Any]


def _summary(latencies: list[float], elapsed: float) -> Result:
    lat = sorted(latencies)
    return {
        "tx_per_s": len(lat) / elapsed,
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1e3,
    }


async def _drive(n_tx: int, tasks: int, one: Callable[[int], Awaitable[None]]) -> Result:
    latencies: list[float] = []
    counter = iter(range(n_tx))

    async def worker() -> None:
        for i in counter:
            t = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker)
    return _summary(latencies, time.perf_counter() - start)


# -- systems under test: each returns (setup, one transaction of `files` files, teardown) --------


def _value(files: int) -> bytes:
    return VALUE if files == 1 else VALUE4  # W1-W3: 1 KiB; W4: ten 4 KiB files


async def bench_walstore(d: str, n: int, tasks: int, files: int) -> Result:
    value = _value(files)
    async with walstore.open(d) as store:

        async def one(i: int) -> None:
            async with store.transaction() as tx:
                for j in range(files):
                    await tx.write(f"f/{i % 1000}-{j}.bin", value)

        return await _drive(n, tasks, one)


def _atomic_write(d: str, name: str, data: bytes) -> None:
    tmp = os.path.join(d, f".{name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(d, name))


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def bench_atomic(d: str, n: int, tasks: int, files: int) -> Result:
    def txn(i: int) -> None:  # not atomic across files: the peer users hand-roll today
        for j in range(files):
            _atomic_write(d, f"{i % 1000}-{j}.bin", _value(files))
        _fsync_dir(d)

    async def one(i: int) -> None:
        await anyio.to_thread.run_sync(txn, i)

    return await _drive(n, tasks, one)


async def bench_aiosqlite(d: str, n: int, tasks: int, files: int, group: bool) -> Result:
    import aiosqlite

    async with aiosqlite.connect(os.path.join(d, "db.sqlite"), isolation_level=None) as db:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB)")
        lock = asyncio.Lock()
        queue: list[tuple[list[tuple[str, bytes]], asyncio.Future[None]]] = []

        async def flush() -> None:
            while queue:
                batch = queue[:]
                del queue[:]
                await db.execute("BEGIN")
                for rows, _ in batch:
                    await db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", rows)
                await db.execute("COMMIT")
                for _, fut in batch:
                    fut.set_result(None)

        async def one(i: int) -> None:
            rows = [(f"{i % 1000}-{j}", _value(files)) for j in range(files)]
            if not group:
                async with lock:
                    await db.execute("BEGIN")
                    await db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", rows)
                    await db.execute("COMMIT")
                return
            fut = asyncio.get_running_loop().create_future()
            queue.append((rows, fut))
            if not lock.locked():
                async with lock:
                    await flush()
            await fut

        return await _drive(n, tasks, one)


async def bench_lmdb(d: str, n: int, tasks: int, files: int) -> Result:
    import lmdb

    env = lmdb.open(d, map_size=1 << 30, sync=True, metasync=True)
    lock = anyio.Lock()

    def txn(i: int) -> None:
        with env.begin(write=True) as t:
            for j in range(files):
                t.put(f"{i % 1000}-{j}".encode(), _value(files))

    async def one(i: int) -> None:
        async with lock:  # one writer at a time, as LMDB requires
            await anyio.to_thread.run_sync(txn, i)

    try:
        return await _drive(n, tasks, one)
    finally:
        env.close()


def raw_floor(d: str, n: int) -> Result:
    fd = os.open(os.path.join(d, "raw"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    block = os.urandom(4096)
    lat = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        os.write(fd, block)
        os.fdatasync(fd)
        lat.append(time.perf_counter() - t)
    os.close(fd)
    return _summary(lat, time.perf_counter() - start)


SYSTEMS: dict[str, Callable[..., Awaitable[Result]]] = {
    "walstore": bench_walstore,
    "atomic-writes": bench_atomic,
    "aiosqlite": lambda d, n, t, f: bench_aiosqlite(d, n, t, f, False),
    "aiosqlite-group": lambda d, n, t, f: bench_aiosqlite(d, n, t, f, True),
    "lmdb": bench_lmdb,
}

WORKLOADS = {  # name: (tasks, files per transaction, transactions)
    "W1 1KiB x1, 1 task": (1, 1, 500),
    "W2 1KiB x1, 16 tasks": (16, 1, 3000),
    "W3 1KiB x1, 64 tasks": (64, 1, 6000),
    "W4 4KiB x10, 1 task": (1, 10, 300),
    "W4 4KiB x10, 16 tasks": (16, 10, 1500),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a tenth of the transactions")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dir", default=None, help="where to run (default: a temp dir)")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    results: dict[str, dict[str, Result]] = {}
    base = tempfile.mkdtemp(prefix="walstore-bench-", dir=args.dir)
    try:
        results["floor"] = {"raw 4KiB append+fdatasync": raw_floor(base, int(1000 * scale))}
        for wname, (tasks, files, n) in WORKLOADS.items():
            results[wname] = {}
            for sname, fn in SYSTEMS.items():
                # Nothing is deleted until the end: on this discard-mounted disk a burst of
                # deletes slows file creation for seconds after (MEASURED.md).
                d = tempfile.mkdtemp(dir=base)
                try:
                    results[wname][sname] = anyio.run(fn, d, max(10, int(n * scale)), tasks, files)
                except ImportError as exc:
                    results[wname][sname] = {"skipped": str(exc)}
    finally:
        shutil.rmtree(base)
    if args.json:
        meta = {
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        }
        print(json.dumps({"meta": meta, "results": results}, indent=2))
        return
    for wname, by_system in results.items():
        print(f"\n{wname}")
        best = max(
            (r["tx_per_s"] for s, r in by_system.items() if s != "walstore" and "tx_per_s" in r),
            default=None,
        )
        for sname, r in by_system.items():
            if "skipped" in r:
                print(f"  {sname:16} skipped ({r['skipped']})")
                continue
            ratio = (
                f"  walstore/best peer {by_system['walstore']['tx_per_s'] / best:.2f}x"
                if (sname == "walstore" and best)
                else ""
            )
            print(
                f"  {sname:16} {r['tx_per_s']:9.0f} tx/s  p50 {r['p50_ms']:6.2f} ms"
                f"  p99 {r['p99_ms']:6.2f} ms{ratio}"
            )


if __name__ == "__main__":
    main()
