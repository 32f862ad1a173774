"""open_write streams a large value with flat memory, through aiofiles, 1 MiB per hop."""

from __future__ import annotations

import hashlib
import tracemalloc
import zlib
from pathlib import Path

import pytest

import walstore

pytestmark = pytest.mark.guarantee(name="Flat memory for big values")

CHUNK = 64 * 1024


def pattern(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "little")).digest() * (CHUNK // 32)


@pytest.mark.asyncio
async def test_streaming_64_mib_keeps_memory_flat(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "s") as store:
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            hops = store.stats().thread_hops
            async with store.transaction() as tx, tx.open_write("blobs/big.bin") as f:
                for i in range(64 * 1024 * 1024 // CHUNK):
                    await f.write(pattern(i))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak - base < 8 * 1024 * 1024, peak - base
        # about one hop per MiB, not one per 64 KiB chunk
        assert store.stats().thread_hops - hops < 64 + 10
    data = (tmp_path / "s/blobs/big.bin").read_bytes()
    assert len(data) == 64 * 1024 * 1024
    assert zlib.crc32(data) == zlib.crc32(b"".join(pattern(i) for i in range(1024)))


@pytest.mark.asyncio
async def test_stream_error_in_block_records_nothing(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "s") as store:
        with pytest.raises(RuntimeError, match="boom"):
            async with store.transaction() as tx, tx.open_write("blob") as f:
                await f.write(b"x" * 3_000_000)
                raise RuntimeError("boom")
        assert not await store.exists("blob")
        assert list((tmp_path / "s/.walstore/staging").iterdir()) == []


@pytest.mark.asyncio
async def test_streamed_value_reads_back_inside_the_transaction(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "s") as store:
        async with store.transaction() as tx:
            async with tx.open_write("a/b.bin") as f:
                await f.write(b"hello ")
                await f.write(bytearray(b"world"))
            assert await tx.read("a/b.bin") == b"hello world"
            assert await tx.list("a") == ["b.bin"]
        assert await store.read("a/b.bin") == b"hello world"
