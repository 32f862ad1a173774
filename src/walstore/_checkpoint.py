"""Checkpoints: when one is due, and the checkpoint itself (docs/commit-protocol.md,
section 5): make everything applied durable in place, start a new journal segment, drop the
old one and the garbage. Mixed into ``Engine``, between groups: ``checkpoint`` in the
committer thread (or a worker thread for ``Store.checkpoint``), ``checkpoint_due`` on the
event loop.
"""

from __future__ import annotations

import contextlib
import logging
import time

from ._commit_log import JournalLog
from ._errors import StoreFailedError
from ._group_steps import CommitSteps
from ._journal_writer import synced
from ._space import out_of_space

log = logging.getLogger("walstore")

# A checkpoint is due once old versions and staged values kept until it hold this much.
GARBAGE_BYTES = 256 << 20
# A checkpoint that found no space is tried again after this many seconds (or when called).
CHECKPOINT_RETRY = 1.0


class Checkpoints(CommitSteps):
    """``checkpoint_due``, ``checkpoint`` and its steps."""

    commit_log: JournalLog | None
    checkpoint_bytes: int
    checkpoint_files: int
    next_txid: int
    preallocate: int
    exclusive: bool
    free: int | None
    reserve: int
    _lock_fd: int | None
    _checkpoint_retry: float

    def checkpoint_due(self) -> bool:
        """Whether the leader should checkpoint after its group. On the event loop, between
        groups: it reads what the committer thread left, nothing on disk."""
        j = self.commit_log
        if j is None or self.failed is not None:
            return False
        if self._checkpoint_retry and time.monotonic() < self._checkpoint_retry:
            return False
        a = self._applier
        garbage_limit = GARBAGE_BYTES
        if self.free is not None:
            # Staged values (and trees moved away) hold their space until the checkpoint:
            # free them once they hold a quarter of what is left above the reserve.
            spare = max(0, self.free - self.reserve)
            garbage_limit = min(GARBAGE_BYTES, spare // 4)
            if spare < self.reserve and a.garbage:
                return True
        return (
            j.segment_bytes > self.checkpoint_bytes
            or len(a.dirty_files) > self.checkpoint_files
            or a.garbage_bytes > garbage_limit
        )

    def checkpoint(self) -> None:
        """Make everything applied durable in place and start a new journal segment. Raises
        OSError ENOSPC/EDQUOT if there was no space for the segment or for removing what it
        frees: nothing committed is at risk, the store carries on and the checkpoint is tried
        again later. Any other error fails the store (StoreFailedError). In the committer
        thread (or a worker thread for ``Store.checkpoint``), between groups."""
        with self._lock:
            if self.failed is not None:
                raise StoreFailedError(f"store failed earlier: {self.failed}")
            try:
                self.peers.catch_up()
                self._checkpoint_locked()
            except OSError as exc:
                if out_of_space(exc):
                    self._checkpoint_retry = time.monotonic() + CHECKPOINT_RETRY
                    log.warning("checkpoint of %s postponed: %s", self.root, exc)
                    raise OSError(
                        exc.errno,
                        f"checkpoint postponed, no space: {exc}; nothing committed is at risk "
                        "and the store carries on",
                    ) from exc
                self._fail(f"checkpoint failed: {exc}", exc)
                raise StoreFailedError(f"checkpoint failed: {exc}") from exc

    def _checkpoint_locked(self) -> None:
        """Checkpoint steps 1-4 (docs/commit-protocol.md, section 5). REQUIRES: ``_lock`` and
        the commit lock held."""
        self._assert_held()
        journal = self.commit_log
        assert journal is not None
        # Step 1: checkpoint_sync: applied files and directories, so the journal can go.
        if self.sync_enabled:
            # A handle open since the open, so write-back errors since are reported on it.
            fd = self.peers.fd if self.peers.fd is not None else self._lock_fd
            synced(lambda: self._applier.sync(fd))
        else:
            self._applier.dirty_files.clear()
            self._applier.dirty_dirs.clear()
        # With other processes open the old segment goes at step 3, not to the spare: one of
        # them may still read it through its handle.
        journal.recycle = bool(self.preallocate) and (self.exclusive or self.peers.alone())
        # Step 2: checkpoint_new_segment (``JournalLog.new_segment``).
        self.peers.note_segment(journal.head + 1)  # other processes: named before it exists
        lsn = journal.new_segment(self.next_txid)
        self.last_lsn = lsn
        self.peers.note_applied(lsn)
        # Step 3: checkpoint_drop_segments: the old segment becomes the spare (or goes).
        journal.drop_segments()
        # Step 4: checkpoint_drop_garbage
        self._applier.drop_garbage()
        self.counters.checkpoints += 1
        if self.free is not None:  # what the checkpoint freed, for the next triggers
            with contextlib.suppress(OSError):
                self.look_at_space()
        self._checkpoint_retry = 0.0
        log.debug("checkpoint lsn=%d", lsn)
