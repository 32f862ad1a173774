"""The main API round trip on both backends: the public API runs on asyncio and on trio
(tests/unit/test_api_*.py check the details on asyncio)."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

import walstore
from walstore import TxState

pytestmark = [pytest.mark.anyio, pytest.mark.guarantee(name="asyncio and trio")]

THRESHOLD = 1024
BIG = bytes(range(256)) * 40  # over THRESHOLD: staged while the transaction runs


async def test_open_as_awaitable_and_aclose(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = await walstore.open(root, inline_threshold=THRESHOLD)
    try:
        assert isinstance(store, walstore.Store)
        assert store.recovery.clean
        await store.write("a.txt", b"hello")
        assert await store.read("a.txt") == b"hello"
    finally:
        await store.aclose()
    await store.aclose()  # idempotent
    with pytest.raises(walstore.StoreClosedError):
        await store.read("a.txt")
    with pytest.raises(walstore.StoreClosedError):
        store.transaction()
    assert (root / "a.txt").read_bytes() == b"hello"


async def test_transaction_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "s"
    async with walstore.open(root, inline_threshold=THRESHOLD) as store:
        await store.write_json("old.json", {"old": True})
        async with store.transaction() as tx:
            await tx.write("users/42.json", b'{"id": 42}')
            await tx.write_text("notes/a.md", "hi")
            await tx.write_json("graphs/g1/composed.json", {"nodes": []})
            await tx.write("blobs/big.bin", BIG)
            assert await tx.read("users/42.json") == b'{"id": 42}'  # its own writes
            assert await tx.read_text("notes/a.md") == "hi"
            assert await tx.read_json("graphs/g1/composed.json") == {"nodes": []}
            assert await tx.read("blobs/big.bin") == BIG
            assert await tx.list() == ["blobs", "graphs", "notes", "old.json", "users"]
            assert await tx.exists("graphs/g1")
            await tx.delete("old.json")
            assert not await tx.exists("old.json")
            with pytest.raises(FileNotFoundError):
                await tx.read("old.json")
            assert await store.exists("old.json")  # nothing visible before commit
            assert not await store.exists("users/42.json")
            await tx.delete("nope.json", missing_ok=True)
            with pytest.raises(FileNotFoundError):
                await tx.delete("nope.json")
        assert tx.state is TxState.COMMITTED
        assert isinstance(tx.txid, int) and tx.lsn is not None
        with pytest.raises(walstore.TransactionClosedError):
            await tx.write("late", b"")

        assert await store.read_json("users/42.json") == {"id": 42}
        assert await store.read_text("notes/a.md") == "hi"
        assert await store.read("blobs/big.bin") == BIG
        assert await store.list() == ["blobs", "graphs", "notes", "users"]
        assert await store.list("graphs/g1") == ["composed.json"]
        assert not await store.exists("old.json")
        st = await store.stat("blobs/big.bin")
        assert st.kind == "file" and st.size == len(BIG)
        assert (await store.stat("graphs")).kind == "dir"
        with pytest.raises(FileNotFoundError):
            await store.stat("old.json")
    assert (root / "blobs" / "big.bin").read_bytes() == BIG
    assert not (root / "old.json").exists()
    assert os.listdir(root / ".walstore" / "staging") == []


async def test_store_level_writes(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "s", inline_threshold=THRESHOLD) as store:
        await store.write("a.bin", bytearray(b"ab"))
        await store.write_text("b.txt", "héllo", encoding="utf-8")
        await store.write_json("c.json", {"k": [1, 2]}, indent=None)
        await store.write("big.bin", memoryview(BIG))
        assert await store.read("a.bin") == b"ab"
        assert await store.read_text("b.txt") == "héllo"
        assert await store.read("c.json") == b'{"k": [1, 2]}\n'
        assert await store.read("big.bin") == BIG
        await store.delete("a.bin")
        await store.delete("a.bin", missing_ok=True)
        with pytest.raises(FileNotFoundError):
            await store.delete("a.bin")
        with pytest.raises(walstore.InvalidPathError):
            await store.write("../escape", b"")
        with pytest.raises(walstore.InvalidPathError):
            await store.read(".walstore/LOCK")
        await store.checkpoint()
        assert store.stats().checkpoints >= 1
        assert await store.list() == ["b.txt", "big.bin", "c.json"]


async def test_rollback_on_error_and_explicit_rollback(tmp_path: Path) -> None:
    root = tmp_path / "s"
    async with walstore.open(root, inline_threshold=THRESHOLD) as store:
        with pytest.raises(RuntimeError):
            async with store.transaction() as tx:
                await tx.write("a", b"1")
                await tx.write("big.bin", BIG)
                raise RuntimeError("boom")
        assert tx.state is TxState.ROLLED_BACK
        async with store.transaction() as tx2:
            await tx2.write("b", b"2")
            await tx2.rollback()
            await tx2.rollback()  # idempotent
        assert tx2.state is TxState.ROLLED_BACK
        assert await store.list() == []
    assert os.listdir(root / ".walstore" / "staging") == []


async def test_atomic_retries_a_conflict(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "s") as store:
        await store.write_json("n.json", 0)
        calls = 0

        async def bump(tx: walstore.Transaction, by: int) -> int:
            nonlocal calls
            calls += 1
            n = await tx.read_json("n.json")
            if calls == 1:  # another transaction commits in between: a conflict
                await store.write_json("n.json", 10)
            await tx.write_json("n.json", n + by)
            return int(n + by)

        assert await store.atomic(bump, 5) == 15
        assert calls == 2
        assert await store.read_json("n.json") == 15
        # A user-given limit: tests/concurrency/test_contention.py.


async def test_concurrent_round_trips_in_one_store(tmp_path: Path) -> None:
    """Many tasks use the API at once on one store (the backend's own scheduling)."""
    async with walstore.open(tmp_path / "s", inline_threshold=THRESHOLD) as store:

        async def user(i: int) -> None:
            async with store.transaction() as tx:
                await tx.write_json(f"u/{i}/doc.json", {"i": i})
                await tx.write(f"u/{i}/big.bin", BIG[i:])
            assert await store.read_json(f"u/{i}/doc.json") == {"i": i}
            assert await store.list(f"u/{i}") == ["big.bin", "doc.json"]
            await store.delete(f"u/{i}/big.bin")

        async with anyio.create_task_group() as tg:
            for i in range(32):
                tg.start_soon(user, i)
        assert len(await store.list("u")) == 32
    async with walstore.open(tmp_path / "s") as store:
        assert store.recovery.clean
        assert await store.list("u/7") == ["doc.json"]


async def test_readonly_open_on_this_backend(tmp_path: Path) -> None:
    root = tmp_path / "s"
    async with walstore.open(root) as store:
        await store.write_json("a.json", {"a": 1})
        async with walstore.open(root, readonly=True) as ro:
            assert await ro.read_json("a.json") == {"a": 1}
            with pytest.raises(walstore.StoreReadOnlyError):
                await ro.write("b", b"")
            await store.write_json("a.json", {"a": 2})
            assert await ro.read_json("a.json") == {"a": 2}
    with pytest.raises(walstore.NotAStoreError):
        await walstore.open(tmp_path / "missing", readonly=True)


async def test_directory_ops_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "s"
    async with walstore.open(root, inline_threshold=THRESHOLD) as store:
        async with store.transaction() as tx:
            await tx.write_text("conversations/c1/QUERY_MESSAGE.md", "q")
            await tx.write_json("conversations/c1/events.json", [0])
            await tx.write("conversations/c1/old.bin", BIG)
            await tx.write("a.json", b"{}")
            await tx.write_text("tmp/x", "x")
            await tx.write_text("tmp/deep/y", "y")
        async with store.transaction() as tx:
            await tx.move("a.json", "archive/a.json")
            async with tx.replace_dir("conversations/c1", keep=["QUERY_MESSAGE.md"]) as d:
                await d.write_json("events.json", [1, 2])
                await d.write("attachments/big.bin", BIG)
            await tx.delete_dir("tmp")
            assert not await tx.exists("a.json")
            assert await tx.read("archive/a.json") == b"{}"
        assert tx.state is TxState.COMMITTED
        assert await store.list() == ["archive", "conversations"]
        assert await store.list("conversations/c1") == [
            "QUERY_MESSAGE.md",
            "attachments",
            "events.json",
        ]
        assert await store.read_json("conversations/c1/events.json") == [1, 2]
        assert await store.read("conversations/c1/attachments/big.bin") == BIG
        assert await store.read_text("conversations/c1/QUERY_MESSAGE.md") == "q"
        assert await store.read("archive/a.json") == b"{}"
    assert not (root / "tmp").exists()
    assert os.listdir(root / ".walstore" / "staging") == []


async def test_open_write_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "s"
    chunk = bytes(range(256)) * 4096  # 1 MiB
    async with walstore.open(root, inline_threshold=THRESHOLD) as store:
        async with store.transaction() as tx:
            async with tx.open_write("blobs/stream.bin") as f:
                for _ in range(3):
                    await f.write(chunk)
                await f.write(b"tail")
            async with tx.replace_dir("conv") as d, d.open_write("big.bin") as f:
                await f.write(BIG)
            assert await tx.read("blobs/stream.bin") == chunk * 3 + b"tail"
        assert tx.state is TxState.COMMITTED
        assert await store.read("blobs/stream.bin") == chunk * 3 + b"tail"
        assert await store.read("conv/big.bin") == BIG
    assert (root / "blobs" / "stream.bin").stat().st_size == 3 * len(chunk) + 4
    assert os.listdir(root / ".walstore" / "staging") == []
