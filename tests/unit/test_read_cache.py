"""The read cache: reads of small files skip the worker thread, and never show a stale value."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import anyio
import pytest

import walstore
from tests.support import PATHS, ROOT, applied, random_ops, run_tx
from walstore._cache import ReadCache
from walstore.testing import MemoryFileSystem


@pytest.mark.asyncio
async def test_reads_of_written_and_read_files_need_no_thread_hop(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "s", cache_bytes=1 << 20) as store:
        await store.write("a.json", b"{}")
        (tmp_path / "s" / "b.json").write_bytes(b"[]")  # there before: read once, then cached
        assert await store.read("b.json") == b"[]"
        hops = store.stats().thread_hops
        for _ in range(10):
            assert await store.read("a.json") == b"{}"
            assert await store.read("b.json") == b"[]"
            async with store.transaction() as tx:
                assert await tx.read("a.json") == b"{}"
        assert store.stats().thread_hops == hops


@pytest.mark.asyncio
async def test_the_cache_is_on_by_default(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "s") as store:
        await store.write("a.json", b"{}")
        hops = store.stats().thread_hops
        assert await store.read("a.json") == b"{}"
        assert store.stats().thread_hops == hops


@pytest.mark.asyncio
async def test_big_files_and_a_zero_budget_are_not_cached(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "s", cache_bytes=1 << 20, cache_max_file=10) as store:
        await store.write("big", b"x" * 11)
        hops = store.stats().thread_hops
        await store.read("big")
        await store.read("big")
        assert store.stats().thread_hops == hops + 2
    async with walstore.open(tmp_path / "s", cache_bytes=0) as store:
        await store.write("small", b"x")
        hops = store.stats().thread_hops
        await store.read("small")
        assert store.stats().thread_hops == hops + 1


@pytest.mark.asyncio
@pytest.mark.parametrize("seed", range(4))
async def test_cached_reads_follow_every_kind_of_change(seed: int) -> None:
    """Random transactions (writes, deletes, moves, delete_dir, replace_dir with keep); after
    each, every path read through the store (mostly from the cache) equals the model."""
    rng = random.Random(seed)
    fs = MemoryFileSystem()
    model: dict[str, bytes] = {}
    async with walstore.open(ROOT, fs=fs, inline_threshold=64, cache_bytes=4096) as store:
        for _ in range(60):
            ops = random_ops(rng, model, dirs=True)
            try:
                await run_tx(store, ops)
            except (FileNotFoundError, walstore.InvalidPathError):
                continue  # refused as a whole: nothing changed
            model = applied(model, ops)
            for p in PATHS:
                if p in model:
                    assert await store.read(p) == model[p], p
                else:
                    with pytest.raises((FileNotFoundError, walstore.InvalidPathError)):
                        await store.read(p)


@pytest.mark.asyncio
async def test_a_read_in_flight_across_a_commit_does_not_cache_its_old_value() -> None:
    """A value read from disk before a group was applied, but returned after the group was
    published, must not enter the cache (the generation check)."""
    fs = MemoryFileSystem()
    async with walstore.open(ROOT, fs=fs, cache_bytes=1 << 20) as store:
        await store.write("x", b"old")
        await store.aclose()
    async with walstore.open(
        ROOT, fs=fs, cache_bytes=1 << 20
    ) as store:  # a fresh cache: "x" is not in it
        engine = store._engine
        original = engine.read_cacheable
        read_done = threading.Event()
        go_on = threading.Event()

        def slow_read(path: str) -> tuple[bytes, bool]:
            out = original(path)  # under the apply gate; it is released on return
            read_done.set()
            assert go_on.wait(10)
            return out

        engine.read_cacheable = slow_read  # type: ignore[method-assign]
        got: list[bytes] = []

        async def reader() -> None:
            got.append(await store.read("x"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await anyio.to_thread.run_sync(read_done.wait)
            await store.write("x", b"new")  # applied and published while the read is out
            go_on.set()
        engine.read_cacheable = original  # type: ignore[method-assign]
        assert got == [b"old"]  # the read began before the commit: the old value is right
        assert await store.read("x") == b"new"  # ...but it was not cached


@pytest.mark.asyncio
async def test_a_path_through_a_symlink_is_not_cached(tmp_path: Path) -> None:
    """No symlink is followed, so no second name of a file can hold a stale copy: reads
    through one are refused (and cache nothing), the real path stays fresh."""
    root = tmp_path / "s"
    async with walstore.open(root, cache_bytes=1 << 20) as store:
        await store.write("real/x", b"1")
        os.symlink("real", root / "alias")
        os.symlink("x", root / "real" / "y")
        for alias in ("alias/x", "real/y"):
            with pytest.raises(walstore.InvalidPathError, match="symlink"):
                await store.read(alias)
        assert await store.read("real/x") == b"1"
        await store.write("real/x", b"2")
        assert await store.read("real/x") == b"2"
        for alias in ("alias/x", "real/y"):
            with pytest.raises(walstore.InvalidPathError, match="symlink"):
                await store.read(alias)


@pytest.mark.asyncio
async def test_a_readonly_store_caches_nothing(tmp_path: Path) -> None:
    """Another process writes a store opened readonly: its reads always go to the disk."""
    async with walstore.open(tmp_path / "s", cache_bytes=1 << 20) as writer:
        await writer.write("x", b"1")
        async with walstore.open(tmp_path / "s", readonly=True) as reader:
            assert await reader.read("x") == b"1"
            await writer.write("x", b"2")
            assert await reader.read("x") == b"2"


@pytest.mark.asyncio
async def test_transactions_begin_at_what_the_cache_shows() -> None:
    """A transaction that read a cached value conflicts with any commit the cache had not yet
    shown when it began, so the increments below are never lost."""
    fs = MemoryFileSystem()
    async with walstore.open(ROOT, fs=fs, cache_bytes=1 << 20) as store:
        await store.write("n", b"0")

        async def incr(tx: walstore.Transaction) -> None:
            n = int(await tx.read("n"))
            await tx.write("n", str(n + 1).encode())

        async with anyio.create_task_group() as tg:
            for _ in range(32):
                tg.start_soon(lambda: store.atomic(incr))
        assert await store.read("n") == b"32"
        assert fs.read_file(ROOT + "/n") == b"32"


def test_the_cache_is_bounded_and_least_recently_used_goes_first() -> None:
    cache = ReadCache(max_bytes=10, max_file=4)
    for name in "abc":
        cache.written(name, b"xyz")
    assert cache.get("a") == b"xyz"  # now the most recent
    cache.written("d", b"xyz")  # 12 bytes > 10: the least recent ("b") goes
    assert cache.get("b") is None and cache.get("a") == b"xyz"
    cache.written("e", b"12345")  # bigger than max_file: not kept
    assert cache.get("e") is None
    gen = cache.generation
    cache.dropped_tree("c")
    cache.insert("c", b"old", gen)  # read before the change: refused
    assert cache.get("c") is None
    assert len(cache) <= 3
