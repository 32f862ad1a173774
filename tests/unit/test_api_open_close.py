"""Opening a store (as an awaitable and a context manager, what it refuses), readonly
and durability modes, and closing it (what every op does after ``aclose``).

Every test opens a real store under ``tmp_path`` and checks both what the API returns and
what is (or is not) on disk, with plain ``open()``/``os`` calls.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import walstore
from tests.unit.api_support import BIG, THRESHOLD, read_plain, snapshot, staging
from walstore import Durability, TxState

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
