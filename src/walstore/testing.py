"""Test doubles for walstore users and for walstore's own tests.

``MemoryFileSystem`` is a simulated file system (LevelDB's memenv plus its
``fault_injection_test``) that a store can be opened on with ``walstore.open(root, fs=...)``.
It can

* stop the process at the Nth file-system call (``crash_at``): that call and every later one
  raise ``SimulatedCrash``, as if the process had died there;
* simulate a power cut (``reboot(power_loss=rng)``): every write not made durable by an fsync
  is kept, dropped, torn, zero-filled or garbled at random, and every directory change
  (create, rename, unlink) not made durable by an fsync of that directory is kept or lost at
  random, each rename atomically;
* raise chosen errors at chosen calls (``fault``), including short writes.

The durability model is POSIX's, stricter than ext4's: ``fsync`` of a file makes its content
durable, not its name; ``fsync_dir`` of a directory makes the entries of that directory
durable (a rename is durable once either of its directories is synced).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from ._fs import FileStat, Kind, NotRegularFileError, byte_view, symlink_on_path

__all__ = ["MemoryFileSystem", "ShortWrite", "SimulatedCrash"]


class SimulatedCrash(BaseException):
    """The simulated process died at a file-system call. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` in the code under test swallows it."""


class ShortWrite(Exception):
    """Returned (not raised) by a fault hook to make a ``pwrite`` write only half its bytes."""


Fault = Callable[[int, str, str], BaseException | None]
"""A fault hook: (call index, call name, path) -> an exception to raise, a ShortWrite, or None.
For calls on a handle the path is the one the handle was opened by."""


@dataclass
class _Inode:
    kind: Kind
    data: bytearray = field(default_factory=bytearray)  # file: current content
    synced: bytes = b""  # file: content as of the last fsync
    entries: dict[str, int] = field(default_factory=dict)  # dir: current entries
    target: str = ""  # symlink
    broken: bool = False  # an fsync failed: later ones make nothing durable (fsyncgate)
    # until the file is truncated to nothing or all of it is written again


# Metadata changes not yet durable: ("link", dir, name, ino) | ("unlink", dir, name, ino)
# | ("rename", src_dir, src_name, dst_dir, dst_name, ino)
_Pending = tuple[Any, ...]


def _entries(op: _Pending) -> set[tuple[int, str]]:
    """The directory entries (directory inode, name) an op changes."""
    if op[0] in ("rename", "exchange"):
        return {(op[1], op[2]), (op[3], op[4])}
    return {(op[1], op[2])}


def _touches(op: _Pending, d: int) -> bool:
    return bool(op[1] == d or (op[0] in ("rename", "exchange") and op[3] == d))


def _err(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


class MemoryFileSystem:
    """An in-memory FileSystem with crash, power-loss and fault injection. Thread-safe."""

    ROOT = 1

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.count = 0  # number of calls made so far; the next call has this index
        self.crash_at: int | None = None
        self.crashed = False
        self.fault: Fault | None = None
        self.trace: list[tuple[int, str, str]] | None = None  # set to [] to record calls
        self.exchange_supported = True  # False: exchange() fails with EINVAL, as on old kernels
        self.syncfs_supported = True  # False: syncfs() fails with ENOSYS, as before Linux 5.8
        # Stores on this disk zero-fill journal segments to at most this many bytes (a real
        # disk: about checkpoint_bytes). Small, so clones stay cheap and appends run both
        # inside the preallocated space and past it.
        self.journal_preallocation = 4096
        self.capacity: int | None = None  # the disk's size, for free_space(); None: 1 TiB
        # NAME_MAX and PATH_MAX (with its NUL), as Linux's: a longer name or path fails with
        # ENAMETOOLONG, and path_limits() reports them.
        self.name_max = 255
        self.path_max = 4096
        self._lock = threading.RLock()
        self._inodes: dict[int, _Inode] = {self.ROOT: _Inode("dir")}
        self._durable: dict[int, dict[str, int]] = {self.ROOT: {}}
        self._pending: list[_Pending] = []
        self._next_ino = 2
        self._fds: dict[int, int] = {}
        self._fd_names: dict[int, str] = {}  # handle -> path it was opened by
        self._next_fd = 3
        self._locks: dict[int, int] = {}  # inode -> fd holding its flock
        self._unlocked = threading.Condition(self._lock)  # notified when a flock is released
        self._mounts: dict[str, int] = {}  # mount point -> the device its paths report
        self._confined: Counter[str] = Counter()  # roots (and how many confined each) whose
        # paths never go through a symlink

    # -- the call gate ---------------------------------------------------------------------

    def _call(self, name: str, path: str = "") -> BaseException | None:
        """Count a call; crash or fail it if so arranged. Requires: self._lock held."""
        if self.crashed:
            raise SimulatedCrash(f"process already crashed; {name}({path})")
        index = self.count
        self.count += 1
        self.calls[name] += 1
        if self.trace is not None:
            self.trace.append((index, name, path))
        if self.crash_at is not None and index >= self.crash_at:
            self.crashed = True
            raise SimulatedCrash(f"crash at call {index}: {name}({path})")
        if self.fault is not None:
            out = self.fault(index, name, path)
            if isinstance(out, ShortWrite):
                return out
            if out is not None:
                raise out
        return None

    # -- path resolution ---------------------------------------------------------------------

    def _walk(
        self, path: str, *, follow: bool = True, depth: int = 0
    ) -> tuple[int, str, int | None]:
        """Resolve ``path`` to (parent dir inode, last name, inode or None)."""
        if depth > 40:
            raise _err(errno.ELOOP, path)
        if not path.startswith("/"):
            raise _err(errno.EINVAL, path)
        encoded = path.encode("utf-8", "surrogateescape")
        if len(encoded) >= self.path_max or (
            len(encoded) > self.name_max
            and any(len(n) > self.name_max for n in encoded.split(b"/"))
        ):
            raise _err(errno.ENAMETOOLONG, path)
        parts = [p for p in path.split("/") if p and p != "."]
        # Under a confined root (OsFileSystem's resolution rule): no symlink after the root's
        # own parts, on the way or (unless ``follow`` is off) as the last name.
        beneath = len(parts) + 1
        for root in self._confined:
            if path == root or path.startswith(root + "/"):
                beneath = min(beneath, len([p for p in root.split("/") if p and p != "."]))
        cur = self.ROOT
        stack: list[int] = []
        if not parts:
            return self.ROOT, "", self.ROOT
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            node = self._inodes[cur]
            if node.kind != "dir":
                raise _err(errno.ENOTDIR, path)
            if part == "..":
                cur = stack.pop() if stack else self.ROOT
                if last:
                    return cur, "", cur
                continue
            child = node.entries.get(part)
            if child is None:
                if last:
                    return cur, part, None
                raise _err(errno.ENOENT, path)
            cnode = self._inodes[child]
            if cnode.kind == "symlink" and (follow or not last) and i >= beneath:
                raise symlink_on_path(path)
            if cnode.kind == "symlink" and (follow or not last):
                base = "/" + "/".join(parts[:i])
                target = cnode.target if cnode.target.startswith("/") else f"{base}/{cnode.target}"
                rest = "/".join(parts[i + 1 :])
                return self._walk(
                    f"{target}/{rest}" if rest else target, follow=follow, depth=depth + 1
                )
            if last:
                return cur, part, child
            stack.append(cur)
            cur = child
        raise AssertionError("unreachable")

    def _get(self, path: str, *, follow: bool = True) -> int:
        _, _, ino = self._walk(path, follow=follow)
        if ino is None:
            raise _err(errno.ENOENT, path)
        return ino

    def _new(self, kind: Kind) -> int:
        ino = self._next_ino
        self._next_ino += 1
        self._inodes[ino] = _Inode(kind)
        if kind == "dir":
            self._durable[ino] = {}
        return ino

    def _link(self, d: int, name: str, ino: int) -> None:
        self._inodes[d].entries[name] = ino
        self._pending.append(("link", d, name, ino))

    # -- FileSystem --------------------------------------------------------------------------

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

    def _fd_path(self, fd: int) -> str:
        return self._fd_names.get(fd, f"<fd {fd}>")

    def _file(self, fd: int) -> _Inode:
        if fd not in self._fds:
            raise _err(errno.EBADF, str(fd))
        return self._inodes[self._fds[fd]]

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

    def _sync_file(self, name: str, fd: int) -> None:
        with self._lock:
            node = self._file(fd)
            try:
                self._call(name, self._fd_path(fd))
            except OSError:
                # fsyncgate: the kernel dropped the dirty pages and marked them clean; what
                # was not durable never will be, even if a later fsync reports success.
                node.broken = True
                raise
            if not node.broken:
                node.synced = bytes(node.data)

    def close(self, fd: int) -> None:
        with self._lock:
            self._call("close", self._fd_path(fd))
            ino = self._fds.pop(fd, None)
            self._fd_names.pop(fd, None)
            if ino is not None and self._locks.get(ino) == fd:  # its flock goes with it
                del self._locks[ino]
                self._unlocked.notify_all()

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

    def _mount_of(self, path: str) -> str:
        """The mount point ``path`` is under ("" for the file system itself)."""
        path = os.path.normpath(path)
        return max(
            (m for m in self._mounts if path == m or path.startswith(m + "/")), key=len, default=""
        )

    def _same_mount(self, a: str, b: str) -> None:
        if self._mount_of(a) != self._mount_of(b):
            raise _err(errno.EXDEV, f"{a} -> {b}")

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

    def _real(self, path: str, depth: int) -> str:
        if depth > 40:
            return path
        parts = [p for p in path.split("/") if p and p != "."]
        out: list[str] = []
        cur: int | None = self.ROOT
        for i, part in enumerate(parts):
            if part == "..":
                if out:
                    out.pop()
                cur = self._get("/" + "/".join(out)) if out else self.ROOT
                continue
            child = None
            if cur is not None and self._inodes[cur].kind == "dir":
                child = self._inodes[cur].entries.get(part)
            if child is not None and self._inodes[child].kind == "symlink":
                t = self._inodes[child].target
                base = "/" + "/".join(out)
                target = t if t.startswith("/") else f"{base.rstrip('/')}/{t}"
                rest = "/".join(parts[i + 1 :])
                return self._real(f"{target}/{rest}" if rest else target, depth + 1)
            out.append(part)
            cur = child
        return "/" + "/".join(out)

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

    def _make_durable(self, op: _Pending) -> None:
        if op[0] == "link":
            _, d, name, ino = op
            self._durable[d][name] = ino
        elif op[0] == "unlink":
            _, d, name, ino = op
            if self._durable[d].get(name) == ino:
                del self._durable[d][name]
        elif op[0] == "rename":
            _, sd, sname, dd, dname, ino = op
            if self._durable[sd].get(sname) == ino:
                del self._durable[sd][sname]
            self._durable[dd][dname] = ino
        else:  # exchange: both names swap at once
            _, da, na, db, nb, ia, ib = op
            self._durable[da][na] = ib
            self._durable[db][nb] = ia

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
                ino = self._fds.pop(fd, None)
                self._fd_names.pop(fd, None)
                if ino is not None and self._locks.get(ino) == fd:
                    del self._locks[ino]
                    self._unlocked.notify_all()

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
            ino = self._fds[fd]
            if self._locks.get(ino) == fd:
                del self._locks[ino]
                self._unlocked.notify_all()

    def map_file(self, fd: int, size: int) -> _MemoryMap:
        with self._lock:
            self._call("map_file", self._fd_path(fd))
            return _MemoryMap(self, self._fds[fd], size)

    # -- simulation control (not file-system calls: never counted, never crash) -------------

    def reboot(self, power_loss: random.Random | None = None) -> None:
        """Start a new "process" on the same disk. Without ``power_loss`` this follows a
        process crash: everything written stays (the page cache survives). With it, a power
        cut: each directory change not yet durable is kept or lost at random, and each file's
        unsynced content is kept, dropped, torn, zero-filled or garbled at random."""
        with self._lock:
            if power_loss is not None:
                rng = power_loss
                for op in self._pending:
                    if rng.random() < 0.5:
                        self._make_durable(op)
                self._pending = []
                for ino, entries in self._durable.items():
                    self._inodes[ino].entries = dict(entries)
                for node in self._inodes.values():
                    if node.kind == "file" and bytes(node.data) != node.synced:
                        node.data = bytearray(self._damage(rng, bytes(node.data), node.synced))
                    node.synced = bytes(node.data)
            self.crashed = False
            self._confined.clear()  # the process that confined them is gone
            self.crash_at = None
            self.fault = None
            self._fds.clear()
            self._fd_names.clear()
            self._locks.clear()
            self._unlocked.notify_all()

    @staticmethod
    def _damage(rng: random.Random, cur: bytes, synced: bytes) -> bytes:
        p = 0
        while p < min(len(cur), len(synced)) and cur[p] == synced[p]:
            p += 1
        pattern = rng.randrange(5)
        if pattern == 0:  # the write reached the disk
            return cur
        if pattern == 1:  # it did not
            return synced
        if pattern == 2:  # torn: a prefix of it did
            k = rng.randint(p, len(cur))
            return cur[:k] + synced[k:]
        if pattern == 3:  # the size grew, the data did not (zero-filled tail)
            return cur[:p] + bytes(len(cur) - p)
        out = bytearray(cur)  # garbled
        for _ in range(rng.randint(1, 8)):
            if len(out) > p:
                out[rng.randrange(p, len(out))] = rng.randrange(256)
        return bytes(out)

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

    def files(self, root: str, *, skip: tuple[str, ...] = (".walstore",)) -> dict[str, bytes]:
        """Every regular file under ``root`` (top-level names in ``skip`` left out), by path
        relative to ``root``; directories as ``path/`` with value b"" only when empty."""
        with self._lock:
            out: dict[str, bytes] = {}
            base = self._get(root)

            stack = [(base, "")]  # iterative: a tree of any depth
            while stack:
                ino, prefix = stack.pop()
                for name, child in sorted(self._inodes[ino].entries.items()):
                    if not prefix and name in skip:
                        continue
                    node = self._inodes[child]
                    if node.kind == "dir":
                        if not node.entries:
                            out[prefix + name + "/"] = b""
                        stack.append((child, prefix + name + "/"))
                    else:
                        out[prefix + name] = bytes(node.data)
            return out

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

    def open_fds(self) -> int:
        """How many handles are open (a leak check)."""
        return len(self._fds)


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
