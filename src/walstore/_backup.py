"""Online backup: a consistent snapshot of a store that another process may be writing.

The snapshot is a store directory of its own: restoring is opening it, and its recovery replays
the journal over the files. Why hard links of the live files make a consistent snapshot
(checked against ``_apply.py``, ``_engine.py`` and ``_recovery.py``):

1. **walstore never writes a user file in place.** A small value is written to a new file
   ``staging/<txid>-<i>.tmp`` and renamed over its target; a staged value is hard-linked to a
   new name and renamed over it; ``delete`` unlinks; ``delete_dir`` renames the directory into
   staging; ``replace_dir`` builds a new directory in staging and exchanges (or renames) it with
   the old one. Every change gives the path a *new inode* and leaves the old inode's bytes
   alone, so a hard link taken earlier keeps the content it had. Staged values
   (``staging/<txid>/<n>``, and ``<txid>/m<i>``, ``<txid>/k<i>-<j>`` linked by ``move`` and
   ``replace_dir(keep=...)``) are complete and fsynced before their COMMIT record is appended
   and never written afterwards; their names stay until the next checkpoint. The journal *is*
   written in place (appended), so it is copied, never linked; so is ``LOCK``, which is left out.
2. **Replay makes any mixture of states whole.** The files are linked one by one while commits
   go on, so the snapshot holds each path as of some moment. Recovery re-applies every op of
   every COMMIT after the segment's CHECKPOINT from the journal and the staged values alone
   (a put writes the journal's bytes, a staged put links the staged file, deletes unlink,
   directory ops rebuild or remove the whole directory), so every path a commit touched ends
   as the last commit left it, whatever state the link found. A path no commit after the
   checkpoint touched did not change during the copy. What replay needs is: (a) the journal
   segment copied *after* the files were linked, so that it holds every commit that could have
   changed a linked file; (b) that segment still being the live one that was live before the
   walk began: a checkpoint in between would drop commits the files may reflect only in part,
   (c) every staged value that segment names, linked after the journal was copied (a
   transaction may stage and commit during the walk).
3. **Protocol.** Read the live segment's identity (name and salt; every checkpoint makes a new
   segment with a larger name); link every user file; read the live segment and keep its valid
   records (a record being appended is left out: it was not acknowledged before the backup
   began, since acknowledgement follows the fdatasync); link the staged values it names; read
   the identity again. If it changed, a checkpoint ran: start over. The result holds every
   transaction acknowledged before the backup started (its record was synced in the segment
   that was then live, or in an earlier one, whose effects a checkpoint made durable in place
   before the walk).
4. **Across file systems** (``EXDEV``), or when a link is refused (``EPERM``, ``EMLINK``), files
   are copied instead; a copy reads the inode it opened, which is never rewritten, so it is
   as consistent as a link.

Hard links share inodes with the live store: a tool that edits a file of either *in place*
(walstore never does) changes both. ``copy=True`` makes independent copies.

Backups are named ``walstore-backup-<seq>-<UTC time>``, ``seq`` one more than the largest of
the existing ones; ``keep`` prunes by that sequence number and touches nothing else in DEST.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import _journal_format as fmt
from ._errors import CorruptionError, StoreError
from ._inspect import (
    CHUNK,
    JournalView,
    Layout,
    NoProgress,
    Progress,
    probe_lock,
    read_journal,
    read_segment,
    staged_names,
)
from ._journal_reader import SegmentScan
from ._os_fs import OsFileSystem
from ._paths import RESERVED

PREFIX = "walstore-backup-"
NAME_RE = re.compile(r"walstore-backup-(\d{6,})-(\d{8}T\d{6}Z)")
PARTIAL_RE = re.compile(r"\.(walstore-backup-(\d{6,})-\d{8}T\d{6}Z)\.partial")
ATTEMPTS = 20
SYNC_THREADS = 16


class UsageError(ValueError):
    """The command line asks for something that cannot be done (exit code 2)."""


class BackupError(StoreError):
    """No consistent snapshot could be taken."""


@dataclass
class BackupResult:
    root: str
    path: str
    name: str
    attempts: int = 0
    linked: int = 0
    copied: int = 0
    copied_bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # sockets, fifos, devices
    journal_bytes: int = 0
    transactions: int = 0
    checkpoint_lsn: int | None = None
    in_use_by: int | None = None
    pruned: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "path": self.path,
            "name": self.name,
            "attempts": self.attempts,
            "linked": self.linked,
            "copied": self.copied,
            "copied_bytes": self.copied_bytes,
            "skipped": self.skipped,
            "journal_bytes": self.journal_bytes,
            "transactions": self.transactions,
            "checkpoint_lsn": self.checkpoint_lsn,
            "in_use_by": self.in_use_by,
            "pruned": self.pruned,
        }


def backup(
    root: str,
    dest: str,
    *,
    keep: int | None = None,
    copy: bool = False,
    progress: Progress | None = None,
    attempts: int = ATTEMPTS,
) -> BackupResult:
    """Snapshot the store at ``root`` into a new ``DEST/walstore-backup-...`` directory, then
    with ``keep`` remove all but the ``keep`` newest backups in ``dest``."""
    progress = progress or NoProgress()
    layout = Layout.of(root)
    if keep is not None and keep < 1:
        raise UsageError(f"--keep must be at least 1, not {keep}")
    dest = os.path.abspath(dest)
    real_root = os.path.realpath(layout.root)
    real_dest = os.path.realpath(dest)
    if real_dest == real_root or real_dest.startswith(real_root + os.sep):
        raise UsageError(f"the backup destination {dest} must be outside the store {layout.root}")
    os.makedirs(dest, exist_ok=True)
    # The store's tree is read beneath its root, through no symlink (the resolution rule,
    # _fs.py): a directory swapped for a symlink meanwhile is never followed out of it.
    name, partial = _reserve(dest)
    result = BackupResult(layout.root, os.path.join(dest, name), name)
    fs = OsFileSystem()
    fs.confine(layout.root)
    try:
        for attempt in range(1, attempts + 1):
            result.attempts = attempt
            if attempt > 1:
                _rmtree(partial)
                os.mkdir(partial)
            copier = _Copier(copy, fs)
            journal = _attempt(layout, partial, copier, result, progress)
            if journal is not None:
                break
        else:
            raise BackupError(
                f"the store checkpointed during each of {attempts} attempts; try again"
            )
        result.linked, result.copied, result.copied_bytes = (
            copier.linked,
            copier.copied,
            copier.bytes,
        )
        _sync_dirs(partial)
        os.rename(partial, result.path)
        _fsync_dir(dest)
    except BaseException:
        _rmtree(partial, ignore_errors=True)
        raise
    finally:
        fs.release(layout.root)
    result.in_use_by = probe_lock(layout).holder
    if keep is not None:
        result.pruned = prune(dest, keep)
    return result


def _attempt(
    layout: Layout, partial: str, copier: _Copier, result: BackupResult, progress: Progress
) -> JournalView | None:
    """One try at a snapshot into ``partial``; None if a checkpoint ran meanwhile."""
    in_use = probe_lock(layout).held
    first = read_journal(layout, retry_corruption=in_use)
    journal_b = os.path.join(partial, RESERVED, "journal")
    staging_b = os.path.join(partial, RESERVED, "staging")
    os.makedirs(journal_b)
    os.mkdir(staging_b)
    result.skipped = []
    advance = progress.task("linking files" if not copier.copy_all else "copying files", None)
    _copy_tree(layout.root, partial, "", copier, result, advance)
    if first.live is None:  # never opened: nothing but an empty journal directory
        again = read_journal(layout, retry_corruption=in_use)
        return first if again.identity is None else None
    try:
        data, scan = read_segment(layout, first.live.name)
    except FileNotFoundError:
        return None  # a checkpoint dropped it
    if (scan.name, scan.header.salt) != first.identity:
        return None
    copied = _unsized(data, scan)
    _write_file(os.path.join(journal_b, scan.name), copied)
    view = JournalView([(scan.name, len(copied))], scan)
    missing: list[str] = []
    for staged in sorted(staged_names(view)):
        dst = os.path.join(staging_b, staged)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            copier.put(os.path.join(layout.staging_dir, staged), dst)
        except FileNotFoundError:
            missing.append(staged)
        advance(1)
    again = read_journal(layout, retry_corruption=in_use)
    if again.identity != first.identity:
        return None
    if missing:
        raise CorruptionError(
            f"staged value {RESERVED}/staging/{missing[0]} named by the journal is missing "
            "(run `walstore verify`)"
        )
    result.journal_bytes = len(copied)
    result.transactions = sum(1 for _ in view.transactions())
    result.checkpoint_lsn = scan.checkpoint.lsn
    return view


def _copy_tree(
    src: str,
    dst: str,
    rel: str,
    copier: _Copier,
    result: BackupResult,
    advance: Callable[[int], None],
) -> None:
    """Link (or copy) the tree ``src`` (store path ``rel``) into ``dst``, skipping
    ``.walstore/`` at the top. Every name is looked up beneath the store's root when it is
    used; one that became a symlink on the way is skipped (listed), never followed. Iterative
    (a stack of directories still to copy), so a tree of any depth is copied: a recursive
    walk died with RecursionError at ~500 levels."""
    fs = copier.fs
    stack = [(src, dst, rel)]
    while stack:
        src, dst, rel = stack.pop()
        try:
            names = sorted(fs.listdir(src))
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed or replaced meanwhile: a commit in the journal did it
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            result.skipped.append(rel)  # swapped for a symlink since it was seen a directory
            continue
        below = []
        for name in names:
            if not rel and name == RESERVED:
                continue
            target = os.path.join(dst, name)
            path = f"{rel}/{name}" if rel else name
            full = os.path.join(src, name)
            try:
                st = fs.lstat(full)
                if st is None:
                    continue
                if st.kind == "dir":
                    os.mkdir(target)
                    below.append((full, target, path))
                elif st.kind == "symlink":
                    os.symlink(fs.readlink(full), target)
                elif st.kind == "file":
                    copier.put(full, target)
                    advance(1)
                else:
                    result.skipped.append(path)  # a socket, fifo or device: not a store file
            except FileNotFoundError:
                continue  # gone meanwhile: a commit in the journal did it
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.EINVAL):
                    raise
                # A symlink on the way, or the file became something else: never followed.
                result.skipped.append(path)
        stack += reversed(below)  # in name order


class _Copier:
    """Hard-links files, or copies them where linking cannot work. Sources are named by
    paths under a root ``fs`` confines."""

    def __init__(self, copy_all: bool, fs: OsFileSystem) -> None:
        self.copy_all = copy_all
        self.fs = fs
        self.linked = self.copied = self.bytes = 0

    def put(self, src: str, dst: str) -> None:
        if not self.copy_all:
            try:
                self.fs.link(src, dst)
                self.linked += 1
                return
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    self.copy_all = True  # another file system: copy from here on
                elif exc.errno not in (errno.EPERM, errno.EMLINK, errno.EACCES):
                    raise
        self._copy(src, dst)

    def _copy(self, src: str, dst: str) -> None:
        fd = self.fs.open_regular(src)
        try:
            mode = os.fstat(fd).st_mode & 0o7777
            out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            try:
                while chunk := os.read(fd, CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view) :]
                    self.bytes += len(chunk)
                os.fsync(out)
            finally:
                os.close(out)
        finally:
            os.close(fd)
        self.copied += 1


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dirs(top: str) -> None:
    """fsync every directory of the snapshot, 16 at a time: the names are what make it
    durable (linked files' data was synced by the live store's checkpoint, or is in the
    journal, which is copied and fsynced)."""
    dirs = list(_dirs_under(top))
    with ThreadPoolExecutor(min(SYNC_THREADS, len(dirs)), "walstore-backup") as pool:
        for f in [pool.submit(_fsync_dir, d) for d in dirs]:
            f.result()


def _dirs_under(top: str) -> Iterator[str]:
    """``top`` and every directory below it (symlinks not followed), iteratively: ``os.walk``
    of Python 3.11 recurses, and a deep tree hit RecursionError."""
    stack = [top]
    while stack:
        d = stack.pop()
        yield d
        stack += [e.path for e in _entries(d) if e.is_dir(follow_symlinks=False)]


def _rmtree(top: str, *, ignore_errors: bool = False) -> None:
    """``shutil.rmtree`` without its recursion (Python 3.11's recurses per level, so a deep
    snapshot could not be pruned): children first, symlinks removed, never followed."""
    try:
        stack: list[tuple[str, Iterator[os.DirEntry[str]]]] = [(top, iter(_entries(top)))]
        while stack:
            d, it = stack[-1]
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append((e.path, iter(_entries(e.path))))
                    break
                os.unlink(e.path)
            else:
                stack.pop()
                os.rmdir(d)
    except OSError:
        if not ignore_errors:
            raise


def _entries(d: str) -> list[os.DirEntry[str]]:
    with os.scandir(d) as it:  # closed at once: a deep tree must not hold a handle per level
        return list(it)


def _reserve(dest: str) -> tuple[str, str]:
    """A new backup name, larger in sequence than every backup of ours in ``dest``, and its
    ``.partial`` directory, made (so two backups at once get different names)."""
    seq = 1 + max((s for s, _ in _ours(dest)), default=0)
    while True:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        name = f"{PREFIX}{seq:06d}-{stamp}"
        partial = os.path.join(dest, f".{name}.partial")
        if not os.path.lexists(os.path.join(dest, name)):
            try:
                os.mkdir(partial)
                return name, partial
            except FileExistsError:
                pass
        seq += 1


def _ours(dest: str) -> list[tuple[int, str]]:
    """(seq, name) of every entry in ``dest`` whose name we made, finished or not."""
    out: list[tuple[int, str]] = []
    for n in os.listdir(dest):
        if m := NAME_RE.fullmatch(n):
            out.append((int(m.group(1)), n))
        elif m := PARTIAL_RE.fullmatch(n):
            out.append((int(m.group(2)), n))
    return out


def backups(dest: str) -> list[str]:
    """Finished backups in ``dest``, oldest first (by the sequence number we wrote)."""
    found = [
        (s, n)
        for s, n in _ours(dest)
        if NAME_RE.fullmatch(n) and os.path.isdir(os.path.join(dest, n))
    ]
    return [n for _, n in sorted(found)]


def prune(dest: str, keep: int) -> list[str]:
    """Remove all but the ``keep`` newest finished backups; returns the names removed.
    Entries we did not name (and unfinished ``.partial`` ones) are left alone."""
    if keep < 1:
        raise UsageError(f"--keep must be at least 1, not {keep}")
    old = backups(dest)[:-keep]
    for n in old:
        _rmtree(os.path.join(dest, n))
    return old


def _unsized(data: bytes, scan: SegmentScan) -> bytes:
    """The segment's records without the zeros after them, under a HEADER that declares no
    preallocated size (version 1): the copy is shorter than the size the original declares,
    which a reader takes for a lost end. Only the HEADER changes; the records keep their
    bytes and CRCs (seeded with the salt, which stays)."""
    length, _crc, _type = fmt.decode_head(memoryview(data), 0)
    header = fmt.SegmentHeader(scan.header.first_lsn, scan.header.salt)
    return fmt.encode_header(header) + data[fmt.HEADER_SIZE + length : scan.valid_end]
