"""walstore: a transactional store of plain files for async apps, made crash-safe by a
write-ahead journal."""

# Layout. Imports point down this list, never up (within a line, left to right):
#
#   _open                    walstore.open: make the engine, recover, hand back a Store
#   _store                   Store's public API and _Link, the only way a Transaction reaches it
#   _group_commit            the commit queue and its leader (LevelDB's writers_), hot-path hand-on
#   _store_reads             reads and the read cache
#   _store_base _commit_lock _worker _contention _cache    a Store's state and checks; the lock
#                            shared with other processes; the committer thread; turns on hot
#                            paths; the read cache
#   _transaction _tx_view _tx_ops _tx_writers _footprint   Transaction, its reads, its ops, the
#                            writers it hands out, what it and its store share (TxLink)
#   _engine _checkpoint _group_steps _validate _reads _space   the blocking core, checkpoints,
#                            the commit protocol; numbered invariants in _engine's docstring
#   _peers _shared           other processes: the commit lock, the shared header, slots
#   _recovery _apply         replay at open; applying a group in place
#   _commit_log _journal_writer _journal_reader            the journal's segments and records
#   _os_fs _confine _writers _libc _memory_fs _memory_disk _fs    OsFileSystem (paths beneath
#                            the root, stream writers, ctypes calls), the simulated disk, the seam
#   _prepared _conflicts _limits _paths _journal_format _errors   plain data and rules, no I/O
#
# Beside it, importing from it and imported by none of it: _cli (with _cli_text, what it
# prints), _inspect (read-only readers of a store) with _info, _verify and _backup on it,
# _demo, testing, _crashcheck, pytest_plugin.

from importlib import metadata as _metadata

from ._engine import Durability as Durability
from ._errors import CommitOutcomeUnknownError as CommitOutcomeUnknownError
from ._errors import CommittedNotAppliedError as CommittedNotAppliedError
from ._errors import ConflictError as ConflictError
from ._errors import CorruptionError as CorruptionError
from ._errors import InvalidPathError as InvalidPathError
from ._errors import NotAStoreError as NotAStoreError
from ._errors import StoreClosedError as StoreClosedError
from ._errors import StoreError as StoreError
from ._errors import StoreFailedError as StoreFailedError
from ._errors import StoreLayoutError as StoreLayoutError
from ._errors import StoreLockedError as StoreLockedError
from ._errors import StoreMisuseError as StoreMisuseError
from ._errors import StoreReadOnlyError as StoreReadOnlyError
from ._errors import TransactionBusyError as TransactionBusyError
from ._errors import TransactionClosedError as TransactionClosedError
from ._errors import TransactionError as TransactionError
from ._footprint import TxState as TxState
from ._fs import FileStat as FileStat
from ._fs import FileSystem as FileSystem
from ._open import open as open
from ._os_fs import OsFileSystem as OsFileSystem
from ._recovery import RecoveryReport as RecoveryReport
from ._store import Store as Store
from ._store import StoreStats as StoreStats
from ._transaction import Transaction as Transaction
from ._tx_writers import DirWriter as DirWriter
from ._tx_writers import StreamWriter as StreamWriter

try:
    __version__: str = _metadata.version("walstore")
    """The installed distribution's version (``importlib.metadata``)."""
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "CommitOutcomeUnknownError",
    "CommittedNotAppliedError",
    "ConflictError",
    "CorruptionError",
    "DirWriter",
    "Durability",
    "FileStat",
    "FileSystem",
    "InvalidPathError",
    "NotAStoreError",
    "OsFileSystem",
    "RecoveryReport",
    "Store",
    "StoreClosedError",
    "StoreError",
    "StoreFailedError",
    "StoreLayoutError",
    "StoreLockedError",
    "StoreMisuseError",
    "StoreReadOnlyError",
    "StoreStats",
    "StreamWriter",
    "Transaction",
    "TransactionBusyError",
    "TransactionClosedError",
    "TransactionError",
    "TxState",
    "__version__",
    "open",
]

# Errors name their public module, as trio's and anyio's do: tracebacks and reprs show
# walstore.ConflictError, not walstore._errors.ConflictError, and pickles name a module
# that keeps them when the private modules are rearranged.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and issubclass(_obj, BaseException):
        _obj.__module__ = __name__
del _name, _obj
