"""ConfinedPaths: how ``OsFileSystem`` resolves a path beneath a store's root.

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

Blocking, as every ``FileSystem`` call; from worker threads (a ``hold()`` block is one
thread's: its descriptors are thread-local).
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ._fs import NotRegularFileError, symlink_on_path
from ._libc import _openat2, _openat2_dir
from ._paths import RESERVED


class ConfinedPaths:
    """The confined roots and ``hold()`` blocks of one ``OsFileSystem``, and ``_at``: the
    directory descriptor and name an ``*at`` call acts on."""

    def __init__(self) -> None:
        # False: resolve by the component walk even where openat2 exists (tests run both).
        self.use_openat2 = _openat2 is not None
        self._roots: dict[str, _Root] = {}  # confined root -> its descriptors
        self._prefixes: tuple[tuple[str, str, _Root], ...] = ()  # (root, root + "/", its _Root)
        self._roots_lock = threading.Lock()
        self._held = threading.local()  # .dirs: (root fd, dir) -> descriptor, inside hold()

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
