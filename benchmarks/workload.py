"""The shape of W1-W4, shared by run.py and processes.py, and the driver that times it.

The shape is what apps do with their state: keys flat in the store's root (``W2-t3-k17``),
a fresh random value for every write, each task cycling over 256 keys of its own, and every
key written once before the clock starts, so that the timed part overwrites files that exist
(a store directory that has seen its keys), as an app's does. CPU per transaction comes from
``getrusage`` (all threads of the process, user and system apart): it moves far less with
this disk's swings than transactions per second do.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

KEYS = 256  # per task
Result = dict[str, Any]
One = Callable[[int, int], Awaitable[None]]  # (task, i) -> one committed transaction


def key(prefix: str, task: int, i: int, file: int = 0, files: int = 1) -> str:
    """The key task ``task`` writes in its ``i``-th transaction (``file`` of ``files``)."""
    name = f"{prefix}-t{task}-k{i % KEYS}"
    return name if files == 1 else f"{name}-f{file}"


def every_key(prefix: str, tasks: int, files: int = 1) -> list[str]:
    """Every key of the workload: the ones written before the clock starts."""
    return [
        key(prefix, t, i, j, files) for t in range(tasks) for i in range(KEYS) for j in range(files)
    ]


async def drive(tasks: int, seconds: float, one: One) -> Result:
    """Run ``tasks`` tasks for ``seconds``, each calling ``one(task, i)`` for i = 0, 1, ...:
    the raw latencies, wall-clock span and CPU of this process over them."""
    latencies: list[float] = []
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.time()
    stop = time.perf_counter() + seconds

    async def task(t: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await one(t, i)
            latencies.append(time.perf_counter() - t0)
            i += 1

    async with anyio.create_task_group() as tg:
        for t in range(tasks):
            tg.start_soon(task, t)
    end = time.time()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "start": start,
        "end": end,
        "latencies": latencies,
        "user": cpu.ru_utime - cpu0.ru_utime,
        "sys": cpu.ru_stime - cpu0.ru_stime,
    }


def summary(lat: list[float], span: float, user: float, sys: float) -> Result:
    """Rate, latency percentiles and CPU per transaction of ``len(lat)`` transactions."""
    lat = sorted(lat)
    n = len(lat)
    return {
        "tx_per_s": n / span,
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": lat[max(0, int(n * 0.99) - 1)] * 1e3,
        "cpu_user_ms": user / n * 1e3,
        "cpu_sys_ms": sys / n * 1e3,
    }


def summarise(raw: Result) -> Result:
    """``summary`` of what one ``drive`` returned."""
    return summary(raw["latencies"], raw["end"] - raw["start"], raw["user"], raw["sys"])
