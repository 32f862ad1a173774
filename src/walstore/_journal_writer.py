"""JournalWriter: append records to the live segment and make them durable.

The journal is one live segment at a time: ``HEADER CHECKPOINT COMMIT*``. A checkpoint starts a
new segment and the caller then retires the older one. The retired segment is kept, renamed
``journal/spare``, and the next checkpoint recycles its blocks (``recycle``: overwritten in
place, never allocated again), as PostgreSQL recycles WAL segments: so a checkpoint, and
recovery, need no free space on the disk once a store has a spare. Without one (a new store, a
store written before version 2, a spare lost), ``create`` allocates a new segment.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable

from . import _journal_format as fmt
from ._fs import FileSystem, write_all
from ._journal_reader import SegmentScan

PREALLOCATING = ".new"  # suffix of a segment being zero-filled; never parsed, removed on open
SPARE = "spare"  # journal/spare: a retired segment kept for the next checkpoint to recycle
MIN_SPARE = 4096  # a smaller spare is not worth recycling (nor is one of a store without sync)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class FailStop(OSError):
    """An error after which the store must fail, whatever its errno: an fsync failed (never
    retried: a retried fsync can report success for data the kernel dropped), or a segment
    left half-made under its name could not be removed again."""


def synced(call: Callable[[], None]) -> None:
    """Run a sync; its OSError becomes FailStop (same errno), so that callers tell it from an
    error that may be retried (ENOSPC while allocating a segment)."""
    try:
        call()
    except FailStop:
        raise
    except OSError as exc:
        raise FailStop(exc.errno, f"sync failed: {exc.strerror or exc}", exc.filename) from exc


def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:016d}.wal"


def segment_lsn(name: str) -> int | None:
    """The first LSN a segment file name claims, or None if it is not a segment name."""
    stem, dot, ext = name.partition(".")
    if dot and ext == "wal" and len(stem) == 16 and stem.isdigit():
        return int(stem)
    return None


class AppendFailed(Exception):
    """An append failed and the journal could not be cut back to its last good record.

    The live segment may now hold a partial record: the store must stop writing."""


class JournalWriter:
    """Appends COMMIT records to the live segment. Requires: caller holds the commit lock."""

    def __init__(
        self,
        fs: FileSystem,
        path: str,
        fd: int,
        *,
        salt: int,
        offset: int,
        checkpoint_lsn: int,
        next_lsn: int,
        size: int = 0,
    ) -> None:
        self.fs = fs
        self.path = path
        self.fd = fd
        self.salt = salt
        self.offset = offset  # end of the last good record
        self.synced = offset  # end of the records a sync (this process's or theirs) covered
        self.next_lsn = next_lsn
        self.checkpoint_lsn = checkpoint_lsn  # LSN of the CHECKPOINT that opens the segment
        self.bytes_written = 0
        self.size = size  # the size the header declares it was zero-filled to (0: none)
        self.high = offset  # past every byte ever written: zeros follow (to recycle it)

    @classmethod
    def resume(
        cls, fs: FileSystem, path: str, fd: int, scan: SegmentScan, *, offset: int, next_lsn: int
    ) -> JournalWriter:
        """A writer for the existing segment ``scan`` (open as ``fd``), appending at
        ``offset``, where a record with ``next_lsn`` goes next."""
        return cls(
            fs,
            path,
            fd,
            salt=scan.header.salt,
            offset=offset,
            checkpoint_lsn=scan.checkpoint.lsn,
            next_lsn=next_lsn,
            size=scan.header.size,
        )

    @classmethod
    def create(
        cls,
        fs: FileSystem,
        journal_dir: str,
        checkpoint: fmt.Checkpoint,
        *,
        sync: bool,
        preallocate: int = 0,
    ) -> JournalWriter:
        """Create a new segment holding HEADER and ``checkpoint``; with ``sync``, fsync it and
        the journal directory so the segment survives power loss before anything relies on it.

        With ``preallocate``, the segment is zero-filled to that size (zeros written, not
        fallocated), so appends overwrite allocated blocks and their fdatasync need not commit
        file-system metadata (benchmarks/RESULTS.md). It is then written and synced under a
        temporary name and renamed into place, so a segment under its
        real name is never a half-written preallocation."""
        salt = secrets.randbits(32)
        name = segment_name(checkpoint.lsn)
        path = os.path.join(journal_dir, name)
        data = _start(checkpoint, salt, preallocate)
        used = len(data)
        staged = preallocate > used
        if staged:
            data += bytes(preallocate - used)
        else:
            data = _start(checkpoint, salt, 0)  # too small to zero-fill: no size declared
            used = len(data)
        at = os.path.join(journal_dir, name + PREALLOCATING) if staged else path
        fd = fs.open(at, create=True, truncate=True)
        try:
            write_all(fs, fd, data, 0)
            if sync:
                synced(lambda: fs.fsync(fd))
            if staged:
                fs.rename(at, path)
            if sync:
                synced(lambda: fs.fsync_dir(journal_dir))
        except BaseException as exc:
            with contextlib.suppress(OSError):  # the error that matters is the first one
                fs.close(fd)
            if isinstance(exc, OSError) and not isinstance(exc, FailStop):
                _unmake(fs, at, real=not staged, cause=exc)
            raise
        return cls(
            fs,
            path,
            fd,
            salt=salt,
            offset=used,
            checkpoint_lsn=checkpoint.lsn,
            next_lsn=checkpoint.lsn + 1,
            size=preallocate if staged else 0,
        )

    @classmethod
    def recycle(
        cls,
        fs: FileSystem,
        journal_dir: str,
        checkpoint: fmt.Checkpoint,
        *,
        sync: bool,
        spare_size: int,
        preallocate: int,
        dirty_end: int | None,
    ) -> JournalWriter:
        """Make ``journal/spare`` (``spare_size`` bytes, allocated) the new segment: HEADER and
        ``checkpoint`` written over its start, zeros over what its old records used (up to
        ``dirty_end``; all of it when None: beyond that it holds the zeros it was filled with),
        cut to ``preallocate`` if larger, synced, then renamed to its segment name and the
        journal directory synced. No block is allocated: this works on a full disk. Until the
        rename, ``spare`` is not a segment name, so a crash half-way leaves the old segment
        live and the spare to be recycled again."""
        salt = secrets.randbits(32)
        size = min(spare_size, preallocate)
        head = _start(checkpoint, salt, size)
        end = size if dirty_end is None else max(len(head), min(dirty_end, size))
        spare = os.path.join(journal_dir, SPARE)
        path = os.path.join(journal_dir, segment_name(checkpoint.lsn))
        fd = fs.open(spare)
        try:
            write_all(fs, fd, head + bytes(end - len(head)), 0)
            if spare_size > size:
                fs.truncate(fd, size)  # the spare had grown past its preallocation
            if sync:
                synced(lambda: fs.fsync(fd))
            fs.rename(spare, path)
            if sync:
                synced(lambda: fs.fsync_dir(journal_dir))
        except BaseException:
            with contextlib.suppress(OSError):  # the error that matters is the first one
                fs.close(fd)
            raise
        return cls(
            fs,
            path,
            fd,
            salt=salt,
            offset=len(head),
            checkpoint_lsn=checkpoint.lsn,
            next_lsn=checkpoint.lsn + 1,
            size=size,
        )

    def append(self, rtype: fmt.RecordType, payload: bytes) -> None:
        """Append one record in one write. On an error the segment is cut back to its last good
        record and the error propagates; if that fails too, AppendFailed."""
        record = fmt.encode_record(rtype, payload, self.salt)
        end = self.offset + len(record)
        self.high = max(self.high, end)
        try:
            write_all(self.fs, self.fd, record, self.offset)
        except OSError as exc:
            try:
                self._cut_back(end)
            except OSError as exc2:
                raise AppendFailed(f"cannot cut back the journal after {exc}: {exc2}") from exc
            raise
        self.offset += len(record)
        self.bytes_written += len(record)

    def _cut_back(self, end: int) -> None:
        """Undo a failed append of the bytes up to ``end``. Never below the declared size: a
        segment shorter than that is media damage to the reader. Inside it, the bytes are
        zeroed again, as they were preallocated."""
        if self.offset < self.size:
            write_all(self.fs, self.fd, bytes(min(end, self.size) - self.offset), self.offset)
        if end > self.size:
            self.fs.truncate(self.fd, max(self.offset, self.size))

    def sync(self) -> None:
        """fdatasync the segment. Raises OSError; the caller must then fail the store, never
        retry (a retried fsync can report success for data the kernel already dropped)."""
        end = self.offset
        self.fdatasync_at(end)

    def fdatasync_at(self, end: int) -> None:
        self.fs.fdatasync(self.fd)
        self.synced = end

    def unappend(self) -> None:
        """After a failed sync: zero the records appended since the last good one, as they
        were preallocated (in the page cache, which every process reads: none takes them for
        committed). Raises OSError, the records left as they were, if that fails."""
        end, self.offset = self.offset, self.synced
        try:
            self._cut_back(end)
        except BaseException:
            self.offset = end
            raise

    def close(self) -> None:
        self.fs.close(self.fd)


def _unmake(fs: FileSystem, at: str, *, real: bool, cause: OSError) -> None:
    """Remove a segment whose creation failed (ENOSPC, say). Under a temporary name that only
    gives the space back; under its real name it must go, or recovery would take it for the
    live segment, or for one cut short, while the old one goes on taking commits."""
    try:
        fs.unlink(at)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if real:
            raise FailStop(exc.errno, f"cannot remove a half-made segment: {exc}", at) from cause


def _start(checkpoint: fmt.Checkpoint, salt: int, size: int) -> bytes:
    """HEADER (declaring ``size``; none if 0) and CHECKPOINT: how every segment begins."""
    header = fmt.encode_header(fmt.SegmentHeader(checkpoint.lsn, salt, size))
    cp = fmt.encode_record(fmt.RecordType.CHECKPOINT, fmt.encode_checkpoint(checkpoint), salt)
    return header + cp


def new_segment(
    fs: FileSystem,
    journal_dir: str,
    checkpoint: fmt.Checkpoint,
    *,
    sync: bool,
    preallocate: int,
    dirty_end: int | None = None,
) -> JournalWriter:
    """Checkpoint step 2 (and recovery's): the segment that ``checkpoint`` opens. Recycles
    ``journal/spare`` if there is one (``dirty_end``: how far its old records reach, None if
    unknown), else allocates one zero-filled to ``preallocate``; if that finds no space
    (ENOSPC, EDQUOT), one without preallocation, which needs a block. Raises OSError."""
    if preallocate:
        st = fs.lstat(os.path.join(journal_dir, SPARE))
        if st is not None and st.kind == "file" and st.size >= MIN_SPARE:
            return JournalWriter.recycle(
                fs,
                journal_dir,
                checkpoint,
                sync=sync,
                spare_size=st.size,
                preallocate=preallocate,
                dirty_end=dirty_end,
            )
    try:
        return JournalWriter.create(fs, journal_dir, checkpoint, sync=sync, preallocate=preallocate)
    except OSError as exc:
        if not preallocate or isinstance(exc, FailStop) or exc.errno not in NO_SPACE:
            raise
    return JournalWriter.create(fs, journal_dir, checkpoint, sync=sync, preallocate=0)


def retire(fs: FileSystem, journal_dir: str, path: str, *, keep: bool) -> bool:
    """Checkpoint step 3: the segment at ``path`` is no longer needed. With ``keep`` (the store
    preallocates), it becomes ``journal/spare`` unless there is one or it is too small to be
    worth recycling; else it is unlinked. Returns whether it was kept."""
    spare = os.path.join(journal_dir, SPARE)
    if keep and fs.lstat(spare) is None:
        st = fs.lstat(path)
        if st is not None and st.kind == "file" and st.size >= MIN_SPARE:
            fs.rename(path, spare)  # unsynced: if lost, recovery finds an old segment
            return True
    with contextlib.suppress(FileNotFoundError):  # gone: a retry after its rename happened
        fs.unlink(path)
    return False
