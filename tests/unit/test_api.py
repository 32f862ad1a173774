"""The public API of a Store and a Transaction, on real files in ``tmp_path``.

Every test opens a real store under ``tmp_path`` and checks both what the API returns and
what is (or is not) on disk, with plain ``open()``/``os`` calls.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import walstore
from walstore import Durability, TxState

BIG = bytes(range(256)) * 40  # 10 KiB: over inline_threshold=1024, so staged until commit
THRESHOLD = 1024


def snapshot(root: Path) -> dict[str, Any]:
    """Every entry under ``root`` (``.walstore/`` included): kind and content."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                out[rel] = ("symlink", os.readlink(full))
            elif os.path.isdir(full):
                out[rel] = ("dir",)
            else:
                with open(full, "rb") as f:
                    out[rel] = ("file", f.read())
    return out


def user_files(root: Path) -> dict[str, Any]:
    """``snapshot`` without ``.walstore/``."""
    return {k: v for k, v in snapshot(root).items() if k.split(os.sep)[0] != ".walstore"}


def staging(root: Path) -> list[str]:
    return sorted(os.listdir(root / ".walstore" / "staging"))


def read_plain(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest_asyncio.fixture
async def store(root: Path) -> AsyncIterator[walstore.Store]:
    async with walstore.open(root, inline_threshold=THRESHOLD) as s:
        yield s


# -- opening -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_open_as_awaitable(root: Path) -> None:
    store = await walstore.open(root)
    try:
        assert isinstance(store, walstore.Store)
        await store.write("a.txt", b"hello")
        assert await store.read("a.txt") == b"hello"
    finally:
        await store.aclose()
    assert read_plain(root / "a.txt") == b"hello"


@pytest.mark.asyncio
async def test_open_as_async_context_manager(root: Path) -> None:
    async with walstore.open(root) as store:
        assert isinstance(store, walstore.Store)
        assert store.root == os.path.abspath(root)
        assert store.durability is Durability.FULL
        await store.write("a.txt", b"hello")
    assert read_plain(root / "a.txt") == b"hello"
    with pytest.raises(walstore.StoreClosedError):
        await store.read("a.txt")


@pytest.mark.asyncio
async def test_open_creates_the_layout(root: Path) -> None:
    async with walstore.open(root):
        assert (root / ".walstore" / "LOCK").is_file()
        assert (root / ".walstore" / "journal").is_dir()
        assert (root / ".walstore" / "staging").is_dir()


@pytest.mark.asyncio
async def test_open_create_false_on_missing_store_refuses(root: Path) -> None:
    with pytest.raises(walstore.NotAStoreError, match="is not a walstore store"):
        await walstore.open(root, create=False)
    assert not root.exists()


@pytest.mark.asyncio
async def test_open_on_a_file_is_not_a_store(root: Path) -> None:
    root.write_bytes(b"not a directory")
    with pytest.raises(walstore.NotAStoreError, match="is not a directory"):
        await walstore.open(root)
    assert root.read_bytes() == b"not a directory"


@pytest.mark.asyncio
@pytest.mark.parametrize("where", [".walstore", ".walstore/journal", ".walstore/staging"])
async def test_a_file_in_place_of_the_layout_is_a_layout_error(root: Path, where: str) -> None:
    async with walstore.open(root) as store:
        await store.write("keep", b"1")
    (root / where).rename(root.parent / "moved")
    (root / where).write_bytes(b"a file")
    with pytest.raises(walstore.StoreLayoutError, match="not a directory"):
        await walstore.open(root)
    assert (root / where).read_bytes() == b"a file"  # nothing was changed


@pytest.mark.asyncio
async def test_a_slot_held_against_the_shared_header_is_a_layout_error(root: Path) -> None:
    """The shared header hands out the next slot, and another process holds its lock
    (``.walstore/procs`` was changed behind the store's back): the open refuses."""
    fs = walstore.OsFileSystem()
    lock = fs.lock

    def lock_but_slots(path: str, *, wait: bool = False) -> int | None:
        return None if "/procs/" in path else lock(path, wait=wait)

    async with walstore.open(root, exclusive=False) as store:
        await store.write("keep", b"1")
        fs.lock = lock_but_slots  # type: ignore[method-assign]
        with pytest.raises(walstore.StoreLayoutError, match="is taken"):
            await walstore.open(root, exclusive=False, fs=fs)
        assert await store.read("keep") == b"1"


@pytest.mark.asyncio
async def test_open_rejects_bad_arguments(root: Path) -> None:
    with pytest.raises(TypeError):
        await walstore.open(root, durability="full")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await walstore.open(root, lock_timeout=-1)


# -- store-level reads and writes --------------------------------------------------------


@pytest.mark.asyncio
async def test_store_level_ops(store: walstore.Store, root: Path) -> None:
    await store.write("bin/a.bin", b"\x00\x01\x02")
    await store.write("bin/b.bin", bytearray(b"ba"))
    await store.write("bin/c.bin", memoryview(b"mv"))
    await store.write_text("notes/a.md", "héllo")
    await store.write_json("users/42.json", {"name": "Ada", "tags": ["x"]})

    assert await store.read("bin/a.bin") == b"\x00\x01\x02"
    assert await store.read("bin/b.bin") == b"ba"
    assert await store.read("bin/c.bin") == b"mv"
    assert await store.read_text("notes/a.md") == "héllo"
    assert await store.read_json("users/42.json") == {"name": "Ada", "tags": ["x"]}

    assert await store.exists("bin/a.bin")
    assert await store.exists("bin")
    assert not await store.exists("bin/zzz")
    assert not await store.exists("nope/zzz")

    assert await store.list() == ["bin", "notes", "users"]
    assert await store.list("") == ["bin", "notes", "users"]
    assert await store.list("bin") == ["a.bin", "b.bin", "c.bin"]

    st = await store.stat("bin/a.bin")
    assert st.kind == "file"
    assert st.size == 3
    assert (await store.stat("bin")).kind == "dir"
    assert (await store.stat("")).kind == "dir"

    await store.delete("bin/a.bin")
    assert not await store.exists("bin/a.bin")
    assert not (root / "bin" / "a.bin").exists()
    assert await store.list("bin") == ["b.bin", "c.bin"]


@pytest.mark.asyncio
async def test_files_are_plain_files_after_store_writes(store: walstore.Store, root: Path) -> None:
    await store.write("a/b/c.bin", b"abc")
    await store.write_text("t.md", "text\n")
    await store.write_json("j.json", {"k": [1, 2]})
    assert read_plain(root / "a" / "b" / "c.bin") == b"abc"
    assert read_plain(root / "t.md") == b"text\n"
    with open(root / "j.json", encoding="utf-8") as f:
        assert json.load(f) == {"k": [1, 2]}


@pytest.mark.asyncio
async def test_write_replaces(store: walstore.Store, root: Path) -> None:
    await store.write("a", b"one")
    await store.write("a", b"two")
    assert read_plain(root / "a") == b"two"
    assert await store.read("a") == b"two"


@pytest.mark.asyncio
async def test_mutating_a_buffer_after_write_changes_nothing(
    store: walstore.Store, root: Path
) -> None:
    buf = bytearray(b"before")
    async with store.transaction() as tx:
        await tx.write("a", buf)
        buf[:] = b"AFTER!"
        assert await tx.read("a") == b"before"
    assert read_plain(root / "a") == b"before"


@pytest.mark.asyncio
async def test_list_errors(store: walstore.Store) -> None:
    await store.write("f", b"x")
    with pytest.raises(FileNotFoundError):
        await store.list("missing")
    with pytest.raises(NotADirectoryError):
        await store.list("f")


@pytest.mark.asyncio
async def test_walstore_dir_is_hidden_from_list(store: walstore.Store) -> None:
    assert await store.list() == []
    await store.write("x", b"1")
    assert await store.list() == ["x"]
    async with store.transaction() as tx:
        assert await tx.list() == ["x"]
        await tx.write("y", b"2")
        assert await tx.list() == ["x", "y"]


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


class Boom(Exception):
    pass


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


# -- closing ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_close_twice_is_fine(root: Path) -> None:
    store = await walstore.open(root)
    await store.aclose()
    await store.aclose()
    async with walstore.open(root) as store2:
        await store2.aclose()  # explicit close inside the context manager
    await store2.aclose()


CLOSED_OPS: dict[str, Callable[[walstore.Store], Awaitable[Any]]] = {
    "read": lambda s: s.read("a"),
    "read_text": lambda s: s.read_text("a"),
    "read_json": lambda s: s.read_json("a"),
    "exists": lambda s: s.exists("a"),
    "list": lambda s: s.list(),
    "list_dir": lambda s: s.list("d"),
    "stat": lambda s: s.stat("a"),
    "write": lambda s: s.write("b", b"x"),
    "write_text": lambda s: s.write_text("b", "x"),
    "write_json": lambda s: s.write_json("b", {}),
    "delete": lambda s: s.delete("a"),
    "delete_missing_ok": lambda s: s.delete("zzz", missing_ok=True),
    "checkpoint": lambda s: s.checkpoint(),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("op", sorted(CLOSED_OPS))
async def test_every_op_after_aclose_raises_store_closed(root: Path, op: str) -> None:
    async with walstore.open(root) as store:
        await store.write_json("a", {"v": 1})
        await store.write("d/x", b"x")
    before = snapshot(root)
    with pytest.raises(walstore.StoreClosedError):
        await CLOSED_OPS[op](store)
    assert snapshot(root) == before


@pytest.mark.asyncio
async def test_transaction_after_aclose_raises_store_closed(root: Path) -> None:
    store = await walstore.open(root)
    await store.aclose()
    with pytest.raises(walstore.StoreClosedError):
        store.transaction()


@pytest.mark.asyncio
async def test_aclose_rolls_back_open_transactions(root: Path) -> None:
    store = await walstore.open(root, inline_threshold=THRESHOLD)
    tx = store.transaction()
    await tx.write("big", BIG)
    await tx.write("small", b"x")
    await store.aclose()
    assert tx.state is TxState.ROLLED_BACK
    assert staging(root) == []
    assert not (root / "big").exists()
    with pytest.raises(walstore.TransactionClosedError):
        await tx.write("more", b"x")
    async with walstore.open(root) as store:
        assert store.recovery.clean


@pytest.mark.asyncio
async def test_block_exit_after_store_closed_raises(root: Path) -> None:
    store = await walstore.open(root)
    with pytest.raises((walstore.StoreClosedError, walstore.TransactionClosedError)):
        async with store.transaction() as tx:
            await tx.write("x", b"1")
            await store.aclose()


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


# -- bad data -----------------------------------------------------------------------------

NOT_BYTES = ["str", 123, None, [1, 2], {"a": 1}, 1.5]


@pytest.mark.asyncio
@pytest.mark.parametrize("data", NOT_BYTES, ids=repr)
async def test_store_write_of_non_bytes_raises_type_error(
    store: walstore.Store, root: Path, data: Any
) -> None:
    await store.write("a", b"old")
    before = snapshot(root)
    with pytest.raises(TypeError):
        await store.write("a", data)
    with pytest.raises(TypeError):
        await store.write("new", data)
    assert snapshot(root) == before
    assert store.stats().commits == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("data", NOT_BYTES, ids=repr)
async def test_tx_write_of_non_bytes_raises_type_error(
    store: walstore.Store, root: Path, data: Any
) -> None:
    await store.write("a", b"old")
    before = snapshot(root)
    with pytest.raises(TypeError):
        async with store.transaction() as tx:
            await tx.write("other", b"valid")
            await tx.write("a", data)
    assert tx.state is TxState.ROLLED_BACK
    assert snapshot(root) == before

    # Caught inside the block: nothing recorded, the transaction stays usable.
    async with store.transaction() as tx:
        with pytest.raises(TypeError):
            await tx.write("a", data)
        assert await tx.read("a") == b"old"
        await tx.write("b", b"fine")
    assert read_plain(root / "a") == b"old"
    assert read_plain(root / "b") == b"fine"


@pytest.mark.asyncio
async def test_write_text_of_non_str_raises_type_error(store: walstore.Store, root: Path) -> None:
    before = snapshot(root)
    with pytest.raises(TypeError):
        await store.write_text("a", b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        async with store.transaction() as tx:
            await tx.write_text("a", 1)  # type: ignore[arg-type]
    assert snapshot(root) == before


UNSERIALISABLE = [
    {1, 2},
    float("nan"),
    float("inf"),
    {"x": float("-inf")},
    {"x": object()},
    {(1, 2): "tuple key"},
    b"bytes",
]


@pytest.mark.asyncio
@pytest.mark.parametrize("obj", UNSERIALISABLE, ids=lambda o: type(o).__name__ + str(o)[:12])
async def test_write_json_of_unserialisable_changes_nothing(
    store: walstore.Store, root: Path, obj: Any
) -> None:
    await store.write_json("doc.json", {"v": 1})
    before = snapshot(root)
    with pytest.raises((TypeError, ValueError)):
        await store.write_json("doc.json", obj)
    with pytest.raises((TypeError, ValueError)):
        await store.write_json("new.json", obj)
    with pytest.raises((TypeError, ValueError)):
        async with store.transaction() as tx:
            await tx.write_json("other.json", {"fine": True})
            await tx.write_json("doc.json", obj)
    assert snapshot(root) == before
    assert await store.read_json("doc.json") == {"v": 1}

    async with store.transaction() as tx:
        with pytest.raises((TypeError, ValueError)):
            await tx.write_json("doc.json", obj)
        assert await tx.read_json("doc.json") == {"v": 1}
    assert await store.read_json("doc.json") == {"v": 1}


@pytest.mark.asyncio
async def test_write_json_of_circular_structure(store: walstore.Store, root: Path) -> None:
    loop: list[Any] = []
    loop.append(loop)
    before = snapshot(root)
    with pytest.raises(ValueError):
        await store.write_json("loop.json", loop)
    assert snapshot(root) == before


# -- missing files ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_delete_of_missing_file(store: walstore.Store, root: Path) -> None:
    await store.write("d/x", b"x")
    before = snapshot(root)
    with pytest.raises(FileNotFoundError):
        await store.delete("missing")
    with pytest.raises(FileNotFoundError):
        await store.delete("d/missing")
    with pytest.raises(FileNotFoundError):
        await store.delete("nodir/missing")
    with pytest.raises(FileNotFoundError):
        async with store.transaction() as tx:
            await tx.write("other", b"o")
            await tx.delete("missing")
    assert snapshot(root) == before
    await store.delete("missing", missing_ok=True)
    await store.delete("nodir/missing", missing_ok=True)
    async with store.transaction() as tx:
        await tx.delete("missing", missing_ok=True)
        await tx.write("other", b"o")
    assert tx.state is TxState.COMMITTED
    assert await store.list() == ["d", "other"]
    assert await store.list("d") == ["x"]


@pytest.mark.asyncio
async def test_read_of_missing_file(store: walstore.Store) -> None:
    await store.write("d/x", b"x")
    for path in ("missing", "d/missing", "nodir/missing"):
        with pytest.raises(FileNotFoundError):
            await store.read(path)
        with pytest.raises(FileNotFoundError):
            await store.read_text(path)
        with pytest.raises(FileNotFoundError):
            await store.read_json(path)
        with pytest.raises(FileNotFoundError):
            await store.stat(path)
        async with store.transaction() as tx:
            with pytest.raises(FileNotFoundError):
                await tx.read(path)
            assert not await tx.exists(path)


@pytest.mark.asyncio
async def test_delete_of_own_new_directory_is_refused_at_the_call(store: walstore.Store) -> None:
    async with store.transaction() as tx:
        await tx.write("nd/x", b"1")
        with pytest.raises(walstore.InvalidPathError):
            await tx.delete("nd")
        await tx.rollback()


@pytest.mark.asyncio
async def test_delete_of_directory_is_refused(store: walstore.Store, root: Path) -> None:
    await store.write("d/x", b"x")
    before = snapshot(root)
    with pytest.raises(walstore.InvalidPathError):
        await store.delete("d")
    assert snapshot(root) == before


# -- readonly and durability ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_readonly_reads_but_refuses_writes(root: Path) -> None:
    async with walstore.open(root) as store:
        await store.write_json("d/a.json", {"a": 1})
    before = snapshot(root)
    async with walstore.open(root, readonly=True) as ro:
        assert await ro.read_json("d/a.json") == {"a": 1}
        assert await ro.list() == ["d"]
        assert await ro.exists("d/a.json")
        assert (await ro.stat("d/a.json")).kind == "file"
        with pytest.raises(walstore.StoreReadOnlyError):
            ro.transaction()
        with pytest.raises(walstore.StoreReadOnlyError):
            await ro.write("b", b"x")
        with pytest.raises(walstore.StoreReadOnlyError):
            await ro.write_json("b", {})
        with pytest.raises(walstore.StoreReadOnlyError):
            await ro.delete("d/a.json")
        with pytest.raises(walstore.StoreReadOnlyError):
            await ro.checkpoint()
    assert snapshot(root) == before


@pytest.mark.asyncio
async def test_readonly_on_missing_store_creates_nothing(root: Path) -> None:
    with pytest.raises(walstore.NotAStoreError):
        await walstore.open(root, readonly=True)
    assert not root.exists()


@pytest.mark.asyncio
async def test_durability_off(root: Path) -> None:
    async with walstore.open(root, durability=Durability.OFF, inline_threshold=THRESHOLD) as s:
        assert s.durability is Durability.OFF
        await s.write("a", b"1")
        await s.write("big", BIG)
        async with s.transaction() as tx:
            await tx.write_json("j.json", [1])
            await tx.delete("a")
        await s.checkpoint()
        assert s.stats().commits == 3
        assert s.stats().fsyncs == 0
        assert s.stats().journal_syncs == 0
    assert read_plain(root / "big") == BIG
    async with walstore.open(root, durability=Durability.OFF) as s:
        assert s.recovery.clean
        assert await s.list() == ["big", "j.json"]
        assert await s.read_json("j.json") == [1]
