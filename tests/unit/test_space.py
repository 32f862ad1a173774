"""The reserve, on a simulated disk of a chosen size (tests/fulldisk fills real ones): a write
that would eat into it is refused before its commit point with ENOSPC and changes nothing,
while deletes and checkpoints go on; what verify says of a full disk."""

from __future__ import annotations

import errno

import anyio
import pytest

import walstore
from walstore._inspect import Space, space_notes
from walstore.testing import MemoryFileSystem

pytestmark = pytest.mark.guarantee(name="A full disk locks no one out")

ROOT = "/store"
MiB = 1 << 20


def _used(fs: MemoryFileSystem) -> int:
    fs.capacity = 1 << 40
    free, total = fs.free_space(ROOT)
    return total - free


def test_a_write_into_the_reserve_is_refused_and_deletes_go_on() -> None:
    async def main() -> None:
        fs = MemoryFileSystem()
        async with walstore.open(ROOT, fs=fs) as store:
            await store.write("a", b"x" * 1000)
            await store.write("b", b"y" * 1000)
        fs.capacity = _used(fs) + MiB + 40_000  # the reserve (1 MiB) and a few blocks
        async with walstore.open(ROOT, fs=fs) as store:
            await store.write("c", b"z" * 4000)  # fits above the reserve
            tx = store.transaction()
            with pytest.raises(OSError) as info:
                async with tx:
                    await tx.write("d", b"w" * 60_000)
            assert info.value.errno == errno.ENOSPC
            assert not isinstance(info.value, walstore.StoreError)
            assert "reserve" in str(info.value)
            assert tx.state is walstore.TxState.ROLLED_BACK
            assert not await store.exists("d")
            async with store.transaction() as tx:  # deletes need no space
                await tx.delete("a")
            await store.checkpoint()
            assert await store.read("c") == b"z" * 4000
        async with walstore.open(ROOT, fs=fs) as store:
            assert sorted(await store.list()) == ["b", "c"]

    anyio.run(main)


def test_a_large_value_is_refused_as_it_stages() -> None:
    async def main() -> None:
        fs = MemoryFileSystem()
        async with walstore.open(ROOT, fs=fs) as store:
            await store.write("a", b"x")
            fs.capacity = _used(fs) + 2 * MiB
            tx = store.transaction()
            with pytest.raises(OSError) as info:
                async with tx:
                    await tx.write("big", bytes(3 * MiB))  # over inline_threshold: staged
            assert info.value.errno == errno.ENOSPC
            assert fs.files(ROOT + "/.walstore/staging", skip=()) == {}
            await store.write("small", b"s")

    anyio.run(main)


def test_verify_says_when_the_disk_is_full_or_too_full_to_checkpoint() -> None:
    ok = Space(free=100 * MiB, total=1 << 30, reserve=16 * MiB, spare=9 * MiB, live_room=MiB)
    full = Space(free=MiB, total=1 << 30, reserve=16 * MiB, spare=9 * MiB, live_room=MiB)
    stuck = Space(free=0, total=1 << 30, reserve=16 * MiB, spare=0, live_room=0)
    assert space_notes(ok) == []
    [note] = space_notes(full)
    assert note.startswith("disk full") and "checkpoints still work" in note
    [note] = space_notes(stuck)
    assert note.startswith("disk too full to checkpoint")
