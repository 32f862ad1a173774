"""Media damage is told from a torn tail (issue 18, item 5).

A segment is zero-filled and synced at its full size before it gets its name, and its
version 2 HEADER declares that size: a segment found shorter lost synced bytes (a cut-off
commit would otherwise be taken for a torn write, and a file it deleted would come back). A
newer segment that does not parse is a creation cut short only if the live one ends where it
begins; otherwise records are missing. Both are CorruptionError on open and problems for
``walstore verify``, while a torn tail inside the preallocated size is still rolled back.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import walstore
from walstore import _journal_format as fmt
from walstore._inspect import Layout
from walstore._journal_reader import scan_segment
from walstore._journal_writer import segment_lsn
from walstore._verify import verify

pytestmark = pytest.mark.guarantee(name="Damage is told from a torn tail")


async def crashed_copy(tmp_path: Path) -> Path:
    """A store that wrote ``a`` and then deleted it, copied while open (a crash: nothing was
    checkpointed); the delete is the live segment's last record."""
    root = tmp_path / "s"
    async with walstore.open(root, checkpoint_bytes=1 << 20) as store:
        await store.write("keep", b"k")
        await store.write("a", b"x")
        async with store.transaction() as tx:
            await tx.delete("a")
        copy = tmp_path / "crashed"
        shutil.copytree(root, copy)
    return copy


def live(root: Path) -> tuple[Path, bytes]:
    journal = root / ".walstore" / "journal"
    [seg] = [p for p in journal.iterdir() if segment_lsn(p.name) is not None]
    return seg, seg.read_bytes()


def last_record_at(name: str, data: bytes) -> int:
    """The offset of the last COMMIT (the delete)."""
    scan = scan_segment(name, data)
    assert len(scan.commits) == 3 and scan.header.size == len(data)
    offset = scan.valid_end
    length = len(fmt.encode_record(fmt.RecordType.COMMIT, fmt.encode_commit(scan.commits[-1]), 0))
    return offset - length


@pytest.mark.asyncio
async def test_a_truncated_segment_is_corruption_not_a_torn_tail(tmp_path: Path) -> None:
    root = await crashed_copy(tmp_path)
    seg, data = live(root)
    cut = last_record_at(seg.name, data) + 7  # media damage: the end of the file is gone
    os.truncate(seg, cut)
    with pytest.raises(walstore.CorruptionError, match="shorter than"):
        await walstore.open(root)
    result = verify(Layout.of(str(root)))
    assert [p.kind for p in result.problems] == ["journal"]
    assert "shorter than" in result.problems[0].detail
    assert (root / "a").exists() is False  # nothing was replayed over the damage


@pytest.mark.asyncio
async def test_a_torn_tail_inside_the_preallocation_is_still_rolled_back(tmp_path: Path) -> None:
    root = await crashed_copy(tmp_path)
    seg, data = live(root)
    at = last_record_at(seg.name, data)
    with open(seg, "r+b") as fh:  # the last append torn: garbage, the size unchanged
        fh.seek(at + 12)
        fh.write(b"\xa5" * 20)
    async with walstore.open(root) as store:
        assert store.recovery.torn_bytes > 0
        assert await store.read("a") == b"x"  # the delete is rolled back, as a torn write
        assert await store.read("keep") == b"k"


@pytest.mark.asyncio
@pytest.mark.parametrize("gap", [0, 3])
async def test_a_newer_segment_that_does_not_parse(tmp_path: Path, gap: int) -> None:
    """At the live segment's next LSN it is a creation cut short (dropped); further on, the
    records between are missing."""
    root = await crashed_copy(tmp_path)
    seg, data = live(root)
    nxt = scan_segment(seg.name, data).next_lsn + gap
    newer = seg.parent / f"{nxt:016d}.wal"
    newer.write_bytes(b"\x17" * 30)
    if gap:
        with pytest.raises(walstore.CorruptionError, match="missing"):
            await walstore.open(root)
        assert [p.kind for p in verify(Layout.of(str(root))).problems] == ["journal"]
        return
    async with walstore.open(root) as store:
        assert not (root / "a").exists()
        assert await store.read("keep") == b"k"
    assert not newer.exists() or newer.stat().st_size > 30  # dropped (or reused)


def test_a_version_1_segment_declares_no_size() -> None:
    """Old stores (and segments not preallocated) keep version 1: no size, no size check."""
    v1 = fmt.encode_header(fmt.SegmentHeader(5, 7))
    v2 = fmt.encode_header(fmt.SegmentHeader(5, 7, 1 << 20))
    assert (len(v1), len(v2)) == (31, 39)
    assert fmt.decode_header(v1[fmt.HEADER_SIZE :]) == fmt.SegmentHeader(5, 7, 0)
    assert fmt.decode_header(v2[fmt.HEADER_SIZE :]) == fmt.SegmentHeader(5, 7, 1 << 20)
    cp = fmt.encode_record(
        fmt.RecordType.CHECKPOINT, fmt.encode_checkpoint(fmt.Checkpoint(5, 1)), 7
    )
    assert scan_segment("x", v1 + cp + bytes(100)).valid_end == len(v1 + cp)
    with pytest.raises(walstore.CorruptionError, match="shorter than"):
        scan_segment("x", v2 + cp + bytes(100))
