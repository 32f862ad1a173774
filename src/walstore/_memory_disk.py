"""MemoryDisk: the simulated disk under ``MemoryFileSystem`` (``walstore.testing``): its
inodes and directory entries, what of them is durable, the call gate where a crash or a
fault is injected, and the power cut (``reboot``). The FileSystem calls on it are
``_memory_fs.py``'s. Thread-safe: every call takes ``_lock``.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._fs import Kind, symlink_on_path


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


class MemoryDisk:
    """The disk's state and model (see the module docstring); ``MemoryFileSystem`` is the
    ``FileSystem`` on it."""

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

    def _fd_path(self, fd: int) -> str:
        return self._fd_names.get(fd, f"<fd {fd}>")

    def _file(self, fd: int) -> _Inode:
        if fd not in self._fds:
            raise _err(errno.EBADF, str(fd))
        return self._inodes[self._fds[fd]]

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

    def _mount_of(self, path: str) -> str:
        """The mount point ``path`` is under ("" for the file system itself)."""
        path = os.path.normpath(path)
        return max(
            (m for m in self._mounts if path == m or path.startswith(m + "/")), key=len, default=""
        )

    def _same_mount(self, a: str, b: str) -> None:
        if self._mount_of(a) != self._mount_of(b):
            raise _err(errno.EXDEV, f"{a} -> {b}")

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

    def open_fds(self) -> int:
        """How many handles are open (a leak check)."""
        return len(self._fds)
