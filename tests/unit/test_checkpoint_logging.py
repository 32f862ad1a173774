"""The background checkpoint keeps the journal short; log lines carry txids."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import walstore


@pytest.mark.asyncio
async def test_checkpoint_runs_between_groups_and_bounds_the_journal(tmp_path: Path) -> None:
    journal = tmp_path / "s/.walstore/journal"
    async with walstore.open(tmp_path / "s", checkpoint_bytes=4096) as store:
        for i in range(40):
            await store.write(f"f{i}", os.urandom(512))
            # Old segments are dropped at once: the last one is kept as the spare that the
            # next checkpoint recycles.
            names = sorted(os.listdir(journal))
            assert names[0].endswith(".wal") and names[1:] in ([], ["spare"])
            # Zero-filled ahead to twice the threshold (at most 1 MiB past it), plus a record.
            for name in names:
                assert os.path.getsize(journal / name) <= 2 * 4096 + 2048
        stats = store.stats()
        assert stats.checkpoints >= 4
        assert stats.commits == 40
    async with walstore.open(tmp_path / "s") as store:
        assert store.recovery.clean
        assert len(await store.list()) == 40


@pytest.mark.asyncio
async def test_log_lines_carry_the_txid(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="walstore")
    async with walstore.open(tmp_path / "s") as store:
        async with store.transaction() as tx:
            await tx.write("a", b"1")
        with pytest.raises(RuntimeError):
            async with store.transaction() as tx2:
                await tx2.write("b", b"2")
                raise RuntimeError("app")
    messages = [r.getMessage() for r in caplog.records if r.name == "walstore"]
    assert any(f"txid={tx.txid} committed" in m for m in messages), messages
    assert any(f"txid={tx2.txid} rolled back" in m for m in messages), messages
