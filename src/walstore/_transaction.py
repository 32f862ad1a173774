"""Transaction: buffered changes to many files, committed all or nothing.

NOTES ON THE DESIGN OF A TRANSACTION

States (``TxState``) and the function that performs each transition::

    ACTIVE ──commit()──▶ COMMITTING ──group committed──▶ COMMITTED
      │                      ├──validation / I/O error before the commit point──▶ ROLLED_BACK
      │                      └──journal sync failed (outcome unknown)──────────▶ FAILED
      └──rollback(), an exception or a cancellation in the block──▶ ROLLED_BACK

Invariants:

* While ACTIVE nothing outside ``.walstore/staging/<txid>/`` has changed. Small values live in
  memory; large values (over ``inline_threshold``) are written and fsynced to the staging
  directory as they arrive, so memory stays flat.
* A transaction reads its own writes; every other read goes to the store and is remembered
  (files read, files found missing, directories listed) so that the committer can refuse the
  transaction with ConflictError if any of it changed since the transaction began.
* Only the committer (``Store._commit``) moves a transaction out of COMMITTING.
* Once the committer has taken a transaction into a group it is no longer cancellable: the
  group runs shielded and the cancellation is delivered after ``state`` is final.
"""

from __future__ import annotations

import enum
import json
import os
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _journal_format as fmt
from ._errors import InvalidPathError, StoreClosedError, TransactionClosedError
from ._paths import check_path

if TYPE_CHECKING:
    from ._store import Store

Path = str | os.PathLike[str]


class TxState(enum.Enum):
    """Where a transaction is in its life."""

    ACTIVE = "active"  # ops buffered; nothing visible; large values staged
    COMMITTING = "committing"  # handed to the committer; outcome pending
    COMMITTED = "committed"  # durable in the journal (and in place unless StoreFailedError)
    ROLLED_BACK = "rolled_back"  # nothing changed; staged values removed
    FAILED = "failed"  # outcome unknown (the journal sync failed); reopen to learn it


def to_bytes(data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"data must be bytes, bytearray or memoryview, not {type(data).__name__}")


def encode_json(obj: Any, indent: int | None) -> bytes:
    """Serialise before anything is recorded, so an unserialisable value changes nothing."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode()


class Transaction:
    """A set of changes to the store applied all or nothing.

    Use ``async with store.transaction() as tx:``; the block commits on a clean exit and rolls
    back on an exception or cancellation, which then propagates unchanged.
    """

    def __init__(self, store: Store, txid: int, begin_lsn: int) -> None:
        self._store = store
        self.txid = txid  # unique and increasing across reopens; names staging/<txid>/
        self.begin_lsn = begin_lsn
        self.state = TxState.ACTIVE
        self.lsn: int | None = None  # LSN of the COMMIT record, once committed
        self._ops: dict[str, fmt.Op] = {}  # path -> last op on it, in first-touch order
        self._reads: set[str] = set()
        self._listed: set[str] = set()
        self._staged = 0
        self._closed_with_store = False  # rolled back by Store.aclose()

    def __repr__(self) -> str:
        return f"<Transaction txid={self.txid} {self.state.value} ops={len(self._ops)}>"

    # -- writes --------------------------------------------------------------------------

    def _check_active(self) -> None:
        if self.state is not TxState.ACTIVE:
            raise TransactionClosedError(f"transaction {self.txid} is {self.state.value}")

    async def write(self, path: Path, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` to ``path`` when the transaction commits (created or replaced).

        A value over the store's inline threshold is staged to disk now. Cancellation: the
        value is not recorded and the transaction stays usable."""
        self._check_active()
        p = check_path(path)
        value = to_bytes(data)
        if len(value) > self._store._inline_threshold:
            index = self._staged
            self._staged += 1  # counted first: a cancelled stage still gets cleaned up
            staged = await self._store._stage(self, index, value)
            self._ops[p] = fmt.PutStaged(p, staged.staged, staged.size, staged.crc)
        else:
            self._ops[p] = fmt.Put(p, value)

    async def write_text(self, path: Path, text: str, encoding: str = "utf-8") -> None:
        """Write ``text`` encoded with ``encoding``. Cancellation: as ``write``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        await self.write(path, text.encode(encoding))

    async def write_json(self, path: Path, obj: Any, *, indent: int | None = 2) -> None:
        """Write ``obj`` as JSON (UTF-8, a trailing newline). A value JSON cannot represent
        raises TypeError or ValueError and records nothing. Cancellation: as ``write``."""
        self._check_active()
        await self.write(path, encode_json(obj, indent))

    async def delete(self, path: Path, missing_ok: bool = False) -> None:
        """Delete the file ``path`` at commit. Raises FileNotFoundError if it does not exist
        (unless ``missing_ok``). Cancellation: nothing recorded, the transaction stays usable."""
        self._check_active()
        p = check_path(path)
        if any(
            k.startswith(p + "/") and not isinstance(o, fmt.Delete) for k, o in self._ops.items()
        ):
            raise InvalidPathError(f"cannot delete {p!r}: it is a directory")
        if not await self.exists(p):
            await self._store._check_parents(p)
            if missing_ok:
                return
            raise FileNotFoundError(2, "No such file or directory", p)
        if await self._is_dir(p):
            raise InvalidPathError(f"cannot delete {p!r}: it is a directory")
        self._ops[p] = fmt.Delete(p)

    # -- reads ---------------------------------------------------------------------------

    async def read(self, path: Path) -> bytes:
        """The content of ``path`` as this transaction sees it (its own writes included).
        Raises FileNotFoundError. Cancellation: propagates; nothing changes."""
        self._check_active()
        p = check_path(path)
        op = self._ops.get(p)
        if isinstance(op, fmt.Put):
            return op.data
        if isinstance(op, fmt.PutStaged):
            return await self._store._read_staged(op.staged)
        if isinstance(op, fmt.Delete):
            raise FileNotFoundError(2, "No such file or directory", p)
        self._reads.add(p)
        return await self._store._read_raw(p)

    async def read_text(self, path: Path, encoding: str = "utf-8") -> str:
        """``read`` decoded. Cancellation: as ``read``."""
        return (await self.read(path)).decode(encoding)

    async def read_json(self, path: Path) -> Any:
        """``read`` parsed as JSON. Cancellation: as ``read``."""
        return json.loads(await self.read(path))

    async def exists(self, path: Path) -> bool:
        """Whether ``path`` (a file or a directory) exists as this transaction sees it.
        Cancellation: propagates; nothing changes."""
        self._check_active()
        p = check_path(path, allow_root=True)
        op = self._ops.get(p)
        if op is not None:
            return not isinstance(op, fmt.Delete)
        if any(
            k.startswith(p + "/") and not isinstance(o, fmt.Delete) for k, o in self._ops.items()
        ):
            return True
        self._reads.add(p)
        return await self._store._lstat_raw(p) is not None

    async def _is_dir(self, p: str) -> bool:
        st = await self._store._lstat_raw(p)
        return st is not None and st.kind == "dir"

    async def list(self, path: Path = "") -> list[str]:
        """Sorted names in directory ``path`` as this transaction sees it. Raises
        FileNotFoundError / NotADirectoryError. Cancellation: propagates; nothing changes."""
        self._check_active()
        p = check_path(path, allow_root=True)
        if isinstance(self._ops.get(p), fmt.Put | fmt.PutStaged):
            raise NotADirectoryError(20, "Not a directory", p)
        prefix = p + "/" if p else ""
        mine = [k for k in self._ops if k.startswith(prefix)]
        self._listed.add(p)
        try:
            names = set(await self._store._list_raw(p))
        except FileNotFoundError:
            if not any(not isinstance(self._ops[k], fmt.Delete) for k in mine):
                raise
            names = set()
        for k in mine:
            rest = k[len(prefix) :]
            name, sep, _ = rest.partition("/")
            if sep or not isinstance(self._ops[k], fmt.Delete):
                names.add(name)
            else:
                names.discard(name)
        return sorted(names)

    # -- ending ----------------------------------------------------------------------------

    def _prepared(self) -> tuple[fmt.Op, ...]:
        return tuple(self._ops.values())

    async def commit(self) -> None:
        """Commit: on return every change is durable (Durability.FULL) and in place.

        Raises ConflictError or InvalidPathError (rolled back, nothing changed), an OSError met
        before the commit point (rolled back), or StoreFailedError (``state`` tells: FAILED, the
        outcome is unknown; COMMITTED, durable but not yet in place). Cancellation: before the
        committer takes the transaction it rolls back and the cancellation propagates; after,
        the commit runs to its end shielded, ``state`` is final, then the cancellation is
        delivered."""
        self._check_active()
        await self._store._commit(self)

    async def rollback(self) -> None:
        """Discard every change; staged values are removed. Idempotent once rolled back.
        Cancellation: the cleanup runs shielded, then the cancellation is delivered."""
        if self.state is TxState.ROLLED_BACK:
            return
        self._check_active()
        await self._store._end(self, TxState.ROLLED_BACK)

    async def __aenter__(self) -> Transaction:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.state is not TxState.ACTIVE:
            if self._closed_with_store and exc is None:
                raise StoreClosedError(
                    f"the store was closed inside transaction {self.txid}'s block; "
                    "it was rolled back"
                )
            return  # rolled back (or committed) explicitly inside the block
        if exc is None:
            await self.commit()
        else:
            await self._store._end(self, TxState.ROLLED_BACK)
