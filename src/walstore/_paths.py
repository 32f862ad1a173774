"""Store paths: the lexical checks every path passes before anything is touched.

A store path is a relative POSIX path of one or more non-empty parts, none ``.`` or ``..``,
no NUL, not under ``.walstore/``. Checks that need the disk (symlinks, a file where a
directory is needed) are made by the engine, under the commit lock, before the commit point.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ._errors import InvalidPathError

if TYPE_CHECKING:
    from ._limits import PathLimits

RESERVED = ".walstore"


def check_path(
    path: str | os.PathLike[str], *, allow_root: bool = False, limits: PathLimits | None = None
) -> str:
    """Return ``path`` normalised to ``a/b/c``, or raise InvalidPathError.

    ``allow_root`` admits ``""`` and ``"."`` (the root itself), for ``list`` and ``exists``.
    ``limits``: also refuse a name or a path longer than the store's file system and journal
    take (``_limits.py``)."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise InvalidPathError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    if allow_root and path in ("", "."):
        return ""
    if not path:
        raise InvalidPathError("path is empty")
    if "\x00" in path:
        raise InvalidPathError(f"path contains a NUL byte: {path!r}")
    try:
        encoded = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise InvalidPathError(f"path cannot be encoded for the file system: {path!r}") from None
    if path.startswith("/"):
        raise InvalidPathError(f"path is absolute: {path!r}")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidPathError(f"path has an empty, '.' or '..' part: {path!r}")
    if parts[0] == RESERVED:
        raise InvalidPathError(f"path is inside the reserved {RESERVED}/ directory: {path!r}")
    if limits is not None and len(encoded) > limits.name_max:
        limits.check(path, encoded)
    return path


@functools.lru_cache(maxsize=8192)
def parents(path: str) -> tuple[str, ...]:
    """Ancestors of a store path, outermost first: ``a/b/c`` -> ``("a", "a/b")``. Cached:
    validation and apply ask for the same paths' ancestors several times per commit."""
    parts = path.split("/")
    return tuple("/".join(parts[:i]) for i in range(1, len(parts)))


def parent(path: str) -> str:
    """The directory holding ``path`` (``""`` for the root)."""
    return path.rpartition("/")[0]


class PathSet:
    """A set of store paths that drops everything below a directory in time proportional
    to what it drops (each path indexed under its ancestors), not to its size: a commit of
    thousands of ``delete_dir`` scanned every dirty path once per directory."""

    __slots__ = ("_below", "_items")

    def __init__(self, items: Iterable[str] = ()) -> None:
        self._items: set[str] = set()
        self._below: dict[str, set[str]] = {}
        self.update(items)

    def add(self, path: str) -> None:
        if path in self._items:
            return
        self._items.add(path)
        below = self._below
        for a in parents(path):
            if a in below:
                below[a].add(path)
            else:
                below[a] = {path}

    def update(self, paths: Iterable[str]) -> None:
        for p in paths:
            self.add(p)

    def discard(self, path: str) -> None:
        if path not in self._items:
            return
        self._items.remove(path)
        for a in parents(path):
            under = self._below[a]
            under.discard(path)
            if not under:
                del self._below[a]

    def drop_under(self, directory: str) -> None:
        """Discard every path strictly below ``directory``."""
        for p in self.under(directory):
            self.discard(p)

    def has_under(self, directory: str) -> bool:
        return directory in self._below

    def under(self, directory: str) -> list[str]:
        """The paths strictly below ``directory``."""
        return list(self._below.get(directory, ()))

    def clear(self) -> None:
        self._items.clear()
        self._below.clear()

    def __contains__(self, path: object) -> bool:
        return path in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"PathSet({sorted(self._items)!r})"
