"""Store-level reads and writes (one-op transactions), data of the wrong type, and
missing files.

Every test opens a real store under ``tmp_path`` and checks both what the API returns and
what is (or is not) on disk, with plain ``open()``/``os`` calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import walstore
from tests.unit.api_support import read_plain, snapshot
from walstore import TxState

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
