"""CommitLock: this process's hold on the commit lock it shares with other processes.

The lock itself (GATE and LOCK, flock) is ``_peers.py``'s; this is the event-loop side: how
many holders in this process share the hold (a group's leader and the atomic retry whose
commit it carries), the wait for it in a worker thread, and the wait ``open`` makes for it.
Runs on the event loop; only ``Peers.xlock_acquire`` runs in a worker thread.
"""

from __future__ import annotations

import anyio

from ._errors import StoreLockedError
from ._peers import LockTicket, Peers


class CommitLock:
    """The commit lock, as this process holds it (``Store`` keeps one, as ``_xlock``)."""

    def __init__(self, peers: Peers, timeout: float) -> None:
        self._peers = peers
        self._timeout = timeout  # seconds to wait for it while another process holds it
        # Held by this process while _depth > 0: by the leader of a group, or by an atomic
        # retry that runs under it (``Store.atomic``); taken under _taking. _free is set
        # whenever _depth drops to 0.
        self._depth = 0
        self._taking = anyio.Lock()
        self._free = anyio.Event()

    @property
    def held(self) -> bool:
        """Whether this process holds it now."""
        return self._depth > 0

    async def _take_lock(self) -> None:
        """The commit lock, held against other processes until ``drop``. Waits up to
        ``timeout`` (then StoreLockedError naming the last holder). Cancellation: the
        wait is abandoned and nothing is held."""
        peers = self._peers
        if peers.xlock_try():
            return
        ticket = LockTicket()
        try:
            with anyio.fail_after(self._timeout):
                await anyio.to_thread.run_sync(peers.xlock_acquire, ticket, abandon_on_cancel=True)
        except BaseException as exc:
            peers.xlock_abandon(ticket)
            if isinstance(exc, TimeoutError):
                raise StoreLockedError(peers.holder_message()) from None
            raise

    async def hold(self, *, join: bool = True) -> None:
        """Hold the commit lock. ``join``: share it if this process holds it already (a
        group's leader joins the atomic retry whose commit it carries). Without ``join`` (an
        atomic retry that runs under the lock), wait until this process has let it go and
        take it afresh, behind any other process that waits for it: retries that joined
        each other could hold it for ever. Cancellation: as ``_take_lock``."""
        if not self._taking.locked():  # the fast paths: no wait, no checkpoint
            if join and self._depth:
                self._depth += 1  # held here already
                return
            if not self._depth and self._peers.xlock_try():
                self._depth = 1  # free, and no other process waits for it
                return
        while True:
            while not join and self._depth:
                await self._free.wait()
            async with self._taking:
                if self._depth and not join:
                    continue  # another retry took it first: wait for it again
                if not self._depth:
                    await self._take_lock()
                self._depth += 1
                return

    def drop(self) -> None:
        self._depth -= 1
        if not self._depth:
            self._peers.xlock_release()
            self._free.set()
            self._free = anyio.Event()


async def wait_for_commit_lock(peers: Peers, timeout: float) -> None:
    """Hold the commit lock for ``Engine.open`` (which releases it). StoreLockedError after
    ``timeout`` seconds; cancellation: the wait is abandoned."""
    ticket = LockTicket()
    try:
        if peers.xlock_try():  # free: taken without a wait (lock_timeout=0 can open)
            return
        with anyio.fail_after(timeout):
            await anyio.to_thread.run_sync(peers.xlock_acquire, ticket, abandon_on_cancel=True)
    except (FileNotFoundError, NotADirectoryError):
        return  # no store there yet: the open makes it, or says why it cannot
    except BaseException as exc:
        peers.xlock_abandon(ticket)
        if isinstance(exc, TimeoutError):
            raise StoreLockedError(peers.holder_message()) from None
        raise
