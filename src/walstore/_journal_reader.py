"""JournalReader: parse one journal segment, tell a torn tail from corruption.

A segment is ``HEADER CHECKPOINT COMMIT*``. The writer appends each commit group as one record
in one write and fdatasyncs it before the next group is written, so only the last record of the
live segment can be incomplete. Damage there is a torn write: the writer died mid-append, as
LevelDB's log reader treats it, and the reader reports the bytes to truncate. Damage that is
followed by a valid record with a later LSN cannot be explained by a torn write and raises
CorruptionError naming the segment and offset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

from . import _journal_format as fmt
from ._errors import CorruptionError

# A new segment is written as HEADER + CHECKPOINT and synced before anything else is appended,
# so a segment at most this long whose start does not parse is a segment whose creation was cut
# short; anything longer with a bad start has lost synced data.
FRESH_SEGMENT_SIZE = 2 * fmt.HEADER_SIZE + 22 + 16

_Record = tuple[int, int, int, memoryview]  # offset, end, type, payload
T = TypeVar("T")


@dataclass
class SegmentScan:
    """What one segment holds."""

    name: str
    header: fmt.SegmentHeader
    checkpoint: fmt.Checkpoint
    commits: list[fmt.Commit] = field(default_factory=list)
    valid_end: int = 0  # offset just past the last good record
    torn_bytes: int = 0  # bytes after valid_end: a torn tail to truncate
    file_bytes: int = 0  # the file's size
    checkpoint_end: int = 0  # offset just past the CHECKPOINT record

    @property
    def next_lsn(self) -> int:
        return self.commits[-1].lsn + 1 if self.commits else self.checkpoint.lsn + 1


class TornSegment(Exception):
    """The segment's HEADER or CHECKPOINT is incomplete: its creation was cut short."""


def _records(data: bytes, offset: int, salt: int) -> Iterator[_Record]:
    """Yield (offset, end, type, payload) of consecutive valid records; stop at the first
    record that is cut off or fails its CRC."""
    view = memoryview(data)
    while offset + fmt.HEADER_SIZE <= len(data):
        length, crc, rtype = fmt.decode_head(view, offset)
        end = offset + fmt.HEADER_SIZE + length
        if rtype == fmt.RecordType.ZERO or length > fmt.MAX_PAYLOAD or end > len(data):
            return
        payload = view[offset + fmt.HEADER_SIZE : end]
        if fmt.crc_of(rtype, payload, salt) != crc:
            # Don't trust the length: it may itself be what was damaged (LevelDB log_reader).
            return
        yield offset, end, rtype, payload
        offset = end


def _valid_record_after(data: bytes, start: int, salt: int, after_lsn: int) -> int | None:
    """Offset of a valid COMMIT/CHECKPOINT record with an LSN above ``after_lsn`` that begins
    after ``start``, or None. Used only once damage is found, to tell corruption from a tear."""
    view = memoryview(data)
    types = (fmt.RecordType.COMMIT, fmt.RecordType.CHECKPOINT)
    pos = start + 1
    limit = len(data) - fmt.HEADER_SIZE - 8
    while pos <= limit:
        # The type byte sits at +8; jump between candidate positions instead of every byte.
        hits = [i for i in (data.find(bytes((t,)), pos + 8) for t in types) if i >= 0]
        if not hits:
            return None
        pos = min(hits) - 8
        if pos > limit:
            return None
        length, crc, rtype = fmt.decode_head(view, pos)
        end = pos + fmt.HEADER_SIZE + length
        if length >= 8 and end <= len(data):
            payload = view[pos + fmt.HEADER_SIZE : end]
            if fmt.crc_of(rtype, payload, salt) == crc and fmt.payload_lsn(payload) > after_lsn:
                return pos
        pos += 1
    return None


def scan_segment(name: str, data: bytes) -> SegmentScan:
    """Parse a segment. Raises TornSegment if its creation was cut short (it may be removed),
    CorruptionError if it is damaged beyond a torn tail."""
    records = _records(data, 0, 0)
    first = next(records, None)
    if first is None or first[2] != fmt.RecordType.HEADER:
        _torn_or_corrupt(name, data, "segment header", 0)
    header = _decode(name, first, fmt.decode_header)
    records = _records(data, first[1], header.salt)
    second = next(records, None)
    if second is None or second[2] != fmt.RecordType.CHECKPOINT:
        _torn_or_corrupt(name, data, "segment checkpoint", first[1])
    checkpoint = _decode(name, second, fmt.decode_checkpoint)
    if checkpoint.lsn != header.first_lsn:
        raise CorruptionError(
            f"journal segment {name}: checkpoint LSN {checkpoint.lsn} "
            f"does not match the header's {header.first_lsn}"
        )
    if len(data) < header.size:
        # Written and synced at its full size before it got its name (a preallocation under
        # a temporary name, a recycled spare), so no crash leaves it shorter: the end of a
        # synced file was lost (media damage, a truncation), and records with it.
        raise CorruptionError(
            f"journal segment {name} is {len(data)} bytes, shorter than the {header.size} "
            "it was preallocated and synced at: its end was lost (media damage or truncation), "
            "and committed records may have gone with it"
        )
    scan = SegmentScan(
        name,
        header,
        checkpoint,
        valid_end=second[1],
        file_bytes=len(data),
        checkpoint_end=second[1],
    )
    for offset, end, rtype, payload in records:
        if rtype != fmt.RecordType.COMMIT:
            raise CorruptionError(
                f"journal segment {name}, offset {offset}: unexpected record type {rtype}"
            )
        commit = _decode(name, (offset, end, rtype, payload), fmt.decode_commit)
        if commit.lsn != scan.next_lsn:
            raise CorruptionError(
                f"journal segment {name}, offset {offset}: LSN {commit.lsn}, "
                f"expected {scan.next_lsn}"
            )
        scan.commits.append(commit)
        scan.valid_end = end
    if scan.valid_end < len(data):
        later = _valid_record_after(data, scan.valid_end, header.salt, scan.next_lsn - 1)
        if later is not None:
            raise CorruptionError(
                f"journal segment {name}, offset {scan.valid_end}: damaged record followed by "
                f"a valid one at offset {later}"
            )
        # Zeros after the last record are a preallocated segment's free space, not a tear.
        scan.torn_bytes = max(0, _end_of_data(data, scan.valid_end) - scan.valid_end)
    return scan


_ZEROS = bytes(1 << 16)


def _end_of_data(data: bytes, start: int) -> int:
    """The offset just past the last non-zero byte at or after ``start`` (``start`` if none).
    Skips zeros 64 KiB at a time: a preallocated segment is mostly zeros, which a byte-wise
    rstrip would walk at every open (benchmarks/RESULTS.md)."""
    end, step = len(data), len(_ZEROS)
    while end - start >= step and data[end - step : end] == _ZEROS:
        end -= step
    return start + len(data[start:end].rstrip(b"\0"))


def _decode(name: str, record: _Record, decode: Callable[[memoryview], T]) -> T:
    try:
        return decode(record[3])
    except fmt.FormatError as exc:
        raise CorruptionError(f"journal segment {name}, offset {record[0]}: {exc}") from exc


def _torn_or_corrupt(name: str, data: bytes, what: str, offset: int) -> NoReturn:
    if len(data) <= FRESH_SEGMENT_SIZE:
        raise TornSegment(f"journal segment {name}: {what} incomplete ({len(data)} bytes)")
    raise CorruptionError(f"journal segment {name}, offset {offset}: {what} is damaged")


@dataclass
class Tail:
    """What ``read_tail`` found after an offset of the live segment."""

    commits: list[fmt.Commit]
    end: int  # offset just past the last good record
    torn_bytes: int  # non-zero bytes after ``end``: a torn record (or damage) to clear


def read_tail(
    read: Callable[[int, int], bytes], name: str, offset: int, salt: int, next_lsn: int
) -> Tail:
    """The COMMIT records that follow ``offset`` (the end of the last record this process
    knows of) in the live segment, read with ``read(size, offset)``: those appended by
    other processes since (``_shared.py``). Raises CorruptionError on a record out of order."""
    # Most reads find nothing new (no other process committed since): 4 KiB of zeros, where
    # the first 64 KiB read and scanned cost a shared store's every group more CPU.
    size = 1 << 12
    limit = fmt.MAX_PAYLOAD + 2 * fmt.HEADER_SIZE + (1 << 16)
    done: list[fmt.Commit] = []  # from the reads before, which records filled exactly
    while True:
        data = read(size, offset)
        commits: list[fmt.Commit] = []
        end, lsn = 0, next_lsn
        for pos, stop, rtype, payload in _records(data, 0, salt):
            if rtype != fmt.RecordType.COMMIT:
                raise CorruptionError(
                    f"journal segment {name}, offset {offset + pos}: unexpected record {rtype}"
                )
            commit = _decode(name, (offset + pos, stop, rtype, payload), fmt.decode_commit)
            if commit.lsn != lsn:
                raise CorruptionError(
                    f"journal segment {name}, offset {offset + pos}: LSN {commit.lsn}, "
                    f"expected {lsn}"
                )
            commits.append(commit)
            end, lsn = stop, lsn + 1
        rest = _end_of_data(data, end) - end
        if rest and len(data) == size and size < limit:
            size *= 4  # a record longer than what was read, or a torn one: read on
            continue
        if commits and not rest and end == len(data) == size:
            # The records end exactly where the read did: more may follow, read on.
            done += commits
            offset, next_lsn = offset + end, lsn
            continue
        return Tail(done + commits, offset + end, rest)
