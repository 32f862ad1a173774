"""Apply committed operations to the user's files (commit step 4 and recovery step 3).

Small values are written to a temporary file under ``.walstore/staging/`` and renamed over the
target, without an fsync: the journal holds the data until a checkpoint makes the files durable.
Staged values are hard-linked into place and keep their staging name until the checkpoint.
Deletes unlink. A directory is deleted by renaming it into staging, and replaced by building
the new one in staging and swapping it in with ``exchange`` (renameat2 RENAME_EXCHANGE), so
the path never goes missing; where the system cannot exchange, by two renames. Everything
applied is remembered, so that the checkpoint can fsync exactly what changed and then drop
what was moved out of the way.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Container, Iterable
from concurrent.futures import ThreadPoolExecutor

from ._fs import FileSystem, symlink_on_path, write_all
from ._journal_format import Delete, DeleteDir, Op, Put, PutStaged, ReplaceDir
from ._paths import PathSet, parent, parents

_NO_EXCHANGE = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


def remove_tree(fs: FileSystem, path: str, dev: int | None = None) -> int:
    """Remove ``path`` and everything under it; returns how many entries went. Never descends
    into another file system: a directory mounted in a tree that was moved out of place to be
    removed raises EXDEV, and what that file system holds is left alone.

    Iterative (a stack of directories, each with the names still to remove), so a tree of any
    depth goes: a recursive walk died with RecursionError at ~500 levels, after the commit
    point. The calls are those of a depth-first walk, children before their directory."""
    st = fs.lstat(path)
    if st is None:
        return 0
    if st.kind != "dir":
        fs.unlink(path)
        return 1
    if dev is not None and st.dev != dev:
        raise OSError(errno.EXDEV, "a mount point inside a directory being removed", path)
    removed = 0
    stack = [(path, st.dev, iter(fs.listdir(path)))]
    while stack:
        d, d_dev, names = stack[-1]
        for name in names:
            child = os.path.join(d, name)
            cst = fs.lstat(child)
            if cst is None:
                continue
            if cst.kind != "dir":
                fs.unlink(child)
                removed += 1
                continue
            if cst.dev != d_dev:
                raise OSError(errno.EXDEV, "a mount point inside a directory being removed", child)
            stack.append((child, cst.dev, iter(fs.listdir(child))))
            break  # descend first; this directory's other names wait on the stack
        else:
            stack.pop()
            fs.rmdir(d)
            removed += 1
    return removed


# Below this many changed files and directories, fsyncing each is cheaper than syncing the
# whole file system (whose other dirty data syncfs writes back too).
SYNCFS_MIN = 16


class Applier:
    """Applies ops under ``root``. Requires: caller holds the commit lock."""

    def __init__(self, fs: FileSystem, root: str, staging_dir: str) -> None:
        self.fs = fs
        self.root = root
        self.staging_dir = staging_dir
        # Store paths written since the last checkpoint, and of directories whose entries
        # changed (PathSet: a delete_dir drops what lies below it without a scan of them all).
        self.dirty_files = PathSet()
        self.dirty_dirs = PathSet()
        self.garbage: set[str] = set()  # staging paths to remove after the next checkpoint
        self.replaced: list[str] = []  # old files exchanged out of place, to unlink
        self.garbage_bytes = 0  # staged bytes kept until the checkpoint (one of its triggers)
        self.exchange_files = True  # False once the system refused renameat2 RENAME_EXCHANGE
        self._known_dirs = PathSet()
        # Checkpoints of at least this many changes use syncfs; None: never.
        self.syncfs_min: int | None = SYNCFS_MIN

    def full(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def apply(
        self,
        txid: int,
        ops: Iterable[Op],
        *,
        replay: bool = False,
        replacing: Container[tuple[int, int]] | None = None,
        unappliable: list[str] | None = None,
    ) -> int:
        """Apply one transaction's ops in order; returns how many were applied. With
        ``replay``, leftovers of an apply that crashed are cleared first. ``replacing``, from
        validation, holds (txid, index) of each put whose target is then an existing file
        (the others' targets are missing); without it each target is looked up. With
        ``unappliable`` (recovery), an op that fails because no file system could hold its
        name or path (ENAMETOOLONG: committed by a version that did not check) is skipped
        and described there, instead of failing this open and every later one."""
        applied = 0
        for i, op in enumerate(ops):
            if unappliable is None:
                self._apply_op(txid, i, op, replay, replacing)
            else:
                try:
                    self._apply_op(txid, i, op, replay, replacing)
                except OSError as exc:
                    if exc.errno != errno.ENAMETOOLONG:
                        raise
                    path = op.path if len(op.path) <= 200 else op.path[:200] + "..."
                    unappliable.append(f"txid={txid} {type(op).__name__} {path!r}: {exc.strerror}")
                    continue
            applied += 1
        return applied

    def note_foreign(self, txid: int, ops: Iterable[Op]) -> None:
        """Another process applied ``ops`` (``_shared.py``): remember what they changed and
        left in staging as if this process had applied them, so that a checkpoint taken
        here makes them durable and drops their garbage. Conservative: every directory on
        the way counts as changed."""
        for i, op in enumerate(ops):
            self.dirty_dirs.add("")
            self.dirty_dirs.update(parents(op.path))
            if isinstance(op, Put | PutStaged):
                self.dirty_files.add(op.path)
                if isinstance(op, PutStaged):
                    self.garbage.add(os.path.join(self.staging_dir, op.staged.split("/")[0]))
                    self.garbage_bytes += op.size
            elif isinstance(op, Delete):
                self.dirty_files.discard(op.path)
            else:
                trash = os.path.join(self.staging_dir, f"{txid}-{i}")
                self.garbage.update((trash + ".del", trash + ".dir", trash + ".old"))
                self._forget_under(op.path)
                if isinstance(op, ReplaceDir):
                    base = op.path + "/"
                    self.dirty_dirs.add(op.path)
                    for e in op.entries:
                        self.dirty_dirs.update(base + d for d in parents(e.path))
                        self.dirty_files.add(base + e.path)
                        if isinstance(e, PutStaged):
                            staged = e.staged.split("/")[0]
                            self.garbage.add(os.path.join(self.staging_dir, staged))

    def forget_all(self) -> None:
        """Another process took a checkpoint: it made everything applied so far durable and
        dropped its garbage; nothing is left for this one to do about it."""
        self.dirty_files.clear()
        self.dirty_dirs.clear()
        self.garbage.clear()
        self.garbage_bytes = 0
        self._known_dirs.clear()

    def _apply_op(
        self,
        txid: int,
        i: int,
        op: Op,
        replay: bool,
        replacing: Container[tuple[int, int]] | None,
    ) -> None:
        if replay and isinstance(op, Put) and self._rewrite_in_place(op):
            self._changed(op.path, replay)
        elif isinstance(op, Put | PutStaged):
            tmp = os.path.join(self.staging_dir, f"{txid}-{i}.tmp")
            self._make_parents(op.path)
            if replay and self.fs.lstat(tmp) is not None:
                self.fs.unlink(tmp)
            self._write(op, tmp)
            exists = None if replacing is None else (txid, i) in replacing
            self._place(tmp, self.full(op.path), linked=isinstance(op, PutStaged), exists=exists)
            if isinstance(op, PutStaged):
                self.garbage_bytes += op.size  # its staged name stays until the checkpoint
            self._changed(op.path, replay)
        elif isinstance(op, Delete):
            # Gone already may mean unlinked by a process that then crashed, without the
            # unlink being durable: the directory is synced at the checkpoint either way.
            try:
                self.fs.unlink(self.full(op.path))
            except (FileNotFoundError, NotADirectoryError):
                pass  # nothing there (a parent is gone, or is a file now)
            except IsADirectoryError:
                if not replay:
                    raise
                # A later op (skipped as superseded, or not) made the name a directory.
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                # A parent became a symlink (another process, after the commit): the
                # path names nothing in the store, and the link is never followed.
            self.dirty_files.discard(op.path)
            self._changed_dir(op.path, replay)
        elif isinstance(op, DeleteDir):
            self._delete_dir(op.path, os.path.join(self.staging_dir, f"{txid}-{i}.del"))
            self._changed_dir(op.path, replay)
        else:
            self._replace_dir(op, os.path.join(self.staging_dir, f"{txid}-{i}.dir"), replay)

    def _rewrite_in_place(self, op: Put) -> bool:
        """Replay of a put whose file already holds the value (the crashed process applied
        it): write the same bytes over it in place, cheaper than a new file (RESULTS.md). Rewriting
        matters: after a write-back error in the crashed process the page cache may show data
        the disk never got, and only pages dirtied anew are written back by the checkpoint's
        sync (fsyncgate). Identical bytes keep the file whole at every instant, for readers
        and across a crash. Returns False, having changed nothing, if the file differs."""
        target = self.full(op.path)
        st = self.fs.lstat(target)
        if st is None or st.kind != "file" or st.size != len(op.data) or not op.data:
            return False
        fd = self.fs.open(target)  # one handle to compare and rewrite: 5 calls, not 9
        try:
            # One byte more than the value: a file that grew since the lstat differs too.
            if self.fs.pread(fd, len(op.data) + 1, 0) != op.data:
                return False
            write_all(self.fs, fd, op.data, 0)
        finally:
            self.fs.close(fd)
        return True

    def _place(self, tmp: str, target: str, *, linked: bool, exists: bool | None = None) -> None:
        """Step 4 for one value: move ``tmp`` (a new file in staging) to ``target``.

        Over an existing file it exchanges the two names (renameat2 RENAME_EXCHANGE) and
        leaves the old file at ``tmp``, for ``drop_replaced`` to unlink once the group is in
        place. On ext4 that is cheaper than a rename over the old file, which for
        ``auto_da_alloc`` starts writing the new data back at once (benchmarks/RESULTS.md).
        Either is atomic for every reader, in this process or another, and either can be
        replayed. ``exists``: whether ``target`` is a file, as
        validation found it under the commit lock (None: look it up)."""
        if self.exchange_files and exists is None:
            st = self.fs.lstat(target)
            if st is not None and st.kind == "dir":  # as rename(2) refuses; never validated
                raise IsADirectoryError(errno.EISDIR, "Is a directory", target)
            exists = st is not None
        if self.exchange_files and exists:
            try:
                self.fs.exchange(tmp, target)
            except FileNotFoundError:
                pass  # gone after all: renamed in below
            except OSError as exc:
                if exc.errno not in _NO_EXCHANGE:
                    raise
                self.exchange_files = False  # not here: rename over the old file from now on
            else:
                self.replaced.append(tmp)
                return
        self.fs.rename(tmp, target)
        if linked and self.fs.lstat(tmp) is not None:
            # The target already was this very file (a replay of a staged value, or a move
            # onto a link of itself): rename() then does nothing and leaves both names.
            self.fs.unlink(tmp)

    def drop_replaced(self) -> None:
        """Unlink the old files that ``_place`` exchanged out of place, once their group is
        applied (outside the apply gate). Nothing needs them: the journal holds what replaced
        them. An error is raised as any I/O error after the commit point is; what is left
        is retried by the checkpoint and removed by the next open."""
        while self.replaced:
            with contextlib.suppress(FileNotFoundError):
                self.fs.unlink(self.replaced[-1])
            self.replaced.pop()

    def _write(self, op: Put | PutStaged, tmp: str) -> None:
        """Put the op's content at ``tmp`` (a new name in staging)."""
        if isinstance(op, PutStaged):
            # Linked, not renamed: the staged name stays until the checkpoint, so a replay
            # always finds it.
            self.fs.link(os.path.join(self.staging_dir, op.staged), tmp)
            return
        fd = self.fs.open(tmp, create=True, truncate=True)
        try:
            write_all(self.fs, fd, op.data, 0)
        finally:
            self.fs.close(fd)

    def _delete_dir(self, path: str, trash: str) -> None:
        target = self.full(path)
        try:
            if self.fs.lstat(target) is None:
                return  # replay: already gone
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            return  # a parent became a symlink: nothing of the store there, never followed
        # Whatever is there goes: in a replay that skips superseded ops the path may hold a
        # file that a skipped op would have removed.
        remove_tree(self.fs, trash)  # replay: left by an apply that crashed
        self.fs.rename(target, trash)  # one atomic step; the tree goes at the checkpoint
        self.garbage.add(trash)
        self._forget_under(path)

    def _replace_dir(self, op: ReplaceDir, build: str, replay: bool) -> None:
        remove_tree(self.fs, build)  # replay: left by an apply that crashed
        self.fs.mkdir(build)
        made = {""}
        for e in op.entries:
            for d in parents(e.path):
                if d not in made:
                    self.fs.mkdir(os.path.join(build, d))
                    made.add(d)
            self._write(e, os.path.join(build, e.path))
        self._make_parents(op.path)
        target = self.full(op.path)
        st = self.fs.lstat(target)
        self._forget_under(op.path)
        if st is None:
            self.fs.rename(build, target)
        else:
            try:
                self.fs.exchange(build, target)  # the path never goes missing
                self.garbage.add(build)
            except OSError as exc:
                if exc.errno not in _NO_EXCHANGE:
                    raise
                old = build[: -len(".dir")] + ".old"
                remove_tree(self.fs, old)
                self.fs.rename(target, old)  # a crash here: replay builds and renames in
                self.fs.rename(build, target)
                self.garbage.add(old)
        base = op.path + "/"
        self.dirty_dirs.update(base + d if d else op.path for d in made)
        self.dirty_files.update(base + e.path for e in op.entries)
        self._changed_dir(op.path, replay)

    def _forget_under(self, path: str) -> None:
        self.dirty_files.discard_under(path)
        self.dirty_dirs.discard_under(path)
        self._known_dirs.discard_under(path)
        self._known_dirs.discard(path)

    def forget_dir_cache(self, known: set[str] | None = None) -> None:
        """Start a group: directories may have changed since the last one; ``known`` were
        just seen to be directories (under the commit lock, so they still are)."""
        self._known_dirs = PathSet(known or ())

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
            elif st.kind == "symlink":  # put there after the commit: never followed
                raise symlink_on_path(self.full(d))
            elif st.kind != "dir":
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", self.full(d))
            self._known_dirs.add(d)

    def drop_garbage(self) -> None:
        """Checkpoint step 4, once the new CHECKPOINT is durable: remove the staging
        directories of applied transactions and the directories moved out of the way."""
        self.drop_replaced()
        for path in sorted(self.garbage):
            remove_tree(self.fs, path)
        self.garbage.clear()
        self.garbage_bytes = 0

    def sync(self, fs_fd: int | None = None) -> None:
        """Checkpoint step 1: make every file written and every directory changed since the
        last checkpoint durable, so the journal records that hold them can be dropped.

        With ``fs_fd`` (a handle on the store's file system, open since the store opened, so
        that write-back errors since then are reported on it) and at least ``syncfs_min``
        changes, one ``syncfs`` does it: one file-system journal commit instead of one per
        fsync (benchmarks/RESULTS.md). Otherwise, or where syncfs cannot report errors, each
        is fsynced, many at once (ext4 commits concurrent fsyncs together). Their order does
        not matter, as nothing relies on them before the CHECKPOINT."""
        changes = len(self.dirty_files) + len(self.dirty_dirs)
        if fs_fd is not None and self.syncfs_min is not None and changes >= self.syncfs_min:
            try:
                self.fs.syncfs(fs_fd)
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
                self.syncfs_min = None  # not on this system: fsync one by one from now on
            else:
                self.dirty_files.clear()
                self.dirty_dirs.clear()
                return
        _run_all(self._sync_file, sorted(self.dirty_files))
        _run_all(self._sync_dir, sorted(self.dirty_dirs))
        self.dirty_files.clear()
        self.dirty_dirs.clear()

    def _sync_file(self, path: str) -> None:
        try:
            fd = self.fs.open(self.full(path))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return  # replaced or removed since; what replaced it is in the sets too
        try:
            self.fs.fsync(fd)
        finally:
            self.fs.close(fd)

    def _sync_dir(self, d: str) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self.fs.fsync_dir(self.full(d))


SYNC_THREADS = 16


def _run_all(fn: Callable[[str], None], items: list[str]) -> None:
    """``fn`` over ``items``, up to SYNC_THREADS at a time; the first error is raised after
    every call has finished (none is abandoned)."""
    if len(items) < 4:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(min(SYNC_THREADS, len(items)), "walstore-sync") as pool:
        futures = [pool.submit(fn, item) for item in items]
    for f in futures:
        f.result()
