"""The conversation CLI's scenario: a conversation directory rewritten over and over with
replace_dir, keeping the unmanaged QUERY_MESSAGE.md, crashed at every file-system call of one
rewrite: after reopening it is exactly the old or exactly the new version, never missing, never
mixed, and QUERY_MESSAGE.md is still there."""

from __future__ import annotations

import json
import random

import anyio
import pytest

import walstore
from tests.support import ROOT, Tally, open_store, tally, user_files
from walstore.testing import MemoryFileSystem, SimulatedCrash

pytestmark = pytest.mark.guarantee(name="Directories whole")

FULL = walstore.Durability.FULL
CONV = "conversations/c1"
QUERY = b"What is walstore?\n"
TALLY = tally("conversation rewrites crashed")


def version_files(v: int) -> dict[str, bytes]:
    """The managed files of version ``v``: events, meta, and some per-turn messages."""
    files = {
        "events.json": json.dumps({"version": v, "events": list(range(v % 5))}).encode(),
        "meta.json": json.dumps({"version": v}).encode(),
    }
    for turn in range(v % 3 + 1):
        files[f"messages/{turn}.md"] = f"turn {turn} of version {v}\n".encode() * (v % 40 + 1)
    return files


async def rewrite(store: walstore.Store, v: int) -> None:
    async with store.transaction() as tx, tx.replace_dir(CONV, keep=["QUERY_MESSAGE.md"]) as d:
        for rel, data in version_files(v).items():
            await d.write(rel, data)


def expected(v: int) -> dict[str, bytes]:
    out = {f"{CONV}/{rel}": data for rel, data in version_files(v).items()}
    out[f"{CONV}/QUERY_MESSAGE.md"] = QUERY
    return out


def prepared(exchange: bool, rewrites: int) -> MemoryFileSystem:
    fs = MemoryFileSystem()
    fs.exchange_supported = exchange
    store = open_store(fs, FULL)

    async def setup() -> None:
        await store.write(f"{CONV}/QUERY_MESSAGE.md", QUERY)
        for v in range(1, rewrites + 1):
            await rewrite(store, v)
            if v % 50 == 0:
                await store.checkpoint()

    anyio.run(setup)
    assert user_files(fs) == expected(rewrites)
    return fs  # left open on purpose: the next rewrite has un-checkpointed company


def _is_crash(exc: BaseException) -> bool:
    if isinstance(exc, SimulatedCrash):
        return True
    return isinstance(exc, BaseExceptionGroup) and all(_is_crash(e) for e in exc.exceptions)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_crash_at_every_call_of_a_rewrite(exchange: bool) -> None:
    base = prepared(exchange, 200)
    old, new = expected(200), expected(201)
    probe = base.clone()
    store = open_store(probe, FULL)
    start = probe.count
    anyio.run(rewrite, store, 201)
    calls = probe.count - start
    assert calls > 20
    mine = Tally()
    for k in range(calls + 1):
        for damage in (None, 0, 1):
            fs = base.clone()
            store = open_store(fs, FULL)
            fs.crash_at = fs.count + k
            acked = False
            try:
                anyio.run(rewrite, store, 201)
                acked = True
            except BaseException as exc:
                if not _is_crash(exc):
                    raise
            fs.reboot(power_loss=random.Random(f"{k}/{damage}") if damage is not None else None)
            store = open_store(fs, FULL)
            found = user_files(fs)
            mine.cases += 1
            allowed = [new] if acked else [old, new]
            if found not in allowed:
                mine.violations.append(f"k={k} damage={damage}: {sorted(found)}")
            if fs.files(ROOT + "/.walstore/staging", skip=()):
                mine.violations.append(f"k={k} damage={damage}: staging leftovers")
            anyio.run(store.aclose)
    TALLY.cases += mine.cases
    TALLY.violations += mine.violations
    assert not mine.violations, mine.violations[:5]
