"""The commit log seam (``_commit_log.py``): LSNs are the log's, an append after a head the
caller has not read is refused, ``read_after`` hands back what others appended, and a
reopened log holds every record appended since its checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from walstore import _journal_format as fmt
from walstore._commit_log import JournalLog, LogConflict
from walstore._os_fs import OsFileSystem


def tx(txid: int, path: str) -> bytes:
    return fmt.encode_tx(fmt.TxRecord(txid, (fmt.Put(path, f"value of {path}".encode()),)))


def new_log(tmp_path: Path, preallocate: int = 0) -> JournalLog:
    log = JournalLog.open(OsFileSystem(), str(tmp_path), sync=True, preallocate=preallocate)
    assert log.found is None and log.read_after(0) == []
    log.checkpoint(next_txid=1)
    return log


def paths(commits: list[fmt.Commit]) -> list[tuple[int, str]]:
    return [(c.lsn, op.path) for c in commits for t in c.txs for op in t.ops]


def test_append_assigns_the_next_lsn_and_refuses_a_stale_head(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    assert (log.head, log.checkpoint_lsn) == (1, 1)
    assert log.append([tx(1, "a")], expect_lsn=1) == 2
    assert log.append([tx(2, "b"), tx(3, "c")], expect_lsn=2) == 3
    written = log.bytes_written
    with pytest.raises(LogConflict) as caught:
        log.append([tx(4, "d")], expect_lsn=2)
    assert (caught.value.expect_lsn, caught.value.head) == (2, 3)
    assert log.bytes_written == written  # nothing written
    assert paths(log.read_after(1)) == [(2, "a"), (3, "b"), (3, "c")]
    assert paths(log.read_after(2)) == [(3, "b"), (3, "c")]
    log.close()


@pytest.mark.parametrize("preallocate", [0, 64 << 10])
def test_read_after_returns_what_another_writer_appended(tmp_path: Path, preallocate: int) -> None:
    fs = OsFileSystem()
    a = new_log(tmp_path, preallocate)
    a.append([tx(1, "a")], expect_lsn=1)
    b = JournalLog.join(fs, str(tmp_path), 1, sync=True, preallocate=preallocate)
    assert paths(b.read_after(1)) == [(2, "a")] and b.head == 2
    b.append([tx(1 << 40 | 1, "from-b")], expect_lsn=2)
    with pytest.raises(LogConflict):
        a.append([tx(2, "lost")], expect_lsn=1)
    assert paths(a.read_after(2)) == [(3, "from-b")]
    assert a.head == 3 and a.append([tx(3, "after")], expect_lsn=3) == 4
    assert paths(b.read_after(3)) == [(4, "after")]
    assert b.read_after(4) == []
    a.close()
    b.close()


def test_a_reopened_log_holds_every_record_after_its_checkpoint(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    for n in range(1, 6):
        log.append([tx(n, f"f{n}")], expect_lsn=n)
    log.sync()
    log.close()
    again = JournalLog.open(OsFileSystem(), str(tmp_path), sync=True, preallocate=0)
    assert again.found is not None and again.left_over
    assert again.head == 6 and again.checkpoint_lsn == 1
    assert paths(again.read_after(again.checkpoint_lsn)) == [(n + 1, f"f{n}") for n in range(1, 6)]
    assert again.checkpoint(next_txid=6) == 7
    assert again.read_after(7) == [] and again.retired == 1
    again.close()
    clean = JournalLog.open(OsFileSystem(), str(tmp_path), sync=True, preallocate=0)
    assert not clean.left_over and clean.head == 7
    clean.resume()
    assert clean.append([tx(6, "g")], expect_lsn=7) == 8
    clean.close()


def sized(txid: int, lsn: int, record_bytes: int) -> bytes:
    """An encoded transaction whose COMMIT record, alone at ``lsn``, is ``record_bytes`` long."""
    empty = fmt.encode_tx(fmt.TxRecord(txid, (fmt.Put("big", b""),)))
    overhead = fmt.HEADER_SIZE + len(fmt.encode_group(lsn, [empty]))
    part = fmt.encode_tx(fmt.TxRecord(txid, (fmt.Put("big", bytes(record_bytes - overhead)),)))
    assert fmt.HEADER_SIZE + len(fmt.encode_group(lsn, [part])) == record_bytes
    return part


@pytest.mark.parametrize("preallocate", [0, 1 << 20])
def test_read_after_reads_on_past_records_that_fill_its_first_read_exactly(
    tmp_path: Path, preallocate: int
) -> None:
    """Records of another writer that end exactly where the reader's first read (64 KiB)
    ends, and more after them: all are read, so the reader appends after the last one."""
    a = new_log(tmp_path, preallocate)
    b = JournalLog.join(OsFileSystem(), str(tmp_path), 1, sync=True, preallocate=preallocate)
    b.append([sized(1 << 40 | 1, 2, 40_000)], expect_lsn=1)
    b.append([sized(1 << 40 | 2, 3, (1 << 16) - 40_000)], expect_lsn=2)
    b.append([tx(1 << 40 | 3, "after the first read")], expect_lsn=3)
    assert [c.lsn for c in a.read_after(1)] == [2, 3, 4]
    assert a.append([tx(1, "a")], expect_lsn=4) == 5
    assert paths(b.read_after(4)) == [(5, "a")]
    a.close()
    b.close()
