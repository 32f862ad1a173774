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
  (files read, files found missing, directories listed), each with the LSN visible when it
  was made, so that the committer can refuse the transaction with ConflictError if any of it
  changed since it was read (``_conflicts.py``).
* A read of a hot path (one that transactions recently conflicted on) first waits for its
  turn in that path's queue (``_contention.py``), so that it reads the value the previous
  holder committed instead of one about to change.
* Ops are kept in order of last touch, one per path; an op on a directory (``delete_dir``,
  ``replace_dir``) drops the ops below it. A move, a delete_dir and a replace_dir's ``keep``
  read what is on disk at commit time: the move's source and the kept files are hard-linked
  into staging by the committer (step 2) and recorded as staged values.
* Only the committer (``GroupCommit._commit``) moves a transaction out of COMMITTING.
* Once the committer has taken a transaction into a group it is no longer cancellable: the
  group runs shielded and the cancellation is delivered after ``state`` is final.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel

from . import _journal_format as fmt
from ._conflicts import listing_key
from ._engine import Keep, Move, PendingReplace, TxOp
from ._errors import (
    InvalidPathError,
    StoreClosedError,
    TransactionBusyError,
    TransactionClosedError,
)
from ._footprint import Footprint, TxLink, TxState
from ._paths import check_path, parents
from ._tx_ops import _FileOp, _retarget
from ._tx_view import TxView
from ._tx_writers import DirWriter, Path, StreamWriter, encode_json, to_bytes


class Transaction(TxView):
    """A set of changes to the store applied all or nothing.

    Use ``async with store.transaction() as tx:``; the block commits on a clean exit and rolls
    back on an exception or cancellation, which then propagates unchanged.
    """

    def __init__(self, link: TxLink, fp: Footprint) -> None:
        self._link = link  # its store
        self.txid = fp.txid  # unique and increasing across reopens; names staging/<txid>/
        self.begin_lsn = fp.begin_lsn
        self._fp = fp  # what the store sees of it
        self._claim = fp.claim
        super().__init__()  # its ops (``TxOps``)
        # What it read (``Footprint``: the same dicts).
        self._reads, self._listed, self._subtrees = fp.reads, fp.listed, fp.subtrees
        self._deps = fp.deps
        self._inflight = 0  # ops running that record a change when they end (``_running``)

    def __repr__(self) -> str:
        return f"<Transaction txid={self.txid} {self.state.value} ops={len(self._ops)}>"

    @property
    def state(self) -> TxState:
        """Where the transaction is in its life."""
        return self._fp.state

    @property
    def lsn(self) -> int | None:
        """The LSN of its COMMIT record, once committed (None before, or if it wrote
        nothing)."""
        return self._fp.lsn

    def _path(self, path: Path, *, allow_root: bool = False) -> str:
        return check_path(path, allow_root=allow_root, limits=self._link.limits)

    def _check_active(self) -> None:
        self._link.check_context()
        if self.state is not TxState.ACTIVE:
            raise TransactionClosedError(f"transaction {self.txid} is {self.state.value}")

    @contextmanager
    def _running(self) -> Iterator[None]:
        """Around an op that awaits before it records its change: while any runs, ``commit``
        refuses (TransactionBusyError) instead of committing without it."""
        self._check_active()
        self._inflight += 1
        try:
            yield
        finally:
            self._inflight -= 1

    def _recording(self) -> None:
        """Before an op that ran records its change: the transaction must still be open (a
        commit refused while it ran rolled it back)."""
        if self.state is not TxState.ACTIVE:
            raise TransactionClosedError(
                f"transaction {self.txid} was {self.state.value} while this op ran: "
                "its change was not recorded (await every op before the commit)"
            )

    async def _drop_late(self) -> None:
        """A value staged by an op that outlived its transaction: remove it, then raise."""
        await self._link.discard(self._fp)
        self._recording()

    def _set(self, op: TxOp) -> None:
        if self.state is not TxState.ACTIVE:
            self._recording()
        self._put(op)

    async def _value_op(self, p: str, value: bytes) -> fmt.Put | fmt.PutStaged:
        if len(value) <= self._link.inline_threshold:
            return fmt.Put(p, value)
        index = self._fp.staged
        self._fp.staged += 1  # counted first: a cancelled stage still gets cleaned up
        staged = await self._link.stage(self._fp, index, value)
        if self.state is not TxState.ACTIVE:  # it ended while the value was being staged
            await self._drop_late()
        # The worker thread is never abandoned, so a cancellation that came meanwhile is
        # delivered here, before the value is recorded.
        await anyio.lowlevel.checkpoint_if_cancelled()
        return fmt.PutStaged(p, staged.staged, staged.size, staged.crc)

    async def write(self, path: Path, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` to ``path`` when the transaction commits (created or replaced).

        A value over the store's inline threshold is staged to disk now. Cancellation: the
        staging write in flight finishes, the value is not recorded, the cancellation
        propagates and the transaction stays usable."""
        self._check_active()
        self._inflight += 1  # as ``_running`` does, inline: every write passes here
        try:
            p = self._path(path)
            self._set(await self._value_op(p, to_bytes(data)))
        finally:
            self._inflight -= 1

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

    @asynccontextmanager
    async def open_write(self, path: Path) -> AsyncIterator[StreamWriter]:
        """Stream a large value: ``async with tx.open_write("blob") as f: await f.write(b)``.

        The bytes go to ``.walstore/staging/<txid>/`` through aiofiles, buffered so that each
        worker-thread hop carries at least 1 MiB, with the CRC computed on the way; memory
        stays flat in the value's size. The value is recorded when the block exits cleanly.
        Cancellation or an error in the block: nothing is recorded (the staged file goes at
        rollback) and it propagates."""
        with self._running():
            p = self._path(path)
            writer = await self._open_stream(p)
            async with writer._closing():
                yield writer
            if self.state is not TxState.ACTIVE:
                await self._drop_late()
            self._set(writer._op())

    async def _open_stream(self, p: str) -> StreamWriter:
        index = self._fp.staged
        self._fp.staged += 1
        name, handle = await self._link.open_stream(self._fp, index)
        return StreamWriter(p, name, handle, self._link.sync_enabled)

    async def delete(self, path: Path, missing_ok: bool = False) -> None:
        """Delete the file ``path`` at commit. Raises FileNotFoundError if it does not exist
        (unless ``missing_ok``). Cancellation: nothing recorded, the transaction stays usable."""
        with self._running():
            await self._delete(self._path(path), missing_ok)

    async def _delete(self, p: str, missing_ok: bool) -> None:
        kind = await self._seen_kind(p)
        if kind == "dir":
            raise InvalidPathError(f"cannot delete {p!r}: it is a directory (use delete_dir)")
        if kind is None:
            await self._link.check_parents(p)
            if missing_ok:
                return
            raise self._missing(FileNotFoundError(2, "No such file or directory", p))
        self._set(fmt.Delete(p))

    async def move(self, src: Path, dst: Path) -> None:
        """Move the file ``src`` to ``dst`` at commit, replacing a file there. Raises
        FileNotFoundError if ``src`` does not exist. The source is hard-linked into staging at
        commit, so the move replays as a put plus a delete. Cancellation: nothing recorded."""
        with self._running():
            await self._move(self._path(src), self._path(dst))

    async def _move(self, s: str, d: str) -> None:
        kind = await self._seen_kind(s)  # one look, recorded as a read
        if kind is None:
            raise self._missing(FileNotFoundError(2, "No such file or directory", s))
        if kind == "dir":
            raise InvalidPathError(f"cannot move {s!r}: it is a directory")
        if s == d:
            return
        found = self._lookup(s)
        if isinstance(found, tuple):  # inside a directory this transaction replaces
            replace, rel = found
            found = next((e for e in replace.entries if e.path == rel), None)
        # This transaction's own value moves as it is; a file on disk is linked at commit.
        moved: TxOp = _retarget(found, d) if isinstance(found, _FileOp) else Move(d, s)
        self._set(moved)
        self._set(fmt.Delete(s))

    async def delete_dir(self, path: Path) -> None:
        """Remove the directory ``path`` and everything in it at commit, atomically with the
        rest of the transaction. Raises FileNotFoundError / NotADirectoryError. Cancellation:
        nothing recorded."""
        with self._running():
            await self._delete_dir(self._path(path))

    async def _delete_dir(self, p: str) -> None:
        kind = await self._seen_kind(p)
        if kind == "file":
            raise self._missing(NotADirectoryError(20, "Not a directory", p))
        if kind is None:
            raise self._missing(FileNotFoundError(2, "No such directory", p))
        self._recording()
        self._drop_below(p)
        self._unset(p)
        if await self._seen_kind(p) is not None:  # not only this transaction's own making
            self._set(fmt.DeleteDir(p))
        await self._note(self._subtrees, p, listing_key(p))

    @asynccontextmanager
    async def replace_dir(
        self, path: Path, keep: Iterable[str] | Callable[[str], bool] | None = None
    ) -> AsyncIterator[DirWriter]:
        """Replace the directory ``path`` as a whole: ``async with tx.replace_dir(p) as d:``
        and write the new contents through ``d`` (``write``, ``write_text``, ``write_json``,
        ``open_write``, nested paths). At commit the new directory takes the old one's place in
        one step (renameat2 RENAME_EXCHANGE on Linux), so readers never see it missing or half
        written. ``keep`` (names, or a predicate on names) carries top-level entries of the
        directory over as they are in the store when the transaction commits; this
        transaction's own earlier changes below ``path`` go with the old directory, and names
        the new contents hold win. Cancellation or an error in the block: nothing recorded,
        and it propagates."""
        with self._running():
            async with self._replace_dir(self._path(path), keep) as writer:
                yield writer

    @asynccontextmanager
    async def _replace_dir(
        self, p: str, keep: Iterable[str] | Callable[[str], bool] | None
    ) -> AsyncIterator[DirWriter]:
        if isinstance(self._lookup(p), _FileOp):
            raise InvalidPathError(f"cannot replace {p!r}: it is a file")
        kept: Keep
        if keep is None or callable(keep):
            kept = keep
        elif isinstance(keep, str):
            raise TypeError("keep must be a collection of names or a predicate, not a str")
        else:
            kept = frozenset(keep)
        writer = DirWriter(self, p)
        yield writer
        self._recording()
        self._drop_below(p)
        if kept is not None:
            await self._note(self._subtrees, p, listing_key(p))
        self._set(PendingReplace(p, tuple(writer._entries.values()), kept))

    async def read(self, path: Path) -> bytes:
        """The content of ``path`` as this transaction sees it (its own writes included).
        Raises FileNotFoundError. Cancellation: propagates; nothing changes."""
        self._check_active()
        return await self._content(self._path(path))

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
        p = self._path(path, allow_root=True)
        if not p:
            return True
        return await self._seen_kind(p) is not None

    async def list(self, path: Path = "") -> list[str]:
        """Sorted names in directory ``path`` as this transaction sees it. Raises
        FileNotFoundError / NotADirectoryError. Cancellation: propagates; nothing changes."""
        self._check_active()
        p = self._path(path, allow_root=True)
        kind = await self._seen_kind(p) if p else "dir"
        if kind == "file":
            raise self._missing(NotADirectoryError(20, "Not a directory", p))
        if kind is None:
            raise self._missing(FileNotFoundError(2, "No such file or directory", p))
        prefix = p + "/" if p else ""
        # The newest directory op at or above p decides the starting point; the ops below p
        # made after it (found in the index, not among all the transaction's ops) add to it.
        names: set[str] = set()
        seq, start, top = self._seq, -1, ""
        for k in (*parents(p), p) if p else ():
            if isinstance(self._ops.get(k), fmt.DeleteDir | PendingReplace) and seq[k] > start:
                start, top = seq[k], k
        base = self._ops.get(top) if top else None
        if base is None:
            await self._note(self._listed, p, listing_key(p))
            names = set(await self._disk_names(p))
        elif isinstance(base, PendingReplace):
            rel = p[len(top) + 1 :] if top != p else ""
            sub = rel + "/" if rel else ""
            names |= {
                e.path[len(sub) :].split("/")[0] for e in base.entries if e.path.startswith(sub)
            }
            if base.keep is not None:
                await self._note(self._subtrees, base.path, listing_key(base.path))
                on_disk = await self._disk_names(p)
                names |= {n for n in on_disk if rel or self._keeps(base, n)}
        self._build_index()
        below = self._below.get(p, ()) if p else self._ops
        for k in sorted((k for k in below if seq[k] > start), key=seq.__getitem__):
            op = self._ops[k]
            name, sep, _ = k[len(prefix) :].partition("/")
            if sep or not isinstance(op, fmt.Delete | fmt.DeleteDir):
                names.add(name)
            else:
                names.discard(name)
        return sorted(names)

    def _prepared(self) -> tuple[TxOp, ...]:
        return tuple(self._ops.values())

    async def commit(self) -> None:
        """Commit: on return every change is durable (Durability.FULL) and in place.

        Raises ConflictError or InvalidPathError (rolled back, nothing changed), an OSError met
        before the commit point (rolled back), CommitOutcomeUnknownError (``state`` FAILED: it
        may or may not be durable), CommittedNotAppliedError (``state`` COMMITTED: durable, not
        yet wholly in place), or StoreFailedError (the store failed earlier: rolled back,
        nothing changed). Cancellation: before the committer takes the transaction it rolls
        back and the cancellation propagates; after, the commit runs to its end shielded,
        ``state`` is final, then the cancellation is delivered."""
        self._check_active()
        if self._inflight:
            await self._link.roll_back(self._fp)
            raise TransactionBusyError(
                f"transaction {self.txid} was committed while {self._inflight} of its own "
                "op(s) still ran (a write staging a value, an open_write or replace_dir "
                "block, in another task or around this commit): it is rolled back, nothing "
                "changed. Await every op of a transaction before it commits"
            )
        await self._link.commit(self._fp, self._prepared())

    async def rollback(self) -> None:
        """Discard every change; staged values are removed. Idempotent once rolled back.
        Cancellation: the cleanup runs shielded, then the cancellation is delivered."""
        if self.state is TxState.ROLLED_BACK:
            return
        self._check_active()
        await self._link.roll_back(self._fp)

    async def __aenter__(self) -> Transaction:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.state is not TxState.ACTIVE:
            if self._fp.closed_with_store and exc is None:
                raise StoreClosedError(
                    f"the store was closed inside transaction {self.txid}'s block; "
                    "it was rolled back"
                )
            return  # rolled back (or committed) explicitly inside the block
        if exc is None:
            await self.commit()
        else:
            await self._link.roll_back(self._fp)
