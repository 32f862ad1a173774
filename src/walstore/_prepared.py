"""What a group commit takes and gives back: the prepared transactions the Store hands the
engine (``PreparedTx``, their ops as the transaction left them), and each one's ``Result``.
Plain data, on the event loop and in the committer thread alike."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from . import _journal_format as fmt
from ._conflicts import Conflict, Reads
from ._errors import ConflictError


class Durability(enum.Enum):
    """How much a returned commit survives."""

    FULL = "full"  # fsync at every group commit: a returned commit survives power loss
    NORMAL = "normal"  # atomic; on power loss the newest commits may be lost (today: as FULL)
    OFF = "off"  # no fsync: survives a process crash, not a power loss (tests, caches)


class Outcome(enum.Enum):
    COMMITTED = "committed"  # durable in the journal (and applied unless error is set)
    REJECTED = "rejected"  # nothing written: error says why
    UNKNOWN = "unknown"  # the commit record was written but its sync failed


@dataclass(frozen=True, slots=True)
class Move:
    """``tx.move``: resolved at step 2 into a PutStaged of a hard link of ``src``."""

    path: str  # the destination
    src: str


Keep = frozenset[str] | Callable[[str], bool] | None


@dataclass(frozen=True, slots=True)
class PendingReplace:
    """``tx.replace_dir``: resolved at step 2 into a ReplaceDir, kept files linked in."""

    path: str
    entries: tuple[fmt.Put | fmt.PutStaged, ...]
    keep: Keep


TxOp = fmt.Put | fmt.PutStaged | fmt.Delete | fmt.DeleteDir | Move | PendingReplace


@dataclass(frozen=True)
class PreparedTx:
    """A transaction handed to the committer: its ops and what it read, each read with the
    LSN visible when it was made (``_conflicts.py``)."""

    txid: int
    begin_lsn: int
    ops: tuple[TxOp, ...]
    staged: bool = False  # has files under staging/<txid>/
    reads: Reads = field(default_factory=dict)  # files read, or found missing
    listed: Reads = field(default_factory=dict)  # directories listed
    subtrees: Reads = field(default_factory=dict)  # directories read as a whole
    # Files read as a transaction ahead in the group wrote them, by path -> its txid.
    deps: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    lsn: int = 0
    error: BaseException | None = None


def conflict_error(txid: int, conflict: Conflict) -> ConflictError:
    return ConflictError(f"txid={txid}: {conflict.what}", paths=(conflict.key,), lsn=conflict.lsn)
