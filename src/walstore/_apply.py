"""Apply committed operations to the user's files (commit step 4 and recovery step R4).

Small values are written to a temporary file under ``.walstore/staging/`` and renamed over the
target, without an fsync: the journal holds the data until a checkpoint makes the files durable.
Staged values are renamed into place. Deletes unlink. Everything applied is remembered, so that
the checkpoint can fsync exactly what changed.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable

from ._fs import FileSystem, write_all
from ._journal_format import Delete, Op, Put, PutStaged
from ._paths import parent, parents


class Applier:
    """Applies ops under ``root``. Requires: caller holds the commit lock."""

    def __init__(self, fs: FileSystem, root: str, staging_dir: str) -> None:
        self.fs = fs
        self.root = root
        self.staging_dir = staging_dir
        self.dirty_files: set[str] = set()  # store paths written since the last checkpoint
        self.dirty_dirs: set[str] = set()  # store paths of directories whose entries changed
        self.staged_dirs: set[str] = set()  # staging/<txid>/ of applied transactions
        self._known_dirs: set[str] = set()

    def full(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def apply(self, txid: int, ops: Iterable[Op], *, replay: bool = False) -> int:
        """Apply one transaction's ops in order; returns how many were applied.

        A staged value is hard-linked into place (through a temporary name, so that it can
        replace an existing file), not renamed: its staging name stays until the checkpoint
        has made the target durable, so a replay always finds it."""
        applied = 0
        for i, op in enumerate(ops):
            tmp = os.path.join(self.staging_dir, f"{txid}-{i}.tmp")
            if isinstance(op, Put):
                self._make_parents(op.path)
                fd = self.fs.open(tmp, create=True, truncate=True)
                try:
                    write_all(self.fs, fd, op.data, 0)
                finally:
                    self.fs.close(fd)
                self.fs.rename(tmp, self.full(op.path))
                self._changed(op.path, replay)
            elif isinstance(op, PutStaged):
                src = os.path.join(self.staging_dir, op.staged)
                self.staged_dirs.add(os.path.dirname(src))
                self._make_parents(op.path)
                if replay and self.fs.lstat(tmp) is not None:
                    self.fs.unlink(tmp)  # left by the apply that crashed
                self.fs.link(src, tmp)
                self.fs.rename(tmp, self.full(op.path))
                self._changed(op.path, replay)
            elif isinstance(op, Delete):
                # Gone already may mean unlinked by a process that then crashed, without the
                # unlink being durable: the directory is synced at the checkpoint either way.
                with contextlib.suppress(FileNotFoundError):
                    self.fs.unlink(self.full(op.path))
                self.dirty_files.discard(op.path)
                self._changed_dir(op.path, replay)
            applied += 1
        return applied

    def forget_dir_cache(self) -> None:
        """Directories may have changed behind our back (a new group, recovery)."""
        self._known_dirs.clear()

    def _changed(self, path: str, replay: bool) -> None:
        self.dirty_files.add(path)
        self._changed_dir(path, replay)

    def _changed_dir(self, path: str, replay: bool) -> None:
        self.dirty_dirs.add(parent(path))
        if replay:
            # The crashed process may have made the directories on the way without syncing
            # them; this process cannot tell, so the checkpoint syncs the whole chain.
            self.dirty_dirs.add("")
            self.dirty_dirs.update(parents(path))

    def _make_parents(self, path: str) -> None:
        for d in parents(path):
            if d in self._known_dirs:
                continue
            st = self.fs.lstat(self.full(d))
            if st is None:
                self.fs.mkdir(self.full(d))
                self.dirty_dirs.add(parent(d))
                self.dirty_dirs.add(d)
            elif st.kind != "dir":
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", self.full(d))
            self._known_dirs.add(d)

    def drop_staged(self) -> None:
        """Checkpoint step, once the new CHECKPOINT is durable: remove the staging
        directories of applied transactions (their values are durable in place)."""
        for d in sorted(self.staged_dirs):
            try:
                names = self.fs.listdir(d)
            except FileNotFoundError:
                continue
            for name in names:
                self.fs.unlink(os.path.join(d, name))
            self.fs.rmdir(d)
        self.staged_dirs.clear()

    def sync(self) -> None:
        """Checkpoint step: fsync every file written and every directory changed since the last
        checkpoint, so the journal records that hold them can be dropped."""
        for path in sorted(self.dirty_files):
            try:
                fd = self.fs.open(self.full(path))
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue  # replaced or removed since; what replaced it is in the sets too
            try:
                self.fs.fsync(fd)
            finally:
                self.fs.close(fd)
        # Deepest first, so a new directory's entries are durable before its own entry.
        for d in sorted(self.dirty_dirs, key=lambda p: -p.count("/") if p else 1):
            try:
                self.fs.fsync_dir(self.full(d))
            except (FileNotFoundError, NotADirectoryError):
                continue
        self.dirty_files.clear()
        self.dirty_dirs.clear()
