"""The walstore exception hierarchy.

Our exception hierarchy::

    StoreError
    ├── StoreLockedError     another process holds the store (holder's pid in the message)
    ├── StoreClosedError     used after aclose()
    ├── StoreFailedError     an fsync/rename failed after the commit point; reopen to recover
    ├── CorruptionError      journal damage that is not a torn tail
    ├── InvalidPathError     (also ValueError) path escapes the root or names a reserved file
    ├── StoreMisuseError     used from another thread (event loop) or, after fork(), process
    └── TransactionError
        ├── ConflictError    serializable validation failed; retrying may succeed
        ├── TransactionClosedError
        └── TransactionBusyError  committed while one of its own ops was still running

A file that does not exist raises the stdlib ``FileNotFoundError``; other ``OSError``\\ s met
before a transaction's commit point propagate unchanged (the transaction is rolled back and the
store stays usable). A full disk is one of them: a plain ``OSError`` whose ``errno`` is
``ENOSPC`` (or ``EDQUOT``), raised by ``tx.write`` of a staged value or by the commit, before
the commit point, when the disk has no room above the store's reserve; ``store.checkpoint()``
raises the same, without failing the store, when it finds no space.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error walstore raises on its own account."""


class StoreLockedError(StoreError):
    """Raised by open() when another process holds the store's LOCK past ``lock_timeout``."""


class StoreClosedError(StoreError):
    """Raised when a store is used after ``aclose()``."""


class StoreFailedError(StoreError):
    """Raised when an fsync or rename failed after a commit point.

    The instance refuses every later write (an fsync is never retried: after a failed fsync
    the kernel may report success while the data is gone). Reopen the store to recover.
    """


class CorruptionError(StoreError):
    """Raised when the journal is damaged in a way a torn tail cannot explain."""


class InvalidPathError(StoreError, ValueError):
    """Raised when a path is absolute, climbs out of the root, names ``.walstore/`` or is
    otherwise unusable (a name or path longer than the file system takes, a transaction
    larger than a journal record holds); nothing has been changed."""


class StoreMisuseError(StoreError):
    """Raised when a store is used where it cannot work: from another thread (and so another
    event loop) than the one that opened it (its tasks and events belong to that thread's
    loop: two loops would wait on each other forever), or in a child process made by
    ``os.fork()`` (the child shares the parent's journal and lock handles: both writing
    through them loses commits). Nothing has been changed. Open a store in the process and
    thread that use it; from another thread, hand the work to the store's event loop
    (``anyio.from_thread.run``)."""


class TransactionError(StoreError):
    """Base class of errors about one transaction."""


class ConflictError(TransactionError):
    """Raised at commit when something the transaction read was changed by another commit
    since it read it; nothing was changed and retrying may succeed (``Store.atomic`` does).

    ``paths`` names what changed: a file's path, or ``dir/`` for a directory listed or read
    as a whole."""

    def __init__(self, message: str, *, paths: tuple[str, ...] = (), lsn: int = 0) -> None:
        super().__init__(message)
        self.paths = paths
        self._lsn = lsn  # the commit that changed them (0: in the same group)


class TransactionClosedError(TransactionError):
    """Raised when a transaction is used after it committed, rolled back or failed; also by
    an op of it that was still running when it ended (its change is not recorded)."""


class TransactionBusyError(TransactionError):
    """Raised by ``commit`` while an op of the same transaction is still running (a
    ``tx.write`` staging a large value, an ``open_write`` or ``replace_dir`` block, in another
    task, or the commit inside such a block): the transaction is rolled back, nothing is
    changed, and the op raises TransactionClosedError when it ends. Await every op of a
    transaction before it commits."""
