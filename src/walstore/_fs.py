"""The file-system seam: every file syscall walstore makes goes through a ``FileSystem``.

``OsFileSystem`` is the real one and the only code in walstore that calls ``os.*`` on files.
``walstore.testing.MemoryFileSystem`` is a simulated one that can crash at the Nth call, lose
unsynced writes in a simulated power cut and raise chosen errors (LevelDB's ``Env``/memenv).

All methods are blocking; the store calls them from worker threads. Paths are absolute strings.

Resolution rule. A store confines its root (``confine``): from then on every path under
that root is resolved beneath it at the moment of the call, never from a string checked
earlier, and never through a symlink. Each call walks from a descriptor of the root
(``openat2`` with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`` where Linux has it, 5.6+;
elsewhere component by component with ``O_NOFOLLOW | O_DIRECTORY``) to the directory that
holds the last name, and acts on that name with an ``*at`` call. Inside ``hold()`` (one
commit group) a directory is resolved once, at its first use, and its descriptor reused until
the group renames or removes it; the group's descriptors are then kept for the next group,
which resolves each directory by checking the kept descriptor, component by component from
the root, against what its parent holds under that name now (``fstatat`` not following a
symlink: the same st_dev and st_ino, which no other directory can have while the descriptor
keeps it open), and opens anew whatever differs. A symlink on the way raises
``OSError(ELOOP)``; the last name is never followed either (``open`` and ``read_file`` of a
symlink raise ELOOP, ``unlink`` removes the link itself, ``lstat`` reports it).
``read_file`` refuses anything but a regular file (``NotRegularFileError``) without
blocking on it: it opens with ``O_NONBLOCK`` and checks ``fstat`` before reading.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import mmap
import os
import re
import stat as stat_mod
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiofiles
import anyio

from ._paths import RESERVED

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


_BIG_READ = 1 << 30  # a read this long that comes back short may have hit Linux's cap


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


class _Mmap:
    def __init__(self, fd: int, size: int) -> None:
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        self._size = size

    def read(self) -> bytes:
        return self._map[: self._size]

    def close(self) -> None:
        self._map.close()


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
        # False: resolve by the component walk even where openat2 exists (tests run both).
        self.use_openat2 = _openat2 is not None
        self._roots: dict[str, _Root] = {}  # confined root -> its descriptors
        self._prefixes: tuple[tuple[str, str, _Root], ...] = ()  # (root, root + "/", its _Root)
        self._roots_lock = threading.Lock()
        self._held = threading.local()  # .dirs: (root fd, dir) -> descriptor, inside hold()

    # -- resolution beneath a confined root ------------------------------------------------

    def confine(self, root: str) -> None:
        key = root.rstrip("/") or "/"
        with self._roots_lock:
            found = self._roots.get(key)
            if found is not None:  # a second store on the same root (a readonly reader)
                found.users += 1
                return
            new = _Root(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            self._roots = {**self._roots, key: new}  # replaced, not changed: read unlocked
            self._prefixes = _prefixes(self._roots)

    def release(self, root: str) -> None:
        key = root.rstrip("/") or "/"
        with self._roots_lock:
            found = self._roots.get(key)
            if found is None:
                return
            found.users -= 1
            if found.users:
                return
            self._roots = {k: v for k, v in self._roots.items() if k != key}
            self._prefixes = _prefixes(self._roots)
        found.close()

    @contextmanager
    def hold(self) -> Iterator[None]:
        outer = getattr(self._held, "dirs", None)
        if outer is not None:  # nested: the outer block keeps them
            yield
            return
        dirs: dict[tuple[_Root, str], _Dir] = {}
        self._held.dirs = dirs
        try:
            yield
        finally:
            self._held.dirs = None
            by_root: dict[_Root, list[tuple[str, _Dir]]] = {}
            for (root, rel), kept in dirs.items():
                by_root.setdefault(root, []).append((rel, kept))
            for root, entries in by_root.items():
                root.keep(entries)  # for the next block, which checks each before use

    def _forget(self, *splits: tuple[_Root, str] | None) -> None:
        """Drop held descriptors of these paths (``_split``) and of directories below them
        (this thread is renaming or removing them)."""
        dirs = getattr(self._held, "dirs", None)
        if not dirs:
            return
        for found in splits:
            if found is None:
                continue
            rel = found[1]
            for key in [k for k in dirs if k[1] == rel or k[1].startswith(rel + "/")]:
                os.close(dirs.pop(key).fd)

    def _checked(self, found: tuple[_Root, str], st: os.stat_result) -> None:
        """Inside ``hold()``: ``st`` is what the directory ``found`` (root, path in it) is now,
        seen from its parent's held descriptor; a kept descriptor of it that matches it is
        this block's from now on, as if ``_held_dir`` had checked it."""
        dirs: dict[tuple[_Root, str], _Dir] | None = getattr(self._held, "dirs", None)
        if dirs is None or not found[1] or found in dirs:
            return
        entry = found[0].take(found[1]) if _plain(found[1]) else None
        if entry is None:
            return
        if entry.ino == st.st_ino and entry.dev == st.st_dev:
            dirs[found] = entry
        else:
            os.close(entry.fd)

    def _held_dir(
        self, dirs: dict[tuple[_Root, str], _Dir], root: _Root, rel: str, path: str
    ) -> int:
        """The descriptor of the directory ``rel`` for this ``hold()`` block: the block's own;
        else each component from its parent's, the deepest the block holds first. A component
        kept from an earlier block is used only if it still is the entry of that name in its
        parent, now (same st_dev and st_ino, not following a symlink: no other directory can
        have them while the kept descriptor holds its directory); anything else is opened anew
        with O_NOFOLLOW, as the walk does."""
        parent, start = root.fd, 0
        cut = rel.rfind("/")
        while cut > 0:
            held = dirs.get((root, rel[:cut]))
            if held is not None:
                parent, start = held.fd, cut + 1
                break
            cut = rel.rfind("/", 0, cut)
        while True:
            end = rel.find("/", start)
            if end < 0:
                end = len(rel)
            sub, name = rel[:end], rel[start:end]
            entry = root.take(sub)
            if entry is not None:
                try:
                    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                    same = st.st_ino == entry.ino and st.st_dev == entry.dev
                except OSError:
                    same = False
                if not same:
                    os.close(entry.fd)
                    entry = None
            if entry is None:
                fd = _open_part(parent, name, path)
                try:
                    st = os.fstat(fd)
                except BaseException:
                    os.close(fd)
                    raise
                entry = _Dir(fd, st.st_dev, st.st_ino)
            dirs[(root, sub)] = entry
            if end == len(rel):
                return entry.fd
            parent, start = entry.fd, end + 1

    def _split(self, path: str) -> tuple[_Root, str] | None:
        """(the confined root, path relative to it) for a path under a confined root."""
        for root, below, r in self._prefixes:
            if path.startswith(below):
                return r, path[len(below) :]
            if path == root:
                return r, ""
        return None

    def _open_beneath(self, rootfd: int, rel: str, path: str) -> int:
        """A new descriptor of the directory ``rel`` beneath ``rootfd``, through no symlink."""
        if not rel:  # a new open, not dup: a duplicate shares the listing offset
            return os.open(".", _DIR_FLAGS, dir_fd=rootfd)
        if self.use_openat2:
            return _openat2_dir(rootfd, rel, path)
        fd = rootfd
        try:
            for part in rel.split("/"):
                nxt = _open_part(fd, part, path)
                if fd != rootfd:
                    os.close(fd)
                fd = nxt
        except BaseException:
            if fd != rootfd:
                os.close(fd)
            raise
        return fd

    def _at(self, path: str) -> tuple[int | None, str, int | None]:
        """(dir_fd, name, descriptor to close afterwards) to act on ``path`` with an ``*at``
        call: under a confined root, its parent resolved beneath the root now."""
        return self._at_split(self._split(path), path)

    def _make_room(self) -> None:
        """Before a call resolves its paths: a full ``hold()`` block passes its oldest half
        to the root to keep. Never between a call's two paths: the first's descriptor would
        close, and the second's could take its number (acting in the wrong directory)."""
        dirs = getattr(self._held, "dirs", None)
        if dirs is not None and len(dirs) >= _HELD_MAX:
            by_root: dict[_Root, list[tuple[str, _Dir]]] = {}
            for key in list(dirs)[: len(dirs) // 2]:
                by_root.setdefault(key[0], []).append((key[1], dirs.pop(key)))
            for root, entries in by_root.items():
                root.keep(entries)

    def _at_split(
        self, found: tuple[_Root, str] | None, path: str, room: bool = True
    ) -> tuple[int | None, str, int | None]:
        """``_at`` of ``path``, split already (``_split``); ``room`` False: the caller made
        room (``_make_room``) for this path and another."""
        if room:
            self._make_room()
        if found is None:
            return None, path, None
        root, rel = found
        if not rel:
            return root.fd, ".", None
        head, _, name = rel.rpartition("/")
        if not head:
            return root.fd, name, None
        if head in _PINNED:
            fd = root.pinned.get(head)
            if fd is None:
                fd = root.pin(head, self._open_beneath(root.fd, head, path))
            return fd, name, None
        dirs = getattr(self._held, "dirs", None)
        if dirs is not None:
            held = dirs.get((root, head))  # a block holds plain paths only (_plain)
            if held is not None:
                return held.fd, name, None
        if dirs is not None and _plain(head):
            return self._held_dir(dirs, root, head, path), name, None
        fd = self._open_beneath(root.fd, head, path)
        return fd, name, fd

    def _open_dir(self, path: str) -> int:
        """A new descriptor of the directory ``path`` (not through a symlink when confined)."""
        found = self._split(path)
        if found is None:
            return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._open_beneath(found[0].fd, found[1], path)

    # -- calls -----------------------------------------------------------------------------

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
        return FileStat(_kind(st.st_mode), st.st_size, st.st_mtime_ns, st.st_dev)

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
            # flock, not fcntl record locks: those are dropped when any handle of the file
            # closes. flock is shared with a fork()ed child: a store refuses use after fork.
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
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
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        return True

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
            return _AiofilesWriter(await aiofiles.open(fd, "wb", buffering=0), self)
        # aiofiles needs an asyncio loop; on trio the same calls go through anyio's threads.
        return _ThreadWriter(fd, self)


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


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_HELD_MAX = 64  # directory descriptors one hold() keeps at most (more while one call walks)
_KEPT_MAX = 128  # those a confined root keeps between hold() blocks (each checked before use)


def _prefixes(roots: dict[str, _Root]) -> tuple[tuple[str, str, _Root], ...]:
    return tuple((root, root.rstrip("/") + "/", r) for root, r in roots.items())


def _plain(rel: str) -> bool:
    """``rel`` is names joined by single slashes (what a store's paths are): a kept
    descriptor is only ever looked up by such a path."""
    return "" not in (parts := rel.split("/")) and "." not in parts and ".." not in parts


# The store's own directories, which it needs to be real directories and never removes or
# renames: each is resolved once per confine and its descriptor kept (every commit names
# staging/ two or three times). The user's directories are resolved at every call, or once
# per hold() block (checked again in each): a descriptor kept unchecked would go on acting
# in a directory another process had since moved away.
_PINNED = frozenset({RESERVED, f"{RESERVED}/staging", f"{RESERVED}/journal"})


class _Root:
    """A confined root: its descriptor and those of the store's own directories below it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 1  # confine calls not yet released
        self.pinned: dict[str, int] = {}
        # Directories' descriptors between hold() blocks, the least recently kept first. A
        # block takes one out (so no two threads share it) and checks it before any use.
        self._kept: dict[str, _Dir] = {}
        self._closed = False
        self._lock = threading.Lock()

    def take(self, rel: str) -> _Dir | None:
        with self._lock:
            return self._kept.pop(rel, None)

    def keep(self, entries: list[tuple[str, _Dir]]) -> None:
        spare = []
        with self._lock:
            for rel, entry in entries:
                if self._closed or rel in self._kept:
                    spare.append(entry)
                else:
                    self._kept[rel] = entry
            while len(self._kept) > _KEPT_MAX:
                spare.append(self._kept.pop(next(iter(self._kept))))
        for entry in spare:
            os.close(entry.fd)

    def pin(self, rel: str, fd: int) -> int:
        with self._lock:
            kept = self.pinned.setdefault(rel, fd)
        if kept != fd:
            os.close(fd)  # another thread pinned it first
        return kept

    def close(self) -> None:
        with self._lock:
            self._closed = True
            kept, self._kept = self._kept, {}
        for fd in (self.fd, *self.pinned.values(), *(entry.fd for entry in kept.values())):
            os.close(fd)
        self.pinned.clear()


@dataclass(frozen=True, slots=True)
class _Dir:
    """A directory's descriptor and its identity: no other directory can have its st_dev and
    st_ino while the descriptor keeps it (open, its inode is not reused)."""

    fd: int
    dev: int
    ino: int


def _open_part(fd: int, part: str, path: str) -> int:
    """openat of the directory ``part`` in ``fd``, not through a symlink (one step of the
    walk). O_NOFOLLOW | O_DIRECTORY says ENOTDIR for a symlink and for a file alike; an lstat
    tells them apart, and if what it finds is a directory again (swapped back meanwhile) the
    open is tried again."""
    for _ in range(100):
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=fd)
        except NotADirectoryError:
            try:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat_mod.S_ISLNK(st.st_mode):
                raise symlink_on_path(path) from None
            if not stat_mod.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", path) from None
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path) from None
    raise symlink_on_path(path)  # changing under every try: not a directory to go through


def _named(exc: OSError, path: str) -> OSError:
    """``exc`` naming the whole path (an ``*at`` call names only the last part); a symlink
    as the last name (O_NOFOLLOW's ELOOP) said so."""
    if exc.errno == errno.ELOOP:
        return symlink_on_path(path)
    return OSError(exc.errno, exc.strerror, path)


def _not_regular(mode: int, path: str) -> NotRegularFileError:
    if stat_mod.S_ISDIR(mode):
        return NotRegularFileError(errno.EISDIR, "Is a directory", path)
    what = {
        stat_mod.S_IFIFO: "a FIFO",
        stat_mod.S_IFCHR: "a character device",
        stat_mod.S_IFBLK: "a block device",
        stat_mod.S_IFSOCK: "a socket",
    }.get(stat_mod.S_IFMT(mode), "not a regular file")
    return NotRegularFileError(errno.EINVAL, f"not a regular file: {what}", path)


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


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = 437  # the same number on every Linux architecture (new syscalls are unified)
# No O_NOFOLLOW: with O_DIRECTORY it reports a symlink as ENOTDIR; RESOLVE_NO_SYMLINKS says ELOOP.
_HOW = _OpenHow(
    os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS
)
_HOW_ADDRESS = ctypes.addressof(_HOW)  # module-level: lives as long as the calls using it
_HOW_SIZE = ctypes.sizeof(_HOW)


def _find_openat2() -> Any:
    """libc's ``syscall`` if the kernel has openat2 (Linux 5.6+), else None."""
    if not _kernel_at_least(5, 6):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    # syscall(2) is variadic; these are the types openat2 takes, all passed in registers.
    fn.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


_openat2: Any = _find_openat2()


def _openat2_dir(rootfd: int, rel: str, path: str) -> int:
    """openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) of the directory ``rel``: the kernel
    walks it in one call, refusing a symlink anywhere (ELOOP) and any way out (EXDEV)."""
    name = os.fsencode(rel)
    for _ in range(8):
        fd = int(_openat2(_SYS_OPENAT2, rootfd, name, _HOW_ADDRESS, _HOW_SIZE))
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code in (errno.EAGAIN, errno.EINTR):
            continue  # a concurrent rename the kernel could not rule out: try again
        if code == errno.ELOOP:
            raise symlink_on_path(path)
        raise OSError(code, os.strerror(code), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)
