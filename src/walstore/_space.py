"""Free space: commits refuse what would eat into a reserve that recovery, checkpoints and
deletes need (docs/commit-protocol.md, section 4, "Space"; docs/limits.md).

``SpaceAccount`` is mixed into ``Engine``. ``look_at_space`` and ``check_space`` run in worker
threads (staging, which runs outside the commit lock, checks too); ``_check_group_space`` in
the committer thread under the commit lock.
"""

from __future__ import annotations

import errno

from . import _journal_format as fmt
from ._apply import Applier
from ._commit_log import JournalLog
from ._fs import FileSystem
from ._journal_writer import NO_SPACE, FailStop, synced
from ._prepared import Outcome, PendingReplace, PreparedTx, Result, TxOp

_BLOCK = 4096  # what a new file or directory entry may cost on disk, beyond its data
# A commit looks at free space again (statvfs) after this many groups, or once the groups
# since the last look may have used an eighth of what was left above the reserve; between
# looks it counts down from the last one (a look is a system call: benchmarks/RESULTS.md).
SPACE_LOOK_EVERY = 64


def reserve_for(total: int) -> int:
    """Free bytes that commits and staging leave to recovery, checkpoints and deletes: 1/64
    of the file system, at least 1 MiB, at most 64 MiB."""
    return min(64 << 20, max(1 << 20, total // 64))


def _space_needed(ops: tuple[TxOp, ...]) -> int:
    """About what applying ``ops`` allocates on disk after the commit point: a block per new
    file or directory entry and the inline values' data. Deletes need nothing."""
    need = 0
    for op in ops:
        if isinstance(op, fmt.Put):
            need += _BLOCK + -(-len(op.data) // _BLOCK) * _BLOCK
        elif isinstance(op, fmt.ReplaceDir | PendingReplace):
            need += _BLOCK + sum(
                _BLOCK + (-(-len(e.data) // _BLOCK) * _BLOCK if isinstance(e, fmt.Put) else 0)
                for e in op.entries
            )
        elif not isinstance(op, fmt.Delete | fmt.DeleteDir):
            need += _BLOCK
    return need


def out_of_space(exc: OSError) -> bool:
    return exc.errno in NO_SPACE and not isinstance(exc, FailStop)


def no_space_error(what: str, free: int, need: int, reserve: int) -> OSError:
    return OSError(
        errno.ENOSPC,
        f"no space for {what}: {free} bytes free on the store's file system, it needs about "
        f"{need} and {reserve} stay in reserve for recovery, checkpoints and deletes; delete "
        "files (and checkpoint) or free space on the disk",
    )


class SpaceAccount:
    """Free space as the engine last looked at it, and the checks against the reserve."""

    fs: FileSystem
    meta: str
    sync_enabled: bool
    _applier: Applier
    _lock_fd: int | None
    free: int | None  # free bytes at the last look (free_space), None: not yet
    reserve: int  # reserve_for() the file system's size, at the last look
    _spent: int  # bytes the groups admitted since the last look may allocate
    _groups_unlooked: int  # groups admitted since the last look

    def look_at_space(self) -> tuple[int, int]:
        """(free bytes, reserve) of the store's file system now; remembered for the checkpoint
        triggers and ``walstore info``."""
        free, total = self.fs.free_space(self.meta)
        self.free, self.reserve = free, reserve_for(total)
        self._spent = self._groups_unlooked = 0
        return free, self.reserve

    def check_space(self, size: int, what: str = "this value") -> None:
        """Raise OSError ENOSPC if writing ``size`` bytes would leave less than the reserve."""
        free, reserve = self.look_at_space()
        if free - size - _BLOCK < reserve:
            raise no_space_error(what, free, size + _BLOCK, reserve)

    def _check_group_space(
        self, group: list[PreparedTx], results: list[Result | None], journal: JournalLog
    ) -> None:
        """Step 1, space: refuse (ENOSPC, rolled back) each transaction whose apply would eat
        into the reserve, so that nothing after the commit point runs out of space and every
        replay of the journal finds the space its puts need. Deletes always pass; the journal
        appends into its preallocated segment, and past it counts the record too."""
        needs = [(i, _space_needed(tx.ops)) for i, tx in enumerate(group) if results[i] is None]
        total = sum(n for _, n in needs)
        if not total:
            return
        try:
            last = self.free
            if (
                last is None
                or self._groups_unlooked >= SPACE_LOOK_EVERY
                or (self._spent + total) * 8 > last - self.reserve
            ):
                free, reserve = self.look_at_space()
            else:
                free, reserve = last - self._spent, self.reserve
            a = self._applier
            if free - reserve < 2 * total and self.sync_enabled and (a.dirty_files or a.dirty_dirs):
                # Checkpoint step 1, early: the file system may hold back blocks for data not
                # yet written back (XFS reserves tens of KiB per small file until then: a
                # 48 MiB disk looked full at 15 MiB). Its sync errors fail the store.
                lock_fd = self._lock_fd
                synced(lambda: a.sync(lock_fd))
                free, reserve = self.look_at_space()
        except FailStop:
            raise
        except OSError as exc:
            for i, n in needs:
                if n:
                    results[i] = Result(Outcome.REJECTED, error=exc)
            return
        left = free - reserve
        room = journal.preallocated_room
        for i, n in needs:
            if not n:
                continue
            room -= n
            cost = n if room >= 0 else 2 * n  # past the preallocation the record takes space
            if cost > left:
                err = no_space_error("this transaction", free, cost, reserve)
                results[i] = Result(Outcome.REJECTED, error=err)
            else:
                left -= cost
                self._spent += cost
        self._groups_unlooked += 1
