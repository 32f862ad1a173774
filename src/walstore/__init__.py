"""walstore: a transactional store of plain files for async apps, made crash-safe by a
write-ahead journal."""

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
