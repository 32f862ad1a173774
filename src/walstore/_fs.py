"""The file-system seam: every file syscall walstore makes goes through a ``FileSystem``.

``OsFileSystem`` is the real one and the only code in walstore that calls ``os.*`` on files.
``walstore.testing.MemoryFileSystem`` is a simulated one that can crash at the Nth call, lose
unsynced writes in a simulated power cut and raise chosen errors (LevelDB's ``Env``/memenv).

All methods are blocking; the store calls them from worker threads. Paths are absolute strings.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import re
import stat as stat_mod
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiofiles
import anyio

Kind = Literal["file", "dir", "symlink", "other"]


@dataclass(frozen=True)
class FileStat:
    """What ``lstat`` reports: the entry's kind, its size in bytes, its mtime, and the device
    (file system) it is on."""

    kind: Kind
    size: int
    mtime_ns: int
    dev: int = 0


_BIG_READ = 1 << 30  # a read this long that comes back short may have hit Linux's cap


class FileSystem(Protocol):
    """The operations walstore needs; each call is one step a crash test can stop at."""

    calls: Counter[str]

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
        """Read a whole file, following symlinks."""

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

    def path_limits(self, path: str) -> tuple[int, int]:
        """(NAME_MAX, PATH_MAX) of the file system ``path`` is on, in bytes (PATH_MAX with
        its terminating NUL, as ``pathconf`` reports it). Optional: a FileSystem without it
        gets 255 and 4096."""

    def mount_points(self, path: str) -> list[str]:
        """The mount points strictly below the directory ``path`` (a real path), from the
        system's mount table; none where the system has no such table."""

    def lock(self, path: str) -> int | None:
        """Take an exclusive advisory lock on ``path`` (created if missing) without waiting.

        Returns a handle that holds the lock, or None when another process holds it."""

    def unlock(self, fd: int) -> None: ...

    async def open_writer(self, path: str) -> AsyncWriter:
        """Create (truncate) ``path`` for a streamed write from async code."""


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


def _kind(mode: int) -> Kind:
    if stat_mod.S_ISREG(mode):
        return "file"
    if stat_mod.S_ISDIR(mode):
        return "dir"
    if stat_mod.S_ISLNK(mode):
        return "symlink"
    return "other"


class OsFileSystem:
    """The real file system (Linux/POSIX)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        # Cap on how far journal segments are zero-filled ahead; None: about checkpoint_bytes.
        # 0 turns preallocation off (the benchmarks measure what it buys).
        self.journal_preallocation: int | None = None

    def open(self, path: str, *, create: bool = False, truncate: bool = False) -> int:
        self.calls["open"] += 1
        flags = os.O_RDWR | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
        if truncate:
            flags |= os.O_TRUNC
        return os.open(path, flags, 0o644)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        self.calls["pwrite"] += 1
        return os.pwrite(fd, data, offset)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        self.calls["pread"] += 1
        chunks = []
        while True:
            chunk = os.pread(fd, size, offset)
            chunks.append(chunk)
            # Short: the end of the file, or Linux's cap on one call (under 2 GiB; its exact
            # value depends on the page size), after which the rest is read.
            if len(chunk) == size or len(chunk) < min(size, _BIG_READ):
                break
            size -= len(chunk)
            offset += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def truncate(self, fd: int, size: int) -> None:
        self.calls["truncate"] += 1
        os.ftruncate(fd, size)

    def fsync(self, fd: int) -> None:
        self.calls["fsync"] += 1
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self.calls["fdatasync"] += 1
        os.fdatasync(fd)

    def close(self, fd: int) -> None:
        self.calls["close"] += 1
        os.close(fd)

    def read_file(self, path: str) -> bytes:
        self.calls["read_file"] += 1
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            chunks = []
            while True:
                chunk = os.read(fd, max(size, 65536))
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        self.calls["rename"] += 1
        os.rename(src, dst)

    def exchange(self, a: str, b: str) -> None:
        self.calls["exchange"] += 1
        if _renameat2 is None:
            raise OSError(errno.ENOSYS, "renameat2 is not available", a)
        if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), a, None, b)

    def link(self, src: str, dst: str) -> None:
        self.calls["link"] += 1
        os.link(src, dst, follow_symlinks=False)

    def unlink(self, path: str) -> None:
        self.calls["unlink"] += 1
        os.unlink(path)

    def mkdir(self, path: str) -> None:
        self.calls["mkdir"] += 1
        os.mkdir(path, 0o755)

    def rmdir(self, path: str) -> None:
        self.calls["rmdir"] += 1
        os.rmdir(path)

    def listdir(self, path: str) -> list[str]:
        self.calls["listdir"] += 1
        return os.listdir(path)

    def lstat(self, path: str) -> FileStat | None:
        self.calls["lstat"] += 1
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        return FileStat(_kind(st.st_mode), st.st_size, st.st_mtime_ns, st.st_dev)

    def realpath(self, path: str) -> str:
        self.calls["realpath"] += 1
        return os.path.realpath(path)

    def fsync_dir(self, path: str) -> None:
        self.calls["fsync_dir"] += 1
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def syncfs(self, fd: int) -> None:
        self.calls["syncfs"] += 1
        if _syncfs is None:
            raise OSError(errno.ENOSYS, "syncfs cannot report write-back errors here")
        if _syncfs(fd):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    def path_limits(self, path: str) -> tuple[int, int]:
        self.calls["path_limits"] += 1
        limits = []
        for name, default in (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)):
            try:
                value = os.pathconf(path, name)
            except (OSError, ValueError):
                value = -1
            limits.append(value if value > 0 else default)  # -1: "no limit", or not said
        return limits[0], limits[1]

    def mount_points(self, path: str) -> list[str]:
        self.calls["mount_points"] += 1
        try:
            with open("/proc/self/mountinfo", "rb") as fh:
                table = fh.read().decode("utf-8", "surrogateescape")
        except OSError:
            return []  # not Linux, or no /proc: nothing to check against
        below = path.rstrip("/") + "/"
        out = []
        for line in table.splitlines():
            fields = line.split(" ")
            if len(fields) > 4:  # the 5th is the mount point, with \ooo escapes
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if point.startswith(below) and len(point) > len(below):
                    out.append(point)
        return out

    def lock(self, path: str) -> int | None:
        self.calls["lock"] += 1
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        return fd

    def unlock(self, fd: int) -> None:
        self.calls["unlock"] += 1
        os.close(fd)  # closing the descriptor releases the flock

    async def open_writer(self, path: str) -> AsyncWriter:
        self.calls["open_writer"] += 1
        if on_asyncio():
            return _AiofilesWriter(await aiofiles.open(path, "wb", buffering=0), self)
        # aiofiles needs an asyncio loop; on trio the same calls go through anyio's threads.
        fd = await anyio.to_thread.run_sync(
            lambda: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        )
        return _ThreadWriter(fd, self)


class _AiofilesWriter:
    """Streams through aiofiles, one worker-thread hop per call."""

    def __init__(self, f: Any, fs: OsFileSystem) -> None:
        self._f = f
        self._fs = fs

    async def write(self, data: bytes | memoryview) -> None:
        self._fs.calls["stream_write"] += 1
        view = byte_view(data)
        while view:  # a raw (unbuffered) file may write short
            n = await self._f.write(view)
            view = view[n:]

    async def sync(self) -> None:
        self._fs.calls["fsync"] += 1
        await anyio.to_thread.run_sync(os.fsync, self._f.fileno())

    async def aclose(self) -> None:
        self._fs.calls["close"] += 1
        await self._f.close()


def on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _ThreadWriter:
    """The same as _AiofilesWriter, through anyio worker threads (for trio)."""

    def __init__(self, fd: int, fs: OsFileSystem) -> None:
        self._fd = fd
        self._fs = fs

    async def write(self, data: bytes | memoryview) -> None:
        self._fs.calls["stream_write"] += 1

        def run() -> None:
            view = byte_view(data)
            while view:
                view = view[os.write(self._fd, view) :]

        await anyio.to_thread.run_sync(run)

    async def sync(self) -> None:
        self._fs.calls["fsync"] += 1
        await anyio.to_thread.run_sync(os.fsync, self._fd)

    async def aclose(self) -> None:
        self._fs.calls["close"] += 1
        await anyio.to_thread.run_sync(os.close, self._fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        uname = os.uname()
        found = tuple(int(p) for p in uname.release.split("-")[0].split(".")[:2])
    except (AttributeError, ValueError):
        return False
    return uname.sysname == "Linux" and found >= (major, minor)


def _libc_function(name: str, *argtypes: Any) -> Any:
    """``name`` from the C library, taking ``argtypes`` and returning an int, setting errno;
    None where there is no such function (not glibc, not Linux)."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


_renameat2: Any = _libc_function(
    "renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
)
# syncfs(2) reports write-back errors (through the super block's errseq) only since Linux 5.8;
# before, it could return 0 after losing data, so it is not used there.
_syncfs: Any = _libc_function("syncfs", ctypes.c_int) if _kernel_at_least(5, 8) else None
