"""Journal record layout: encode and decode, no I/O.

See ../../docs/journal-format.md for the byte layout, a worked example and the reasons.

    record  := length: u32 | crc: u32 | type: u8 | payload: bytes[length]
    crc     := crc32(type || payload), seeded with the segment's salt (0 for HEADER)

All integers are little-endian.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

HEADER_SIZE = 9  # length u32, crc u32, type u8
MAX_PAYLOAD = 1 << 31  # a length above this cannot be ours: the header itself is damaged
MAGIC = b"WALSTORE"
VERSION = 1  # a segment without a declared size (not preallocated, or written before version 2)
VERSION_SIZED = 2  # the header also declares the size the segment was preallocated to

_HEAD = struct.Struct("<IIB")
_SEGMENT = struct.Struct("<8sHQI")  # magic, version, first_lsn, salt
_SIZE = struct.Struct("<Q")  # version 2: the preallocated size, after the version 1 fields
_CHECKPOINT = struct.Struct("<QQ")  # lsn, next_txid
_GROUP = struct.Struct("<QI")  # lsn, number of transactions
_TX = struct.Struct("<QI")  # txid, number of ops
_OP = struct.Struct("<BH")  # op kind, path length
_U32 = struct.Struct("<I")
_STAGED = struct.Struct("<QI")  # size, crc32


class RecordType(enum.IntEnum):
    """Record types. 0 is reserved: a zero-filled region (a preallocated or torn tail) never
    parses as a record, as LevelDB reserves kZeroType."""

    ZERO = 0
    HEADER = 1  # first record of every segment: magic, version, first LSN, salt
    CHECKPOINT = 2  # second record of every segment: all earlier commits are durable in place
    COMMIT = 3  # one commit group: its transactions' ops; its fdatasync is the commit point


class OpKind(enum.IntEnum):
    """Operation kinds inside a COMMIT record (0 reserved)."""

    PUT = 1  # small value inline
    PUT_STAGED = 2  # large value staged under .walstore/staging/, by name, size and crc
    DELETE = 3
    DELETE_DIR = 4  # remove a directory tree
    REPLACE_DIR = 5  # replace a directory by one built from entries (PUT / PUT_STAGED ops)


@dataclass(frozen=True, slots=True)
class Put:
    """Write ``data`` to ``path`` (created or replaced)."""

    path: str
    data: bytes


@dataclass(frozen=True, slots=True)
class PutStaged:
    """Rename the staged file ``staged`` (relative to the staging directory) onto ``path``."""

    path: str
    staged: str
    size: int
    crc: int


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove the file ``path`` (nothing to do if it is already gone)."""

    path: str


@dataclass(frozen=True, slots=True)
class DeleteDir:
    """Remove the directory tree ``path`` (nothing to do if it is already gone)."""

    path: str


@dataclass(frozen=True, slots=True)
class ReplaceDir:
    """Replace the directory ``path`` as a whole by one holding ``entries`` (paths relative
    to ``path``); created if missing."""

    path: str
    entries: tuple[Put | PutStaged, ...]


Op = Put | PutStaged | Delete | DeleteDir | ReplaceDir


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    first_lsn: int
    salt: int
    # The size the segment was zero-filled to before it got its name (version 2); 0: none
    # declared (version 1). A segment shorter than this has lost synced bytes.
    size: int = 0


@dataclass(frozen=True, slots=True)
class TxRecord:
    """One transaction inside a COMMIT record."""

    txid: int
    ops: tuple[Op, ...]


@dataclass(frozen=True, slots=True)
class Commit:
    """A COMMIT record: the transactions of one commit group, in commit order."""

    lsn: int
    txs: tuple[TxRecord, ...]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A CHECKPOINT record: every COMMIT with a smaller LSN is applied and durable."""

    lsn: int
    next_txid: int  # txids below this were handed out before the checkpoint


class FormatError(ValueError):
    """A payload whose CRC matched does not decode: the writer had a bug or the file is not
    ours. Readers turn it into CorruptionError."""


def crc_of(rtype: int, payload: bytes | memoryview, salt: int) -> int:
    return zlib.crc32(payload, zlib.crc32(bytes((rtype,)), salt))


def encode_record(rtype: RecordType, payload: bytes, salt: int) -> bytes:
    return _HEAD.pack(len(payload), crc_of(rtype, payload, salt), rtype) + payload


def decode_head(buf: bytes | memoryview, offset: int) -> tuple[int, int, int]:
    """Return (length, crc, type) of the record header at ``offset``."""
    length, crc, rtype = _HEAD.unpack_from(buf, offset)
    return length, crc, rtype


def encode_header(header: SegmentHeader) -> bytes:
    """Version 1 (22 bytes) without a size, version 2 (30 bytes) with one."""
    version = VERSION_SIZED if header.size else VERSION
    payload = _SEGMENT.pack(MAGIC, version, header.first_lsn, header.salt)
    if header.size:
        payload += _SIZE.pack(header.size)
    return encode_record(RecordType.HEADER, payload, 0)


def decode_header(payload: bytes | memoryview) -> SegmentHeader:
    if len(payload) not in (_SEGMENT.size, _SEGMENT.size + _SIZE.size):
        raise FormatError(f"segment header is {len(payload)} bytes, expected {_SEGMENT.size}")
    magic, version, first_lsn, salt = _SEGMENT.unpack_from(payload)
    if magic != MAGIC:
        raise FormatError("not a walstore journal segment (bad magic)")
    if version not in (VERSION, VERSION_SIZED):
        raise FormatError(
            f"journal format version {version} is not supported (this is {VERSION_SIZED})"
        )
    sized = len(payload) > _SEGMENT.size
    if sized != (version == VERSION_SIZED):
        raise FormatError(f"segment header of version {version} is {len(payload)} bytes")
    size = _SIZE.unpack_from(payload, _SEGMENT.size)[0] if sized else 0
    if sized and not size:
        raise FormatError("segment header of version 2 declares size 0")
    return SegmentHeader(first_lsn, salt, size)


def encode_checkpoint(cp: Checkpoint) -> bytes:
    return _CHECKPOINT.pack(cp.lsn, cp.next_txid)


def decode_checkpoint(payload: bytes | memoryview) -> Checkpoint:
    if len(payload) != _CHECKPOINT.size:
        raise FormatError(f"checkpoint is {len(payload)} bytes, expected {_CHECKPOINT.size}")
    return Checkpoint(*_CHECKPOINT.unpack(payload))


def _encode_str(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def payload_lsn(payload: bytes | memoryview) -> int:
    """The LSN that opens every CHECKPOINT and COMMIT payload."""
    if len(payload) < 8:
        raise FormatError("record too short to hold its LSN")
    return int.from_bytes(payload[:8], "little")


def encode_commit(commit: Commit) -> bytes:
    return encode_group(commit.lsn, [encode_tx(tx) for tx in commit.txs])


def encode_tx(tx: TxRecord) -> bytes:
    """One transaction's part of a COMMIT payload. Raises struct.error (or OverflowError) if
    a field does not fit its width: a path over 64 KiB, a count or size over 4 GiB."""
    parts = [_TX.pack(tx.txid, len(tx.ops))]
    _encode_ops(tx.ops, parts)
    return b"".join(parts)


def encode_group(lsn: int, txs: list[bytes]) -> bytes:
    """A COMMIT payload from its transactions' parts (``encode_tx``)."""
    return b"".join([_GROUP.pack(lsn, len(txs)), *txs])


GROUP_HEADER_SIZE = _GROUP.size


def _encode_ops(ops: tuple[Op, ...] | tuple[Put | PutStaged, ...], parts: list[bytes]) -> None:
    for op in ops:
        path = _encode_str(op.path)
        if isinstance(op, Put):
            parts += [_OP.pack(OpKind.PUT, len(path)), path, _U32.pack(len(op.data)), op.data]
        elif isinstance(op, PutStaged):
            name = _encode_str(op.staged)
            parts += [
                _OP.pack(OpKind.PUT_STAGED, len(path)),
                path,
                _U32.pack(len(name)),
                name,
                _STAGED.pack(op.size, op.crc),
            ]
        elif isinstance(op, Delete):
            parts += [_OP.pack(OpKind.DELETE, len(path)), path]
        elif isinstance(op, DeleteDir):
            parts += [_OP.pack(OpKind.DELETE_DIR, len(path)), path]
        else:
            parts += [_OP.pack(OpKind.REPLACE_DIR, len(path)), path, _U32.pack(len(op.entries))]
            _encode_ops(op.entries, parts)


def decode_commit(payload: bytes | memoryview) -> Commit:
    buf = bytes(payload)
    end = len(buf)
    if end < _GROUP.size:
        raise FormatError("commit record ends inside an operation")
    lsn, ntx = _GROUP.unpack_from(buf, 0)
    pos = _GROUP.size
    txs = []
    for _ in range(ntx):
        if pos + _TX.size > end:
            raise FormatError("commit record ends inside an operation")
        txid, nops = _TX.unpack_from(buf, pos)
        ops, pos = _decode_ops(buf, pos + _TX.size, nops)
        txs.append(TxRecord(txid, ops))
    if pos != end:
        raise FormatError("commit record has trailing bytes")
    return Commit(lsn, tuple(txs))


def _decode_ops(
    buf: bytes, pos: int, count: int, *, nested: bool = False
) -> tuple[tuple[Op, ...], int]:
    """``count`` ops from ``buf`` at ``pos``; returns them and the position after them. Plain
    offsets and ``unpack_from``, no cursor object: recovery decodes every op of the journal."""
    end = len(buf)
    ops: list[Op] = []
    op_unpack, u32_unpack, staged_unpack = _OP.unpack_from, _U32.unpack_from, _STAGED.unpack_from
    short = FormatError("commit record ends inside an operation")
    for _ in range(count):
        if pos + 3 > end:
            raise short
        kind, path_len = op_unpack(buf, pos)
        pos += 3
        if pos + path_len > end:
            raise short
        path = buf[pos : pos + path_len].decode("utf-8", "surrogateescape")
        pos += path_len
        if kind == OpKind.PUT:
            if pos + 4 > end:
                raise short
            (size,) = u32_unpack(buf, pos)
            pos += 4
            if pos + size > end:
                raise short
            ops.append(Put(path, buf[pos : pos + size]))
            pos += size
        elif kind == OpKind.PUT_STAGED:
            if pos + 4 > end:
                raise short
            (name_len,) = u32_unpack(buf, pos)
            pos += 4
            if pos + name_len + 12 > end:
                raise short
            name = buf[pos : pos + name_len].decode("utf-8", "surrogateescape")
            pos += name_len
            size, crc = staged_unpack(buf, pos)
            pos += 12
            ops.append(PutStaged(path, name, size, crc))
        elif nested:
            raise FormatError(f"operation kind {kind} inside a directory replacement")
        elif kind == OpKind.DELETE:
            ops.append(Delete(path))
        elif kind == OpKind.DELETE_DIR:
            ops.append(DeleteDir(path))
        elif kind == OpKind.REPLACE_DIR:
            if pos + 4 > end:
                raise short
            (n,) = u32_unpack(buf, pos)
            entries, pos = _decode_ops(buf, pos + 4, n, nested=True)
            ops.append(ReplaceDir(path, entries))  # type: ignore[arg-type]
        else:
            raise FormatError(f"unknown operation kind {kind}")
    return tuple(ops), pos
