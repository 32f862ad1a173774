"""Crashes judged by the commit point: a crash at every call of a commit and its checkpoint
leaves the old state only before the journal's fdatasync and the new one only after it (the
sweep allows either everywhere), for single transactions and for groups of several; a power
cut right after a finished recovery changes nothing it recovered; two crashes in a row inside
recovery still recover.
"""

from __future__ import annotations

import random

import anyio
import pytest

import walstore
from tests.crash.oracle import (
    BIG,
    FULL,
    SETUP,
    STAGING,
    TX,
    attempt,
    commit_point,
    crashed_mid_apply,
    reopen,
    survives_power_cut,
)
from tests.support import ROOT, Ops, applied, fresh, open_store, run_tx, user_files

pytestmark = [
    pytest.mark.guarantee(name="Atomic"),
    pytest.mark.guarantee(name="Durable"),
    pytest.mark.guarantee(name="Recovered on open"),
]


def test_two_crashes_in_a_row_inside_recovery() -> None:
    base, after = crashed_mid_apply()
    t = base.clone()
    open_store(t, FULL)
    n = t.count
    for k in range(n + 1):
        for power in (None, 1):
            fs = base.clone()
            for j, rec_k in enumerate((k, (k * 7 + 3) % n)):
                fs.crash_at = fs.count + rec_k
                try:  # after a power cut recovery may need fewer calls than rec_k
                    open_store(fs, FULL)
                except BaseException:
                    pass
                fs.reboot(power_loss=random.Random(f"{k}/{j}") if power else None)
            reopen(fs, [after], f"recovery crashed at {k} then at {(k * 7 + 3) % n}")


@pytest.mark.parametrize("shape", ["mixed", "staged-superseded"])
def test_crash_then_full_recovery_then_power_cut(shape: str) -> None:
    """Crash at every call of a commit and its checkpoint. After the commit point only the new
    state is allowed (the sweep allows both), and once recovery returned, a power cut must not
    change what it recovered (the sweep cuts power only *before* recovery)."""
    tx_ops = TX if shape == "mixed" else [("x", BIG[::-1]), ("v", BIG), ("v", None), ("x", b"s")]
    base, model = fresh(SETUP)
    after = applied(model, tx_ops)
    t = base.clone()
    store = open_store(t, FULL)
    t.trace, start = [], t.count
    anyio.run(run_tx, store, tx_ops)
    anyio.run(store.aclose)
    cp = commit_point(t.trace)
    for k in range(start, t.count + 1):
        for power in (None, 1, 2):
            fs = base.clone()
            store = open_store(fs, FULL)
            fs.crash_at = k
            _, exc = attempt(store, tx_ops)
            if exc is None:
                try:
                    anyio.run(store.aclose)
                except BaseException:
                    pass
            fs.reboot(power_loss=random.Random(f"{shape}{k}/{power}") if power else None)
            what = f"{shape}: crash at {k} (commit point {cp}) power={power}"
            found = reopen(fs, [after] if k > cp else [model, after], what, close=False)
            survives_power_cut(fs, found, what)


def test_group_commit_crash_sweep() -> None:
    """Groups of several transactions (the sweep and the model test only ever commit groups of
    one): staged values superseded in the same group by a staged and then an inline value, a
    value staged and deleted in one transaction, new directories next to deleted files."""
    base, s0 = fresh([("a", b"old"), ("x", BIG), ("z", b"z"), ("d1/b", b"b")])
    txs: list[Ops] = [
        [("a", b"1")],
        [("x", BIG[::-1]), ("y", b"y"), ("v", BIG), ("v", None)],
        [("x", BIG[:300]), ("z", None), ("d1/d2/new", b"n")],
        [("n/d/f", b"f"), ("x", b"small"), ("d1/b", None)],
    ]
    s1 = applied(s0, txs[0])
    s2 = applied(s1, [op for ops in txs[1:] for op in ops])

    async def commit_all(store: walstore.Store) -> None:
        prepared = []
        for ops in txs:  # stage sequentially: the call order stays deterministic
            tx = store.transaction()
            for path, value in ops:
                await (tx.delete(path) if value is None else tx.write(path, value))
            prepared.append(tx)
        await prepared[0].commit()  # [t1] alone, then t2..t4 queue and commit as one group
        async with anyio.create_task_group() as tg:
            for tx in prepared[1:]:
                tg.start_soon(tx.commit)

    t = base.clone()
    store = open_store(t, FULL)
    t.trace, start = [], t.count
    ungated: list[str] = []  # user-visible changes made while readers are not held off

    def gate_check(index: int, name: str, path: str) -> None:
        dst = path.split(" -> ")[-1].split(" <-> ")[-1]
        user = dst.startswith(ROOT + "/") and not dst.startswith(ROOT + "/.walstore")
        if name in ("rename", "exchange", "unlink", "mkdir", "link") and user and not gate._writer:
            ungated.append(path)

    gate, t.fault = store._engine._gate, gate_check
    anyio.run(commit_all, store)
    anyio.run(store.aclose)
    syncs = [i for i, name, path in t.trace if name == "fdatasync" and path.endswith(".wal")]
    assert len(syncs) == 2 and store.stats().groups == 2
    assert user_files(t) == s2 and not ungated
    assert t.files(STAGING, skip=()) == {}  # a clean close leaves nothing staged
    for k in range(start, t.count + 1):
        for power in (None, 1):
            fs = base.clone()
            store = open_store(fs, FULL)
            fs.crash_at = k
            try:
                anyio.run(commit_all, store)
                anyio.run(store.aclose)
            except BaseException:
                pass
            fs.reboot(power_loss=random.Random(k) if power else None)
            allowed = [s2] if k > syncs[1] else [s1, s2] if k > syncs[0] else [s0, s1]
            found = reopen(fs, allowed, f"group crash at {k} power={power}", close=False)
            survives_power_cut(fs, found, f"group crash at {k}", seeds=1)
