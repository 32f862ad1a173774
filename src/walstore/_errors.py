"""The walstore exception hierarchy, split by what the caller should do.

Our exception hierarchy::

    StoreError
    ├── StoreLockedError      another process holds the store (pid given): wait, or stop it
    ├── StoreClosedError      used after aclose(): open the store again
    ├── StoreReadOnlyError    a write to a store opened readonly=True: open it for writing
    ├── NotAStoreError        open() of a root holding no store: create=True, or fix the path
    ├── StoreLayoutError      .walstore/ is not real directories on the root's mount: fix that
    ├── StoreMisuseError      used from another thread (event loop) or after fork(): open it there
    ├── StoreFailedError      this instance refuses writes: reopen the store to recover
    │   ├── CommitOutcomeUnknownError  the commit point failed: reopen, read to learn the outcome
    │   └── CommittedNotAppliedError   durable, not wholly in place: reopen to finish applying it
    ├── CorruptionError       journal damage that is not a torn tail: restore a backup
    ├── InvalidPathError      (also ValueError) a bad path or input: fix it; nothing changed
    └── TransactionError
        ├── ConflictError     what it read was changed: retry (Store.atomic does)
        ├── TransactionClosedError  used after it committed, rolled back or failed
        └── TransactionBusyError    committed while one of its own ops ran: await them first

A file that does not exist raises the stdlib ``FileNotFoundError``; other ``OSError``\\ s met
before a transaction's commit point propagate unchanged (the transaction is rolled back and the
store stays usable). A full disk is one of them: a plain ``OSError`` whose ``errno`` is
``ENOSPC`` (or ``EDQUOT``), raised by ``tx.write`` of a staged value or by the commit, before
the commit point, when the disk has no room above the store's reserve; ``store.checkpoint()``
raises the same, without failing the store, when it finds no space.

Every class here is importable from ``walstore`` and reports ``walstore`` as its module.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error walstore raises on its own account. Catch a subclass: each
    says what to do."""


class StoreLockedError(StoreError):
    """Raised by ``open()`` when another process holds the store's LOCK past ``lock_timeout``
    (0 by default with ``exclusive=True``; the message names the holder's pid), or, with
    ``exclusive=True``, has the store open. Nothing was changed. Open again later, or stop
    the holder."""


class StoreClosedError(StoreError):
    """Raised when a store is used after ``aclose()`` (also by a transaction whose store was
    closed inside its block: it was rolled back). Open the store again."""


class StoreReadOnlyError(StoreError):
    """Raised by ``store.transaction()`` (and so ``atomic``) and ``store.checkpoint()`` of a
    store opened with ``readonly=True``. Nothing was changed. Open the store without
    ``readonly`` to write."""


class NotAStoreError(StoreError):
    """Raised by ``open()`` when the root holds no store: ``create=False`` or
    ``readonly=True`` and there is no ``.walstore/journal``, or the root is not a directory.
    Nothing was changed. Open with ``create=True`` (the default) to make one, or fix the
    path."""


class StoreLayoutError(StoreError):
    """Raised by ``open()`` when the store's directories are not as commits need them:
    ``.walstore/`` (or its ``journal/`` or ``staging/``) is a symlink or not a directory, or
    lies on another file system or mount than the root (commits rename from
    ``.walstore/staging/`` into place, which cannot cross mounts), or a file under
    ``.walstore/`` was changed by something other than walstore. Nothing was changed. Put
    the store's root and ``.walstore/`` on one mount, as real directories, and open again."""


class StoreMisuseError(StoreError):
    """Raised when a store is used where it cannot work: from another thread (and so another
    event loop) than the one that opened it (its tasks and events belong to that thread's
    loop: two loops would wait on each other forever), or in a child process made by
    ``os.fork()`` (the child shares the parent's journal and lock handles: both writing
    through them loses commits). Nothing has been changed. Open a store in the process and
    thread that use it; from another thread, hand the work to the store's event loop
    (``anyio.from_thread.run``)."""


class StoreFailedError(StoreError):
    """Raised when an fsync or rename failed where it cannot be undone (at or after a commit
    point, a sync before it, a checkpoint), and by every later write, and by a read that
    would show half a commit, of the same store instance.

    The instance refuses every later write (an fsync is never retried: after a failed fsync
    the kernel may report success while the data is gone). Close it and open the store
    again: recovery finishes the committed work from the journal. If it happens again, the
    disk is failing. The subclasses say what became of the transaction that raised it."""


class CommitOutcomeUnknownError(StoreFailedError):
    """Raised by a commit whose commit point failed: the journal's ``fdatasync`` failed, or
    an append to the journal failed and could not be undone, or the commit's worker call
    raised something unforeseen. The transaction may or may not be durable; ``tx.state`` is
    ``FAILED``. The store fails (see StoreFailedError): reopen it, then read what the
    transaction wrote to learn whether it committed. After a failed sync the store erases
    the record before another process may commit, so it resolves to "not committed" unless
    the erasure failed too."""


class CommittedNotAppliedError(StoreFailedError):
    """Raised by a commit that passed its commit point (the transaction is durable in the
    journal; ``tx.state`` is ``COMMITTED``) whose apply then failed: its changes, or the
    removal of the files they replaced, are not all in place. The store fails (see
    StoreFailedError) and reads that could show half of it are refused: do not commit the
    transaction again; reopen the store, whose recovery finishes applying it."""


class CorruptionError(StoreError):
    """Raised when the journal is damaged in a way a torn tail cannot explain (the message
    names the segment and offset). Restore the newest backup, or inspect the store with
    ``walstore info`` and ``walstore log``."""


class InvalidPathError(StoreError, ValueError):
    """Raised when a path is absolute, climbs out of the root, names ``.walstore/`` or is
    otherwise unusable (a name or path longer than the file system takes, a transaction
    larger than a journal record holds); nothing has been changed. Fix the input."""


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
