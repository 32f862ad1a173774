"""Transactions cost linear time in their ops: each op looks up its path (and its ancestors)
in indexes instead of scanning every op the transaction holds. 16,000 deletes in one
transaction took 62 s when each scanned them all. The proxy measured here is how many
entries of the transaction's op table (and of a replaced directory's entries) are visited:
a scan per op visits n²/2 of them, an index none (timing is in benchmarks/)."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import walstore
from walstore import Durability
from walstore._conflicts import ConflictIndex, GroupEffects
from walstore._paths import PathSet

pytestmark = pytest.mark.anyio

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


class CountingOrderedDict(OrderedDict[str, bytes]):
    visited = 0

    def __iter__(self) -> Iterator[str]:
        for k in super().__iter__():
            CountingOrderedDict.visited += 1
            yield k


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_commit_of_many_delete_dirs_does_not_scan_the_read_cache(tmp_path: Path) -> None:
    """Publishing a group drops each deleted directory's files from the read cache by an
    index (8,000 delete_dirs scanned the whole cache each: 7 s on the event loop)."""
    async with walstore.open(tmp_path / "s", durability=Durability.OFF) as store:
        async with store.transaction() as tx:
            for i in range(N):
                await tx.write(f"d{i}/f", b"x")
        assert store._cache is not None and len(store._cache) == N
        store._cache._data = CountingOrderedDict(store._cache._data)
        CountingOrderedDict.visited = 0
        async with store.transaction() as tx:
            for i in range(N):
                await tx.delete_dir(f"d{i}")
        assert CountingOrderedDict.visited <= N, CountingOrderedDict.visited
        assert len(store._cache) == 0
        assert await store.list() == []


def test_path_set_matches_a_plain_set() -> None:
    """PathSet (the index behind apply's dirty sets, validation's kinds and the read cache)
    against a set scanned by prefix, over random adds, discards and drops."""
    rng = random.Random(18)
    names = ["a", "b", "c"]
    paths = ["/".join(rng.choice(names) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    model: set[str] = set()
    ps = PathSet()
    for _ in range(3000):
        p = rng.choice(paths)
        action = rng.random()
        if action < 0.5:
            model.add(p)
            ps.add(p)
        elif action < 0.8:
            model.discard(p)
            ps.discard(p)
        else:
            model = {k for k in model if not k.startswith(p + "/")}
            ps.drop_under(p)
        assert set(ps) == model and len(ps) == len(model)
        assert ps.has_under(p) == any(k.startswith(p + "/") for k in model)
        assert sorted(ps.under(p)) == sorted(k for k in model if k.startswith(p + "/"))


def test_subtree_conflicts_match_a_scan() -> None:
    """ConflictIndex answers a subtree read by its per-directory newest LSN: the same
    answers as scanning every change, over random commits, prunes and reads."""
    rng = random.Random(7)
    names = ["a", "b", "c"]

    def path() -> str:
        return "/".join(rng.choice(names) for _ in range(rng.randint(1, 3)))

    index = ConflictIndex()
    changes: dict[str, int] = {}  # file or tree -> newest LSN (the brute-force model)
    oldest = 0
    for lsn in range(1, 400):
        effects = GroupEffects()
        for _ in range(rng.randint(1, 3)):
            (effects.modified if rng.random() < 0.7 else effects.trees).add(path())
        index.observe(lsn, effects)
        for p in effects.modified | effects.trees:
            changes[p] = lsn
        if rng.random() < 0.05:
            oldest = lsn - rng.randint(0, 20)
            index.prune(oldest)
        for _ in range(5):
            d, seen = path(), rng.randint(max(oldest, lsn - 30), lsn)
            below = [v for k, v in changes.items() if k.startswith(d + "/") and v > seen]
            got = index.check({}, {}, {d: seen})
            hit = index._tree_changed(d, seen, GroupEffects())
            if below or hit is not None:
                assert got is not None, (d, seen, below)
                assert got.lsn == max([*below, hit or 0])
            else:
                assert got is None, (d, seen, got)
