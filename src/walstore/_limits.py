"""What a store path and a transaction may be, so that apply can always carry them out.

Everything the journal accepts must be appliable, by this process after the commit point and
by every later open's replay: an op that fails there for its input's sake (a name over the
file system's NAME_MAX, a path over PATH_MAX, over what a journal record can hold) would make
the store fail, and every open after it, in its replay. So these limits are checked at the op
call (``tx.write``, ``replace_dir`` entries, ``move``, ``delete``...), and a transaction's
size at commit, before its group is formed: one transaction's bad input never fails another.

Apply uses paths longer than the store path itself: a directory being deleted or replaced is
moved to, or built in, ``.walstore/staging/<txid>-<index>.dir`` and its files live there
until the checkpoint removes them. So a store path's room is PATH_MAX less the longest such
prefix, the same for every path of the store (``PathLimits.path_max``). Depth has no limit of
its own: it is bounded by the path length, and every tree walk is iterative.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ._errors import InvalidPathError
from ._journal_format import Put

# A path's length is a u16 in a journal record (docs/journal-format.md).
RECORD_PATH_MAX = 0xFFFF
# What apply puts between staging/ and a store path: "<txid>-<index>.dir/", "<txid>/k<i>-<j>"
# (txids and indexes of up to 20 digits each), with room to spare.
STAGING_NAME_MAX = 48
# A transaction's share of a COMMIT record (whose payload is at most fmt.MAX_PAYLOAD, 2 GiB).
MAX_TX_BYTES = 1 << 30
# The limits of a file system that does not say (Linux's, and those of most others).
DEFAULT_NAME_MAX = 255
DEFAULT_PATH_MAX = 4096  # including the terminating NUL, as pathconf reports it


@dataclass(frozen=True, slots=True)
class PathLimits:
    """The longest name and store path (UTF-8 bytes, surrogates escaped) a store takes."""

    name_max: int = DEFAULT_NAME_MAX
    path_max: int = RECORD_PATH_MAX

    @classmethod
    def of(cls, name_max: int, path_max: int, staging_dir: str) -> PathLimits:
        """For a store whose staging directory is ``staging_dir``, on a file system with
        ``NAME_MAX`` ``name_max`` and ``PATH_MAX`` ``path_max`` (with its NUL)."""
        prefix = len(os.fsencode(staging_dir)) + 1 + STAGING_NAME_MAX + 1
        return cls(max(1, name_max), max(1, min(path_max - 1 - prefix, RECORD_PATH_MAX)))

    def check(self, path: str, encoded: bytes) -> None:
        """Raise InvalidPathError if ``path`` (``encoded``) is too long, or one of its names.
        Requires: ``len(encoded) > self.name_max`` (shorter paths always fit)."""
        if len(encoded) > self.path_max:
            raise InvalidPathError(
                f"path is {len(encoded)} bytes, over the {self.path_max} bytes a path of this "
                f"store may have (the file system's PATH_MAX, less room for "
                f".walstore/staging/): {_short(path)}"
            )
        for name in encoded.split(b"/"):
            if len(name) > self.name_max:
                where = "" if name == encoded else f" in {_short(path)}"
                raise InvalidPathError(
                    f"name of {len(name)} bytes, over the file system's NAME_MAX of "
                    f"{self.name_max}: {_short(os.fsdecode(name))}{where}"
                )

    def check_op(self, op: Any) -> None:
        """``check_path``'s limits for an op's paths (its source, its entries), again where
        the commit record is made: a last line in front of the journal."""
        for p in (op.path, getattr(op, "src", "")):
            if 4 * len(p) > self.name_max:  # else it fits whatever its characters
                self.check(p, p.encode("utf-8", "surrogateescape"))
        for e in getattr(op, "entries", ()):
            if 4 * (len(op.path) + 1 + len(e.path)) > self.name_max:
                p = f"{op.path}/{e.path}"
                self.check(p, p.encode("utf-8", "surrogateescape"))


def limits_of(fs: Any, root: str, staging_dir: str) -> PathLimits:
    """The limits of the file system ``root`` is on, through the seam's ``path_limits``
    (a FileSystem written before it existed gets Linux's: 255 and 4096)."""
    query = getattr(fs, "path_limits", None)
    name_max, path_max = query(root) if query is not None else (DEFAULT_NAME_MAX, DEFAULT_PATH_MAX)
    return PathLimits.of(name_max, path_max, staging_dir)


def tx_bytes(ops: Iterable[Any], *, exact: bool = False) -> int:
    """The bytes a transaction's ops take in a COMMIT record, at most (``exact``: paths
    encoded, not counted as 4 bytes a character, UTF-8's most). A file ``replace_dir`` keeps
    is not known before the commit links it, and not counted."""

    def size(p: str) -> int:
        return len(p.encode("utf-8", "surrogateescape")) if exact else 4 * len(p)

    total = 12  # txid, op count
    for op in ops:
        if type(op) is Put:  # the common case, without the lookups below
            total += 24 + size(op.path) + len(op.data)
            continue
        total += 24 + size(op.path) + size(getattr(op, "src", ""))
        data = getattr(op, "data", None)
        if data is not None:
            total += len(data)
        for e in getattr(op, "entries", ()):
            total += 24 + size(e.path) + len(getattr(e, "data", b""))
    return total


def check_tx_size(txid: int, ops: tuple[Any, ...]) -> int:
    """Raise InvalidPathError if the ops are more than a commit record takes of one
    transaction (MAX_TX_BYTES); returns their size, or a bound of it."""
    size = tx_bytes(ops)
    if size > MAX_TX_BYTES:
        size = tx_bytes(ops, exact=True)
        if size > MAX_TX_BYTES:
            raise InvalidPathError(
                f"txid={txid}: its {len(ops)} changes take {size} bytes of journal, over the "
                f"{MAX_TX_BYTES} a transaction may have (the commit record's limit); stream "
                "large values with open_write (they are staged, not journalled) or commit "
                "in several transactions"
            )
    return size


def _short(s: str, keep: int = 60) -> str:
    return repr(s) if len(s) <= keep else repr(s[:keep]) + f"... ({len(s)} characters)"
