"""move, delete_dir and replace_dir: what they do, what a transaction sees, what they refuse."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

import walstore


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[walstore.Store]:
    async with walstore.open(tmp_path / "s", inline_threshold=64) as s:
        await s.write("a.txt", b"A")
        await s.write("big.bin", b"B" * 200)
        await s.write("conv/c1/events.json", b"[1]")
        await s.write("conv/c1/QUERY_MESSAGE.md", b"q")
        await s.write("conv/c1/sub/deep.txt", b"deep")
        yield s


pytestmark = pytest.mark.asyncio


async def test_move_replaces_target_and_reads_back(store: walstore.Store) -> None:
    await store.write("b.txt", b"old b")
    async with store.transaction() as tx:
        await tx.move("a.txt", "b.txt")
        assert await tx.read("b.txt") == b"A"
        assert not await tx.exists("a.txt")
        await tx.move("big.bin", "x/y/big.bin")
    assert await store.read("b.txt") == b"A"
    assert not await store.exists("a.txt")
    assert await store.read("x/y/big.bin") == b"B" * 200
    assert (Path(store.root) / "x/y/big.bin").read_bytes() == b"B" * 200


async def test_move_of_a_missing_file_raises(store: walstore.Store) -> None:
    async with store.transaction() as tx:
        with pytest.raises(FileNotFoundError):
            await tx.move("nope", "b")
        with pytest.raises(walstore.InvalidPathError):
            await tx.move("conv", "elsewhere")  # a directory
        await tx.rollback()


async def test_move_of_own_write_and_chains(store: walstore.Store) -> None:
    async with store.transaction() as tx:
        await tx.write("new.txt", b"N")
        await tx.move("new.txt", "n2.txt")
        await tx.move("a.txt", "t1")
        await tx.move("t1", "t2")
    assert await store.list() == ["big.bin", "conv", "n2.txt", "t2"]
    assert await store.read("t2") == b"A"


async def test_move_source_changed_concurrently_conflicts(store: walstore.Store) -> None:
    tx = store.transaction()
    async with tx:
        await tx.move("a.txt", "moved")
        await store.write("a.txt", b"changed meanwhile")
        with pytest.raises(walstore.ConflictError):
            await tx.commit()
    assert await store.read("a.txt") == b"changed meanwhile"
    assert not await store.exists("moved")


async def test_delete_dir(store: walstore.Store) -> None:
    async with store.transaction() as tx:
        await tx.delete_dir("conv/c1")
        assert not await tx.exists("conv/c1/events.json")
        assert await tx.list("conv") == []
        with pytest.raises(FileNotFoundError):
            await tx.delete_dir("conv/c1")  # already gone in this transaction
    assert await store.list("conv") == []
    async with store.transaction() as tx:
        with pytest.raises(FileNotFoundError):
            await tx.delete_dir("missing")
        with pytest.raises(NotADirectoryError):
            await tx.delete_dir("a.txt")
        await tx.rollback()


async def test_delete_dir_then_write_inside(store: walstore.Store) -> None:
    async with store.transaction() as tx:
        await tx.delete_dir("conv")
        await tx.write("conv/fresh.json", b"{}")
        assert await tx.list("conv") == ["fresh.json"]
    assert await store.list("conv") == ["fresh.json"]


async def test_replace_dir_keeps_unmanaged_files(store: walstore.Store) -> None:
    async with store.transaction() as tx:
        async with tx.replace_dir("conv/c1", keep=["QUERY_MESSAGE.md"]) as d:
            await d.write_json("events.json", [1, 2])
            await d.write("nested/more.bin", b"M" * 100)  # staged
        assert await tx.list("conv/c1") == ["QUERY_MESSAGE.md", "events.json", "nested"]
        assert await tx.read("conv/c1/QUERY_MESSAGE.md") == b"q"
        assert not await tx.exists("conv/c1/sub")
    assert await store.list("conv/c1") == ["QUERY_MESSAGE.md", "events.json", "nested"]
    assert await store.read_json("conv/c1/events.json") == [1, 2]
    assert await store.read("conv/c1/nested/more.bin") == b"M" * 100


async def test_replace_dir_keep_predicate_and_directories(store: walstore.Store) -> None:
    async with store.transaction() as tx:
        async with tx.replace_dir("conv/c1", keep=lambda name: name != "events.json") as d:
            await d.write("new.txt", b"n")
    assert await store.list("conv/c1") == ["QUERY_MESSAGE.md", "new.txt", "sub"]
    assert await store.read("conv/c1/sub/deep.txt") == b"deep"


async def test_replace_dir_creates_a_missing_directory(store: walstore.Store) -> None:
    async with store.transaction() as tx, tx.replace_dir("fresh/dir") as d:
        await d.write("x", b"1")
    assert await store.read("fresh/dir/x") == b"1"


async def test_replace_dir_refuses_a_file_and_bad_names(store: walstore.Store) -> None:
    async with store.transaction() as tx:
        with pytest.raises(walstore.InvalidPathError):
            async with tx.replace_dir("conv/c1") as d:
                await d.write("../escape", b"x")
        with pytest.raises(TypeError):
            async with tx.replace_dir("conv/c1", keep="QUERY_MESSAGE.md"):  # type: ignore[arg-type]
                pass
        async with tx.replace_dir("a.txt") as d:
            await d.write("x", b"1")
        with pytest.raises(walstore.InvalidPathError):
            await tx.commit()
    assert await store.read("a.txt") == b"A"


async def test_error_inside_replace_block_records_nothing(store: walstore.Store) -> None:
    async with store.transaction() as tx:
        with pytest.raises(KeyError):
            async with tx.replace_dir("conv/c1") as d:
                await d.write("x", b"1")
                raise KeyError("app")
        await tx.write("other", b"o")
    assert await store.read("conv/c1/events.json") == b"[1]"
    assert await store.read("other") == b"o"


async def test_staging_is_empty_after_checkpoint(store: walstore.Store) -> None:
    async with store.transaction() as tx:
        await tx.move("big.bin", "moved.bin")
        await tx.delete_dir("conv/c1/sub")
        async with tx.replace_dir("conv/c1", keep=["QUERY_MESSAGE.md"]) as d:
            await d.write("events.json", b"E" * 100)
    await store.checkpoint()
    assert list((Path(store.root) / ".walstore/staging").iterdir()) == []


async def test_group_write_of_a_file_where_another_tx_deleted_below_it(
    store: walstore.Store,
) -> None:
    """A transaction whose ops delete n/m (n never existed) makes no directory n, so a file n
    written by the next transaction of the same commit group is not refused. (The group is
    handed to the engine directly: two tasks would usually commit in two groups.)"""
    import anyio

    from walstore._engine import Outcome, PreparedTx
    from walstore._journal_format import Delete, Put

    engine = store._engine
    group = [
        PreparedTx(1001, engine.last_lsn, (Delete("n/m"),)),
        PreparedTx(1002, engine.last_lsn, (Put("n", b"file n"),)),
    ]
    assert engine.peers.xlock_try()  # the commit lock, as the store's committer holds it
    try:
        results = await anyio.to_thread.run_sync(engine.commit_group, group, engine.last_lsn)
    finally:
        engine.peers.xlock_release()
    assert [r.outcome for r in results] == [Outcome.COMMITTED, Outcome.COMMITTED], results
    assert await store.read("n") == b"file n"


async def test_group_write_below_a_file_that_an_earlier_tx_deleted_with_its_directory(
    store: walstore.Store,
) -> None:
    """In one group: tx1 writes file a/f, tx2 deletes directory a, tx3 writes a/f/x. After
    tx2 there is no a/f, so tx3 makes a/ and a/f/ afresh: it is not refused for writing
    below a file. (The group is handed to the engine directly, as above.)"""
    import anyio

    from walstore._engine import Outcome, PreparedTx
    from walstore._journal_format import DeleteDir, Put

    engine = store._engine
    group = [
        PreparedTx(1001, engine.last_lsn, (Put("a/f", b"file"),)),
        PreparedTx(1002, engine.last_lsn, (DeleteDir("a"),)),
        PreparedTx(1003, engine.last_lsn, (Put("a/f/x", b"x"),)),
    ]
    assert engine.peers.xlock_try()
    try:
        results = await anyio.to_thread.run_sync(engine.commit_group, group, engine.last_lsn)
    finally:
        engine.peers.xlock_release()
    assert [r.outcome for r in results] == [Outcome.COMMITTED] * 3, results
    assert await store.read("a/f/x") == b"x"
