"""Several writer processes on one store: W2 and W3 shapes run by P processes at once.

    python benchmarks/processes.py [--procs 4] [--tasks 16,64] [--seconds 3] [--rounds 3]

Each process has T tasks; each task cycles over 256 keys of its own, flat in the store root,
and writes a fresh random 1 KiB value per transaction, full durability everywhere. Systems:
walstore shared (``exclusive=False``), aiosqlite (one connection per process, WAL,
synchronous=FULL, ``BEGIN IMMEDIATE`` with a busy timeout; the tasks of a process take turns on
its connection), the same with the process's tasks grouped into one SQLite transaction
(application-level group commit), and LMDB (one environment per process; LMDB serialises
writers across processes itself). The processes start together (each sets up, says ready,
then waits for go) and each reports its commits, latencies and CPU (``getrusage``, all its
threads); a rate is all commits over the span from the first start to the last end, CPU per
transaction is all the processes' CPU over all commits. Rounds interleave the systems in a
rotated order; the table shows medians and, in brackets, the range. Not collected by pytest;
``pip install -e '.[bench]'`` for the peers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from workload import drive, key, summary

import walstore

ME = "walstore shared"
Result = dict[str, Any]


def _key(proc: int, task: int, i: int) -> str:
    return key(f"p{proc}", task, i)


async def _walstore(d: str, proc: int, tasks: int, seconds: float) -> Result:
    async with walstore.open(d, exclusive=False) as store:
        _ready()

        async def one(task: int, i: int) -> None:
            async with store.transaction() as tx:
                await tx.write(_key(proc, task, i), os.urandom(1024))

        out = await drive(tasks, seconds, one)
        out["stats"] = dataclasses.asdict(store.stats())  # printed as JSON
        return out


async def _aiosqlite(d: str, proc: int, tasks: int, seconds: float, group: bool) -> Result:
    import aiosqlite

    path = os.path.join(d, "db.sqlite")
    async with aiosqlite.connect(path, isolation_level=None, timeout=60) as db:
        await db.execute("PRAGMA busy_timeout=60000")
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB)")
        _ready()
        lock = asyncio.Lock()
        queue: list[tuple[tuple[str, bytes], asyncio.Future[None]]] = []

        async def flush() -> None:
            while queue:
                batch = queue[:]
                del queue[:]
                await db.execute("BEGIN IMMEDIATE")
                await db.executemany(
                    "INSERT OR REPLACE INTO kv VALUES (?, ?)", [r for r, _ in batch]
                )
                await db.execute("COMMIT")
                for _, fut in batch:
                    fut.set_result(None)

        async def one(task: int, i: int) -> None:
            row = (_key(proc, task, i), os.urandom(1024))
            if not group:
                async with lock:
                    await db.execute("BEGIN IMMEDIATE")
                    await db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", row)
                    await db.execute("COMMIT")
                return
            fut = asyncio.get_running_loop().create_future()
            queue.append((row, fut))
            if not lock.locked():
                async with lock:
                    await flush()
            await fut

        return await drive(tasks, seconds, one)


async def _lmdb(d: str, proc: int, tasks: int, seconds: float) -> Result:
    import lmdb

    env = lmdb.open(d, map_size=1 << 32, sync=True, metasync=True, max_spare_txns=0)
    _ready()
    lock = anyio.Lock()

    def txn(key: str, value: bytes) -> None:
        with env.begin(write=True) as t:
            t.put(key.encode(), value)

    async def one(task: int, i: int) -> None:
        async with lock:  # one writer per environment handle at a time, as LMDB requires
            await anyio.to_thread.run_sync(txn, _key(proc, task, i), os.urandom(1024))

    try:
        return await drive(tasks, seconds, one)
    finally:
        env.close()


SYSTEMS: dict[str, Callable[[str, int, int, float], Awaitable[Result]]] = {
    "walstore shared": _walstore,
    "aiosqlite": lambda d, p, t, s: _aiosqlite(d, p, t, s, False),
    "aiosqlite-group": lambda d, p, t, s: _aiosqlite(d, p, t, s, True),
    "lmdb": _lmdb,
}


def _ready() -> None:
    """Tell the parent this process is set up, and wait for its go."""
    print("ready", flush=True)
    sys.stdin.readline()


def _child(system: str, d: str, proc: int, tasks: int, seconds: float) -> None:
    result = anyio.run(SYSTEMS[system], d, proc, tasks, seconds)
    print(json.dumps(result), flush=True)


def run_one(system: str, base: str, procs: int, tasks: int, seconds: float) -> Result:
    """``procs`` processes of ``system`` on one fresh store, started together."""
    d = tempfile.mkdtemp(dir=base)
    os.sync()
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", system, d, str(p), str(tasks), str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for p in range(procs)
    ]
    try:
        for c in children:
            assert c.stdout is not None
            line = c.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"{system}: a process did not start: {line!r}")
        for c in children:
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        outs = []
        for c in children:
            out, _ = c.communicate()
            if c.returncode:
                raise RuntimeError(f"{system}: a process exited with {c.returncode}")
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
    lat = sorted(x for o in outs for x in o["latencies"])
    span = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    n = len(lat)
    extra: Result = {}
    if "stats" in outs[0]:  # walstore: how its processes grouped their commits
        stats = [o["stats"] for o in outs]
        extra["group"] = sum(x["commits"] for x in stats) / max(1, sum(x["groups"] for x in stats))
        extra["conflicts"] = sum(x["conflicts"] for x in stats) / n
    user, kernel = sum(o["user"] for o in outs), sum(o["sys"] for o in outs)
    return extra | summary(lat, span, user, kernel)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--tasks", default="16,64", help="tasks per process, comma-separated")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=None, help="systems whose name starts with this")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        system, d, proc, tasks, seconds = args.child
        _child(system, d, int(proc), int(tasks), float(seconds))
        return
    systems = [s for s in SYSTEMS if args.only is None or s.startswith(args.only)]
    base = tempfile.mkdtemp(prefix="walstore-procs-", dir=args.dir)
    runs: dict[str, dict[str, list[Result]]] = {}
    try:
        for r in range(args.rounds):
            for tasks in (int(t) for t in args.tasks.split(",")):
                wname = f"{args.procs} processes x {tasks} tasks"
                k = r % len(systems)
                for system in systems[k:] + systems[:k]:
                    res = run_one(system, base, args.procs, tasks, args.seconds)
                    runs.setdefault(wname, {}).setdefault(system, []).append(res)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(runs, indent=1))
    for wname, by in runs.items():
        print(f"\n{wname} ({args.rounds} rounds of {args.seconds:g} s, medians [ranges])")
        best = max(
            [
                statistics.median(x["tx_per_s"] for x in rs)
                for s, rs in by.items()
                if s != "walstore shared"
            ]
            or [float("nan")]
        )
        for system, rs in by.items():

            def col(key: str, rs: list[Result] = rs) -> str:
                xs = [x[key] for x in rs]
                return f"{statistics.median(xs):8.2f} [{min(xs):.2f}-{max(xs):.2f}]"

            rate = statistics.median(x["tx_per_s"] for x in rs)
            grouping = f"  mean group {col('group')}" if "group" in rs[0] else ""
            print(
                f"  {system:16} {rate:8.0f} tx/s ({rate / best:.2f}x best peer)  "
                f"p50 {col('p50_ms')} ms  p99 {col('p99_ms')} ms  "
                f"CPU/tx user {col('cpu_user_ms')} sys {col('cpu_sys_ms')} ms{grouping}"
            )


if __name__ == "__main__":
    main()
