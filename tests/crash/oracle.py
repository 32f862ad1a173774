"""What the commit-protocol attack tests share (ALICE / LevelDB fault_injection_test style):
a commit-point-aware oracle. After the journal fdatasync of a commit only its new state is
allowed; a store reopened after a failure must hold an allowed state with no staging
leftovers and one segment; and what a finished recovery reported must already be durable, so
a power cut right after it changes nothing.
"""

from __future__ import annotations

import random

import anyio

import walstore
from tests.support import (
    ROOT,
    Model,
    Ops,
    applied,
    fresh,
    open_store,
    run_tx,
    segment_files,
    user_files,
)
from walstore.testing import MemoryFileSystem

FULL, OFF = walstore.Durability.FULL, walstore.Durability.OFF
BIG = bytes(range(256)) * 2  # over the inline threshold: staged
STAGING, JOURNAL = ROOT + "/.walstore/staging", ROOT + "/.walstore/journal"

# A store's files before, and a transaction of every kind of op (staged, inline, delete,
# new directories, an empty file) over them.
SETUP: Ops = [("a", b"old"), ("d1/b", b"old-b"), ("x", BIG), ("z", b"z")]
TX: Ops = [("a", BIG), ("d1/b", None), ("n/m/c", b"c"), ("x", b"tiny"), ("e", b""), ("z", BIG)]


class LoseAll(random.Random):
    """A power cut that loses every directory change not made durable by an fsync."""

    def random(self) -> float:
        return 0.99


async def _tx_body(store: walstore.Store, ops: Ops, box: list[walstore.Transaction]) -> None:
    async with store.transaction() as tx:
        box.append(tx)
        for path, value in ops:
            await (tx.delete(path) if value is None else tx.write(path, value))


def attempt(store: walstore.Store, ops: Ops) -> tuple[walstore.Transaction, BaseException | None]:
    box: list[walstore.Transaction] = []
    try:
        anyio.run(_tx_body, store, ops, box)
        return box[0], None
    except BaseException as exc:  # SimulatedCrash, OSError, StoreFailedError
        return box[0], exc


def reopen(fs: MemoryFileSystem, allowed: list[Model], what: str, *, close: bool = True) -> Model:
    """Open (recover), check the state, leftovers and segments; return the state found."""
    store = open_store(fs, FULL)
    found = user_files(fs)
    assert found in allowed, f"{what}: {sorted(found)} not in {[sorted(m) for m in allowed]}"
    assert fs.files(STAGING, skip=()) == {}, f"{what}: staging leftovers"
    assert len(segment_files(fs.files(JOURNAL, skip=()))) == 1, f"{what}: segments"
    if close:
        anyio.run(store.aclose)
    return found


def survives_power_cut(fs: MemoryFileSystem, state: Model, what: str, seeds: int = 2) -> None:
    """The state a finished recovery reported must already be durable."""
    for seed in range(seeds):
        other = fs.clone()
        other.reboot(power_loss=random.Random(f"{what}/{seed}"))
        reopen(other, [state], f"{what}, power cut after recovery (seed {seed})")


def commit_point(trace: list[tuple[int, str, str]]) -> int:
    return next(i for i, name, path in trace if name == "fdatasync" and path.endswith(".wal"))


def crashed_mid_apply() -> tuple[MemoryFileSystem, Model]:
    """A process that died half-way through applying a committed group (staged, inline,
    delete, new directories): recovery has real work to do."""
    base, model = fresh(SETUP)
    t = base.clone()
    store = open_store(t, FULL)
    t.trace = []
    anyio.run(run_tx, store, TX)
    cp = commit_point(t.trace)
    fs = base.clone()
    store = open_store(fs, FULL)
    fs.crash_at = cp + (t.count - cp) // 2
    _, exc = attempt(store, TX)
    assert exc is not None
    fs.reboot()
    return fs, applied(model, TX)
