"""Several processes on one store: the shared header, process slots, the commit lock.

docs/commit-protocol.md, section 7. Every process that opens a store read-write takes the
commit lock (``.walstore/LOCK``, flock) for each group it commits, each checkpoint and its
open and close, and holds it from validation through append, fdatasync and apply. While it
holds it, it may trust what it reads here:

1. ``.walstore/shared`` (``SharedHeader``) names the live segment and the last LSN applied to
   the files, and is rewritten by the holder after every apply and checkpoint. It is a hint
   that never needs an fsync: the journal says what committed. A header from another boot
   (``boot_id``) or one that does not parse is ignored, and the opener recovers in full.
2. A process holds ``.walstore/procs/<slot>`` (flock) for its life. A slot file whose lock can
   be taken belongs to a dead process: its staging is removed by the next opener.
3. Txids are ``slot << SLOT_SHIFT | n``: unique across processes, as are staging names.
4. Records after the holder's last LSN were appended by others: the holder catches up on them
   (``Peers.catch_up``) before it validates. Those above the header's applied LSN were
   committed by a process that died before it applied them: the holder applies them, as
   recovery would.
"""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from dataclasses import dataclass

from . import _journal_format as fmt
from ._conflicts import GroupEffects
from ._fs import FileSystem, MappedFile, write_all
from ._paths import parent, parents

SLOT_SHIFT = 40  # a process's txids: slot << 40 | 1, 2, ...; 2**40 per process lifetime
_MAGIC = b"WSSHARE1"
_HEADER = struct.Struct("<8s16sQQQQ")  # magic, boot id, segment, applied, next slot, pid
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _CRC.size


def boot_id() -> bytes:
    """This boot's id: a header written before a reboot describes files a power loss may
    have rolled back, so it must not be trusted."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return uuid.UUID(f.read().decode().strip()).bytes
    except (OSError, ValueError):
        return bytes(16)  # no boot id: every opener that finds no live peer recovers anyway


@dataclass(frozen=True)
class SharedHeader:
    boot: bytes
    segment_lsn: int  # first LSN of the live segment (its CHECKPOINT's)
    applied_lsn: int  # every COMMIT up to here is applied to the files
    next_slot: int  # the slot the next process to open takes
    holder_pid: int  # the process that wrote it last (named when a lock wait times out)

    def encode(self) -> bytes:
        body = _HEADER.pack(
            _MAGIC,
            self.boot,
            self.segment_lsn,
            self.applied_lsn,
            self.next_slot,
            self.holder_pid,
        )
        return body + _CRC.pack(zlib.crc32(body))

    @staticmethod
    def decode(data: bytes) -> SharedHeader | None:
        """The header, or None if ``data`` is not a whole, valid one."""
        if len(data) < HEADER_SIZE:
            return None
        body = data[: _HEADER.size]
        if _CRC.unpack_from(data, _HEADER.size)[0] != zlib.crc32(body):
            return None
        magic, boot, seg, applied, slot, pid = _HEADER.unpack(body)
        if magic != _MAGIC:
            return None
        return SharedHeader(boot, seg, applied, slot, pid)

    def advanced(
        self,
        *,
        segment_lsn: int | None = None,
        applied_lsn: int | None = None,
        next_slot: int | None = None,
    ) -> SharedHeader:
        """This header as the calling process rewrites it."""
        return SharedHeader(
            self.boot,
            self.segment_lsn if segment_lsn is None else segment_lsn,
            self.applied_lsn if applied_lsn is None else applied_lsn,
            self.next_slot if next_slot is None else next_slot,
            os.getpid(),
        )


class SharedFile:
    """``.walstore/shared``, kept open and mapped. ``read`` makes no system call, so it may
    run on the event loop, and outside the commit lock (a read torn by a concurrent write
    fails its CRC and is read again); ``write`` requires the lock."""

    def __init__(self, fs: FileSystem, path: str) -> None:
        self.fs = fs
        self.fd = fs.open(path, create=True)
        self._map: MappedFile | None = None
        self._raw = b""  # the bytes of the last header read, and what they decoded to
        self._last: SharedHeader | None = None
        try:
            if len(fs.pread(self.fd, HEADER_SIZE, 0)) < HEADER_SIZE:  # new: make it whole
                write_all(fs, self.fd, bytes(HEADER_SIZE), 0)
            self._map = fs.map_file(self.fd, HEADER_SIZE)
        except BaseException:
            fs.close(self.fd)
            raise

    def read(self) -> SharedHeader | None:
        assert self._map is not None
        for _ in range(3):
            raw = self._map.read()
            if raw == self._raw:  # unchanged since the last read (read before every read)
                return self._last
            header = SharedHeader.decode(raw)
            if header is not None:
                self._raw, self._last = raw, header
                return header
        return None

    def write(self, header: SharedHeader) -> None:
        raw = header.encode()
        self._raw, self._last = b"", None  # unknown if the write fails
        write_all(self.fs, self.fd, raw, 0)
        self._raw, self._last = raw, header  # the next read finds it unchanged: no decode

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self.fs.close(self.fd)


def slot_of(staging_name: str) -> int | None:
    """The slot of the process that staged ``staging_name`` (``<txid>`` or ``<txid>-...``)."""
    head = staging_name.split("-", 1)[0].split(".", 1)[0]
    return int(head) >> SLOT_SHIFT if head.isdigit() else None


def effects_of(commit: fmt.Commit) -> GroupEffects:
    """What a COMMIT record changed, for the conflict index of a process that did not
    validate it. Conservative where the record cannot tell: a file op may have made the
    directories on its way, so each of them, and each listing above, counts as changed."""
    out = GroupEffects()
    for tx in commit.txs:
        for op in tx.ops:
            if isinstance(op, fmt.Delete):
                out.modified.add(op.path)
                out.listing_changed.add(parent(op.path))
                continue
            out.listing_changed.add(parent(op.path))
            if isinstance(op, fmt.DeleteDir | fmt.ReplaceDir):
                out.trees.add(op.path)
            else:
                out.modified.add(op.path)
            for anc in parents(op.path):
                out.modified.add(anc)
                out.listing_changed.add(parent(anc))
    return out


def touched(commit: fmt.Commit) -> tuple[set[str], set[str]]:
    """(files, directory trees) a COMMIT record changed: what a read cache must drop."""
    files: set[str] = set()
    trees: set[str] = set()
    for tx in commit.txs:
        for op in tx.ops:
            (trees if isinstance(op, fmt.DeleteDir | fmt.ReplaceDir) else files).add(op.path)
    return files, trees


def staged_dirs(commit: fmt.Commit) -> set[str]:
    """The ``staging/`` directories (``<txid>``) that a record's staged values are in."""
    out: set[str] = set()
    for tx in commit.txs:
        for op in tx.ops:
            for e in op.entries if isinstance(op, fmt.ReplaceDir) else (op,):
                if isinstance(e, fmt.PutStaged):
                    out.add(e.staged.split("/", 1)[0])
    return out
