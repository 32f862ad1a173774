"""What readers see while writers commit.

Through the store, a reader never sees part of a transaction: two accounts ``a`` and ``b``
always hold 100 between them, and a transfer moves an amount from one to the other in one
transaction. Plain readers of the files (other programs) never see a torn file.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import walstore
from walstore import Durability

from .helpers import GUARD, STRESS

pytestmark = [pytest.mark.anyio, pytest.mark.guarantee(name="Readers see whole transactions")]

WRITERS = 16
TRANSFERS = 128 if STRESS else 24  # per writer: 2048 (384) committed transfers in all


async def transfer(tx: walstore.Transaction, rng: random.Random) -> int:
    """Move a random amount between a and b; both files get the transfer's sequence number,
    a written first. Returns that number."""
    a = await tx.read_json("a.json")
    b = await tx.read_json("b.json")
    seq = max(a["seq"], b["seq"]) + 1
    amount = rng.randint(-a["amount"], b["amount"])  # from b to a (negative: a to b)
    await tx.write_json("a.json", {"seq": seq, "amount": a["amount"] + amount})
    await tx.write_json("b.json", {"seq": seq, "amount": b["amount"] - amount})
    return seq


async def read_pair(tx: walstore.Transaction) -> tuple[dict[str, Any], dict[str, Any]]:
    return await tx.read_json("a.json"), await tx.read_json("b.json")


async def test_readers_never_see_half_a_transfer(tmp_path: Path, anyio_backend: str) -> None:
    # The size (thousands of transfers) on asyncio always, on trio with STRESS.
    transfers = 128 if anyio_backend == "asyncio" else TRANSFERS
    stats: dict[str, int] = {"store pairs": 0, "store whole": 0, "tx pairs": 0}
    async with walstore.open(tmp_path / "s", durability=Durability.OFF) as store:
        async with store.transaction() as tx:
            await tx.write_json("a.json", {"seq": 0, "amount": 60})
            await tx.write_json("b.json", {"seq": 0, "amount": 40})
        writers_done = anyio.Event()
        committed: list[int] = []

        async def writer(i: int) -> None:
            rng = random.Random(i)
            for _ in range(transfers):
                seq = await store.atomic(transfer, rng)
                committed.append(seq)
                # Visible at once: a store read after commit sees it (or something newer).
                assert (await store.read_json("a.json"))["seq"] >= seq

        async def store_reader() -> None:
            """Two store reads, a then b. b is written after a in every transfer and every
            read sees whole groups, so b's seq is never behind a's; equal seqs mean both
            reads saw the same transfer, whose amounts sum to 100."""
            last = -1
            while not writers_done.is_set():
                a = await store.read_json("a.json")
                b = await store.read_json("b.json")
                assert b["seq"] >= a["seq"] >= last, (a, b, last)  # never half, never back
                last = a["seq"]
                stats["store pairs"] += 1
                if a["seq"] == b["seq"]:
                    assert a["amount"] + b["amount"] == 100, (a, b)
                    stats["store whole"] += 1

        async def tx_reader() -> None:
            """Read-only transactions: one that commits saw one state of both files."""
            while not writers_done.is_set():
                a, b = await store.atomic(read_pair)
                assert a["seq"] == b["seq"], (a, b)
                assert a["amount"] + b["amount"] == 100, (a, b)
                stats["tx pairs"] += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(store_reader)
            tg.start_soon(tx_reader)
            async with anyio.create_task_group() as writers:
                for i in range(WRITERS):
                    writers.start_soon(writer, i)
            writers_done.set()

        a = await store.read_json("a.json")
        b = await store.read_json("b.json")
    total = WRITERS * transfers
    assert sorted(committed) == list(range(1, total + 1))  # serial: each seq once
    assert a["seq"] == b["seq"] == total
    assert a["amount"] + b["amount"] == 100
    assert stats["store pairs"] >= 1 and stats["tx pairs"] >= 1, stats


def sized(v: int) -> int:
    """The size of version ``v`` of the blob: small (inline) or over the inline threshold
    (staged), alternately."""
    return 1000 + v if v % 2 else 200_000 + v


async def test_plain_readers_never_see_a_torn_file(tmp_path: Path) -> None:
    """Another program reading the files with plain open() while transactions replace them
    sees each file whole: one complete version, never a prefix or a mix."""
    root = tmp_path / "s"
    versions = 120
    stop = threading.Event()
    started = threading.Event()
    reads = {"plain": 0, "store": 0}

    def check_blob(data: bytes) -> int:
        assert data, "empty blob"
        v = data[0]
        assert len(data) == sized(v) and data == bytes([v]) * len(data), (v, len(data))
        return v

    def check_doc(data: bytes) -> int:
        doc = json.loads(data)
        assert doc["pad"] == "x" * doc["v"], doc
        return int(doc["v"])

    def plain_reader() -> None:
        started.set()
        while True:
            last = stop.is_set()
            check_blob((root / "blob.bin").read_bytes())
            check_doc((root / "doc.json").read_bytes())
            reads["plain"] += 1
            if last:
                return

    async with walstore.open(root, durability=Durability.OFF) as store:

        async def write(v: int) -> None:
            async with store.transaction() as tx:
                await tx.write("blob.bin", bytes([v]) * sized(v))
                await tx.write_json("doc.json", {"v": v, "pad": "x" * v})

        async def writer() -> None:
            ok = await anyio.to_thread.run_sync(started.wait, GUARD)
            assert ok
            try:
                for v in range(1, versions):
                    await write(v)
            finally:
                stop.set()

        async def store_reader() -> None:
            while not stop.is_set():
                check_blob(await store.read("blob.bin"))
                check_doc(await store.read("doc.json"))
                reads["store"] += 1

        await write(0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            tg.start_soon(store_reader)
            await anyio.to_thread.run_sync(plain_reader)
    assert check_blob((root / "blob.bin").read_bytes()) == versions - 1
    assert reads["plain"] >= 1, reads
