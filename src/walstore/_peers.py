"""Peers: the machinery of several processes on one store, for the engine.

docs/commit-protocol.md, section 7; the on-disk pieces (shared header, slots, txids) are in
``_shared.py``. ``Peers`` holds this process's side of them: the cross-process commit lock
(``LOCK``, taken after ``GATE``), its slot in ``procs/`` for life, the shared header it last
read or wrote, and the moves that keep the engine in step with the others: ``open`` (recover
or join), ``catch_up`` (step 0 of every group and checkpoint), ``follow`` (another process's
checkpoint) and ``close``.

Imports point one way: the engine makes one ``Peers`` and hands it itself as its ``Host``;
this module knows the engine only through that protocol.

Threads: ``xlock_try``, ``shared_applied``, ``holder_message`` and ``check_fork`` run on the
event loop (``SharedFile.read`` makes no system call); everything else in a worker thread,
and, past ``open``, under the engine's lock and the commit lock (``REQUIRES`` below).
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol

from . import _journal_format as fmt
from ._apply import remove_tree
from ._commit_log import JournalLog
from ._errors import StoreLayoutError, StoreLockedError, StoreMisuseError
from ._fs import FileSystem, write_all
from ._recovery import RecoveryReport
from ._shared import SLOT_SHIFT, SharedFile, SharedHeader, boot_id, slot_of, staged_dirs

log = logging.getLogger("walstore")

_forks = [0]  # bumped in every child of os.fork(): a store opened before it refuses use
os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


@dataclass
class LockTicket:
    """One wait for the commit lock (``Peers.xlock_acquire``); abandoned if the waiter is
    cancelled or times out, in which case the thread releases what it then gets."""

    abandoned: bool = False
    fd: int | None = None


class Host(Protocol):
    """What ``Peers`` needs of its engine (``Engine`` implements it)."""

    fs: FileSystem
    root: str
    meta: str
    journal_dir: str
    staging_dir: str
    sync_enabled: bool
    preallocate: int
    exclusive: bool
    last_lsn: int
    next_txid: int
    commit_log: JournalLog | None

    def recover(self, fs_fd: int) -> RecoveryReport:
        """Run recovery and take its state (``fs_fd``: a handle for ``syncfs``)."""
        ...

    def take_in(self, commits: list[fmt.Commit], applied: int) -> list[fmt.Commit]:
        """Records other processes appended: apply those above ``applied``, note all."""
        ...

    def followed(self, checkpoint_lsn: int, gap: bool) -> None:
        """Another process checkpointed at ``checkpoint_lsn`` (``gap``: a whole segment came
        and went unseen)."""
        ...


class Peers:
    """This process's side of the several-process protocol (the module docstring)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.lock_path = os.path.join(host.meta, "LOCK")
        self.gate_path = os.path.join(host.meta, "GATE")
        self.procs = os.path.join(host.meta, "procs")
        self.shared: SharedFile | None = None
        self.header: SharedHeader | None = None
        self._slot_fd: int | None = None
        self._slot_path = ""
        self._xlock_fd: int | None = None  # the commit lock, while this process holds it
        self._xlock_kept = False  # ... through _lock_fd
        # GATE and LOCK, open from ``open`` to ``close`` for ``xlock_try``: opening and
        # closing them for every group cost four more system calls a group.
        self._gate_fd: int | None = None
        self._lock_fd: int | None = None
        self._xmutex = threading.Lock()
        self._forks = _forks[0]

    @property
    def fs(self) -> FileSystem:
        return self.host.fs

    @property
    def fd(self) -> int | None:
        """A handle open since the open (``shared``'s), None if exclusive."""
        return self.shared.fd if self.shared is not None else None

    def check_fork(self) -> None:
        """StoreMisuseError in a child of ``os.fork()`` of the process that opened the store."""
        if _forks[0] != self._forks:
            raise StoreMisuseError(
                f"store {self.host.root} was opened before os.fork(): a child process must "
                "open the store itself (with gunicorn --preload, open it after the fork)"
            )

    # -- the commit lock -------------------------------------------------------------------

    # Fairness: a process waiting for the commit lock holds GATE while it waits, and a
    # process takes GATE before LOCK, so one that just released LOCK cannot take it again
    # before the waiter (flock hands a released lock to whoever asks first, not in order).

    def xlock_try(self) -> bool:
        """Take the commit lock if it and its gate are free, without waiting (on the event
        loop). Past ``open``, through handles of GATE and LOCK kept open for it."""
        if self._gate_fd is not None and self._lock_fd is not None:
            return self._xlock_try_kept(self._gate_fd, self._lock_fd)
        gate = self.fs.lock(self.gate_path)
        if gate is None:
            return False
        try:
            fd = self.fs.lock(self.lock_path)
        finally:
            self._close_lock(gate)
        if fd is None:
            return False
        self._xlock_fd, self._xlock_kept = fd, False
        return True

    def _xlock_try_kept(self, gate: int, lock: int) -> bool:
        # A wait in a worker thread (``xlock_acquire``) opens handles of its own: one it
        # abandons, and that then takes the lock, must not take it for this handle too.
        fs = self.fs
        if not fs.flock(gate):
            return False
        try:
            got = fs.flock(lock)
        finally:
            self._funlock_kept(gate)
        if got:
            self._xlock_fd, self._xlock_kept = lock, True
        return got

    def _funlock_kept(self, fd: int) -> None:
        """Release a lock taken through a kept handle. If that fails, the lock may still be
        held: close the handle (which frees it for sure) and go on without it."""
        try:
            self.fs.funlock(fd)
        except OSError as exc:
            log.warning("releasing a lock failed: %s; closing its descriptor", exc)
            if fd == self._gate_fd:
                self._gate_fd = None
            if fd == self._lock_fd:
                self._lock_fd = None
            self._close_fd(fd)

    def _close_fd(self, fd: int) -> None:
        try:
            self.fs.close(fd)
        except OSError as exc:
            log.warning("closing a lock's descriptor failed: %s", exc)

    def xlock_acquire(self, ticket: LockTicket) -> None:
        """Wait for the commit lock, in turn (in a worker thread the waiter may abandon)."""
        gate = self.fs.lock(self.gate_path, wait=True)
        try:
            fd = self.fs.lock(self.lock_path, wait=True)
        finally:
            if gate is not None:
                self._close_lock(gate)
        assert fd is not None
        with self._xmutex:
            if ticket.abandoned:
                self._close_lock(fd)
                return
            ticket.fd = self._xlock_fd = fd
            self._xlock_kept = False

    def xlock_abandon(self, ticket: LockTicket) -> None:
        """Give up a wait (on the event loop, as the waiter is cancelled or times out)."""
        with self._xmutex:
            ticket.abandoned = True
            if ticket.fd is not None and self._xlock_fd == ticket.fd:
                self._xlock_fd = None
                self._close_lock(ticket.fd)

    def xlock_release(self) -> None:
        """Release the commit lock if held (on the event loop, or in the closing thread)."""
        fd, self._xlock_fd = self._xlock_fd, None
        if fd is not None:
            if self._xlock_kept:
                self._funlock_kept(fd)
            else:
                self._close_lock(fd)

    def _close_lock(self, fd: int) -> None:
        """Release a lock of GATE or LOCK. An error closing its descriptor is logged, never
        raised: close(2) frees the descriptor, and so the lock, even when it fails, and a
        raise here would lose track of a lock taken just before."""
        try:
            self.fs.unlock(fd)
        except OSError as exc:
            log.warning("closing a lock's descriptor failed: %s", exc)

    def assert_xlock(self) -> None:
        assert self.host.exclusive or self._xlock_fd is not None, "REQUIRES: commit lock held"

    def holder_message(self) -> str:
        header = self.shared.read() if self.shared is not None else None
        pid: int | str = header.holder_pid if header is not None else self._lock_file_pid()
        return (
            f"store {self.host.root}: the commit lock is held by another process (last "
            f"holder: pid {pid}) past lock_timeout"
        )

    def _lock_file_pid(self) -> str:
        """The pid a process that opened the store exclusive wrote in LOCK (before this one
        has read the shared header: waiting to open), or "?"."""
        try:
            return self.fs.read_file(self.lock_path).decode().strip() or "?"
        except (OSError, UnicodeDecodeError):
            return "?"

    def shared_applied(self) -> int:
        """The last LSN applied by any process (0 if unknown); read outside the lock."""
        header = self.shared.read() if self.shared is not None else None
        return header.applied_lsn if header is not None else 0

    # -- the shared header -----------------------------------------------------------------

    def write_header(self, header: SharedHeader) -> None:
        """REQUIRES: commit lock held."""
        assert self.shared is not None
        self.header = header
        self.shared.write(header)

    def note_applied(self, lsn: int) -> None:
        """Tell the others every commit up to ``lsn`` is applied (nothing if exclusive).
        REQUIRES: commit lock held."""
        if self.header is not None:
            self.write_header(self.header.advanced(applied_lsn=lsn))

    def note_segment(self, lsn: int) -> None:
        """Name the segment a checkpoint is about to create at ``lsn``, before it exists: a
        process that finds it missing (this one died) goes on with the old segment, which
        holds every commit. REQUIRES: commit lock held."""
        if self.header is not None:
            self.write_header(self.header.advanced(segment_lsn=lsn))

    # -- slots -----------------------------------------------------------------------------

    def alone(self) -> bool:
        """Whether no other process has the store open (False if that cannot be told).
        REQUIRES: commit lock held (no other process can open it meanwhile)."""
        mine = os.path.basename(self._slot_path)
        try:
            return self.live_slots() <= ({int(mine)} if mine.isdigit() else set())
        except OSError as exc:  # not knowing is not being alone: the old segment just goes
            log.warning("could not tell which processes have the store open: %s", exc)
            return False

    def live_slots(self) -> set[int]:
        """Slots of the processes that have the store open (shared), from the files of
        ``procs/`` whose lock is held. REQUIRES: commit lock held (or the LOCK, exclusive)."""
        fs = self.fs
        alive: set[int] = set()
        if fs.lstat(self.procs) is None:
            return alive
        for name in fs.listdir(self.procs):
            if not name.isdigit():
                continue
            fd = fs.lock(os.path.join(self.procs, name))
            if fd is None:
                alive.add(int(name))
            else:
                self._close_lock(fd)
        return alive

    def _drop_dead_slots(self, alive: set[int]) -> None:
        """Remove the ``procs/`` files of processes that died with the store open."""
        for name in self.fs.listdir(self.procs):
            if name.isdigit() and int(name) not in alive:
                path = os.path.join(self.procs, name)
                if path != self._slot_path:
                    with suppress(FileNotFoundError):
                        self.fs.unlink(path)

    # -- open, catch up, close -------------------------------------------------------------

    def open(self) -> RecoveryReport:
        """Open beside other processes: under the commit lock, recover in full if no other
        process has the store open (or the shared header is from another boot), else join
        the live segment. Then take a slot for life. In a worker thread."""
        fs, host = self.fs, self.host
        if fs.lstat(self.procs) is None:
            with suppress(FileExistsError):
                fs.mkdir(self.procs)
        if self._xlock_fd is None and not self.xlock_try():  # Store's open waits for it
            raise StoreLockedError(self.holder_message())
        lock_fd = self._xlock_fd
        assert lock_fd is not None
        shared: SharedFile | None = None
        try:
            # The last opener's pid, for `walstore info` (and a holder the open waits for).
            fs.truncate(lock_fd, 0)
            write_all(fs, lock_fd, f"{os.getpid()}\n".encode(), 0)
            shared = self.shared = SharedFile(fs, os.path.join(host.meta, "shared"))
            header = shared.read()
            alive = self.live_slots()
            boot = boot_id()
            if header is None or header.boot != boot or not alive:
                report = host.recover(shared.fd)
                slot = host.next_txid >> SLOT_SHIFT
                next_slot = slot + 1
                if header is not None and header.boot == boot:
                    next_slot = max(next_slot, header.next_slot)
                assert host.commit_log is not None
                header = SharedHeader(
                    boot, host.commit_log.checkpoint_lsn, host.last_lsn, next_slot, os.getpid()
                )
            else:
                slot = header.next_slot
                report = self._join(header, alive)
                host.next_txid = (slot << SLOT_SHIFT) | 1
                header = self.header or header
                header = header.advanced(next_slot=slot + 1, applied_lsn=host.last_lsn)
            self._slot_path = os.path.join(self.procs, str(slot))
            slot_fd = fs.lock(self._slot_path)
            if slot_fd is None:
                raise StoreLayoutError(
                    f"slot {slot} of {host.root} is taken: {self.procs} was changed"
                )
            self._slot_fd = slot_fd
            write_all(fs, slot_fd, f"{os.getpid()}\n".encode(), 0)
            self.write_header(header)
            self._drop_dead_slots(alive)
            self._gate_fd = fs.open(self.gate_path, create=True)
            self._lock_fd = fs.open(self.lock_path)
        except BaseException:
            self._close_kept()
            if host.commit_log is not None:
                host.commit_log.close()
                host.commit_log = None
            if shared is not None:
                shared.close()
                self.shared = None
            self.xlock_release()
            raise
        self.xlock_release()
        if not report.clean:
            log.info("opened %s beside other processes: %s", host.root, report)
        return report

    def _join(self, header: SharedHeader, alive: set[int]) -> RecoveryReport:
        """Open the live segment beside the processes in ``alive``: finish the commits a
        dead holder left unapplied, clear a torn tail and the staging of dead processes.
        REQUIRES: commit lock held."""
        fs, host = self.fs, self.host
        journal = JournalLog.join(
            fs,
            host.journal_dir,
            header.segment_lsn,
            sync=host.sync_enabled,
            preallocate=host.preallocate,
        )
        journal.recycle = False  # others may still read an old segment through their handle
        host.commit_log = journal
        self.header = header
        commits = journal.read_after(journal.checkpoint_lsn)  # and clears a torn tail
        unapplied = host.take_in(commits, header.applied_lsn)
        keep = {d for c in commits for d in staged_dirs(c)}
        orphans = 0
        for entry in fs.listdir(host.staging_dir):
            slot = slot_of(entry)
            if slot is None or slot in alive or entry.split("-")[0] in keep:
                continue
            orphans += remove_tree(fs, os.path.join(host.staging_dir, entry))
        host.last_lsn = journal.head
        return RecoveryReport(
            rolled_forward=tuple(tx.txid for c in unapplied for tx in c.txs),
            torn_bytes=journal.torn_cleared,
            orphans_removed=orphans,
        )

    def catch_up(self) -> None:
        """Step 0, ``catch_up``: take in what other processes committed since this one last
        held the commit lock. Nothing if exclusive. REQUIRES: commit lock held."""
        self.assert_xlock()
        host = self.host
        if host.exclusive:
            return
        assert self.shared is not None and host.commit_log is not None
        header = self.shared.read() or self.header
        assert header is not None
        self._read_on(header)
        if header.segment_lsn != host.commit_log.checkpoint_lsn:
            self._follow(header)
            header = self.shared.read() or header
        if self.header is None or header.applied_lsn < host.last_lsn:
            self.write_header(header.advanced(applied_lsn=host.last_lsn))
        else:
            self.header = header

    def _read_on(self, header: SharedHeader) -> None:
        """Take in the records the commit log holds after this process's last LSN."""
        journal = self.host.commit_log
        assert journal is not None
        # Commits of a segment that a checkpoint has since closed are all applied.
        same = header.segment_lsn == journal.checkpoint_lsn
        commits = journal.read_after(self.host.last_lsn)
        if commits:
            self.host.take_in(commits, header.applied_lsn if same else 1 << 63)

    def _follow(self, header: SharedHeader) -> None:
        """Another process took a checkpoint: append to its new segment from now on."""
        journal = self.host.commit_log
        assert journal is not None
        known = journal.head
        lsn = journal.follow(header.segment_lsn)
        if lsn is None:
            return  # the checkpoint died before its segment existed
        # A segment in between came and went: its commits are unknown here.
        self.host.followed(lsn, gap=lsn > known + 1)
        self._read_on(header)

    def sharing(self) -> bool:
        """Whether this process shares the store with others, and opened it (not a child it
        forked since)."""
        return self.shared is not None and self._forks == _forks[0]

    def leave(self) -> None:
        """At close, before the last checkpoint: take the commit lock and catch up. REQUIRES:
        ``sharing()``, no group runs (the engine's lock held)."""
        if self._xlock_fd is None:  # (held already if a failure left it so)
            self.xlock_acquire(LockTicket())
        self.catch_up()

    def close(self, shared: bool) -> None:
        """Give up the slot (its file removed unless in a forked child), the shared header
        and the commit lock. After the commit log is closed."""
        if self._slot_fd is not None:
            if shared:
                with suppress(FileNotFoundError):
                    self.fs.unlink(self._slot_path)
            self._close_lock(self._slot_fd)
            self._slot_fd = None
        if self.shared is not None:
            self.shared.close()
            self.shared = None
        if shared:
            self.xlock_release()
        self._close_kept()

    def _close_kept(self) -> None:
        if self._xlock_kept:  # (a forked child's copy: the parent's holds the lock)
            self._xlock_fd, self._xlock_kept = None, False
        for fd in (self._gate_fd, self._lock_fd):
            if fd is not None:
                self._close_fd(fd)
        self._gate_fd = self._lock_fd = None
