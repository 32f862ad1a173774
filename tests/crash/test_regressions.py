"""Bugs the commit-protocol review found, each kept as the test that showed it: the layout of
a first open that crashed is made durable; a FULL commit after OFF ones is durable; a replayed
delete of a name that later became a directory; a failed store never shows half a group; a
failed staging fsync is never retried; a failed recovery leaks no handle.
"""

from __future__ import annotations

import errno

import anyio
import pytest

import walstore
from tests.crash.oracle import BIG, FULL, OFF, STAGING, LoseAll, attempt, crashed_mid_apply, reopen
from tests.support import fresh, open_store, run_tx, user_files
from walstore.testing import MemoryFileSystem


@pytest.mark.guarantee(name="Durable")
def test_layout_of_a_crashed_first_open_is_made_durable() -> None:
    t = MemoryFileSystem()
    t.trace = []
    anyio.run(open_store(t, FULL).aclose)
    layout_syncs = [i for i, name, _ in t.trace if name == "fsync_dir"][:3]
    lost = []
    for k in layout_syncs:
        fs = MemoryFileSystem()
        fs.crash_at = k
        with pytest.raises(BaseException):
            open_store(fs, FULL)
        fs.reboot()
        anyio.run(run_tx, open_store(fs, FULL), [("a", b"acked")])
        fs.reboot(power_loss=LoseAll())
        anyio.run(open_store(fs, FULL).aclose)
        lost += [k] if user_files(fs) != {"a": b"acked"} else []
    assert not lost


@pytest.mark.guarantee(name="Durable")
def test_full_after_off_is_durable() -> None:
    fs, _ = fresh([])
    store = open_store(fs, OFF)
    anyio.run(run_tx, store, [("x", b"off")])
    anyio.run(store.aclose)
    store = open_store(fs, FULL)
    anyio.run(run_tx, store, [("a", b"acked")])
    fs.reboot(power_loss=LoseAll())
    anyio.run(open_store(fs, FULL).aclose)
    assert user_files(fs).get("a") == b"acked"


@pytest.mark.guarantee(name="Recovered on open")
@pytest.mark.parametrize("same_tx", [False, True])
def test_replay_delete_of_a_name_that_became_a_directory(same_tx: bool) -> None:
    fs, _ = fresh([("a", b"file")])
    store = open_store(fs, FULL)
    if same_tx:
        anyio.run(run_tx, store, [("a", None), ("a/b", b"nested")])
    else:
        anyio.run(run_tx, store, [("a", None)])
        anyio.run(run_tx, store, [("a/b", b"nested")])
    fs.crashed = True  # the process dies before any checkpoint
    fs.reboot()
    reopen(fs, [{"a/b": b"nested"}], "replay")


@pytest.mark.guarantee(name="Readers see whole transactions")
@pytest.mark.guarantee(name="Fail-stop")
def test_failed_store_never_shows_half_a_group() -> None:
    fs, _ = fresh([("a", b"old"), ("b", b"old")])
    store = open_store(fs, FULL)
    fs.fault = lambda i, n, p: (
        OSError(errno.EIO, "x") if n in ("rename", "exchange") and p.endswith("/b") else None
    )
    _, exc = attempt(store, [("a", b"new"), ("b", b"new")])
    assert isinstance(exc, walstore.CommittedNotAppliedError)

    async def both() -> tuple[bytes, bytes] | None:
        try:
            return await store.read("a"), await store.read("b")
        except walstore.StoreFailedError:
            return None

    assert anyio.run(both) in (None, (b"old", b"old"), (b"new", b"new"))


@pytest.mark.guarantee(name="Fail-stop")
def test_failed_staging_fsync_is_not_retried() -> None:
    """An EIO from fsync_dir(staging/) before the commit point rolls its group back and fails
    the store: a later group must not retry that fsync and acknowledge a transaction whose
    staged value's name the failed fsync may have lost (fsyncgate)."""
    fs, _ = fresh([])
    store = open_store(fs, FULL)
    fired: list[int] = []

    def fsyncgate(index: int, name: str, path: str) -> OSError | None:
        if name == "fsync_dir" and path == STAGING and not fired:
            fired.append(index)  # the kernel drops the dirty entries and reports them clean
            d = fs._get(path)
            fs._pending = [
                o for o in fs._pending if o[1] != d and not (o[0] == "rename" and o[3] == d)
            ]
            return OSError(errno.EIO, "injected")
        return None

    async def main() -> walstore.Transaction:
        tb = store.transaction()
        await tb.write("b", BIG)  # staged, waits
        fs.fault = fsyncgate
        with pytest.raises(OSError):
            async with store.transaction() as ta:
                await ta.write("a", BIG)
        with pytest.raises(walstore.StoreFailedError):
            await tb.commit()
        return tb

    tb = anyio.run(main)
    assert fired and tb.state is walstore.TxState.ROLLED_BACK  # never acknowledged
    anyio.run(store.aclose)
    fs.reboot(power_loss=LoseAll())
    reopen(fs, [{}], "after fsyncgate")


@pytest.mark.guarantee(name="Recovered on open")
def test_failed_recovery_leaks_no_handle() -> None:
    base, _ = crashed_mid_apply()
    fs = base.clone()
    # Dropping the old segment fails (it is unlinked, or renamed to be the spare).
    fs.fault = lambda i, n, p: (
        OSError(errno.EIO, "x")
        if (n == "unlink" and p.endswith(".wal")) or (n == "rename" and p.endswith("/spare"))
        else None
    )
    with pytest.raises(OSError):
        open_store(fs, FULL)
    assert fs.open_fds() == 0
