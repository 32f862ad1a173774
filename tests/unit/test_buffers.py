"""Buffers are sized in bytes (``nbytes``), never in items: a typed memoryview (4-byte ints,
a 2-D view, a strided one) is stored, journalled and verified as the bytes it holds. A view
of 1,000 ints was journalled as 1,000 bytes and ``verify`` then reported the file."""

from __future__ import annotations

import array
from pathlib import Path

import pytest

import walstore
from walstore._inspect import Layout
from walstore._verify import verify
from walstore.testing import MemoryFileSystem

pytestmark = pytest.mark.anyio

INTS = array.array("i", range(1000))  # 4,000 bytes, 1,000 items


def buffers() -> dict[str, memoryview]:
    flat = memoryview(bytes(range(256)) * 32)  # 8 KiB
    return {
        "ints": memoryview(INTS),
        "2-D": flat.cast("B", (64, 128)),
        "strided": flat[::3],
        "doubles": memoryview(array.array("d", [0.5] * 300)),
    }


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("kind", sorted(buffers()))
async def test_typed_views_are_stored_as_their_bytes(tmp_path: Path, kind: str) -> None:
    view = buffers()[kind]
    expected = view.tobytes()
    root = tmp_path / "s"
    async with walstore.open(root, inline_threshold=1024) as store:
        async with store.transaction() as tx:
            async with tx.open_write("streamed.bin") as f:
                await f.write(view)
                await f.write(view)
            await tx.write("written.bin", view)  # over the inline threshold: staged
            await tx.write("small.bin", view[:10] if view.ndim == 1 else view[:1])
        assert await store.read("streamed.bin") == expected * 2
        assert await store.read("written.bin") == expected
        assert (await store.stat("streamed.bin")).size == 2 * len(expected)
        result = verify(Layout.of(str(root)))  # the journal still holds the commit
        assert result.ok, result.as_json()
        assert result.paths_checked >= 3


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_typed_views_on_the_simulated_disk(tmp_path: Path) -> None:
    fs = MemoryFileSystem()
    async with walstore.open("/m", fs=fs, inline_threshold=1024) as store:
        async with store.transaction() as tx:
            async with tx.open_write("ints.bin") as f:
                await f.write(memoryview(INTS))
        assert await store.read("ints.bin") == INTS.tobytes()
