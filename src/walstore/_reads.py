"""Reads of the store's files for the engine, and the apply gate that keeps them from seeing
half a group.

Every path is resolved beneath the root, through no symlink (the resolution rule of
``_fs.py``). ``ReadSide`` is mixed into ``Engine``: its public methods run in worker threads
(several at once, beside the committer thread), each under the gate's read side; the apply
step holds its write side.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ._apply import Applier
from ._errors import InvalidPathError, StoreFailedError
from ._fs import FileStat, FileSystem, NotRegularFileError
from ._paths import RESERVED, parents


class ApplyGate:
    """Readers share it; the apply step takes it alone, so no reader sees half a group."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writer = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class ReadSide:
    """The engine's reads (the module docstring)."""

    fs: FileSystem
    root: str
    partial: bool  # a group is half applied: reads would show half of it
    _applier: Applier
    _gate: ApplyGate

    def _lstat(self, path: str) -> FileStat | None:
        """lstat of a store path, resolved beneath the root now; a symlink on the way is
        InvalidPathError (a symlink as the last name is reported, not followed)."""
        try:
            return self.fs.lstat(self._applier.full(path))
        except OSError as exc:
            raise refused(exc, path) from None

    def _check_whole(self) -> None:
        if self.partial:
            raise StoreFailedError(
                f"store {self.root} failed while applying a commit and would show half of it; "
                "reopen it to recover"
            )

    def read(self, path: str) -> bytes:
        with self._gate.read():
            self._check_whole()
            return self._read(path)

    def read_cacheable(self, path: str) -> tuple[bytes, bool]:
        """``read``, and whether its content may be cached under ``path``: always, as no
        symlink is followed, so a path names one file and a change of it is a change of
        ``path`` itself (what isolation records too)."""
        with self._gate.read():
            self._check_whole()
            return self._read(path), True

    def _read(self, path: str) -> bytes:
        """One regular file, resolved beneath the root now, through no symlink; a FIFO or a
        device is refused without being opened for a blocking read."""
        try:
            return self.fs.read_file(self._applier.full(path))
        except NotRegularFileError as exc:
            if exc.errno == errno.EISDIR:
                raise IsADirectoryError(errno.EISDIR, "Is a directory", path) from None
            raise InvalidPathError(
                f"cannot read {path!r}: {exc.strerror} (walstore reads regular files only)"
            ) from None
        except NotADirectoryError:
            raise self._blocked(path) from None
        except FileNotFoundError:
            raise FileNotFoundError(2, "No such file or directory", path) from None
        except OSError as exc:
            raise refused(exc, path) from None

    def _blocked(self, path: str) -> InvalidPathError:
        for anc in parents(path):
            st = self._lstat(anc)
            if st is not None and st.kind != "dir":
                return InvalidPathError(f"{path!r}: {anc!r} is a {st.kind}, not a directory")
        return InvalidPathError(f"{path!r}: a parent is not a directory")

    def check_parents(self, path: str) -> None:
        """Raise InvalidPathError if an existing parent of ``path`` is not a directory."""
        with self._gate.read():
            for anc in parents(path):
                st = self._lstat(anc)
                if st is None:
                    return
                if st.kind != "dir":
                    raise self._blocked(path)

    def lstat(self, path: str) -> FileStat | None:
        with self._gate.read():
            self._check_whole()
            return self._lstat(path)

    def listdir(self, path: str) -> list[str]:
        with self._gate.read():
            self._check_whole()
            st = self._lstat(path)
            if st is None:
                raise FileNotFoundError(2, "No such file or directory", path)
            if st.kind == "symlink":
                raise refused(OSError(errno.ELOOP, "a symlink"), path)
            if st.kind != "dir":
                raise NotADirectoryError(20, "Not a directory", path)
            try:  # resolved again: it may have become a symlink since the lstat
                names = self.fs.listdir(self._applier.full(path))
            except OSError as exc:
                raise refused(exc, path) from None
        return sorted(n for n in names if path or n != RESERVED)


def refused(exc: OSError, path: str) -> Exception:
    """InvalidPathError for a symlink met on the way to ``path`` (ELOOP from the file
    system's resolution rule); any other error as it is."""
    if exc.errno == errno.ELOOP:
        return InvalidPathError(
            f"{path!r} goes through a symlink, or is one: walstore never follows a symlink "
            "inside the store (delete removes one as a plain entry)"
        )
    return exc
