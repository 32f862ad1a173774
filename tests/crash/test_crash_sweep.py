"""Crash at every file-system call of a transaction, its checkpoint and its recovery.

For each workload shape: prepare a store, then for every call index k of the transaction
(commit, then the checkpoint on close) crash there, reboot as a process crash and as power
cuts with several damage seeds, sometimes crash again during recovery, reopen and check
that the store holds exactly the old or exactly the new state (the new one if the commit
returned), with no staging leftovers and one journal segment.
"""

from __future__ import annotations

import random

import anyio
import pytest

import walstore
from tests.support import (
    INLINE,
    ROOT,
    Ops,
    Tally,
    crash_once,
    fresh,
    open_store,
    run_tx,
    user_files,
)
from walstore.testing import MemoryFileSystem

pytestmark = [
    pytest.mark.guarantee(name="Atomic"),
    pytest.mark.guarantee(name="Durable"),
    pytest.mark.guarantee(name="Recovered on open"),
]

FULL = walstore.Durability.FULL
BIG = bytes(range(256)) * 2  # staged: over the inline threshold

SHAPES: dict[str, tuple[Ops, Ops]] = {
    # name: (setup ops, the transaction that is crashed)
    "create-one": ([], [("a", b"new")]),
    "overwrite-one": ([("a", b"old")], [("a", b"new")]),
    "delete-one": ([("a", b"old")], [("a", None)]),
    "create-nested": ([], [("d1/d2/x.json", b"{}"), ("d3/e/y", b"y")]),
    "ten-files": ([], [(f"f{i}", bytes([i]) * i) for i in range(10)]),
    "mixed": (
        [("a", b"old"), ("d1/b", b"old-b"), ("c", b"c")],
        [("a", b"A2"), ("d1/b", None), ("d1/d2/n", b"n"), ("c", b"")],
    ),
    "staged-new": ([], [("big", BIG)]),
    "staged-overwrite": ([("big", b"small")], [("big", BIG), ("d1/big2", BIG[::-1])]),
    "staged-and-inline": ([("x", BIG)], [("x", b"tiny"), ("y", BIG), ("z", b"z")]),
    "empty-value": ([("a", b"old")], [("a", b"")]),
}


def _calls_of(fs: MemoryFileSystem, ops: Ops) -> int:
    fs = fs.clone()
    store = open_store(fs, FULL)
    start = fs.count
    anyio.run(run_tx, store, ops)
    anyio.run(store.aclose)
    return fs.count - start


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_crash_at_every_call(shape: str, crash_tally: Tally) -> None:
    setup, ops = SHAPES[shape]
    base, model = fresh(setup)
    total = _calls_of(base, ops)
    assert total > 5
    rng = random.Random(shape)
    for k in range(total + 1):
        for damage in (None, 1, 2, 3):
            fs = base.clone()
            store = open_store(fs, FULL)
            power = random.Random(rng.random()) if damage else None
            rec_crash = rng.randrange(40) if damage == 3 else None
            store, _ = crash_once(
                fs,
                store,
                model,
                ops,
                k,
                power,
                rec_crash,
                FULL,
                crash_tally,
                f"{shape} k={k} damage={damage} recovery_crash={rec_crash}",
            )
            anyio.run(store.aclose)
            assert fs.open_fds() == 0
    assert not crash_tally.violations, crash_tally.violations[:5]


def test_every_call_site_was_a_crash_point() -> None:
    """The sweep crashed at every kind of file-system call the commit and checkpoint make."""
    fs, _ = fresh([("a", b"old"), ("d1/b", BIG)])
    fs.trace = []
    store = open_store(fs, FULL)
    anyio.run(run_tx, store, [("a", BIG), ("d1/b", None), ("n/m", b"x")])
    anyio.run(store.aclose)
    kinds = {name for _, name, _ in fs.trace}
    assert {"pwrite", "fsync", "fdatasync", "fsync_dir", "rename", "unlink", "mkdir"} <= kinds


def test_open_fds_balanced_and_files_plain() -> None:
    """A staged value and an inline one end up as plain files; no handle stays open."""
    assert len(BIG) > INLINE
    fs, model = fresh([("a", b"1"), ("d1/d2/b", BIG)])
    store = open_store(fs, FULL)
    assert user_files(fs) == model
    assert fs.read_file(ROOT + "/d1/d2/b") == BIG
    anyio.run(store.aclose)
    assert fs.open_fds() == 0
