"""LevelDB's db/log_test.cc in miniature: segments built byte for byte, one kind of damage
per test, and what scan_segment makes of it (a torn tail to truncate, or CorruptionError)."""

from __future__ import annotations

import random
import re
from contextlib import AbstractContextManager

import pytest

from walstore import CorruptionError
from walstore import _journal_format as fmt
from walstore._journal_format import Checkpoint, Commit, Put, RecordType, SegmentHeader, TxRecord
from walstore._journal_reader import FRESH_SEGMENT_SIZE, TornSegment, scan_segment
from walstore._journal_writer import segment_name

pytestmark = pytest.mark.guarantee(name="Damage is told from a torn tail")

FIRST = 100  # first LSN of the test segment: its CHECKPOINT's LSN
SALT = 0x5A17C0DE
OTHER_SALT = 0x0BADF00D
NAME = segment_name(FIRST)
CHECKPOINT_AT = fmt.HEADER_SIZE + 22  # offset of the CHECKPOINT record


def commit_record(lsn: int, salt: int = SALT) -> bytes:
    commit = Commit(lsn, (TxRecord(lsn, (Put(f"file-{lsn}.json", b'{"n": %d}' % lsn),)),))
    return fmt.encode_record(RecordType.COMMIT, fmt.encode_commit(commit), salt)


def segment_head(first_lsn: int = FIRST, salt: int = SALT, cp_lsn: int | None = None) -> bytes:
    cp = Checkpoint(first_lsn if cp_lsn is None else cp_lsn, 7)
    checkpoint = fmt.encode_record(RecordType.CHECKPOINT, fmt.encode_checkpoint(cp), salt)
    return fmt.encode_header(SegmentHeader(first_lsn, salt)) + checkpoint


def build(n: int, first_lsn: int = FIRST, salt: int = SALT) -> tuple[bytes, list[int]]:
    """A segment with ``n`` COMMITs (LSNs first_lsn+1 ...), and the offset of each COMMIT."""
    data, offsets = segment_head(first_lsn, salt), []
    for lsn in range(first_lsn + 1, first_lsn + 1 + n):
        offsets.append(len(data))
        data += commit_record(lsn, salt)
    return data, offsets


def flip(data: bytes, pos: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[pos] ^= mask
    return bytes(out)


def assert_torn(data: bytes, good_commits: int, valid_end: int) -> None:
    scan = scan_segment(NAME, data)
    assert [c.lsn for c in scan.commits] == list(range(FIRST + 1, FIRST + 1 + good_commits))
    assert scan.valid_end == valid_end
    # Trailing zeros are free space of a preallocated segment, not part of the tear.
    assert scan.torn_bytes == len(data.rstrip(b"\0")) - valid_end > 0


def test_a_zero_filled_tail_is_free_space_not_a_tear() -> None:
    """A preallocated segment: records, then zeros to the end. Nothing is torn."""
    data, _ = build(3)
    scan = scan_segment(NAME, data + bytes(1 << 20))
    assert [c.lsn for c in scan.commits] == [FIRST + 1, FIRST + 2, FIRST + 3]
    assert scan.valid_end == len(data) and scan.torn_bytes == 0
    # A partly written record in the free space is a tear up to its last non-zero byte.
    part = commit_record(FIRST + 4)[:20]
    scan = scan_segment(NAME, data + part + bytes(4096))
    assert scan.valid_end == len(data) and scan.torn_bytes == len(part.rstrip(b"\0"))


def corruption_at(offset: int) -> AbstractContextManager[pytest.ExceptionInfo[CorruptionError]]:
    return pytest.raises(CorruptionError, match=re.escape(f"{NAME}, offset {offset}:"))


# -- clean segments -------------------------------------------------------------------------


def test_clean_segment() -> None:
    data, _ = build(3)
    scan = scan_segment(NAME, data)
    assert scan.name == NAME
    assert scan.header == SegmentHeader(FIRST, SALT)
    assert scan.checkpoint == Checkpoint(FIRST, 7)
    assert [c.lsn for c in scan.commits] == [FIRST + 1, FIRST + 2, FIRST + 3]
    assert scan.commits[0].txs[0].ops == (Put("file-101.json", b'{"n": 101}'),)
    assert scan.next_lsn == FIRST + 4
    assert (scan.valid_end, scan.torn_bytes) == (len(data), 0)


def test_fresh_segment_has_no_commits() -> None:
    data, _ = build(0)
    assert len(data) == FRESH_SEGMENT_SIZE
    scan = scan_segment(NAME, data)
    assert (scan.commits, scan.next_lsn, scan.valid_end, scan.torn_bytes) == ([], FIRST + 1, 56, 0)


# -- torn tails -----------------------------------------------------------------------------


def with_length(data: bytes, offset: int, length: int) -> bytes:
    return data[:offset] + length.to_bytes(4, "little") + data[offset + 4 :]


@pytest.mark.parametrize("delta", [1, 2, 1 << 20, -1])
def test_bad_length(delta: int) -> None:
    data, offsets = build(2)
    length = len(data) - offsets[-1] - fmt.HEADER_SIZE
    assert_torn(with_length(data, offsets[-1], length + delta), 1, offsets[-1])


@pytest.mark.parametrize("length", [fmt.MAX_PAYLOAD + 1, 0xFFFFFFFF])
def test_bad_length_above_max_payload(length: int) -> None:
    data, offsets = build(2)
    assert_torn(with_length(data, offsets[-1], length) + bytes(64), 1, offsets[-1])


@pytest.mark.parametrize("pos", [4, 8, fmt.HEADER_SIZE, -1], ids=["crc", "type", "first", "last"])
def test_checksum_mismatch_at_tail(pos: int) -> None:
    data, offsets = build(2)
    at = offsets[-1] + pos if pos >= 0 else len(data) - 1
    assert_torn(flip(data, at), 1, offsets[-1])


def test_truncated_trailing_record_is_ignored() -> None:
    data, offsets = build(3)
    for cut in range(offsets[-1] + 1, len(data)):
        assert_torn(data[:cut], 2, offsets[-1])


def test_zero_filled_tail() -> None:
    """The size reached the disk but the last record's data did not: zeros, which are free
    space (as in a preallocated segment), the record is simply not there."""
    data, offsets = build(2)
    scan = scan_segment(NAME, data[: offsets[-1]] + bytes(len(data) - offsets[-1]))
    assert [c.lsn for c in scan.commits] == [FIRST + 1]
    assert scan.valid_end == offsets[-1] and scan.torn_bytes == 0


@pytest.mark.parametrize("seed", range(8))
def test_garbage_after_good_record(seed: int) -> None:
    data, _ = build(2)
    garbage = random.Random(seed).randbytes(1 + seed * 300)
    assert_torn(data + garbage, 2, len(data))


def test_type_zero_never_parses() -> None:
    data, _ = build(1)
    zero = fmt.encode_record(RecordType.ZERO, fmt.encode_commit(Commit(FIRST + 2, ())), SALT)
    assert_torn(data + zero, 1, len(data))  # even with a good CRC


def test_short_tail_shorter_than_a_record_head() -> None:
    data, _ = build(1)
    assert_torn(data + b"\x03" * (fmt.HEADER_SIZE - 1), 1, len(data))


def test_wrong_salt_records_are_not_resynced() -> None:
    data, offsets = build(2)
    damaged = flip(data, offsets[-1] + fmt.HEADER_SIZE)  # the last record fails its CRC
    assert_torn(damaged + commit_record(FIRST + 3, salt=OTHER_SALT), 1, offsets[-1])
    # The same record under this segment's salt proves the damage was not a tear.
    with corruption_at(offsets[-1]):
        scan_segment(NAME, damaged + commit_record(FIRST + 3))


def test_stale_record_after_damage_is_torn() -> None:
    data, offsets = build(2)
    damaged = flip(data, offsets[-1] + fmt.HEADER_SIZE)
    stale = data[offsets[0] : offsets[1]]  # a valid copy of LSN FIRST+1, already applied
    assert_torn(damaged + stale, 1, offsets[-1])


def test_header_copied_into_tail_is_torn() -> None:
    data, offsets = build(2)
    damaged = flip(data, offsets[-1] + fmt.HEADER_SIZE)
    header = fmt.encode_header(SegmentHeader(FIRST + 50, SALT))  # valid, but not a COMMIT
    assert_torn(damaged + header, 1, offsets[-1])


# -- corruption -----------------------------------------------------------------------------


def test_damage_mid_log_raises_corruption() -> None:
    data, offsets = build(3)
    for pos in range(offsets[1], offsets[2]):  # every byte of the middle record
        with corruption_at(offsets[1]):
            scan_segment(NAME, flip(data, pos))


def test_damage_to_first_commit_raises_corruption() -> None:
    data, offsets = build(2)
    with corruption_at(offsets[0]):
        scan_segment(NAME, flip(data, offsets[0] + fmt.HEADER_SIZE + 3))


def test_zeroed_record_mid_log_raises_corruption() -> None:
    data, offsets = build(3)
    zeroed = data[: offsets[1]] + bytes(offsets[2] - offsets[1]) + data[offsets[2] :]
    with corruption_at(offsets[1]):
        scan_segment(NAME, zeroed)


@pytest.mark.parametrize("lsn", [FIRST + 3, FIRST + 1, FIRST], ids=["gap", "repeat", "checkpoint"])
def test_non_consecutive_lsn_raises_corruption(lsn: int) -> None:
    data, _ = build(1)
    with pytest.raises(CorruptionError, match=f"LSN {lsn}, expected {FIRST + 2}"):
        scan_segment(NAME, data + commit_record(lsn))


def test_first_commit_lsn_must_follow_checkpoint() -> None:
    with corruption_at(FRESH_SEGMENT_SIZE):
        scan_segment(NAME, segment_head() + commit_record(FIRST + 2))


@pytest.mark.parametrize("cut", range(FRESH_SEGMENT_SIZE))
def test_truncated_fresh_segment_is_torn_segment(cut: int) -> None:
    with pytest.raises(TornSegment):
        scan_segment(NAME, build(0)[0][:cut])


@pytest.mark.parametrize("pos", [0, 4, 8, 9, 30, CHECKPOINT_AT + 9, FRESH_SEGMENT_SIZE - 1])
def test_damaged_start_of_fresh_segment_is_torn_segment(pos: int) -> None:
    with pytest.raises(TornSegment):
        scan_segment(NAME, flip(build(0)[0], pos))


@pytest.mark.parametrize("pos", [0, 4, 8, 9, 30])
def test_damaged_header_in_longer_segment_raises_corruption(pos: int) -> None:
    data, _ = build(1)
    with corruption_at(0):
        scan_segment(NAME, flip(data, pos))


def test_damaged_checkpoint_in_longer_segment_raises_corruption() -> None:
    data, _ = build(1)
    with pytest.raises(CorruptionError, match="checkpoint is damaged"):
        scan_segment(NAME, flip(data, CHECKPOINT_AT + fmt.HEADER_SIZE))


def test_damaged_checkpoint_message_names_its_offset() -> None:
    data, _ = build(1)
    with corruption_at(CHECKPOINT_AT):
        scan_segment(NAME, flip(data, CHECKPOINT_AT + fmt.HEADER_SIZE))


def test_good_crc_but_undecodable_commit_raises_corruption() -> None:
    data, _ = build(2)
    payload = fmt.encode_commit(Commit(FIRST + 3, ())) + b"\0"  # trailing byte
    bad = fmt.encode_record(RecordType.COMMIT, payload, SALT)
    with corruption_at(len(data)):
        scan_segment(NAME, data + bad)


def test_good_crc_but_undecodable_header_raises_corruption() -> None:
    payload = b"WALSTORX" + bytes(14)  # bad magic, right size
    data = fmt.encode_record(RecordType.HEADER, payload, 0) + build(0)[0][CHECKPOINT_AT:]
    with corruption_at(0):
        scan_segment(NAME, data)


def test_good_crc_but_undecodable_checkpoint_raises_corruption() -> None:
    bad = fmt.encode_record(RecordType.CHECKPOINT, bytes(15), SALT)
    data = fmt.encode_header(SegmentHeader(FIRST, SALT)) + bad
    with corruption_at(CHECKPOINT_AT):
        scan_segment(NAME, data)


def test_checkpoint_lsn_differs_from_header_raises_corruption() -> None:
    with pytest.raises(CorruptionError, match=f"checkpoint LSN {FIRST + 1}"):
        scan_segment(NAME, segment_head(cp_lsn=FIRST + 1))


@pytest.mark.parametrize("rtype", [RecordType.HEADER, RecordType.CHECKPOINT, 9])
def test_unexpected_record_type_raises_corruption(rtype: int) -> None:
    data, _ = build(1)
    payload = fmt.encode_checkpoint(Checkpoint(FIRST + 2, 7))
    with corruption_at(len(data)):
        scan_segment(NAME, data + fmt.encode_record(rtype, payload, SALT))  # type: ignore[arg-type]


def test_records_seeded_with_another_salt_do_not_parse() -> None:
    data, _ = build(2)
    other, _ = build(2, salt=OTHER_SALT)
    spliced = data[:CHECKPOINT_AT] + other[CHECKPOINT_AT:]
    with pytest.raises(CorruptionError, match="checkpoint is damaged"):
        scan_segment(NAME, spliced)
