"""A transaction's life cycle (``TxState``), txids, reopening, and ``stats()``.

Every test opens a real store under ``tmp_path`` and checks both what the API returns and
what is (or is not) on disk, with plain ``open()``/``os`` calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

import walstore
from tests.unit.api_support import BIG, THRESHOLD, Boom
from walstore import TxState

# -- life cycle ---------------------------------------------------------------------------


class SpyFS(walstore.OsFileSystem):
    """The real file system, calling ``on_fdatasync`` (from the worker thread) at the journal
    sync, i.e. while a group is between append and commit point."""

    def __init__(self) -> None:
        super().__init__()
        self.on_fdatasync: Callable[[], None] | None = None

    def fdatasync(self, fd: int) -> None:
        if self.on_fdatasync is not None:
            self.on_fdatasync()
        super().fdatasync(fd)


@pytest.mark.asyncio
async def test_tx_state_through_the_life_cycle(root: Path) -> None:
    fs = SpyFS()
    async with walstore.open(root, fs=fs) as store:
        seen: list[TxState] = []
        async with store.transaction() as tx:
            assert tx.state is TxState.ACTIVE
            await tx.write("a", b"1")
            assert tx.state is TxState.ACTIVE
            fs.on_fdatasync = lambda: seen.append(tx.state)
        fs.on_fdatasync = None
        assert seen == [TxState.COMMITTING]
        assert tx.state is TxState.COMMITTED
        assert tx.lsn is not None

        async with store.transaction() as tx2:
            await tx2.rollback()
        assert tx2.state is TxState.ROLLED_BACK

        with pytest.raises(Boom):
            async with store.transaction() as tx3:
                await tx3.write("b", b"2")
                raise Boom
        assert tx3.state is TxState.ROLLED_BACK

        # Refused at commit (a file where a directory is needed): rolled back.
        with pytest.raises(walstore.InvalidPathError):
            async with store.transaction() as tx4:
                await tx4.write("a/b", b"3")
        assert tx4.state is TxState.ROLLED_BACK

        async with store.transaction() as tx5:
            pass  # empty
        assert tx5.state is TxState.COMMITTED


@pytest.mark.asyncio
async def test_txid_increases(root: Path) -> None:
    txids = []
    async with walstore.open(root) as store:
        for i in range(3):
            async with store.transaction() as tx:
                await tx.write(f"f{i}", b"x")
            txids.append(tx.txid)
        async with store.transaction() as tx:
            await tx.rollback()
        txids.append(tx.txid)
    async with walstore.open(root) as store:
        async with store.transaction() as tx:
            await tx.write("after", b"x")
        txids.append(tx.txid)
    assert txids == sorted(txids)
    assert len(set(txids)) == len(txids)


@pytest.mark.asyncio
async def test_reopen_preserves_data_and_recovery_is_clean(root: Path) -> None:
    async with walstore.open(root, inline_threshold=THRESHOLD) as store:
        assert store.recovery.clean  # a new store
        await store.write("a.txt", b"A")
        await store.write("big.bin", BIG)
        await store.write_json("d/j.json", {"x": 1})
        await store.delete("a.txt")
        async with store.transaction() as tx:
            await tx.write("rolled", b"back")
            await tx.write("rolled-big", BIG)
            await tx.rollback()
    async with walstore.open(root) as store:
        assert store.recovery.clean
        assert store.recovery.rolled_forward == ()
        assert store.recovery.rolled_back == ()
        assert await store.list() == ["big.bin", "d"]
        assert await store.read("big.bin") == BIG
        assert await store.read_json("d/j.json") == {"x": 1}
    async with walstore.open(root) as store:  # and again
        assert store.recovery.clean


@pytest.mark.asyncio
async def test_stats_count_commits_and_groups(store: walstore.Store) -> None:
    s0 = store.stats()
    assert s0.commits == 0
    assert s0.groups == 0
    for i in range(3):
        await store.write(f"f{i}", b"x")
    s1 = store.stats()
    assert s1.commits == 3
    assert s1.groups == 3
    assert s1.mean_group_size == 1.0
    assert s1.journal_bytes > 0
    assert s1.journal_syncs == 3

    async with store.transaction() as tx:
        await tx.rollback()
    async with store.transaction():
        pass
    assert store.stats().commits == 3  # neither a rollback nor an empty tx commits

    async def one(i: int) -> None:
        async with store.transaction() as tx:
            await tx.write(f"g{i}", b"y")

    await asyncio.gather(*(one(i) for i in range(5)))
    s2 = store.stats()
    assert s2.commits == 8
    assert 4 <= s2.groups < 8  # the five concurrent commits shared groups
    assert s2.mean_group_size > 1.0

    await store.checkpoint()
    assert store.stats().checkpoints == s2.checkpoints + 1


@pytest.mark.asyncio
@pytest.mark.parametrize("what", ["reads", "delete missing_ok"])
async def test_read_only_transaction_writes_no_journal(store: walstore.Store, what: str) -> None:
    await store.write("a", b"1")
    before = store.stats()
    if what == "reads":
        async with store.transaction() as tx:
            assert await tx.read("a") == b"1"
            assert await tx.list() == ["a"]
            assert not await tx.exists("b")
    else:
        await store.delete("missing", missing_ok=True)
    after = store.stats()
    assert after.journal_bytes == before.journal_bytes
    assert after.journal_syncs == before.journal_syncs
