"""OsFileSystem: the real file system, and the only code in walstore that calls ``os.*`` on
files. Paths beneath a confined root resolve as ``_confine.py`` says.

Blocking; the store calls it from worker threads (``open_writer`` on the event loop).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import re
import stat as stat_mod
from collections import Counter

import aiofiles
import anyio

from ._confine import ConfinedPaths, _named, _not_regular
from ._fs import AsyncWriter, FileStat, Kind, MappedFile
from ._libc import _AT_FDCWD, _RENAME_EXCHANGE, _renameat2, _syncfs
from ._writers import AiofilesWriter, ThreadWriter, on_asyncio

_BIG_READ = 1 << 30  # a read this long that comes back short may have hit Linux's cap


def _kind_of_mode(mode: int) -> Kind:
    if stat_mod.S_ISREG(mode):
        return "file"
    if stat_mod.S_ISDIR(mode):
        return "dir"
    if stat_mod.S_ISLNK(mode):
        return "symlink"
    return "other"


class _Mmap:
    def __init__(self, fd: int, size: int) -> None:
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        self._size = size

    def read(self) -> bytes:
        return self._map[: self._size]

    def close(self) -> None:
        self._map.close()


class OsFileSystem(ConfinedPaths):
    """The real file system (Linux/POSIX)."""

    def __init__(self) -> None:
        super().__init__()
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
        return self._open_file(path, flags)

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
        # O_NONBLOCK: opening a FIFO waits for a writer without it; the fstat below refuses it
        # (and devices) before any read could block or never end.
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
        d, name, c = self._at(path)
        try:
            if d is None:
                fd = os.open(path, flags)
            else:
                fd = os.open(name, flags | os.O_NOFOLLOW, dir_fd=d)
        except OSError as exc:
            raise _named(exc, path) from None
        finally:
            if c is not None:
                os.close(c)
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode):
                raise _not_regular(st.st_mode, path)
            size = st.st_size
            chunks = []
            while True:
                chunk = os.read(fd, max(size, 65536))
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def open_regular(self, path: str) -> int:
        """A read-only handle on the regular file ``path`` (under a confined root: through no
        symlink), for streaming reads (backup); NotRegularFileError for anything else."""
        self.calls["open"] += 1
        fd = self._open_file(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode):
                raise _not_regular(st.st_mode, path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def readlink(self, path: str) -> str:
        """The target of the symlink ``path`` (whose parent is resolved as every path is)."""
        self.calls["readlink"] += 1
        d, name, c = self._at(path)
        try:
            return os.readlink(name, dir_fd=d)
        finally:
            if c is not None:
                os.close(c)

    def rename(self, src: str, dst: str) -> None:
        self.calls["rename"] += 1
        at_src, at_dst = self._split(src), self._split(dst)
        self._forget(at_src, at_dst)
        self._make_room()
        sd, sn, sc = self._at_split(at_src, src, False)
        try:
            dd, dn, dc = self._at_split(at_dst, dst, False)
            try:
                os.rename(sn, dn, src_dir_fd=sd, dst_dir_fd=dd)
            finally:
                if dc is not None:
                    os.close(dc)
        finally:
            if sc is not None:
                os.close(sc)

    def exchange(self, a: str, b: str) -> None:
        self.calls["exchange"] += 1
        if _renameat2 is None:
            raise OSError(errno.ENOSYS, "renameat2 is not available", a)
        at_a, at_b = self._split(a), self._split(b)
        self._forget(at_a, at_b)
        self._make_room()
        ad, an, ac = self._at_split(at_a, a, False)
        try:
            bd, bn, bc = self._at_split(at_b, b, False)
            try:
                if _renameat2(
                    _AT_FDCWD if ad is None else ad,
                    os.fsencode(an),
                    _AT_FDCWD if bd is None else bd,
                    os.fsencode(bn),
                    _RENAME_EXCHANGE,
                ):
                    code = ctypes.get_errno()
                    raise OSError(code, os.strerror(code), a, None, b)
            finally:
                if bc is not None:
                    os.close(bc)
        finally:
            if ac is not None:
                os.close(ac)

    def link(self, src: str, dst: str) -> None:
        self.calls["link"] += 1
        self._make_room()
        sd, sn, sc = self._at_split(self._split(src), src, False)
        try:
            dd, dn, dc = self._at_split(self._split(dst), dst, False)
            try:
                os.link(sn, dn, src_dir_fd=sd, dst_dir_fd=dd, follow_symlinks=False)
            finally:
                if dc is not None:
                    os.close(dc)
        finally:
            if sc is not None:
                os.close(sc)

    def unlink(self, path: str) -> None:
        self.calls["unlink"] += 1
        d, name, c = self._at(path)
        try:
            os.unlink(name, dir_fd=d)
        finally:
            if c is not None:
                os.close(c)

    def mkdir(self, path: str) -> None:
        self.calls["mkdir"] += 1
        d, name, c = self._at(path)
        try:
            os.mkdir(name, 0o755, dir_fd=d)
        finally:
            if c is not None:
                os.close(c)

    def rmdir(self, path: str) -> None:
        self.calls["rmdir"] += 1
        found = self._split(path)
        self._forget(found)
        d, name, c = self._at_split(found, path)
        try:
            os.rmdir(name, dir_fd=d)
        finally:
            if c is not None:
                os.close(c)

    def listdir(self, path: str) -> list[str]:
        self.calls["listdir"] += 1
        if self._split(path) is None:
            return os.listdir(path)
        fd = self._open_dir(path)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def lstat(self, path: str) -> FileStat | None:
        self.calls["lstat"] += 1
        found = self._split(path)
        try:
            d, name, c = self._at_split(found, path)
        except (FileNotFoundError, NotADirectoryError):
            return None  # a parent is missing or a file; a symlink on the way raises ELOOP
        try:
            st = os.stat(name, dir_fd=d, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        finally:
            if c is not None:
                os.close(c)
        if c is None and found is not None and stat_mod.S_ISDIR(st.st_mode):
            self._checked(found, st)
        return FileStat(_kind_of_mode(st.st_mode), st.st_size, st.st_mtime_ns, st.st_dev)

    def realpath(self, path: str) -> str:
        self.calls["realpath"] += 1
        return os.path.realpath(path)

    def fsync_dir(self, path: str) -> None:
        self.calls["fsync_dir"] += 1
        fd = self._open_dir(path)
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

    def free_space(self, path: str) -> tuple[int, int]:
        self.calls["free_space"] += 1
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

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

    def lock(self, path: str, *, wait: bool = False) -> int | None:
        self.calls["lock"] += 1
        fd = self._open_file(path, os.O_RDWR | os.O_CREAT)
        try:
            taken = _flock(fd, wait)
        except BaseException:
            os.close(fd)
            raise
        if not taken:
            os.close(fd)
            return None
        return fd

    def _open_file(self, path: str, flags: int) -> int:
        flags |= os.O_CLOEXEC
        d, name, c = self._at(path)
        if d is None:
            return os.open(path, flags, 0o644)
        try:
            return os.open(name, flags | os.O_NOFOLLOW, 0o644, dir_fd=d)
        except OSError as exc:
            raise _named(exc, path) from None
        finally:
            if c is not None:
                os.close(c)

    def unlock(self, fd: int) -> None:
        self.calls["unlock"] += 1
        os.close(fd)  # closing the descriptor releases the flock

    def flock(self, fd: int) -> bool:
        self.calls["flock"] += 1
        return _flock(fd, wait=False)

    def funlock(self, fd: int) -> None:
        self.calls["funlock"] += 1
        fcntl.flock(fd, fcntl.LOCK_UN)

    def map_file(self, fd: int, size: int) -> MappedFile:
        self.calls["map_file"] += 1
        return _Mmap(fd, size)

    async def open_writer(self, path: str) -> AsyncWriter:
        self.calls["open_writer"] += 1
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = await anyio.to_thread.run_sync(self._open_file, path, flags)
        if on_asyncio():
            return AiofilesWriter(await aiofiles.open(fd, "wb", buffering=0), self)
        # aiofiles needs an asyncio loop; on trio the same calls go through anyio's threads.
        return ThreadWriter(fd, self)


def _flock(fd: int, wait: bool) -> bool:
    """Take the exclusive flock of ``fd``; False if another handle holds it (without
    ``wait``). flock, not fcntl record locks: those are dropped when any handle of the file
    closes. flock is shared with a fork()ed child: a store refuses use after fork."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def lstat_result(fs: OsFileSystem, path: str) -> os.stat_result | None:
    """``fs.lstat(path)`` with all that ``lstat`` tells (``st_ino`` too), resolved as every
    path is: for the read-only tools (``walstore verify``), which compare inodes."""
    fs.calls["lstat"] += 1
    try:
        d, name, c = fs._at(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return os.stat(name, dir_fd=d, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    finally:
        if c is not None:
            os.close(c)
