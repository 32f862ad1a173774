"""GroupCommit: the commit queue and its leader, and what a transaction asks of its store
between its first write and its outcome (staging, hand-on of hot writes, roll back).

Commits are grouped as LevelDB's ``DBImpl::Write`` groups its ``writers_``: a transaction
queues itself; if no commit is running it leads, taking every transaction queued at that
moment as one group (one journal write, one fdatasync, one worker-thread hop), and when the
group is done it hands the lead to the head of the queue.

On the event loop; a group (and the checkpoint after it) runs in the committer thread
(``_run_committer``), staging in anyio's worker threads (``_run``).
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import anyio
import anyio.lowlevel

from . import _journal_format as fmt
from ._conflicts import Conflict, listing_key
from ._contention import Claim
from ._engine import (
    Move,
    Outcome,
    PendingReplace,
    PreparedTx,
    Result,
    TxOp,
    conflict_error,
)
from ._errors import CommitOutcomeUnknownError, StoreFailedError
from ._footprint import Footprint, TxState
from ._fs import AsyncWriter
from ._limits import check_tx_size
from ._store_base import StoreBase

log = logging.getLogger("walstore")


class WaiterState(enum.Enum):
    QUEUED = "queued"  # in the queue, may still leave it (cancellation rolls back)
    LEADING = "leading"  # handed the lead: must run the next group
    TAKEN = "taken"  # in a group being committed: waits shielded
    DONE = "done"  # result is set


@dataclass(eq=False)
class Waiter:
    tx: Footprint
    prepared: PreparedTx
    event: anyio.Event
    size: int = 0  # the journal bytes of its ops, at most (``_limits.tx_bytes``)
    state: WaiterState = WaiterState.QUEUED
    result: Result | None = None


@dataclass(frozen=True, eq=False)
class PendingWrite:
    """A queued transaction's write of a hot file, handed on to the next holder of its key
    before the transaction commits (``_contention.py`` rule 5)."""

    tx: Footprint
    op: fmt.Put | fmt.Delete
    waiter: Waiter


class GroupCommit(StoreBase):
    """The commit queue (``_queue``), its leader (``_leading``) and the hot-path hand-on."""

    def _pass_lead(self) -> None:
        """Hand the committer's role to the next queued transaction, or give it up."""
        if self._queue:
            head = self._queue[0]
            head.state = WaiterState.LEADING
            head.event.set()
        else:
            self._leading = False
            self._idle.set()

    def _forget(self, tx: Footprint) -> None:
        """The transaction is over and its outcome published: let go of its hot paths."""
        if tx in self._open_txs:
            self._open_txs.discard(tx)
            self._active[tx.begin_lsn] -= 1
            if not self._active[tx.begin_lsn]:
                del self._active[tx.begin_lsn]
        self._locks.release_all(tx.claim)

    async def _admit(self, claim: Claim, key: str) -> None:
        """Before a transaction reads ``key``: wait for its turn if the key is hot."""
        if self._locks:
            await self._locks.admit(claim, key)

    def _pending_write(self, claim: Claim, path: str) -> PendingWrite | None:
        """The newest queued write of ``path``, if ``claim`` holds its key: that is what the
        holder reads (rule 5). With other processes, a commit of theirs that lands first can
        fail the writer and with it every reader down the chain: those retry, and from their
        third try on run under the commit lock (``atomic``), where no other process commits."""
        chain = self._pending.get(path)
        return chain[-1] if chain and path in claim.held else None

    def _hand_on(self, w: Waiter) -> None:
        """Rule 5: a transaction just queued for commit lets go of its hot keys, handing on
        the small values and deletes it writes as pending writes."""
        claim = w.tx.claim
        if not claim.held:
            return
        tx = w.tx
        if any(
            k not in claim.held and self._locks.hot(k)
            for k in (*tx.reads, *map(listing_key, tx.listed), *map(listing_key, tx.subtrees))
        ):
            return  # it read a hot key out of turn: it may well fail, so hand nothing on
        ops = w.prepared.ops
        for key in sorted(claim.held):
            if key.endswith("/"):  # a listing or a tree: kept if this commit changes it
                if any(_covers(op.path, key) for op in ops):
                    continue
            else:
                changed = [op for op in ops if _covers(op.path, key + "/")]
                if len(changed) == 1 and isinstance(changed[0], fmt.Put | fmt.Delete):
                    if changed[0].path != key:
                        continue  # a directory above it, changed as a whole: kept
                    self._pending.setdefault(key, []).append(PendingWrite(w.tx, changed[0], w))
                    self._pending_of.setdefault(w.tx, []).append(key)
                    self._locks.pin(key)
                elif changed:  # a staged value, a move or a directory op: kept
                    continue
            self._locks.release(claim, key)

    def _drop_pending(self, tx: Footprint) -> None:
        for path in self._pending_of.pop(tx, ()):
            chain = [pw for pw in self._pending.get(path, ()) if pw.tx is not tx]
            if chain:
                self._pending[path] = chain
            else:
                self._pending.pop(path, None)
            self._locks.unpin(path)

    def _resolve_deps(self, group: list[Waiter]) -> dict[Waiter, Result]:
        """As a group forms: a read of a pending write (rule 5) whose writer committed in an
        earlier group becomes a read at that group's LSN; one whose writer is ahead in this
        group stays a dependency for validation; one whose writer failed is a conflict."""
        rejected: dict[Waiter, Result] = {}
        ahead: set[Waiter] = set()
        for w in group:
            for path, pw in w.tx.deps.items():
                r = pw.waiter.result
                if r is not None and r.outcome is Outcome.COMMITTED:
                    w.tx.reads[path] = r.lsn
                elif pw.waiter in ahead:
                    w.prepared.deps[path] = pw.tx.txid
                else:
                    conflict = Conflict(path, 0, f"{path!r} was read before its writer failed")
                    self._engine.counters.conflicts += 1
                    error = conflict_error(w.tx.txid, conflict)
                    rejected[w] = Result(Outcome.REJECTED, error=error)
                    break
            ahead.add(w)
        return rejected

    async def _await_deps(self, tx: Footprint) -> None:
        """A read-only transaction that read pending writes returns once they committed
        (else ConflictError), so it never shows what was not committed. Cancellation:
        propagates (the caller rolls back)."""
        for path, pw in tx.deps.items():
            while pw.waiter.result is None and pw.tx.state is TxState.COMMITTING:
                await self._published.wait()
            r = pw.waiter.result
            if r is None or r.outcome is not Outcome.COMMITTED:
                self._engine.counters.conflicts += 1
                raise conflict_error(tx.txid, Conflict(path, 0, f"{path!r}: its writer failed"))
            tx.reads[path] = r.lsn
        conflict = self._stale(tx.reads, tx.listed)
        if conflict is not None:
            self._engine.counters.conflicts += 1
            raise conflict_error(tx.txid, conflict)

    def _stale(self, reads: Mapping[str, int], listed: Mapping[str, int]) -> Conflict | None:
        """Whether a commit changed one of these files or listings since they were read.
        On the event loop: single-key lookups of the conflict index (``_conflicts.py``)."""
        return self._engine.conflicts.check(reads, listed, {})

    async def _wait_visible(self, lsn: int) -> None:
        """Wait until the group that committed ``lsn`` is published (a retry then reads what
        it wrote), or nothing more will be."""
        while self._visible_lsn < lsn and self._leading and not self._closed:
            await self._published.wait()

    async def _stage(self, tx: Footprint, index: int, data: bytes) -> fmt.PutStaged:
        self._check_writable()
        op = await self._run(self._engine.stage, tx.txid, index, data, not tx.staging_made)
        tx.staging_made = True
        return op

    async def _discard(self, tx: Footprint) -> None:
        """Remove what a transaction that already ended staged since (shielded)."""
        with anyio.CancelScope(shield=True):
            try:
                await self._run(self._engine.discard, tx.txid)
            except OSError as exc:  # the next open removes it as an orphan
                log.warning("txid=%d: could not remove staged files: %s", tx.txid, exc)

    async def _open_stream(self, tx: Footprint, index: int) -> tuple[str, AsyncWriter]:
        self._check_writable()
        engine = self._engine
        await self._run(engine.check_space, 0, "a streamed value")
        if not tx.staging_made:
            await self._run(engine.make_staging_dir, tx.txid)
            tx.staging_made = True
        name = f"{tx.txid}/{index}"
        self._hops += 1
        return name, await engine.fs.open_writer(os.path.join(engine.staging_dir, name))

    async def _end(self, tx: Footprint, *, by_close: bool = False) -> None:
        """Roll back: drop the transaction and whatever it staged (shielded; on the event
        loop, the removal in a worker thread)."""
        tx.rolled_back(by_close=by_close)
        self._drop_pending(tx)
        self._forget(tx)
        if tx.staged:
            with anyio.CancelScope(shield=True):
                try:
                    await self._run(self._engine.discard, tx.txid)
                except OSError as exc:  # the next open removes it as an orphan
                    log.warning("txid=%d: could not remove staged files: %s", tx.txid, exc)
        log.debug("txid=%d rolled back", tx.txid)

    async def _commit(self, tx: Footprint, ops: tuple[TxOp, ...]) -> None:
        """``Transaction.commit``: queue, lead or wait for the group, settle (on the event
        loop; the group runs in the committer thread)."""
        try:
            self._check_writable()
            # A cancellation already pending (say, delivered in the block's last await) is
            # before the commit point: roll back.
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            await self._end(tx)
            raise
        tx.committing()
        prepared = PreparedTx(
            tx.txid,
            tx.begin_lsn,
            ops,
            staged=tx.staged > 0,
            reads=tx.reads,
            listed=tx.listed,
            subtrees=tx.subtrees,
        )
        try:
            size = check_tx_size(tx.txid, prepared.ops)
            await self._check_early(tx, prepared)
            read_only = not prepared.ops and not prepared.subtrees
            if read_only and tx.deps:
                await self._await_deps(tx)
            engine = self._engine
            if (
                read_only
                and not engine.exclusive
                and engine.peers.shared_applied() > engine.last_lsn
            ):
                # Other processes committed since this one caught up: what it read may have
                # changed after it read it; the committer validates it against their commits.
                read_only = False
        except BaseException:
            await self._end(tx)
            raise
        if read_only:  # no journal, no thread
            tx.committed()
            self._forget(tx)
            return
        w = Waiter(tx, prepared, anyio.Event(), size)
        self._queue.append(w)
        self._hand_on(w)
        cancelled: BaseException | None = None
        if self._leading:
            try:
                await w.event.wait()
            except BaseException as exc:  # a cancellation while waiting for the committer
                if w.state is WaiterState.QUEUED:
                    self._queue.remove(w)
                    await self._end(tx)
                    raise
                cancelled = exc  # taken or handed the lead: finish first, deliver after
        else:
            self._leading = True
            self._idle = anyio.Event()
            w.state = WaiterState.LEADING
        if w.state is WaiterState.LEADING and not self._engine.exclusive:
            try:
                await self._xlock.hold()
            except BaseException:  # cancelled or timed out before the commit point
                self._queue.remove(w)
                self._pass_lead()
                await self._end(tx)
                raise
        with anyio.CancelScope(shield=True):
            if w.state is WaiterState.LEADING:
                try:
                    await self._lead()
                except BaseException:  # e.g. a simulated crash: the outcome is unknown
                    tx.failed()
                    self._forget(tx)
                    raise
            elif w.state is WaiterState.TAKEN:
                await w.event.wait()
        assert w.result is not None
        await self._settle(tx, w.result)
        if cancelled is not None:
            raise cancelled
        await anyio.lowlevel.checkpoint()  # deliver a cancellation that arrived while shielded

    async def _check_early(self, tx: Footprint, prepared: PreparedTx) -> None:
        """Before queueing, on the event loop: a transaction whose reads are stale already
        fails here (ConflictError), with no thread hop and no journal work. One that writes
        a hot path it does not hold (rule 3 of ``_contention.py``) fails if it read the
        path out of turn, and takes its turn if it wrote blindly (a blind write never
        conflicts: where it cannot wait, say for its own task, it goes ahead). Cancellation:
        propagates (the caller rolls back)."""
        conflict = self._stale(tx.reads, tx.listed)
        claim = tx.claim
        if conflict is None and self._locks:
            for op in prepared.ops:
                if op.path in claim.held or not self._locks.hot(op.path):
                    continue
                if op.path in tx.reads:
                    conflict = Conflict(op.path, 0, f"{op.path!r} is being changed in turn")
                    break
                if await self._locks.admit(claim, op.path):  # it may have waited
                    conflict = self._stale(tx.reads, tx.listed)
                    if conflict is not None:
                        break
        if conflict is not None:
            self._engine.counters.conflicts += 1
            raise conflict_error(tx.txid, conflict)

    async def _lead(self) -> None:
        """Commit one group: every transaction queued now. Requires: self._leading is ours."""
        # One turn of the event loop first: the tasks the last group just released run their
        # next transactions into the queue and this group, instead of waiting out a whole
        # commit for the next one (16 writers: groups of 16 instead of 8).
        await anyio.lowlevel.cancel_shielded_checkpoint()
        group, self._queue = _take_group(self._queue)
        for w in group:
            w.state = WaiterState.TAKEN
        rejected = self._resolve_deps(group)
        oldest = min(self._active, default=self._engine.last_lsn)
        committing = self._committing = anyio.Event()
        try:
            try:
                sent = [w for w in group if w not in rejected]
                done = await self._run_committer(
                    self._engine.commit_group, [w.prepared for w in sent], oldest
                )
            except BaseException as exc:
                if self._cache is not None:
                    self._cache.clear()
                err = CommitOutcomeUnknownError(f"commit outcome unknown: {exc!r}")
                err.__cause__ = exc
                for w in group:
                    w.result = rejected.get(w) or Result(Outcome.UNKNOWN, error=err)
                    w.state = WaiterState.DONE
                    self._drop_pending(w.tx)
                    w.event.set()
                raise
            by_waiter = dict(zip(sent, done, strict=True))
            results = [rejected.get(w) or by_waiter[w] for w in group]
            self._publish(group, results)
            for w, r in zip(group, results, strict=True):
                w.result = r
                w.state = WaiterState.DONE
                w.event.set()
            if self._engine.checkpoint_due():
                try:
                    await self._run_committer(self._engine.checkpoint)
                except StoreFailedError as exc:
                    log.error("background checkpoint failed: %s", exc)
                except OSError:
                    pass  # no space (logged): nothing is at risk, it is tried again later
        finally:
            try:
                if not self._engine.exclusive:
                    self._xlock.drop()
            finally:
                self._committing = None
                committing.set()
                self._published.set()
                self._published = anyio.Event()
                self._pass_lead()

    def _publish(self, group: list[Waiter], results: list[Result]) -> None:
        """Show a group's changes to event-loop readers, in one step: update the read cache,
        then the LSN new transactions begin at; the group's pending writes are now committed
        (or never will be)."""
        for w in group:
            self._drop_pending(w.tx)
        cache = self._cache
        engine = self._engine
        foreign, engine.foreign = engine.foreign, []
        if cache is not None:
            if engine.cache_stale:
                engine.cache_stale = False
                cache.clear()
            for files, trees in foreign:  # changed by other processes
                for p in files:
                    cache.dropped(p)
                for p in trees:
                    cache.dropped_tree(p)
            for w, r in zip(group, results, strict=True):
                if r.outcome is not Outcome.COMMITTED:
                    continue
                if r.error is not None:  # committed but not (wholly) applied
                    cache.clear()
                    break
                for op in w.prepared.ops:
                    if isinstance(op, fmt.Put):
                        cache.written(op.path, op.data)
                    elif isinstance(op, PendingReplace | fmt.DeleteDir | fmt.ReplaceDir):
                        cache.dropped_tree(op.path)
                    else:
                        cache.dropped(op.path)
                        if isinstance(op, Move):
                            cache.dropped(op.src)
        self._visible_lsn = max(self._visible_lsn, self._engine.last_lsn)

    async def _settle(self, tx: Footprint, result: Result) -> None:
        """Move the transaction to its outcome (on the event loop)."""
        self._forget(tx)
        if result.outcome is Outcome.COMMITTED:
            tx.committed(result.lsn)
        elif result.outcome is Outcome.UNKNOWN:
            tx.failed()
        else:
            await self._end(tx)
        if result.error is not None:
            raise result.error


def _take_group(queue: list[Waiter]) -> tuple[list[Waiter], list[Waiter]]:
    """The next group (the queue's head, and as many after it as one COMMIT record holds)
    and what stays queued for the next: a group too big for its record would fail whole."""
    if not queue:
        return [], []
    room = fmt.MAX_PAYLOAD - fmt.GROUP_HEADER_SIZE - queue[0].size
    for n, w in enumerate(queue[1:], 1):
        room -= w.size
        if room < 0:
            return queue[:n], queue[n:]
    return queue, []


def _covers(path: str, key: str) -> bool:
    """Whether a change at ``path`` can change what ``key`` (``a/b`` or ``dir/``, with a
    slash) covers: a path at or below the directory, or a directory above it."""
    return key == "/" or (path + "/").startswith(key) or key.startswith(path + "/")
