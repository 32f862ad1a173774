"""Store paths: the lexical checks every path passes before anything is touched.

A store path is a relative POSIX path of one or more non-empty parts, none ``.`` or ``..``,
no NUL, not under ``.walstore/``. Checks that need the disk (symlinks, a file where a
directory is needed) are made by the engine, under the commit lock, before the commit point.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Container, Iterable, Iterator, Mapping, MutableSet
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


class PathTree:
    """Which of a collection's paths lie below a directory, found in time proportional to
    them, not to the collection (a transaction of thousands of ``delete_dir`` scanned every
    path once per directory). Each listed path is kept under its parent directory, and that
    directory under its own, up to the first one already listed: memory is one entry per path
    and per directory on the way, never a path under each of its ancestors (which made a
    2,000-level path 2M entries). The owner keeps the members; the tree only says where."""

    __slots__ = ("_kids",)

    def __init__(self) -> None:
        self._kids: dict[str, set[str]] = {}  # directory -> listed paths directly in it

    def add(self, path: str) -> None:
        kids, child = self._kids, path
        while child:
            below = kids.get(d := child.rpartition("/")[0])
            if below is not None:
                below.add(child)
                return
            kids[d] = {child}
            child = d

    def discard(self, path: str, members: Container[str]) -> None:
        """Unlist ``path`` (no longer in ``members``), and the directories above it that are
        left with nothing listed below them and are not members either."""
        kids, child = self._kids, path
        while child and child not in members and child not in kids:
            below = kids.get(d := child.rpartition("/")[0])
            if below is None:
                return
            below.discard(child)
            if below:
                return
            del kids[d]
            child = d

    def under(self, path: str) -> Iterator[str]:
        """Every listed path strictly below ``path`` (members, and directories on the way)."""
        stack = [path]
        while stack:
            below = self._kids.get(stack.pop())
            if below:
                yield from below
                stack.extend(below)

    def pop_under(self, path: str) -> list[str]:
        """``under(path)``, unlisted; then ``discard(path, members)`` unlists ``path`` itself
        if it is not a member."""
        out: list[str] = []
        stack = [path]
        while stack:
            below = self._kids.pop(stack.pop(), None)
            if below:
                out.extend(below)
                stack.extend(below)
        return out

    def clear(self) -> None:
        self._kids.clear()


class PathSet(MutableSet[str]):
    """A set of store paths that drops everything below a directory in time proportional to
    what it drops (``PathTree``)."""

    __slots__ = ("_items", "_tree")

    def __init__(self, items: Iterable[str] = ()) -> None:
        self._items: set[str] = set()
        self._tree = PathTree()
        self.update(items)

    def __contains__(self, path: object) -> bool:
        return path in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, path: str) -> None:
        if path not in self._items:
            self._items.add(path)
            self._tree.add(path)

    def update(self, paths: Iterable[str]) -> None:
        for path in paths:
            self.add(path)

    def discard(self, path: str) -> None:
        if path in self._items:
            self._items.remove(path)
            self._tree.discard(path, self._items)

    def clear(self) -> None:
        self._items.clear()
        self._tree.clear()

    def discard_under(self, path: str) -> None:
        """Drop every member strictly below the directory ``path``."""
        self._items.difference_update(self._tree.pop_under(path))
        self._tree.discard(path, self._items)


class PathDict(dict[str, str | None]):
    """path -> kind, dropping everything below a directory in time proportional to what it
    drops (``PathTree``). Only ``[]=`` and ``update`` add keys (what validation uses)."""

    def __init__(self) -> None:
        super().__init__()
        self._tree = PathTree()

    def __setitem__(self, path: str, kind: str | None) -> None:
        if path not in self:
            self._tree.add(path)
        super().__setitem__(path, kind)

    def update(  # type: ignore[override]
        self, pairs: Mapping[str, str | None] | Iterable[tuple[str, str | None]]
    ) -> None:
        for path, kind in pairs.items() if isinstance(pairs, Mapping) else pairs:
            self[path] = kind

    def drop_under(self, path: str) -> None:
        """Drop every key strictly below the directory ``path``."""
        for below in self._tree.pop_under(path):
            self.pop(below, None)
        self._tree.discard(path, self)
