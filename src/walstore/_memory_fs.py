"""MemoryFileSystem: the ``FileSystem`` calls on a simulated disk (``_memory_disk.py``),
with its mapped files and streamed writers. Exported by ``walstore.testing``.
"""

from __future__ import annotations

import contextlib
import errno
import os

import anyio

from ._fs import FileStat, NotRegularFileError, byte_view
from ._memory_disk import MemoryDisk, ShortWrite, _entries, _err, _Inode, _touches


class MemoryFileSystem(MemoryDisk):
    """An in-memory FileSystem with crash, power-loss and fault injection. Thread-safe."""

    def confine(self, root: str) -> None:
        with self._lock:
            self._get(root)  # as OsFileSystem opens it: the root must be there
            self._confined[os.path.normpath(root)] += 1

    def hold(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # every call resolves its path anew

    def release(self, root: str) -> None:
        with self._lock:
            key = os.path.normpath(root)
            self._confined[key] -= 1
            if self._confined[key] <= 0:
                del self._confined[key]

    def open(self, path: str, *, create: bool = False, truncate: bool = False) -> int:
        with self._lock:
            self._call("open", path)
            d, name, ino = self._walk(path)
            if ino is None:
                if not create:
                    raise _err(errno.ENOENT, path)
                ino = self._new("file")
                self._link(d, name, ino)
            node = self._inodes[ino]
            if node.kind == "dir":
                raise _err(errno.EISDIR, path)
            if truncate:
                node.data = bytearray()
                node.broken = False  # all of it will be written anew
            fd = self._next_fd
            self._next_fd += 1
            self._fds[fd] = ino
            self._fd_names[fd] = path
            return fd

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        with self._lock:
            out = self._call("pwrite", self._fd_path(fd))
            node = self._file(fd)
            data = bytes(data)
            if isinstance(out, ShortWrite) and len(data) > 1:
                data = data[: len(data) // 2]
            if offset == 0 and len(data) >= len(node.data):
                node.broken = False  # every page of it dirtied anew: write-back will write it
            if offset > len(node.data):
                node.data.extend(bytes(offset - len(node.data)))
            node.data[offset : offset + len(data)] = data
            return len(data)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        with self._lock:
            self._call("pread", self._fd_path(fd))
            return bytes(self._file(fd).data[offset : offset + size])

    def truncate(self, fd: int, size: int) -> None:
        with self._lock:
            self._call("truncate", self._fd_path(fd))
            node = self._file(fd)
            if size == 0:
                node.broken = False
            del node.data[size:]
            node.data.extend(bytes(size - len(node.data)))

    def fsync(self, fd: int) -> None:
        self._sync_file("fsync", fd)

    def fdatasync(self, fd: int) -> None:
        self._sync_file("fdatasync", fd)

    def close(self, fd: int) -> None:
        with self._lock:
            self._call("close", self._fd_path(fd))
            self._drop_fd(fd)  # and its flock with it

    def read_file(self, path: str) -> bytes:
        with self._lock:
            self._call("read_file", path)
            node = self._inodes[self._get(path)]
            if node.kind == "dir":
                raise NotRegularFileError(errno.EISDIR, "Is a directory", path)
            if node.kind != "file":
                raise NotRegularFileError(errno.EINVAL, "not a regular file", path)
            return bytes(node.data)

    def rename(self, src: str, dst: str) -> None:
        with self._lock:
            self._call("rename", f"{src} -> {dst}")
            self._same_mount(src, dst)
            sd, sname, sino = self._walk(src, follow=False)
            if sino is None:
                raise _err(errno.ENOENT, src)
            dd, dname, dino = self._walk(dst, follow=False)
            if dino == sino:
                return
            skind = self._inodes[sino].kind
            if dino is not None:
                dkind = self._inodes[dino].kind
                if dkind == "dir" and skind != "dir":
                    raise _err(errno.EISDIR, dst)
                if dkind != "dir" and skind == "dir":
                    raise _err(errno.ENOTDIR, dst)
                if dkind == "dir" and self._inodes[dino].entries:
                    raise _err(errno.ENOTEMPTY, dst)
            del self._inodes[sd].entries[sname]
            self._inodes[dd].entries[dname] = sino
            self._pending.append(("rename", sd, sname, dd, dname, sino))

    def exchange(self, a: str, b: str) -> None:
        with self._lock:
            self._call("exchange", f"{a} <-> {b}")
            if not self.exchange_supported:
                raise _err(errno.EINVAL, a)
            self._same_mount(a, b)
            da, na, ia = self._walk(a, follow=False)
            db, nb, ib = self._walk(b, follow=False)
            if ia is None:
                raise _err(errno.ENOENT, a)
            if ib is None:
                raise _err(errno.ENOENT, b)
            self._inodes[da].entries[na] = ib
            self._inodes[db].entries[nb] = ia
            self._pending.append(("exchange", da, na, db, nb, ia, ib))

    async def open_writer(self, path: str) -> _MemoryWriter:
        fd = await anyio.to_thread.run_sync(lambda: self.open(path, create=True, truncate=True))
        return _MemoryWriter(self, fd)

    def link(self, src: str, dst: str) -> None:
        with self._lock:
            self._call("link", f"{src} -> {dst}")
            self._same_mount(src, dst)
            sino = self._get(src, follow=False)
            if self._inodes[sino].kind == "dir":
                raise _err(errno.EPERM, src)
            dd, dname, dino = self._walk(dst, follow=False)
            if dino is not None:
                raise _err(errno.EEXIST, dst)
            self._link(dd, dname, sino)

    def unlink(self, path: str) -> None:
        with self._lock:
            self._call("unlink", path)
            d, name, ino = self._walk(path, follow=False)
            if ino is None:
                raise _err(errno.ENOENT, path)
            if self._inodes[ino].kind == "dir":
                raise _err(errno.EISDIR, path)
            del self._inodes[d].entries[name]
            self._pending.append(("unlink", d, name, ino))

    def mkdir(self, path: str) -> None:
        with self._lock:
            self._call("mkdir", path)
            d, name, ino = self._walk(path, follow=False)
            if ino is not None:
                raise _err(errno.EEXIST, path)
            self._link(d, name, self._new("dir"))

    def rmdir(self, path: str) -> None:
        with self._lock:
            self._call("rmdir", path)
            d, name, ino = self._walk(path, follow=False)
            if ino is None:
                raise _err(errno.ENOENT, path)
            node = self._inodes[ino]
            if node.kind != "dir":
                raise _err(errno.ENOTDIR, path)
            if node.entries:
                raise _err(errno.ENOTEMPTY, path)
            del self._inodes[d].entries[name]
            self._pending.append(("unlink", d, name, ino))

    def listdir(self, path: str) -> list[str]:
        with self._lock:
            self._call("listdir", path)
            node = self._inodes[self._get(path)]
            if node.kind != "dir":
                raise _err(errno.ENOTDIR, path)
            return list(node.entries)

    def lstat(self, path: str) -> FileStat | None:
        with self._lock:
            self._call("lstat", path)
            try:
                _, _, ino = self._walk(path, follow=False)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    return None
                raise
            if ino is None:
                return None
            node = self._inodes[ino]
            return FileStat(node.kind, len(node.data), 0, self._mounts.get(self._mount_of(path), 0))

    def mount(self, path: str, *, same_device: bool = False) -> None:
        """Make the directory ``path`` a mount point, as of another file system (its paths
        report another device) or, ``same_device``, a bind mount of this one. Renames and
        links between it and the rest fail with EXDEV, as Linux's do across mounts."""
        with self._lock:
            if self._inodes[self._get(path)].kind != "dir":
                raise _err(errno.ENOTDIR, path)
            self._mounts[os.path.normpath(path)] = 0 if same_device else len(self._mounts) + 1

    def free_space(self, path: str) -> tuple[int, int]:
        """``capacity`` minus the bytes every file holds (1 TiB free when ``capacity`` is
        None). Writes are not refused for it: inject ENOSPC with ``fault``."""
        with self._lock:
            self._call("free_space", path)
            self._get(path)
            if self.capacity is None:
                return 1 << 40, 1 << 40
            used = sum(len(n.data) for n in self._inodes.values() if n.kind == "file")
            return max(0, self.capacity - used), self.capacity

    def path_limits(self, path: str) -> tuple[int, int]:
        with self._lock:
            self._call("path_limits", path)
            return self.name_max, self.path_max

    def mount_points(self, path: str) -> list[str]:
        with self._lock:
            self._call("mount_points", path)
            below = path.rstrip("/") + "/"
            return sorted(m for m in self._mounts if m.startswith(below))

    def realpath(self, path: str) -> str:
        with self._lock:
            self._call("realpath", path)
            return self._real(path, 0)

    def fsync_dir(self, path: str) -> None:
        with self._lock:
            # A failed directory fsync loses nothing here: directory changes live in the file
            # system's journal, whose failure stops the file system (ext4 errors=remount-ro).
            self._call("fsync_dir", path)
            d = self._get(path)
            if self._inodes[d].kind != "dir":
                raise _err(errno.ENOTDIR, path)
            # The ops on this directory, and, so that no older op lands on top of a newer
            # one, every earlier op on an entry they touch (a directory entry holds its
            # latest state).
            chosen = [False] * len(self._pending)
            needed: set[tuple[int, str]] = set()
            for i in range(len(self._pending) - 1, -1, -1):
                op = self._pending[i]
                if _touches(op, d) or _entries(op) & needed:
                    chosen[i] = True
                    needed |= _entries(op)
            for op, c in zip(self._pending, chosen, strict=True):
                if c:
                    self._make_durable(op)
            self._pending = [op for op, c in zip(self._pending, chosen, strict=True) if not c]

    def syncfs(self, fd: int) -> None:
        with self._lock:
            self._file(fd)
            try:
                self._call("syncfs", self._fd_path(fd))
                if not self.syncfs_supported:
                    raise _err(errno.ENOSYS, self._fd_path(fd))
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    # As a failed fsync (fsyncgate), for every file it was to write back.
                    for node in self._inodes.values():
                        if node.kind == "file" and bytes(node.data) != node.synced:
                            node.broken = True
                raise
            for node in self._inodes.values():
                if node.kind == "file" and not node.broken:
                    node.synced = bytes(node.data)
            for op in self._pending:  # in order: a later change lands on an earlier one
                self._make_durable(op)
            self._pending = []

    def lock(self, path: str, *, wait: bool = False) -> int | None:
        with self._lock:
            self._call("lock", path)
            d, name, ino = self._walk(path)
            if ino is None:
                ino = self._new("file")
                self._link(d, name, ino)
            while ino in self._locks:
                if not wait:
                    return None
                self._unlocked.wait()
            fd = self._next_fd
            self._next_fd += 1
            self._fds[fd] = ino
            self._fd_names[fd] = path
            self._locks[ino] = fd
            return fd

    def unlock(self, fd: int) -> None:
        with self._lock:
            try:
                self._call("unlock", self._fd_path(fd))
            finally:  # close(2) frees the descriptor, and so the flock, even when it fails
                self._drop_fd(fd)

    def flock(self, fd: int) -> bool:
        with self._lock:
            self._call("flock", self._fd_path(fd))
            ino = self._fds[fd]
            if self._locks.get(ino, fd) != fd:
                return False
            self._locks[ino] = fd
            return True

    def funlock(self, fd: int) -> None:
        with self._lock:
            self._call("funlock", self._fd_path(fd))
            self._drop_flock(fd, self._fds[fd])

    def _drop_fd(self, fd: int) -> None:
        """Forget a closed handle, and release the flock it held. Requires: _lock held."""
        ino = self._fds.pop(fd, None)
        self._fd_names.pop(fd, None)
        if ino is not None:
            self._drop_flock(fd, ino)

    def _drop_flock(self, fd: int, ino: int) -> None:
        if self._locks.get(ino) == fd:
            del self._locks[ino]
            self._unlocked.notify_all()

    def map_file(self, fd: int, size: int) -> _MemoryMap:
        with self._lock:
            self._call("map_file", self._fd_path(fd))
            return _MemoryMap(self, self._fds[fd], size)

    def symlink(self, target: str, path: str) -> None:
        """Create a symlink (a test fixture helper, durable at once)."""
        with self._lock:
            d, name, ino = self._walk(path, follow=False)
            if ino is not None:
                raise _err(errno.EEXIST, path)
            new = self._new("symlink")
            self._inodes[new].target = target
            self._inodes[d].entries[name] = new
            self._durable[d][name] = new

    def clone(self) -> MemoryFileSystem:
        """A copy of the disk (durable and unsynced state alike), with no open handles or
        locks: the same machine, another process. Counters start at zero."""
        with self._lock:
            new = MemoryFileSystem()
            new.exchange_supported = self.exchange_supported
            new.journal_preallocation = self.journal_preallocation
            new.capacity = self.capacity
            new._mounts = dict(self._mounts)
            new._inodes = {
                ino: _Inode(
                    n.kind, bytearray(n.data), n.synced, dict(n.entries), n.target, n.broken
                )
                for ino, n in self._inodes.items()
            }
            new._durable = {ino: dict(e) for ino, e in self._durable.items()}
            new._pending = list(self._pending)
            new._next_ino = self._next_ino
            return new


class _MemoryMap:
    """MemoryFileSystem's mapped file: reads of memory, not calls (never counted)."""

    def __init__(self, fs: MemoryFileSystem, ino: int, size: int) -> None:
        self._fs, self._ino, self._size = fs, ino, size

    def read(self) -> bytes:
        # Without the file system's lock, as a real mapping is read with no system call: a
        # call blocked by a fault hook holds that lock, and the event loop reads the header.
        # One slice under the GIL, so a read is never torn here.
        return bytes(self._fs._inodes[self._ino].data[: self._size])

    def close(self) -> None:
        pass


class _MemoryWriter:
    """MemoryFileSystem's streamed writer: pwrite/fsync/close from a worker thread."""

    def __init__(self, fs: MemoryFileSystem, fd: int) -> None:
        self._fs = fs
        self._fd = fd
        self._offset = 0

    async def write(self, data: bytes | memoryview) -> None:
        def run() -> None:
            view = byte_view(data)
            while view:
                n = self._fs.pwrite(self._fd, view, self._offset)
                self._offset += n
                view = view[n:]

        await anyio.to_thread.run_sync(run)

    async def sync(self) -> None:
        await anyio.to_thread.run_sync(self._fs.fsync, self._fd)

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self._fs.close, self._fd)
