"""Transactions cost linear time in their ops: each op looks up its path (and its ancestors)
in indexes instead of scanning every op the transaction holds. 16,000 deletes in one
transaction took 62 s when each scanned them all. The proxy measured here is how many
entries of the transaction's op table (and of a replaced directory's entries) are visited:
a scan per op visits n²/2 of them, an index none (timing is in benchmarks/)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import walstore
from walstore import Durability

pytestmark = [pytest.mark.anyio, pytest.mark.guarantee(name="Transactions cost linear time")]

N = 2000


class CountingDict(dict[str, Any]):
    """A dict that counts the entries iterations visit (lookups are not counted)."""

    visited = 0

    def __iter__(self) -> Iterator[str]:
        for k in super().__iter__():
            CountingDict.visited += 1
            yield k

    def __reversed__(self) -> Iterator[str]:
        for k in super().__reversed__():
            CountingDict.visited += 1
            yield k

    def keys(self) -> Any:
        return list(iter(self))

    def values(self) -> Any:
        return [self[k] for k in iter(self)]

    def items(self) -> Any:
        return [(k, self[k]) for k in iter(self)]


@pytest.fixture(autouse=True)
def _reset() -> None:
    CountingDict.visited = 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_ops_look_up_their_paths_instead_of_scanning(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "s", durability=Durability.OFF) as store:
        async with store.transaction() as tx:
            for i in range(N):
                await tx.write(f"f/{i % 50}/{i}", b"x")
        async with store.transaction() as tx:
            tx._ops = CountingDict()
            for i in range(N):
                await tx.delete(f"f/{i % 50}/{i}")
                assert not await tx.exists(f"f/{i % 50}/{i}")
                await tx.write(f"g/{i}", b"y")
                assert await tx.read(f"g/{i}") == b"y"
            await tx.move("g/0", "h/0")
            await tx.delete_dir("g")
            assert await tx.list("h") == ["0"]
            before_commit = CountingDict.visited
        # Per op: no visits. Listing and committing visit each op once or twice.
        assert before_commit <= 4 * N, before_commit
        assert await store.list("f") == sorted(str(i) for i in range(50))
        assert await store.list("f/0") == []
        assert await store.list("h") == ["0"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_listing_looks_at_the_ops_below_it_only(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "s", durability=Durability.OFF) as store:
        async with store.transaction() as tx:
            tx._ops = CountingDict()
            for i in range(N):
                await tx.write(f"f/{i}", b"x")
            await tx.write("h/0", b"y")
            async with tx.replace_dir("r") as d:
                await d.write("a/b", b"z")
            await tx.write("r/a/c", b"w")
            for _ in range(100):
                assert await tx.list("h") == ["0"]
                assert await tx.list("r/a") == ["b", "c"]
            assert await tx.list("") == ["f", "h", "r"]
        # The index is built once, the root listing and the commit visit each op: N each.
        # A scan per listing: 200 N.
        assert CountingDict.visited <= 3 * N + 10, CountingDict.visited


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_replaced_directory_checks_its_entries_by_lookup(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "s", durability=Durability.OFF) as store:
        async with store.transaction() as tx:
            async with tx.replace_dir("d") as d:
                d._entries = CountingDict()
                for i in range(N):
                    await d.write(f"{i % 40}/{i}", b"x")
                with pytest.raises(walstore.InvalidPathError, match="inside the other"):
                    await d.write("7", b"a file where a directory of entries is")
                with pytest.raises(walstore.InvalidPathError, match="inside the other"):
                    await d.write("7/7/x", b"below a file entry")
                during = CountingDict.visited
        assert during <= N, during  # the refusal names the other entry: one scan, at most
        assert await store.read("d/7/7") == b"x"
        assert len(await store.list("d")) == 40


class CountingSet(set[str]):
    """A set that counts the members iterations visit."""

    def __iter__(self) -> Iterator[str]:
        for k in super().__iter__():
            CountingDict.visited += 1
            yield k


class CountingOrderedDict(OrderedDict[str, bytes]):
    def __iter__(self) -> Iterator[str]:
        for k in super().__iter__():
            CountingDict.visited += 1
            yield k


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_commit_of_many_delete_dirs_visits_only_what_lies_below_each(
    tmp_path: Path,
) -> None:
    """Validation, the conflict check of the directories read as a whole, apply's dirty sets
    and the read cache each drop or check what lies below a deleted directory without a scan
    of everything they hold (8,000 delete_dirs took 37 s to commit when each scanned)."""
    async with walstore.open(tmp_path / "s", durability=Durability.OFF) as store:
        async with store.transaction() as tx:
            for i in range(N):
                await tx.write(f"d{i}/f", b"x")
        engine, cache = store._engine, store._cache
        assert cache is not None and len(cache) == N
        conflicts, applier = engine.conflicts, engine._applier
        conflicts._modified = CountingDict(conflicts._modified)
        conflicts._trees = CountingDict(conflicts._trees)
        cache._data = CountingOrderedDict(cache._data)
        for kept in (applier.dirty_files, applier.dirty_dirs):
            kept._items = CountingSet(kept._items)
        async with store.transaction() as tx:
            for i in range(N):
                await tx.delete_dir(f"d{i}")
        assert CountingDict.visited <= 4 * N, CountingDict.visited  # a scan each: N * N / 2
        assert await store.list("") == []
        assert len(cache) == 0
        assert not any(p.startswith("d") for p in applier.dirty_files)
