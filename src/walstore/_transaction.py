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
* Only the committer (``Store._commit``) moves a transaction out of COMMITTING.
* Once the committer has taken a transaction into a group it is no longer cancellable: the
  group runs shielded and the cancellation is delivered after ``state`` is final.
"""

from __future__ import annotations

import builtins
import enum
import json
import os
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.lowlevel

from . import _journal_format as fmt
from ._conflicts import listing_key
from ._engine import Keep, Move, PendingReplace, TxOp
from ._errors import (
    ConflictError,
    InvalidPathError,
    StoreClosedError,
    TransactionBusyError,
    TransactionClosedError,
)
from ._fs import byte_view
from ._paths import check_path, parents

if TYPE_CHECKING:
    from ._conflicts import Conflict
    from ._contention import Claim
    from ._fs import AsyncWriter, FileStat
    from ._group_commit import PendingWrite
    from ._limits import PathLimits

Path = str | os.PathLike[str]


class TxState(enum.Enum):
    """Where a transaction is in its life."""

    ACTIVE = "active"  # ops buffered; nothing visible; large values staged
    COMMITTING = "committing"  # handed to the committer; outcome pending
    COMMITTED = "committed"  # durable in the journal (in place unless CommittedNotAppliedError)
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


STREAM_CHUNK = 1 << 20  # open_write buffers this much per worker-thread hop


class _Missing:
    """A path the transaction's own ops say does not exist."""


MISSING = _Missing()
_FileOp = fmt.Put | fmt.PutStaged | Move


@dataclass(eq=False)
class Footprint:
    """What a transaction's store sees of it, and all it sees: what it read (each with the
    LSN visible then), its place in the queues of hot paths, what it staged, and its state,
    which moves only by the transitions below (the diagram at the top). The store makes one
    with each transaction (``Store._transaction``), which hands it back to each ``TxLink``
    call that needs it. On the event loop."""

    txid: int
    begin_lsn: int
    claim: Claim  # its place in the queues of hot paths
    # What it read, each with the LSN visible when it read it (the oldest, if twice):
    reads: dict[str, int] = field(default_factory=dict)  # files read, or found missing
    listed: dict[str, int] = field(default_factory=dict)  # directories listed
    subtrees: dict[str, int] = field(default_factory=dict)  # directories read as a whole
    # Hot files read as a transaction queued ahead wrote them (``_contention.py`` rule 5):
    # path -> that transaction's pending write.
    deps: dict[str, PendingWrite] = field(default_factory=dict)
    staged: int = 0  # values staged (or being staged): names staging/<txid>/<n>
    staging_made: bool = False  # staging/<txid>/ exists
    closed_with_store: bool = False  # rolled back by Store.aclose()
    state: TxState = TxState.ACTIVE
    lsn: int | None = None  # LSN of the COMMIT record, once committed

    def committing(self) -> None:
        """ACTIVE -> COMMITTING: handed to the committer (``Store._commit``)."""
        assert self.state is TxState.ACTIVE, self.state
        self.state = TxState.COMMITTING

    def committed(self, lsn: int | None = None) -> None:
        """-> COMMITTED (at ``lsn``; None: it wrote nothing, no record)."""
        self.state = TxState.COMMITTED
        if lsn is not None:
            self.lsn = lsn

    def failed(self) -> None:
        """-> FAILED: the outcome is unknown."""
        self.state = TxState.FAILED

    def rolled_back(self, *, by_close: bool = False) -> None:
        """-> ROLLED_BACK (``by_close``: by ``Store.aclose`` while its block ran)."""
        self.state = TxState.ROLLED_BACK
        self.closed_with_store |= by_close


class TxLink(Protocol):
    """What a transaction needs of its store: the one interface between them. The store
    hands each transaction one (``_store._Link``). On the event loop; the reads and writes
    run their file-system work in worker threads."""

    @property
    def limits(self) -> PathLimits: ...  # the names and paths the store takes

    @property
    def inline_threshold(self) -> int: ...  # larger values are staged to disk

    @property
    def sync(self) -> bool: ...  # whether staged files are fsynced

    @property
    def visible_lsn(self) -> int: ...  # the LSN a read made now is tagged with

    def check_context(self) -> None: ...  # StoreMisuseError outside its thread and process

    def stale(self, reads: Mapping[str, int], listed: Mapping[str, int]) -> Conflict | None: ...

    async def admit(self, claim: Claim, key: str) -> None: ...  # a turn on a hot key

    def pending_write(self, claim: Claim, path: str) -> PendingWrite | None: ...

    async def read(self, path: str) -> bytes: ...

    async def read_staged(self, name: str) -> bytes: ...

    async def lstat(self, path: str) -> FileStat | None: ...

    async def listdir(self, path: str) -> builtins.list[str]: ...

    async def check_parents(self, path: str) -> None: ...

    async def stage(self, tx: Footprint, index: int, data: bytes) -> fmt.PutStaged: ...

    async def open_stream(self, tx: Footprint, index: int) -> tuple[str, AsyncWriter]: ...

    async def discard(self, tx: Footprint) -> None: ...  # what it staged, after it ended

    async def commit(self, tx: Footprint, ops: tuple[TxOp, ...]) -> None: ...

    async def roll_back(self, tx: Footprint) -> None: ...


class Transaction:
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
        self._ops: dict[str, TxOp] = {}  # path -> last op on it, in order of last touch
        # Indexes of _ops, so that each op costs O(its depth), not O(the transaction's ops)
        # (16,000 deletes in one transaction took 62 s when every op scanned them all):
        self._seq: dict[str, int] = {}  # path -> when its op was last set
        self._tick = 0
        # Made on first need (a transaction that only writes never needs them), then kept:
        self._indexed = False
        self._below: dict[str, set[str]] = {}  # directory -> paths of ops strictly below it
        self._makes: dict[str, int] = {}  # directory -> ops below it that are not deletes
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
        path = op.path
        if path in self._ops:
            self._unset(path)
        self._ops[path] = op
        self._tick += 1
        self._seq[path] = self._tick
        if self._indexed:
            self._index(path, op)

    def _index(self, path: str, op: TxOp) -> None:
        makes = not isinstance(op, fmt.Delete | fmt.DeleteDir)
        below, counts = self._below, self._makes
        for a in parents(path):
            below.setdefault(a, set()).add(path)
            if makes:
                counts[a] = counts.get(a, 0) + 1

    def _build_index(self) -> None:
        """``_below`` and ``_makes``, the first time an op needs them: once, in the ops'
        number; kept up to date by ``_set`` and ``_unset`` from then on."""
        if not self._indexed:
            self._indexed = True
            for path, op in self._ops.items():
                self._index(path, op)

    def _unset(self, path: str) -> None:
        op = self._ops.pop(path, None)
        if op is None:
            return
        del self._seq[path]
        if not self._indexed:
            return
        makes = not isinstance(op, fmt.Delete | fmt.DeleteDir)
        for a in parents(path):
            under = self._below[a]
            under.discard(path)
            if not under:
                del self._below[a]
            if makes:
                self._makes[a] -= 1
                if not self._makes[a]:
                    del self._makes[a]

    def _drop_below(self, path: str) -> None:
        self._build_index()
        for k in list(self._below.get(path, ())):
            self._unset(k)

    # -- the transaction's own view ------------------------------------------------------

    def _lookup(self, p: str) -> TxOp | _Missing | tuple[PendingReplace, str] | None:
        """What the transaction's ops say about file ``p``: an op on it, MISSING, (a
        replace_dir above it, the path relative to it), or None (ask the disk)."""
        ops, seq = self._ops, self._seq
        if not ops:
            return None
        # The newest op at p or above it decides: a dict lookup for p and each ancestor.
        k, newest = p, seq.get(p, -1)
        for a in parents(p):
            at = seq.get(a, -1)
            if at > newest:
                k, newest = a, at
        if newest < 0:
            return None
        op = ops[k]
        if k == p:
            if isinstance(op, fmt.Delete | fmt.DeleteDir):
                return MISSING
            return op
        if isinstance(op, fmt.DeleteDir):
            return MISSING
        if isinstance(op, PendingReplace):
            return op, p[len(k) + 1 :]
        return MISSING  # an ancestor is a file this transaction writes

    def _keeps(self, op: PendingReplace, rel: str) -> bool:
        return op.keep is not None and _keeps(op.keep, rel)

    def _missing(self, exc: OSError) -> Exception:
        """What to raise when the store lacks what an op needs: ConflictError if something
        this transaction read has changed since it read it (its view is stale, and a retry
        in ``Store.atomic`` may well succeed), else ``exc`` itself."""
        conflict = self._link.stale(self._reads, self._listed)
        if conflict is not None:
            err = ConflictError(
                f"txid={self.txid}: {exc.filename!r}: {exc.strerror}, after another commit "
                f"changed what this transaction had read ({conflict.what})",
                paths=(conflict.key,),
                lsn=conflict.lsn,
            )
            err.__cause__ = exc
            return err
        return exc

    async def _note(self, reads: dict[str, int], path: str, key: str) -> None:
        """Remember a read of ``path`` (under lock key ``key``), after waiting for its turn
        if it is hot. Cancellation: propagates; nothing is remembered."""
        if path in reads or path in self._deps:
            return
        await self._link.admit(self._claim, key)
        if reads is self._reads:
            pending = self._link.pending_write(self._claim, path)
            if pending is not None:
                self._deps[path] = pending
                return
        reads.setdefault(path, self._link.visible_lsn)

    async def _content(self, p: str) -> bytes:
        found = self._lookup(p)
        if isinstance(found, fmt.Put):
            return found.data
        if isinstance(found, fmt.PutStaged):
            return await self._link.read_staged(found.staged)
        if isinstance(found, Move):
            await self._note(self._reads, found.src, found.src)
            return await self._read_disk(found.src)
        if isinstance(found, tuple):
            replace, rel = found
            for e in replace.entries:
                if e.path == rel:
                    return (
                        e.data if isinstance(e, fmt.Put) else await self._link.read_staged(e.staged)
                    )
            if not self._keeps(replace, rel):
                raise FileNotFoundError(2, "No such file or directory", p)
            await self._note(self._subtrees, replace.path, listing_key(replace.path))
            return await self._read_disk(p)
        if found is not None:
            raise FileNotFoundError(2, "No such file or directory", p)
        await self._note(self._reads, p, p)
        return await self._read_disk(p)

    async def _read_disk(self, p: str) -> bytes:
        dep = self._deps.get(p)
        if dep is not None:  # the value a transaction queued ahead of this one writes
            if isinstance(dep.op, fmt.Put):
                return dep.op.data
            raise FileNotFoundError(2, "No such file or directory", p)
        try:
            return await self._link.read(p)
        except FileNotFoundError as exc:
            err = self._missing(exc)
            if err is exc:
                raise
            raise err from exc

    # -- writes --------------------------------------------------------------------------

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
        return StreamWriter(p, name, handle, self._link.sync)

    async def delete(self, path: Path, missing_ok: bool = False) -> None:
        """Delete the file ``path`` at commit. Raises FileNotFoundError if it does not exist
        (unless ``missing_ok``). Cancellation: nothing recorded, the transaction stays usable."""
        with self._running():
            await self._delete(self._path(path), missing_ok)

    async def _delete(self, p: str, missing_ok: bool) -> None:
        kind = await self._kind(p)
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
        kind = await self._kind(s)  # one look, recorded as a read
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
        kind = await self._kind(p)
        if kind == "file":
            raise self._missing(NotADirectoryError(20, "Not a directory", p))
        if kind is None:
            raise self._missing(FileNotFoundError(2, "No such directory", p))
        self._recording()
        self._drop_below(p)
        self._unset(p)
        if await self._kind(p) is not None:  # not only this transaction's own making
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

    # -- reads ---------------------------------------------------------------------------

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
        return await self._kind(p) is not None

    async def _kind(self, p: str) -> str | None:
        """ "file", "dir" or None as this transaction sees ``p``."""
        # Something this transaction puts below p, or a directory it replaces at p: a dir.
        self._build_index()
        if p in self._makes or isinstance(self._ops.get(p), PendingReplace):
            return "dir"
        found = self._lookup(p)
        if isinstance(found, _FileOp):
            return "file"
        if found is MISSING:
            return None
        if isinstance(found, tuple):
            replace, rel = found
            if any(e.path == rel for e in replace.entries):
                return "file"
            if any(e.path.startswith(rel + "/") for e in replace.entries):
                return "dir"
            if not self._keeps(replace, rel):
                return None
            await self._note(self._subtrees, replace.path, listing_key(replace.path))
        else:
            await self._note(self._reads, p, p)
            dep = self._deps.get(p)
            if dep is not None:
                return "file" if isinstance(dep.op, fmt.Put) else None
        st = await self._link.lstat(p)
        if st is None:
            return None
        return "dir" if st.kind == "dir" else "file"

    async def list(self, path: Path = "") -> list[str]:
        """Sorted names in directory ``path`` as this transaction sees it. Raises
        FileNotFoundError / NotADirectoryError. Cancellation: propagates; nothing changes."""
        self._check_active()
        p = self._path(path, allow_root=True)
        kind = await self._kind(p) if p else "dir"
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

    async def _disk_names(self, p: str) -> builtins.list[str]:
        try:
            return await self._link.listdir(p)
        except (FileNotFoundError, NotADirectoryError):
            return []

    # -- ending ----------------------------------------------------------------------------

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


def _keeps(keep: frozenset[str] | Callable[[str], bool], rel: str) -> bool:
    top = rel.split("/")[0]
    return keep(top) if callable(keep) else top in keep


def _retarget(op: fmt.Put | fmt.PutStaged | Move, path: str) -> TxOp:
    if isinstance(op, fmt.Put):
        return fmt.Put(path, op.data)
    if isinstance(op, fmt.PutStaged):
        return fmt.PutStaged(path, op.staged, op.size, op.crc)
    return Move(path, op.src)


class StreamWriter:
    """A large value being streamed into staging (see ``Transaction.open_write``)."""

    def __init__(self, path: str, name: str, handle: AsyncWriter, sync: bool) -> None:
        self._path = path
        self._name = name
        self._handle = handle
        self._sync = sync
        self._buf = bytearray()
        self._size = 0
        self._crc = 0
        self._closed = False

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; a worker-thread hop happens once at least 1 MiB is buffered.
        Cancellation: propagates; the value will not be recorded."""
        if self._closed:
            raise TransactionClosedError("the streamed value is already closed")
        view = byte_view(
            to_bytes(data) if not isinstance(data, bytes | bytearray | memoryview) else data
        )
        self._size += len(view)  # bytes (nbytes), whatever the view's item size
        if not self._buf and len(view) >= STREAM_CHUNK:
            await self._write(view)  # big enough for a hop of its own: no copy
            return
        self._buf += view
        if len(self._buf) >= STREAM_CHUNK:
            await self._flush()

    async def _flush(self) -> None:
        if self._buf:
            chunk = bytes(self._buf)
            self._buf.clear()
            await self._write(memoryview(chunk))

    async def _write(self, chunk: memoryview) -> None:
        self._crc = zlib.crc32(chunk, self._crc)
        await self._handle.write(chunk)

    @asynccontextmanager
    async def _closing(self) -> AsyncIterator[None]:
        """Around the user's block: on a clean exit flush and (FULL) fsync; the handle is
        closed whatever happens, shielded from cancellation."""
        try:
            yield
            self._closed = True
            await self._flush()
            if self._sync:
                await self._handle.sync()
        finally:
            self._closed = True
            with anyio.CancelScope(shield=True):
                await self._handle.aclose()

    def _op(self) -> fmt.PutStaged:
        return fmt.PutStaged(self._path, self._name, self._size, self._crc)


class DirWriter:
    """The new contents of a directory being replaced (see ``Transaction.replace_dir``).
    Paths are relative to that directory."""

    def __init__(self, tx: Transaction, path: str) -> None:
        self._tx = tx
        self.path = path
        self._entries: dict[str, fmt.Put | fmt.PutStaged] = {}
        self._dirs: set[str] = set()  # directories the entries are in

    def _rel(self, path: Path) -> str:
        rel = check_path(path)
        self._tx._path(f"{self.path}/{rel}")  # the limits, on the path it is applied at
        if rel in self._dirs:
            other = next(e for e in self._entries if e.startswith(rel + "/"))
            raise InvalidPathError(f"{rel!r} and {other!r}: one is inside the other")
        for a in parents(rel):
            if a in self._entries:
                raise InvalidPathError(f"{rel!r} and {a!r}: one is inside the other")
        return rel

    def _add(self, rel: str, op: fmt.Put | fmt.PutStaged) -> None:
        self._entries[rel] = op
        self._dirs.update(parents(rel))

    async def write(self, path: Path, data: bytes | bytearray | memoryview) -> None:
        """Put ``data`` at ``path`` inside the new directory. Cancellation: not recorded."""
        self._tx._check_active()
        rel = self._rel(path)
        self._add(rel, await self._tx._value_op(rel, to_bytes(data)))

    async def write_text(self, path: Path, text: str, encoding: str = "utf-8") -> None:
        """``write`` of encoded text. Cancellation: not recorded."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        await self.write(path, text.encode(encoding))

    async def write_json(self, path: Path, obj: Any, *, indent: int | None = 2) -> None:
        """``write`` of JSON. Cancellation: not recorded."""
        await self.write(path, encode_json(obj, indent))

    @asynccontextmanager
    async def open_write(self, path: Path) -> AsyncIterator[StreamWriter]:
        """Stream a large file into the new directory (as ``Transaction.open_write``)."""
        self._tx._check_active()
        rel = self._rel(path)
        writer = await self._tx._open_stream(rel)
        async with writer._closing():
            yield writer
        op = writer._op()
        assert isinstance(op, fmt.PutStaged)
        self._add(rel, op)
