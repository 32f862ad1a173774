"""The file-system seam: every file syscall walstore makes goes through a ``FileSystem``.

``OsFileSystem`` is the real one and the only code in walstore that calls ``os.*`` on files.
``walstore.testing.MemoryFileSystem`` is a simulated one that can crash at the Nth call, lose
unsynced writes in a simulated power cut and raise chosen errors (LevelDB's ``Env``/memenv).

All methods are blocking; the store calls them from worker threads. Paths are absolute strings.

Where the rest lives: ``_os_fs.py`` (``OsFileSystem``: the OS calls), ``_confine.py`` (how
it resolves paths beneath a store's root), ``_writers.py`` (its async stream writers),
``_libc.py`` (the Linux calls ``os`` lacks); ``_memory_fs.py`` (``MemoryFileSystem``).
"""

from __future__ import annotations

import errno
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

Kind = Literal["file", "dir", "symlink", "other"]


@dataclass(frozen=True)
class FileStat:
    """What ``lstat`` reports: the entry's kind, its size in bytes, its mtime, and the device
    (file system) it is on."""

    kind: Kind
    size: int
    mtime_ns: int
    dev: int = 0


class NotRegularFileError(OSError):
    """``read_file`` of something that is not a regular file: a FIFO, a device, a socket or a
    directory (errno EINVAL, or EISDIR for a directory). Nothing was read from it."""


def symlink_on_path(path: str) -> OSError:
    """The error for a symlink met while resolving ``path`` under a confined root."""
    return OSError(errno.ELOOP, "a symlink on the way (walstore never follows one)", path)


class FileSystem(Protocol):
    """The operations walstore needs; each call is one step a crash test can stop at."""

    calls: Counter[str]

    def confine(self, root: str) -> None:
        """From now on resolve every path under ``root`` (a directory) beneath it, never
        through a symlink (the module's resolution rule). Paths elsewhere are unaffected."""

    def release(self, root: str) -> None:
        """Undo ``confine(root)`` (the store closed)."""

    def hold(self) -> AbstractContextManager[None]:
        """A stretch of calls from this thread (one commit group, under the store's commit
        lock) in which a directory under a confined root may be resolved once and its
        descriptor kept, until the block ends or this thread renames or removes it. (A
        FileSystem may keep descriptors for later blocks, if each is checked again at its
        first use in a block: it resolves beneath the root as the path is then.)"""

    def open(self, path: str, *, create: bool = False, truncate: bool = False) -> int:
        """Open for reading and writing; returns a handle."""

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        """Write at ``offset``; may write fewer bytes than given (a short write)."""

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        """Read at most ``size`` bytes at ``offset``: fewer at the end of the file (and, on
        some file systems, where a read was cut short: callers must not take fewer for the
        end)."""

    def truncate(self, fd: int, size: int) -> None: ...

    def fsync(self, fd: int) -> None: ...

    def fdatasync(self, fd: int) -> None: ...

    def close(self, fd: int) -> None: ...

    def read_file(self, path: str) -> bytes:
        """Read a whole regular file; anything else raises ``NotRegularFileError`` without
        being read or waited on. Under a confined root a symlink raises ELOOP; elsewhere a
        final symlink is followed."""

    def rename(self, src: str, dst: str) -> None: ...

    def exchange(self, a: str, b: str) -> None:
        """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). Raises OSError with
        errno ENOSYS, EINVAL or ENOTSUP where the system or file system cannot."""

    def link(self, src: str, dst: str) -> None: ...

    def unlink(self, path: str) -> None: ...

    def mkdir(self, path: str) -> None: ...

    def rmdir(self, path: str) -> None: ...

    def listdir(self, path: str) -> list[str]: ...

    def lstat(self, path: str) -> FileStat | None:
        """Stat without following a final symlink; None when nothing is there."""

    def realpath(self, path: str) -> str: ...

    def fsync_dir(self, path: str) -> None:
        """Make the directory's entries (creations, renames, unlinks) durable."""

    def syncfs(self, fd: int) -> None:
        """Make everything written on the file system that holds ``fd``'s file durable: every
        file's content and every directory entry (Linux ``syncfs(2)``). A write-back error
        since ``fd`` was opened is raised, as ``fsync`` raises its file's. Raises OSError
        ENOSYS where the system cannot report such errors (before Linux 5.8)."""

    def free_space(self, path: str) -> tuple[int, int]:
        """(bytes an unprivileged process may still allocate, total bytes) of the file system
        ``path`` is on (``statvfs``: ``f_bavail`` and ``f_blocks`` times ``f_frsize``)."""

    def path_limits(self, path: str) -> tuple[int, int]:
        """(NAME_MAX, PATH_MAX) of the file system ``path`` is on, in bytes (PATH_MAX with
        its terminating NUL, as ``pathconf`` reports it). Optional: a FileSystem without it
        gets 255 and 4096."""

    def mount_points(self, path: str) -> list[str]:
        """The mount points strictly below the directory ``path`` (a real path), from the
        system's mount table; none where the system has no such table."""

    def lock(self, path: str, *, wait: bool = False) -> int | None:
        """Take an exclusive advisory lock on ``path`` (created if missing): without
        ``wait``, only if it is free. Returns a handle that holds the lock (``unlock``
        releases it), or None when another open handle holds it."""

    def unlock(self, fd: int) -> None: ...

    def flock(self, fd: int) -> bool:
        """Take the exclusive advisory lock of a handle from ``open`` without waiting, as
        ``lock`` does for a path: False when another handle holds it. For a lock taken and
        given up often (the commit lock), where ``lock`` and ``unlock`` would open and
        close the file each time."""

    def funlock(self, fd: int) -> None:
        """Release the lock ``flock`` took; the handle stays open."""

    def map_file(self, fd: int, size: int) -> MappedFile:
        """Map the first ``size`` bytes of an open file, for reads that make no system call
        (the shared header, read on the event loop). The file must be that long."""

    async def open_writer(self, path: str) -> AsyncWriter:
        """Create (truncate) ``path`` for a streamed write from async code."""


class MappedFile(Protocol):
    """A file mapped into memory: what other processes write to it shows at once."""

    def read(self) -> bytes: ...

    def close(self) -> None: ...


class AsyncWriter(Protocol):
    """A file being streamed from async code; each call is one worker-thread hop."""

    async def write(self, data: bytes | memoryview) -> None: ...

    async def sync(self) -> None: ...

    async def aclose(self) -> None: ...


def byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """``data`` as a view of unsigned bytes, so that ``len`` and slices count bytes
    (``nbytes``): a view of 4-byte ints has a quarter as many items as bytes, and sizing by
    items journalled a quarter of the size."""
    view = memoryview(data)
    if view.format == "B" and view.ndim == 1 and view.c_contiguous:
        return view
    return view.cast("B") if view.c_contiguous else memoryview(view.tobytes())


def write_all(fs: FileSystem, fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite until all of ``data`` is written (a short write is not an error)."""
    view = byte_view(data)
    done = 0
    while done < len(view):
        n = fs.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        done += n
