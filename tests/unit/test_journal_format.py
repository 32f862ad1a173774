"""Round trips of the journal record layout (walstore._journal_format), and bad payloads."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from walstore import _journal_format as fmt
from walstore._journal_format import (
    Checkpoint,
    Commit,
    Delete,
    FormatError,
    Put,
    PutStaged,
    RecordType,
    SegmentHeader,
    TxRecord,
)


def split_record(record: bytes) -> tuple[int, int, int, bytes]:
    length, crc, rtype = fmt.decode_head(record, 0)
    return length, crc, rtype, record[fmt.HEADER_SIZE :]


def roundtrip(commit: Commit) -> Commit:
    return fmt.decode_commit(fmt.encode_commit(commit))


# -- records --------------------------------------------------------------------------------


def test_record_head_and_crc() -> None:
    record = fmt.encode_record(RecordType.COMMIT, b"payload", salt=1234)
    length, crc, rtype, payload = split_record(record)
    assert (length, rtype, payload) == (7, RecordType.COMMIT, b"payload")
    assert crc == fmt.crc_of(RecordType.COMMIT, b"payload", 1234)
    assert len(record) == fmt.HEADER_SIZE + 7


def test_crc_covers_type_and_salt() -> None:
    base = fmt.crc_of(RecordType.COMMIT, b"x", 1)
    assert fmt.crc_of(RecordType.CHECKPOINT, b"x", 1) != base
    assert fmt.crc_of(RecordType.COMMIT, b"x", 2) != base
    assert fmt.crc_of(RecordType.COMMIT, b"y", 1) != base


# -- HEADER ---------------------------------------------------------------------------------


def test_header_roundtrip() -> None:
    header = SegmentHeader(first_lsn=42, salt=0xDEADBEEF)
    length, crc, rtype, payload = split_record(fmt.encode_header(header))
    assert rtype == RecordType.HEADER
    assert length == len(payload) == 22
    assert crc == fmt.crc_of(RecordType.HEADER, payload, 0)  # HEADER is seeded with 0
    assert payload.startswith(fmt.MAGIC)
    assert fmt.decode_header(payload) == header


def test_header_extremes_roundtrip() -> None:
    header = SegmentHeader(first_lsn=2**64 - 1, salt=2**32 - 1)
    assert fmt.decode_header(split_record(fmt.encode_header(header))[3]) == header


def header_payload(magic: bytes = fmt.MAGIC, version: int = fmt.VERSION) -> bytes:
    return struct.pack("<8sHQI", magic, version, 1, 7)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        header_payload()[:-1],
        header_payload() + b"\0",
        header_payload(magic=b"WALSTORX"),
        header_payload(version=fmt.VERSION + 1),
        header_payload(version=0),
    ],
    ids=["empty", "short", "long", "bad-magic", "future-version", "version-0"],
)
def test_header_bad_payload(payload: bytes) -> None:
    with pytest.raises(FormatError):
        fmt.decode_header(payload)


# -- CHECKPOINT -----------------------------------------------------------------------------


@pytest.mark.parametrize("cp", [Checkpoint(1, 1), Checkpoint(17, 99), Checkpoint(2**64 - 1, 0)])
def test_checkpoint_roundtrip(cp: Checkpoint) -> None:
    payload = fmt.encode_checkpoint(cp)
    assert len(payload) == 16
    assert fmt.payload_lsn(payload) == cp.lsn
    assert fmt.decode_checkpoint(payload) == cp


@pytest.mark.parametrize("size", [0, 8, 15, 17, 32])
def test_checkpoint_bad_length(size: int) -> None:
    with pytest.raises(FormatError):
        fmt.decode_checkpoint(bytes(size))


# -- COMMIT ---------------------------------------------------------------------------------


def test_commit_put_roundtrip() -> None:
    commit = Commit(5, (TxRecord(9, (Put("a.json", b"{}"),)),))
    payload = fmt.encode_commit(commit)
    assert fmt.payload_lsn(payload) == 5
    assert fmt.decode_commit(payload) == commit


def test_commit_put_staged_roundtrip() -> None:
    op = PutStaged("big/blob.bin", "9/0", size=2**40, crc=0xFFFFFFFF)
    commit = Commit(6, (TxRecord(9, (op,)),))
    assert roundtrip(commit) == commit


def test_commit_delete_roundtrip() -> None:
    commit = Commit(7, (TxRecord(1, (Delete("gone.txt"),)),))
    assert roundtrip(commit) == commit


def test_commit_empty_values_roundtrip() -> None:
    ops = (Put("empty", b""), PutStaged("s", "", 0, 0), Delete("d"))
    commit = Commit(1, (TxRecord(1, ops), TxRecord(2, ())))
    assert roundtrip(commit) == commit


def test_commit_empty_group_roundtrip() -> None:
    assert roundtrip(Commit(3, ())) == Commit(3, ())


def test_commit_unicode_paths_roundtrip() -> None:
    ops = (
        Put("données/été.txt", "ünïcødé ✓".encode()),
        PutStaged("日本語/ファイル", "4/1", 3, 0),
        Delete("emoji/🙂.json"),
    )
    commit = Commit(8, (TxRecord(4, ops),))
    assert roundtrip(commit) == commit


def test_commit_undecodable_path_bytes_roundtrip() -> None:
    # os.fsdecode of a non-UTF-8 file name yields lone surrogates; surrogateescape keeps them.
    commit = Commit(1, (TxRecord(1, (Delete("bad\udcff.txt"),)),))
    payload = fmt.encode_commit(commit)
    assert b"bad\xff.txt" in payload
    assert fmt.decode_commit(payload) == commit


def test_commit_many_transactions_roundtrip() -> None:
    txs = (
        TxRecord(10, (Put("a", b"1"), Put("b", b"2"))),
        TxRecord(11, (Delete("a"),)),
        TxRecord(12, (PutStaged("c", "12/0", 100, 5), Put("d", b"\0" * 300))),
    )
    commit = Commit(2**64 - 1, txs)
    assert roundtrip(commit) == commit


def good_commit_payload() -> bytes:
    return fmt.encode_commit(Commit(1, (TxRecord(1, (Put("p", b"v"), Delete("q"))),)))


def bad_op_kind_payload(kind: int) -> bytes:
    return struct.pack("<QI", 1, 1) + struct.pack("<QI", 1, 1) + struct.pack("<BH", kind, 0)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        bytes(11),  # shorter than lsn + transaction count
        good_commit_payload()[:-1],  # ends inside the last op
        good_commit_payload() + b"\0",  # trailing bytes
        struct.pack("<QI", 1, 2) + struct.pack("<QI", 1, 0),  # claims two transactions
        struct.pack("<QI", 1, 1) + struct.pack("<QI", 1, 1),  # claims an op it lacks
        struct.pack("<QI", 1, 1) + struct.pack("<QI", 1, 1) + struct.pack("<BH", 1, 9) + b"ab",
        bad_op_kind_payload(0),
        bad_op_kind_payload(6),
        bad_op_kind_payload(255),
    ],
    ids=[
        "empty",
        "short-group",
        "truncated-op",
        "trailing-bytes",
        "missing-tx",
        "missing-op",
        "path-past-end",
        "op-kind-0",
        "op-kind-4",
        "op-kind-255",
    ],
)
def test_commit_bad_payload(payload: bytes) -> None:
    with pytest.raises(FormatError):
        fmt.decode_commit(payload)


@pytest.mark.parametrize("cut", range(len(good_commit_payload())))
def test_commit_every_truncation_raises(cut: int) -> None:
    with pytest.raises(FormatError):
        fmt.decode_commit(good_commit_payload()[:cut])


def test_payload_lsn_too_short() -> None:
    with pytest.raises(FormatError):
        fmt.payload_lsn(bytes(7))


def test_format_error_is_value_error() -> None:
    assert issubclass(FormatError, ValueError)


# -- the worked example in docs/journal-format.md ------------------------------------------

DOC = Path(__file__).parents[2] / "docs" / "journal-format.md"


def test_docs_worked_example_is_exact() -> None:
    salt = 0x1234ABCD
    commit = Commit(2, (TxRecord(1, (Put("a.json", b"{}"),)),))
    segment = (
        fmt.encode_header(SegmentHeader(1, salt))
        + fmt.encode_record(RecordType.CHECKPOINT, fmt.encode_checkpoint(Checkpoint(1, 1)), salt)
        + fmt.encode_record(RecordType.COMMIT, fmt.encode_commit(commit), salt)
    )
    rows = re.findall(r"^[0-9a-f]{8}  (.+?)  \|", DOC.read_text(), re.MULTILINE)
    assert bytes.fromhex("".join(rows)) == segment


# -- property -------------------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
paths = st.text(st.characters(codec="utf-8"), max_size=40)
ops = st.one_of(
    st.builds(Put, paths, st.binary(max_size=64)),
    st.builds(PutStaged, paths, paths, u64, u32),
    st.builds(Delete, paths),
)
txs = st.builds(TxRecord, u64, st.lists(ops, max_size=6).map(tuple))
commits = st.builds(Commit, u64, st.lists(txs, max_size=5).map(tuple))


@given(commits)
def test_commit_roundtrip_property(commit: Commit) -> None:
    payload = fmt.encode_commit(commit)
    assert fmt.payload_lsn(payload) == commit.lsn
    assert fmt.decode_commit(payload) == commit


@given(commits, st.data())
def test_commit_truncation_property(commit: Commit, data: st.DataObject) -> None:
    payload = fmt.encode_commit(commit)
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(FormatError):
        fmt.decode_commit(payload[:cut])
