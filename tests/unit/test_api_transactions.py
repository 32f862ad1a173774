"""Transactions: their own writes, deletes and listings, staged large values, roll back,
and ops on a finished transaction.

Every test opens a real store under ``tmp_path`` and checks both what the API returns and
what is (or is not) on disk, with plain ``open()``/``os`` calls.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import walstore
from tests.unit.api_support import BIG, THRESHOLD, Boom, read_plain, snapshot, staging
from walstore import TxState

# -- transactions: own writes, own deletes, list merging ---------------------------------


@pytest.mark.asyncio
async def test_transaction_ops_and_commit(store: walstore.Store, root: Path) -> None:
    async with store.transaction() as tx:
        await tx.write("users/42.json", b'{"id": 42}')
        await tx.write_text("notes/a.md", "hi")
        await tx.write_json("graphs/g1/composed.json", {"nodes": []})
        assert await tx.read("users/42.json") == b'{"id": 42}'
        assert await tx.read_text("notes/a.md") == "hi"
        assert await tx.read_json("graphs/g1/composed.json") == {"nodes": []}
        assert await tx.exists("users/42.json")
        assert await tx.exists("graphs")
        assert await tx.exists("graphs/g1")
        assert not await tx.exists("users/41.json")
    assert tx.state is TxState.COMMITTED
    assert read_plain(root / "users" / "42.json") == b'{"id": 42}'
    assert read_plain(root / "notes" / "a.md") == b"hi"
    with open(root / "graphs" / "g1" / "composed.json", encoding="utf-8") as f:
        assert json.load(f) == {"nodes": []}


@pytest.mark.asyncio
async def test_nothing_on_disk_before_commit(store: walstore.Store, root: Path) -> None:
    await store.write("existing", b"old")
    before = snapshot(root)
    async with store.transaction() as tx:
        await tx.write("new/file", b"new")
        await tx.write("existing", b"changed")
        await tx.delete("existing")
        await tx.write("existing", b"changed again")
        assert not (root / "new").exists()
        assert read_plain(root / "existing") == b"old"
        assert not await store.exists("new/file")
        with pytest.raises(FileNotFoundError):
            await store.read("new/file")
        assert await store.read("existing") == b"old"
        assert await store.list() == ["existing"]
        # Small values live in memory: nothing on disk (.walstore/ included) has changed.
        assert snapshot(root) == before
    assert read_plain(root / "new" / "file") == b"new"
    assert read_plain(root / "existing") == b"changed again"


@pytest.mark.asyncio
async def test_large_value_is_staged_until_commit(store: walstore.Store, root: Path) -> None:
    async with store.transaction() as tx:
        await tx.write("blobs/big.bin", BIG)
        staged_dir = root / ".walstore" / "staging" / str(tx.txid)
        assert staged_dir.is_dir()
        staged_files = [staged_dir / n for n in os.listdir(staged_dir)]
        assert [read_plain(p) for p in staged_files] == [BIG]
        assert not (root / "blobs").exists()
        assert await tx.read("blobs/big.bin") == BIG
        assert not await store.exists("blobs/big.bin")
    assert read_plain(root / "blobs" / "big.bin") == BIG
    assert await store.read("blobs/big.bin") == BIG
    # The staged name may stay until a checkpoint has made the target durable.
    assert staging(root) in ([], [str(tx.txid)])
    await store.checkpoint()
    assert staging(root) == []
    assert read_plain(root / "blobs" / "big.bin") == BIG


@pytest.mark.asyncio
async def test_store_write_of_large_value(root: Path) -> None:
    async with walstore.open(root, inline_threshold=THRESHOLD) as store:
        await store.write("big.bin", BIG)
        assert read_plain(root / "big.bin") == BIG
    assert staging(root) == []  # closing checkpoints
    assert read_plain(root / "big.bin") == BIG


@pytest.mark.asyncio
async def test_large_value_overwritten_by_large_value(store: walstore.Store, root: Path) -> None:
    other = b"z" * (3 * THRESHOLD)
    async with store.transaction() as tx:
        await tx.write("big.bin", BIG)
        await tx.write("big.bin", other)
        assert await tx.read("big.bin") == other
    assert read_plain(root / "big.bin") == other
    await store.checkpoint()
    assert staging(root) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("then", ["small write", "delete"])
async def test_superseded_staged_value_leaves_no_staging(root: Path, then: str) -> None:
    async with walstore.open(root, inline_threshold=THRESHOLD) as store:
        async with store.transaction() as tx:
            await tx.write("a.bin", BIG)
            if then == "small write":
                await tx.write("a.bin", b"small")
            else:
                await tx.delete("a.bin")
        committed = tx.txid
        await store.checkpoint()
        assert staging(root) == []
    async with walstore.open(root) as store:
        assert committed not in store.recovery.rolled_back
        assert store.recovery.orphans_removed == 0
        assert store.recovery.clean


@pytest.mark.asyncio
async def test_transaction_reads_own_deletes(store: walstore.Store, root: Path) -> None:
    await store.write("d/a", b"A")
    await store.write("d/b", b"B")
    async with store.transaction() as tx:
        await tx.delete("d/a")
        assert not await tx.exists("d/a")
        with pytest.raises(FileNotFoundError):
            await tx.read("d/a")
        with pytest.raises(FileNotFoundError):
            await tx.delete("d/a")
        await tx.delete("d/a", missing_ok=True)
        assert await tx.list("d") == ["b"]
        assert await store.read("d/a") == b"A"  # not yet
        assert read_plain(root / "d" / "a") == b"A"
    assert not (root / "d" / "a").exists()
    assert await store.list("d") == ["b"]


@pytest.mark.asyncio
async def test_write_after_delete_in_same_transaction(store: walstore.Store, root: Path) -> None:
    await store.write("a", b"old")
    async with store.transaction() as tx:
        await tx.delete("a")
        await tx.write("a", b"new")
        assert await tx.read("a") == b"new"
    assert read_plain(root / "a") == b"new"


@pytest.mark.asyncio
async def test_delete_of_own_write_cancels_it(store: walstore.Store, root: Path) -> None:
    async with store.transaction() as tx:
        await tx.write("tmp.txt", b"x")
        await tx.delete("tmp.txt")
        assert not await tx.exists("tmp.txt")
    assert not (root / "tmp.txt").exists()
    assert await store.list() == []


@pytest.mark.asyncio
async def test_transaction_list_merges_own_writes_and_deletes(store: walstore.Store) -> None:
    await store.write("keep.txt", b"k")
    await store.write("old.txt", b"o")
    await store.write("sub/a", b"a")
    async with store.transaction() as tx:
        await tx.write("new.txt", b"n")
        await tx.delete("old.txt")
        await tx.write("newdir/deep/x", b"x")
        await tx.write("sub/b", b"b")
        await tx.write("keep.txt", b"k2")
        assert await tx.list() == ["keep.txt", "new.txt", "newdir", "sub"]
        assert await tx.list("sub") == ["a", "b"]
        assert await tx.list("newdir") == ["deep"]
        assert await tx.list("newdir/deep") == ["x"]
        with pytest.raises(FileNotFoundError):
            await tx.list("nowhere")
        assert await store.list() == ["keep.txt", "old.txt", "sub"]
    assert await store.list() == ["keep.txt", "new.txt", "newdir", "sub"]
    assert await store.list("sub") == ["a", "b"]


@pytest.mark.asyncio
async def test_transaction_list_of_own_file_is_not_a_directory(store: walstore.Store) -> None:
    async with store.transaction() as tx:
        await tx.write("f.txt", b"x")
        with pytest.raises(NotADirectoryError):
            await tx.list("f.txt")


@pytest.mark.asyncio
async def test_explicit_commit_without_context_manager(store: walstore.Store, root: Path) -> None:
    tx = store.transaction()
    await tx.write("a", b"1")
    await tx.commit()
    assert tx.state is TxState.COMMITTED
    assert read_plain(root / "a") == b"1"


# -- roll back --------------------------------------------------------------------------


class BaseBoom(BaseException):
    pass


@pytest.mark.asyncio
@pytest.mark.parametrize("exc_type", [Boom, BaseBoom, KeyError])
async def test_exception_in_block_rolls_back_and_propagates_unchanged(
    store: walstore.Store, root: Path, exc_type: type[BaseException]
) -> None:
    await store.write("existing", b"old")
    before = snapshot(root)
    err = exc_type("boom")
    with pytest.raises(exc_type) as info:
        async with store.transaction() as tx:
            await tx.write("small", b"x")
            await tx.write("big", BIG)
            await tx.write("existing", b"new")
            await tx.delete("existing")
            assert staging(root) == [str(tx.txid)]
            raise err
    assert info.value is err
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    assert tx.state is TxState.ROLLED_BACK
    assert staging(root) == []
    assert snapshot(root) == before
    with pytest.raises(walstore.TransactionClosedError):
        await tx.write("small", b"x")


@pytest.mark.asyncio
async def test_rollback_discards(store: walstore.Store, root: Path) -> None:
    await store.write("existing", b"old")
    before = snapshot(root)
    async with store.transaction() as tx:
        await tx.write("small", b"x")
        await tx.write("big", BIG)
        await tx.delete("existing")
        await tx.rollback()
        assert tx.state is TxState.ROLLED_BACK
        assert staging(root) == []
        await tx.rollback()  # idempotent
        with pytest.raises(walstore.TransactionClosedError):
            await tx.write("more", b"x")
    assert tx.state is TxState.ROLLED_BACK
    assert snapshot(root) == before
    assert await store.read("existing") == b"old"


@pytest.mark.asyncio
async def test_rollback_without_context_manager(store: walstore.Store, root: Path) -> None:
    before = snapshot(root)
    tx = store.transaction()
    await tx.write("big", BIG)
    await tx.rollback()
    assert tx.state is TxState.ROLLED_BACK
    assert snapshot(root) == before


# -- finished transactions ----------------------------------------------------------------

TX_OPS: dict[str, Callable[[walstore.Transaction], Awaitable[Any]]] = {
    "write": lambda t: t.write("n", b"x"),
    "write_text": lambda t: t.write_text("n", "x"),
    "write_json": lambda t: t.write_json("n", {}),
    "read": lambda t: t.read("a"),
    "read_text": lambda t: t.read_text("a"),
    "read_json": lambda t: t.read_json("a"),
    "exists": lambda t: t.exists("a"),
    "list": lambda t: t.list(),
    "delete": lambda t: t.delete("a"),
    "commit": lambda t: t.commit(),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("ending", ["committed", "rolled back", "raised"])
@pytest.mark.parametrize("op", sorted(TX_OPS))
async def test_finished_transaction_raises_transaction_closed(
    store: walstore.Store, root: Path, op: str, ending: str
) -> None:
    await store.write_json("a", {"v": 1})
    if ending == "committed":
        async with store.transaction() as tx:
            await tx.write("c", b"c")
    elif ending == "rolled back":
        async with store.transaction() as tx:
            await tx.rollback()
    else:
        with pytest.raises(Boom):
            async with store.transaction() as tx:
                raise Boom
    before = snapshot(root)
    with pytest.raises(walstore.TransactionClosedError):
        await TX_OPS[op](tx)
    assert snapshot(root) == before


@pytest.mark.asyncio
async def test_rollback_after_commit_raises(store: walstore.Store) -> None:
    async with store.transaction() as tx:
        await tx.write("a", b"1")
    with pytest.raises(walstore.TransactionClosedError):
        await tx.rollback()
    assert tx.state is TxState.COMMITTED
    assert await store.read("a") == b"1"
