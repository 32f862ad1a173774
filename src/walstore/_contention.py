"""PathLocks: hot paths get a queue, so that conflicting transactions take turns.

Transactions are optimistic: they read without locks and are validated at commit
(``_conflicts.py``). That is cheapest while they rarely touch the same paths, and wasteful
when many do: with 64 handlers incrementing one counter, every group commits one of them and
refuses the rest, which retry, conflict again, and may never get through.

So a path becomes *hot* when a transaction conflicts on it, and stays hot while anyone holds
or waits for it or a pending write of it (5) is queued, and ``LINGER`` seconds more (taking
a free lock costs a dict lookup; letting a path cool down while its traffic goes on would
let the next wave of transactions read it unqueued and conflict again). On a hot path
walstore is pessimistic, as SQLite is for a whole database:

1. A transaction that conflicted (``Store.atomic``) takes the locks of the keys it
   conflicted on, in sorted order, before it runs again, waiting in arrival order (a
   *ticket* taken when the ``atomic`` call began, so the oldest caller goes first).
2. A transaction that reads a hot key waits for that key's turn before reading it, instead
   of reading a value about to change and failing later, if it holds no key above it (a
   transfer from ``b`` to ``a`` that holds ``b`` reads ``a`` out of turn; should it
   conflict, its retry takes both, in order).
3. A transaction that writes a hot key it does not hold without having read it (a blind
   write) takes its turn at commit; one that read it without its turn fails at once
   (``ConflictError``; ``Store.atomic`` retries it in the queue): its write would come
   between the holder's and the value the holder read.
4. Locks are released when the transaction's outcome is published (its group applied and
   visible), so the next holder reads the value the last one committed; or earlier:
5. When a holder is queued for commit, it hands its keys on at once. A key it writes (a
   small value, or a delete) is handed on with its pending value: the next holder reads
   that value, not the committed one, and its commit depends on the first one's (it is
   valid only if that transaction is the last one ahead of it to change the key, in the
   same group or in one already committed; ``ConflictIndex.check``'s ``deps``). Only a
   transaction that holds every hot key it read hands on: one that read a hot key out of
   turn may fail, and would take everyone who read its pending values with it. So one
   group commits a chain of read-modify-writes of one hot path, with one fdatasync, where
   rule 4 alone would commit one per group. Nobody but the next holder sees a pending
   value, and a read-only transaction that read one returns only once it committed.

Paths no transaction conflicted on never see a lock. Deadlock freedom: a transaction waits
only for a key above every key it holds (1, 2, 3), so every wait while holding points from a
smaller key to a larger one.
A holder that keeps a key for longer than ``STUCK_AFTER`` seconds without the queue moving
(say, a user's task holds a transaction open while it waits for another task that waits for
this key) stops being waited for: waiters go on optimistically, as they would without the
queue. Everything here runs on the event loop.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio

# Seconds a waiter waits for a holder that has not let go, while the queue does not move,
# before it stops waiting and goes on optimistically.
STUCK_AFTER = 2.0
# Seconds a hot path stays hot once nobody holds, waits for or has a pending write of it.
LINGER = 1.0


@dataclass(eq=False)
class Claim:
    """One party to the queues: a ``Store.atomic`` call across its attempts, or one plain
    transaction. ``ticket`` orders waiters (lower first)."""

    ticket: int
    deadline: float = math.inf  # anyio.current_time() past which waiting gives up
    task: int = 0  # anyio task id, so a task never waits for a lock it holds itself
    held: set[str] = field(default_factory=set)


@dataclass(eq=False)
class _Waiter:
    claim: Claim
    granted: anyio.Event = field(default_factory=anyio.Event)
    gone: bool = False  # gave up or was cancelled: skip it when granting


@dataclass(eq=False)
class _Lock:
    holder: Claim | None = None
    queue: list[tuple[int, int, _Waiter]] = field(default_factory=list)  # heap
    grants: int = 0  # how many times it changed hands (a stuck holder does not move it)
    idle_since: float | None = None  # when it was last let go with nobody waiting


class DeadlinePassed(Exception):
    """A claim's deadline passed while it waited for a key (``Store.atomic`` turns it into
    ConflictError)."""


class PathLocks:
    """Queues on hot keys. Requires: used from the event loop of the store only."""

    def __init__(self) -> None:
        self._locks: dict[str, _Lock] = {}
        self._tickets = itertools.count(1)
        self._seq = itertools.count()
        self._pins: dict[str, int] = {}  # keys kept hot while pending writes are queued
        self.waits = 0  # how many times a claim waited for a key (stats)

    def __bool__(self) -> bool:
        return bool(self._locks)

    def claim(self, deadline: float = math.inf) -> Claim:
        ticket = next(self._tickets)
        if ticket % 1024 == 0:  # now and then, forget paths that cooled down unvisited
            for key in [k for k, lock in self._locks.items() if self._cold(k, lock)]:
                del self._locks[key]
        return Claim(ticket, deadline, _task_id())

    def hot(self, key: str) -> bool:
        lock = self._locks.get(key)
        if lock is None:
            return False
        if self._cold(key, lock):
            del self._locks[key]
            return False
        return True

    def _cold(self, key: str, lock: _Lock) -> bool:
        return (
            lock.idle_since is not None
            and anyio.current_time() - lock.idle_since > LINGER
            and key not in self._pins
        )

    def pin(self, key: str) -> None:
        """Keep ``key`` hot (rule 5: a pending write of it is queued). Requires: it is."""
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: str) -> None:
        n = self._pins.get(key, 0) - 1
        if n > 0:
            self._pins[key] = n
            return
        self._pins.pop(key, None)
        lock = self._locks.get(key)
        if lock is not None and lock.holder is None and not lock.queue:
            lock.idle_since = anyio.current_time()

    async def admit(self, claim: Claim, key: str) -> bool:
        """Rules 2 and 3: if ``key`` is hot, wait for its turn and take it, unless that
        could deadlock (``claim`` holds a key above it) or it is held by another claim of
        this very task. Returns whether ``claim`` holds it now. Raises DeadlinePassed.
        Cancellation: the place in the queue is given up; it propagates."""
        if key in claim.held:
            return True
        if not self.hot(key):
            return False
        if (claim.held and key < max(claim.held)) or self._own_task(claim, key):
            return False
        await self._acquire(claim, key)
        return key in claim.held

    def _own_task(self, claim: Claim, key: str) -> bool:
        """Whether ``key`` is held by another claim of this very task: never wait for it."""
        holder = self._locks[key].holder
        return holder is not None and holder is not claim and holder.task == claim.task

    async def acquire_all(self, claim: Claim, keys: Iterable[str]) -> None:
        """Rule 1: take every key, in sorted order. Raises DeadlinePassed. Cancellation: the
        keys taken so far stay held until ``release_all``; it propagates."""
        for key in sorted(keys):
            if key not in claim.held:
                await self._acquire(claim, key)

    async def _acquire(self, claim: Claim, key: str) -> None:
        lock = self._locks.setdefault(key, _Lock())
        if lock.holder is None and not lock.queue:
            self._take(lock, key, claim)
            return
        self.waits += 1
        w = _Waiter(claim)
        heapq.heappush(lock.queue, (claim.ticket, next(self._seq), w))
        try:
            while True:
                seen = (lock.holder, lock.grants)
                limit = min(STUCK_AFTER, claim.deadline - anyio.current_time())
                if limit <= 0:
                    raise DeadlinePassed(key)
                with anyio.move_on_after(limit):
                    await w.granted.wait()
                if w.granted.is_set():
                    return
                if claim.deadline <= anyio.current_time():
                    raise DeadlinePassed(key)
                if (lock.holder, lock.grants) == seen:
                    return  # stuck: go on without the lock (optimistically)
        except BaseException:
            w.gone = True
            if w.granted.is_set():  # granted as it was cancelled: pass it on
                claim.held.discard(key)
                self._release(key)
            else:
                self._drop_if_idle(key)
            raise
        finally:
            if not w.granted.is_set():
                w.gone = True

    def _take(self, lock: _Lock, key: str, claim: Claim) -> None:
        lock.holder = claim
        lock.grants += 1
        lock.idle_since = None
        claim.held.add(key)

    def release(self, claim: Claim, key: str) -> None:
        """Let go of one key ``claim`` holds (rule 5)."""
        if key in claim.held:
            claim.held.discard(key)
            self._release(key)

    def release_all(self, claim: Claim) -> None:
        """Let go of every key ``claim`` holds, waking the next waiter of each. Requires:
        the claim's transaction's outcome is published."""
        for key in sorted(claim.held):
            self._release(key)
        claim.held.clear()

    def _release(self, key: str) -> None:
        lock = self._locks.get(key)
        if lock is None:
            return
        lock.holder = None
        while lock.queue:
            _, _, w = heapq.heappop(lock.queue)
            if not w.gone:
                self._take(lock, key, w.claim)
                w.granted.set()
                return
        lock.idle_since = anyio.current_time()  # nobody waits: it cools down (LINGER)

    def _drop_if_idle(self, key: str) -> None:
        lock = self._locks.get(key)
        if lock is None:
            return
        lock.queue = [e for e in lock.queue if not e[2].gone]
        heapq.heapify(lock.queue)
        if lock.holder is None:
            self._release(key)


def _task_id() -> int:
    try:
        return anyio.get_current_task().id
    except RuntimeError:  # pragma: no cover - no event loop
        return 0
