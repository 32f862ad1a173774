"""Crash-check a user's workload: run it on a simulated disk, kill the process at every
file-system call it makes, reopen the store and check the user's invariant each time.

This is how walstore's own crash sweeps work (``tests/crash/``), packaged for apps: an app's
invariant ("money is conserved", "the registry names every graph directory") is about *its*
files, and only a test of the app can state it.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ._engine import Durability
from ._open import open as open_store
from ._store import Store
from .testing import MemoryFileSystem

ROOT = "/store"
SMALL_CHECKPOINT = 64 << 10  # checkpoint_bytes unless the caller gives one

Workload = Callable[[Store], Awaitable[object]]
Invariant = Callable[[Store], Awaitable[object]]


@dataclass(frozen=True)
class CrashFailure:
    """One crash case whose reopened store broke the invariant (or could not be reopened)."""

    index: int
    """The file-system call the process died at, counted from 0 at the start of the workload
    (the store's close after the workload counts on). -1: the run that did not crash."""
    call: str
    """The name of that call (``pwrite``, ``fdatasync``, ``rename``, ...)."""
    path: str
    """The path it was made on, relative to the store root."""
    power_loss: bool
    """Whether the crash was followed by a simulated power cut (unsynced writes damaged)."""
    error: str
    """The first line of the invariant's AssertionError (or the error reopening raised)."""

    def __str__(self) -> str:
        where = "no crash" if self.index < 0 else f"crash at call {self.index} {self.call}"
        if self.path:
            where += f"({self.path})"
        if self.power_loss:
            where += " + power loss"
        return f"{where}: {self.error}"


@dataclass
class CrashReport:
    """What ``crash_check`` ran and found."""

    points: int
    """Crash points: the file-system calls the workload (and closing the store) made."""
    cases: int
    """Cases checked: every point, with and without a power cut, plus the run without a crash."""
    failures: list[CrashFailure] = field(default_factory=list)
    """The cases that broke the invariant, in the order they ran."""

    @property
    def ok(self) -> bool:
        """No case broke the invariant."""
        return not self.failures

    def __str__(self) -> str:
        head = (
            f"walstore crash check: {self.points} crash points, {self.cases} cases checked, "
            f"{len(self.failures)} broke the invariant"
        )
        return "\n".join([head, *(f"  {f}" for f in self.failures)])


def _relative(path: str) -> str:
    return path.replace(ROOT + "/", "")  # also in "a -> b" of a rename


async def _open(fs: MemoryFileSystem, durability: Durability, options: dict[str, Any]) -> Store:
    return await open_store(ROOT, fs=fs, durability=durability, **options)


async def crash_check(
    workload: Workload,
    invariant: Invariant,
    *,
    setup: Workload | None = None,
    power_loss: bool = True,
    durability: Durability = Durability.FULL,
    raise_on_failure: bool = True,
    **open_options: Any,
) -> CrashReport:
    """Run ``await workload(store)`` under a crash at every file-system call it makes and
    check ``await invariant(store)`` on the store reopened after each.

    The store lives on a ``walstore.testing.MemoryFileSystem``. First ``setup`` (if given)
    runs once on a fresh store, and the workload runs once without a crash to count its
    file-system calls (closing the store counts too: it checkpoints). Then, for every call
    ``k``, the disk after setup is copied, the workload runs on it and the simulated process
    dies at call ``k``: that call and every later one raise, so whatever the workload (or its
    other tasks) does after that is lost, as in a real crash. The disk is rebooted (with
    ``power_loss``, a second case also cuts the power: unsynced writes are kept, lost, torn
    or garbled), the store is reopened (recovering), and ``invariant`` runs on it; it signals
    a broken state by raising AssertionError. The run without a crash is checked too.

    The invariant cannot know whether the workload's last transaction was acknowledged
    before the crash: state it so that both are allowed (the whole point of the check is
    that nothing in between ever is).

    Returns a ``CrashReport``. With ``raise_on_failure`` (the default) a report with failures
    raises AssertionError listing every failing crash point (call index, call name, path,
    the assertion). ``open_options`` go to ``walstore.open`` (e.g. ``inline_threshold=64``
    to push small values through staging too); ``checkpoint_bytes`` defaults to 64 KiB here,
    to keep the simulated disk that every case copies small. Runs on asyncio and trio; every
    case runs on the calling event loop, one after another.
    """
    __tracebackhide__ = True  # pytest: show the test's line and the report, not this function
    # The simulated disk is copied for every case: keep journal segments (which the store may
    # preallocate to about checkpoint_bytes) small. More checkpoints also mean more of them
    # among the crash points.
    open_options.setdefault("checkpoint_bytes", SMALL_CHECKPOINT)
    base = MemoryFileSystem()
    store = await _open(base, durability, open_options)
    if setup is not None:
        await setup(store)
    await store.aclose()
    base.reboot()

    probe = base.clone()
    store = await _open(probe, durability, open_options)
    start = probe.count
    await workload(store)
    await store.aclose()
    points = probe.count - start

    report = CrashReport(points=points, cases=0)
    for k in [*range(points), -1]:
        for cut in (False, True) if power_loss and k >= 0 else (False,):
            await _case(report, base, k, cut, workload, invariant, durability, open_options)
    if raise_on_failure and report.failures:
        raise AssertionError(str(report))
    return report


async def _case(
    report: CrashReport,
    base: MemoryFileSystem,
    k: int,
    cut: bool,
    workload: Workload,
    invariant: Invariant,
    durability: Durability,
    options: dict[str, Any],
) -> None:
    fs = base.clone()
    store = await _open(fs, durability, options)
    trace: list[tuple[int, str, str]] = []
    fs.trace = trace
    start = fs.count
    if k >= 0:
        fs.crash_at = start + k
    try:
        await workload(store)
        await store.aclose()
    except BaseException:
        if not fs.crashed:
            raise  # the workload's own error, not the crash: the test should see it
    call, path = "", ""
    if fs.crashed and trace:
        _, call, path = trace[-1]
    index = k if fs.crashed else -1
    fs.trace = None
    fs.reboot(power_loss=random.Random(k) if cut else None)
    report.cases += 1

    def fail(error: str) -> None:
        report.failures.append(CrashFailure(index, call, _relative(path), cut, error))

    try:
        reopened = await _open(fs, durability, options)
    except Exception as exc:
        fail(f"reopening failed: {exc!r}")
        return
    try:
        await invariant(reopened)
    except AssertionError as exc:
        # the message's first line: pytest's assertion rewriting appends its explanation
        fail(str(exc).split("\n", 1)[0] or "AssertionError")
    except Exception as exc:
        fail(f"invariant raised {exc!r}")
    finally:
        await reopened.aclose()
