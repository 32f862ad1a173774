"""Recovery on open: roll committed work forward, roll the rest back.

Steps (docs/commit-protocol.md, section 6; step 1, ``recover_lock``, is ``Engine.open``):

2. ``recover_scan``: open the commit log (``JournalLog.open``): find the live segment, the
   newest one whose HEADER and CHECKPOINT parse. A newer segment whose creation was cut
   short is dropped; damage elsewhere is CorruptionError.
3. ``recover_replay``: apply every transaction of every COMMIT the log holds after the
   checkpoint (``read_after(checkpoint)``), in journal order, skipping an op superseded by a
   later op on the same path.
4. ``recover_checkpoint``: fsync what was replayed, start a new segment with a CHECKPOINT, drop
   the older segments (this discards a torn tail), then clear ``staging/`` (the roll back).

Every step only redoes idempotent work, so a crash during recovery is recovered by the next open.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

from . import _journal_format as fmt
from ._apply import Applier, remove_tree
from ._commit_log import JournalLog
from ._commit_log import _segments as _segments  # for _inspect
from ._commit_log import check_reaches as check_reaches
from ._errors import CorruptionError
from ._fs import FileSystem
from ._journal_writer import synced
from ._paths import parents

log = logging.getLogger("walstore")


@dataclass(frozen=True)
class RecoveryReport:
    """What the last open recovered."""

    rolled_forward: tuple[int, ...] = ()  # txids replayed from the journal
    rolled_back: tuple[int, ...] = ()  # txids whose staged files were discarded uncommitted
    torn_bytes: int = 0  # bytes of torn journal tail discarded
    orphans_removed: int = 0  # files and directories removed from staging/
    segments_removed: int = 0  # old or half-created journal segments removed
    ops_replayed: int = 0
    # Ops a version without the limits committed and no file system can apply (a name over
    # NAME_MAX, a path over PATH_MAX): skipped, each described, instead of failing every open.
    ops_skipped: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        """True when the store was closed cleanly and nothing needed doing."""
        return not (
            self.rolled_forward
            or self.rolled_back
            or self.torn_bytes
            or self.orphans_removed
            or self.segments_removed
            or self.ops_skipped
        )


@dataclass
class Recovered:
    """The state recovery hands to the engine."""

    report: RecoveryReport
    journal: JournalLog
    next_txid: int
    last_lsn: int
    applier: Applier = field(repr=False)


def _staging_entries(fs: FileSystem, staging_dir: str) -> list[str]:
    return sorted(fs.listdir(staging_dir))


def _superseded(commits: list[fmt.Commit]) -> set[tuple[int, int, int]]:
    """(record, tx, op) indexes of ops a later op makes pointless: a file op followed by a
    file op on the same path, anything followed by a DELETE_DIR or REPLACE_DIR of itself or
    of a directory above it."""
    files: set[str] = set()  # paths a later file op decides
    trees: set[str] = set()  # directories a later directory op decides
    out: set[tuple[int, int, int]] = set()
    for ri in range(len(commits) - 1, -1, -1):
        txs = commits[ri].txs
        for ti in range(len(txs) - 1, -1, -1):
            ops = txs[ti].ops
            for oi in range(len(ops) - 1, -1, -1):
                op = ops[oi]
                is_dir_op = isinstance(op, fmt.DeleteDir | fmt.ReplaceDir)
                under = bool(trees) and (
                    op.path in trees or any(a in trees for a in parents(op.path))
                )
                if under or (not is_dir_op and op.path in files):
                    out.add((ri, ti, oi))
                (trees if is_dir_op else files).add(op.path)
    return out


def _symlink_met(what: str, exc: OSError) -> str:
    return (
        f"{what}: {exc}: something other than walstore put a symlink where the store has a "
        "directory, and walstore never follows one. Put the directory back (or remove the "
        "symlink) and open the store again"
    )


def recover(
    fs: FileSystem,
    root: str,
    journal_dir: str,
    staging_dir: str,
    *,
    sync: bool,
    preallocate: int = 0,
    fs_fd: int | None = None,
    syncfs_min: int | None = None,
) -> Recovered:
    """Run recovery steps 2-4: ``read_after(checkpoint)`` of the commit log, replayed by the
    applier, then a checkpoint. Requires: caller holds the store LOCK (in a worker thread).
    Raises CorruptionError. ``fs_fd`` (the LOCK's handle) lets step 4 sync with one
    ``syncfs`` when at least ``syncfs_min`` things changed (``Applier.sync``)."""
    # Step 2: recover_scan
    journal = JournalLog.open(fs, journal_dir, sync=sync, preallocate=preallocate)
    live = journal.found
    staged = _staging_entries(fs, staging_dir)
    applier = Applier(fs, root, staging_dir)
    applier.syncfs_min = syncfs_min  # used only with fs_fd (Applier.sync)
    next_txid = live.checkpoint.next_txid if live is not None else 1
    torn = live.torn_bytes if live is not None else 0

    if not (journal.left_over or staged):
        # Closed cleanly: append to the live segment as it is.
        journal.resume()
        return Recovered(RecoveryReport(), journal, next_txid, journal.head, applier)

    # Step 3: recover_replay
    commits = journal.read_after(journal.checkpoint_lsn)
    skip = _superseded(commits)
    rolled_forward: list[int] = []
    replayed = 0
    unappliable: list[str] = []
    for ri, commit in enumerate(commits):
        for ti, tx in enumerate(commit.txs):
            ops = [op for oi, op in enumerate(tx.ops) if (ri, ti, oi) not in skip]
            try:
                replayed += applier.apply(tx.txid, ops, replay=True, unappliable=unappliable)
            except FileNotFoundError as exc:
                raise CorruptionError(
                    f"cannot replay transaction {tx.txid}: its staged value is missing ({exc})"
                ) from exc
            except (NotADirectoryError, IsADirectoryError) as exc:
                raise CorruptionError(
                    f"cannot replay transaction {tx.txid}: {exc} "
                    "(was the store changed outside walstore?)"
                ) from exc
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                raise CorruptionError(
                    _symlink_met(f"cannot replay transaction {tx.txid}", exc)
                ) from exc
            rolled_forward.append(tx.txid)
            next_txid = max(next_txid, tx.txid + 1)
    applier.drop_replaced()  # before the sync: their data need never be written back
    committed = set(rolled_forward)
    staged_txids = [int(n) for n in staged if n.isdigit()]
    # Staging directories of txids handed out before the live checkpoint are leftovers of
    # transactions that committed long ago (a lost rmdir); the others never committed.
    began_after = live.checkpoint.next_txid if live else 1
    rolled_back = [t for t in staged_txids if t >= began_after and t not in committed]
    next_txid = max([next_txid, *(t + 1 for t in staged_txids)])

    # Step 4: recover_checkpoint
    if sync:
        try:
            synced(lambda: applier.sync(fs_fd))
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            # A file replayed above is now behind a symlink: it cannot be made durable
            # through it, so the journal that holds it must stay.
            msg = _symlink_met("cannot make the replayed files durable", exc)
            raise CorruptionError(msg) from exc
    lsn = journal.new_segment(next_txid)
    orphans = 0
    try:
        # The live segment first: it becomes the spare if none is left.
        journal.drop_segments()
        for name in _staging_entries(fs, staging_dir):
            orphans += remove_tree(fs, os.path.join(staging_dir, name))
    except BaseException:
        journal.close()
        raise
    report = RecoveryReport(
        rolled_forward=tuple(rolled_forward),
        rolled_back=tuple(rolled_back),
        torn_bytes=torn,
        orphans_removed=orphans,
        segments_removed=journal.retired,
        ops_replayed=replayed,
        ops_skipped=tuple(unappliable),
    )
    for what in unappliable:
        log.error("recovery skipped an op no file system can apply: %s", what)
    return Recovered(report, journal, next_txid, lsn, applier)
