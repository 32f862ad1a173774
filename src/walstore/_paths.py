"""Store paths: the lexical checks every path passes before anything is touched.

A store path is a relative POSIX path of one or more non-empty parts, none ``.`` or ``..``,
no NUL, not under ``.walstore/``. Checks that need the disk (symlinks, a file where a
directory is needed) are made by the engine, under the commit lock, before the commit point.
"""

from __future__ import annotations

import functools
import os
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
