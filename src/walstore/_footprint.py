"""The record a transaction and its store share, and the interface between them.

A ``Transaction`` never holds its ``Store``: it holds a ``TxLink`` (``_store._Link``), the
only way it reaches the store, and a ``Footprint``, all the store sees of it. Neither reads
the other's private attributes. Both run on the event loop.
"""

from __future__ import annotations

import builtins
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from . import _journal_format as fmt

if TYPE_CHECKING:
    from ._conflicts import Conflict
    from ._contention import Claim
    from ._engine import TxOp
    from ._fs import AsyncWriter, FileStat
    from ._group_commit import PendingWrite
    from ._limits import PathLimits


class TxState(enum.Enum):
    """Where a transaction is in its life."""

    ACTIVE = "active"  # ops buffered; nothing visible; large values staged
    COMMITTING = "committing"  # handed to the committer; outcome pending
    COMMITTED = "committed"  # durable in the journal (in place unless CommittedNotAppliedError)
    ROLLED_BACK = "rolled_back"  # nothing changed; staged values removed
    FAILED = "failed"  # outcome unknown (the journal sync failed); reopen to learn it


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
    def sync_enabled(self) -> bool: ...  # whether staged files are fsynced

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
