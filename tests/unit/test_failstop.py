"""Fail-stop: an I/O error before the commit point aborts cleanly; one after it fails the
store (never retrying an fsync), and reopening recovers."""

from __future__ import annotations

import errno
import random

import anyio
import pytest

import walstore
from tests.support import ROOT, open_store, user_files
from walstore.testing import MemoryFileSystem, ShortWrite

pytestmark = pytest.mark.guarantee(name="Fail-stop")

FULL = walstore.Durability.FULL
F, C = walstore.TxState.FAILED, walstore.TxState.COMMITTED
UNKNOWN = walstore.CommitOutcomeUnknownError
NOT_APPLIED = walstore.CommittedNotAppliedError


def _eio() -> OSError:
    return OSError(errno.EIO, "injected EIO")


def _store_with(fs: MemoryFileSystem, files: dict[str, bytes]) -> walstore.Store:
    store = open_store(fs, FULL)

    async def fill() -> None:
        async with store.transaction() as tx:
            for p, v in files.items():
                await tx.write(p, v)

    anyio.run(fill)
    return store


async def _commit(store: walstore.Store, files: dict[str, bytes]) -> walstore.Transaction:
    tx = store.transaction()
    async with tx:
        for p, v in files.items():
            await tx.write(p, v)
    return tx


def _fail_once(name: str, path_part: str, exc: BaseException | ShortWrite):
    fired: list[int] = []

    def hook(index: int, call: str, path: str) -> BaseException | None:
        if not fired and call == name and path_part in path:
            fired.append(index)
            return exc  # type: ignore[return-value]
        return None

    return hook, fired


def _commit_raising(
    store: walstore.Store,
    files: dict[str, bytes],
    error: type[Exception],
    match: str,
    state: walstore.TxState,
) -> walstore.Transaction:
    """A transaction writing ``files`` whose commit raises ``error`` (its message matching
    ``match``) and leaves it in ``state``."""
    tx = store.transaction()
    with pytest.raises(error, match=match):
        anyio.run(_commit_tx, tx, files)
    assert tx.state is state
    return tx


def _refused(store: walstore.Store, files: dict[str, bytes]) -> None:
    """A commit the failed store refuses: the plain StoreFailedError, neither subclass (the
    transaction did nothing; it is no outcome of its own to learn)."""
    with pytest.raises(walstore.StoreFailedError) as info:
        anyio.run(_commit, store, files)
    assert type(info.value) is walstore.StoreFailedError, repr(info.value)


@pytest.mark.parametrize("kind", [errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS])
def test_append_error_before_commit_point_rolls_back_and_store_stays_usable(kind: int) -> None:
    fs = MemoryFileSystem()
    store = _store_with(fs, {"a": b"old"})
    fs.fault, fired = _fail_once("pwrite", ".wal", OSError(kind, "injected"))
    tx = store.transaction()
    with pytest.raises(OSError) as info:
        anyio.run(_commit_tx, tx, {"a": b"new", "b": b"b"})
    assert fired and info.value.errno == kind
    assert tx.state is walstore.TxState.ROLLED_BACK
    assert user_files(fs) == {"a": b"old"}
    anyio.run(_commit, store, {"c": b"c"})  # usable, no reopen
    assert user_files(fs) == {"a": b"old", "c": b"c"}
    anyio.run(store.aclose)
    store = open_store(fs, FULL)
    assert user_files(fs) == {"a": b"old", "c": b"c"}
    anyio.run(store.aclose)


async def _commit_tx(tx: walstore.Transaction, files: dict[str, bytes]) -> None:
    async with tx:
        for p, v in files.items():
            await tx.write(p, v)


def test_short_writes_to_the_journal_are_completed() -> None:
    fs = MemoryFileSystem()
    store = _store_with(fs, {})
    shorts = []

    def hook(index: int, call: str, path: str) -> ShortWrite | None:
        if call == "pwrite" and ".wal" in path and len(shorts) < 3:
            shorts.append(index)
            return ShortWrite()
        return None

    fs.fault = hook  # type: ignore[assignment]
    anyio.run(_commit, store, {"a": b"x" * 40})
    assert len(shorts) == 3
    anyio.run(store.aclose)
    fs.reboot(power_loss=random.Random(1))
    store = open_store(fs, FULL)
    assert user_files(fs) == {"a": b"x" * 40}
    anyio.run(store.aclose)


def test_failed_journal_sync_fails_the_store_with_outcome_unknown() -> None:
    fs = MemoryFileSystem()
    store = _store_with(fs, {"a": b"old"})
    fs.fault, fired = _fail_once("fdatasync", ".wal", _eio())
    tx = _commit_raising(store, {"a": b"new"}, UNKNOWN, "outcome unknown", F)
    assert fired
    fs.fault = None
    syncs = fs.calls["fdatasync"]
    _refused(store, {"b": b"b"})
    assert fs.calls["fdatasync"] == syncs  # never retried
    assert anyio.run(store.read, "a") == b"old"  # reads still work
    anyio.run(store.aclose)
    # A process restart: the record reached the page cache, but the store erased it (and
    # synced the erasure) when the sync failed, so it is not there to roll forward.
    fs.reboot()
    store = open_store(fs, FULL)
    assert tx.txid not in store.recovery.rolled_forward
    assert user_files(fs) == {"a": b"old"}
    anyio.run(store.aclose)


def test_a_failed_sync_whose_record_cannot_be_erased_stays_unknown() -> None:
    """If erasing the record fails too (its zeros cannot be written), the record stays where
    every process reads it: a restart rolls it forward. Outcome unknown meant just that."""
    fs = MemoryFileSystem()
    store = _store_with(fs, {"a": b"old"})
    failed: list[str] = []

    def hook(index: int, call: str, path: str) -> BaseException | None:
        if ".wal" in path and (
            (call == "fdatasync" and not failed) or (call == "pwrite" and failed)
        ):
            failed.append(call)
            return _eio()
        return None

    fs.fault = hook
    tx = _commit_raising(store, {"a": b"new"}, UNKNOWN, "outcome unknown", F)
    assert failed[:2] == ["fdatasync", "pwrite"]
    fs.fault = None
    anyio.run(store.aclose)
    fs.reboot()
    store = open_store(fs, FULL)
    assert tx.txid in store.recovery.rolled_forward
    assert user_files(fs) == {"a": b"new"}
    anyio.run(store.aclose)


@pytest.mark.parametrize("seed", range(20))
def test_failed_journal_sync_then_power_loss_is_all_or_nothing(seed: int) -> None:
    fs = MemoryFileSystem()
    store = _store_with(fs, {"a": b"old"})
    fs.fault, _ = _fail_once("fdatasync", ".wal", _eio())
    with pytest.raises(walstore.CommitOutcomeUnknownError):
        anyio.run(_commit, store, {"a": b"new", "d/b": b"b"})
    anyio.run(store.aclose)
    fs.reboot(power_loss=random.Random(seed))
    store = open_store(fs, FULL)
    assert user_files(fs) in ({"a": b"old"}, {"a": b"new", "d/b": b"b"})
    anyio.run(store.aclose)


@pytest.mark.parametrize("call", ["rename", "link", "mkdir", "pwrite"])
def test_apply_error_after_commit_point_fails_store_and_reopen_finishes(call: str) -> None:
    fs = MemoryFileSystem()
    store = open_store(fs, FULL)
    anyio.run(_commit, store, {"a": b"old"})
    part = {"pwrite": ".tmp", "mkdir": "/store/n"}.get(call, "/store/")
    fs.fault, fired = _fail_once(call, part, _eio())
    store._inline_threshold = 8  # "big" is staged, so a link happens during apply
    files = {"a": b"new", "n/m": b"m", "big": b"B" * 32}
    tx = _commit_raising(store, files, NOT_APPLIED, r"committed .* not applied", C)
    assert fired
    _refused(store, {"x": b"x"})
    anyio.run(store.aclose)
    fs.fault = None
    fs.reboot()
    store = open_store(fs, FULL)
    assert tx.txid in store.recovery.rolled_forward
    assert user_files(fs) == {"a": b"new", "n/m": b"m", "big": b"B" * 32}
    anyio.run(store.aclose)


def test_an_old_file_left_after_apply_is_committed_not_applied() -> None:
    """Apply exchanged the new file into place and then could not unlink the old one (left in
    staging): the commit is durable and in place, and still the store fails, with
    CommittedNotAppliedError (what it replaced is not all cleared away)."""
    fs = MemoryFileSystem()
    store = _store_with(fs, {"a": b"old"})
    fs.fault, fired = _fail_once("unlink", "/staging/", _eio())
    _commit_raising(store, {"a": b"new"}, NOT_APPLIED, r"committed .* and applied, but an old", C)
    assert fired
    assert anyio.run(store.read, "a") == b"new"  # wholly in place: reads go on
    _refused(store, {"x": b"x"})
    anyio.run(store.aclose)
    fs.fault = None
    fs.reboot()
    store = open_store(fs, FULL)
    assert user_files(fs) == {"a": b"new"}
    assert fs.files(ROOT + "/.walstore/staging", skip=()) == {}  # the open cleared it
    anyio.run(store.aclose)


def test_an_append_that_cannot_be_cut_back_is_outcome_unknown() -> None:
    """The journal write fails and so does cutting the segment back to its last record: the
    segment may hold part of the record, so the outcome is unknown and the store fails."""
    fs = MemoryFileSystem()
    store = _store_with(fs, {"a": b"old"})
    failed: list[str] = []

    def hook(index: int, call: str, path: str) -> BaseException | None:
        if ".wal" in path and call in ("pwrite", "truncate") and (failed or call == "pwrite"):
            failed.append(call)  # the record's write, then every try to undo it
            return _eio()
        return None

    fs.fault = hook
    _commit_raising(store, {"a": b"new"}, UNKNOWN, "outcome unknown: cannot cut back", F)
    assert len(failed) >= 2
    fs.fault = None
    _refused(store, {"x": b"x"})
    anyio.run(store.aclose)
    fs.reboot()
    store = open_store(fs, FULL)
    assert user_files(fs) == {"a": b"old"}  # nothing of the record reached the segment
    anyio.run(store.aclose)


def test_a_group_whose_commit_raised_something_unforeseen_is_outcome_unknown() -> None:
    """The commit's worker call raised an error no step handles (a bug, a crash): the leader
    gets that error, and every other transaction of its group CommitOutcomeUnknownError
    caused by it, each FAILED."""
    fs = MemoryFileSystem()
    store = _store_with(fs, {})
    fs.fault, fired = _fail_once("pwrite", ".wal", RuntimeError("unforeseen"))
    txs = [store.transaction() for _ in range(3)]
    errors: list[BaseException] = []

    async def commit(tx: walstore.Transaction, i: int) -> None:
        try:
            await _commit_tx(tx, {f"f{i}": b"v"})
        except Exception as exc:
            errors.append(exc)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i, tx in enumerate(txs):
                tg.start_soon(commit, tx, i)

    anyio.run(main)
    assert fired
    assert [type(e) for e in errors].count(RuntimeError) == 1  # the leader's own
    unknown = [e for e in errors if not isinstance(e, RuntimeError)]
    assert len(unknown) == 2 and all(type(e) is walstore.CommitOutcomeUnknownError for e in unknown)
    assert all(isinstance(e.__cause__, RuntimeError) for e in unknown)
    assert all(tx.state is walstore.TxState.FAILED for tx in txs)
    anyio.run(store.aclose)


def test_checkpoint_fsync_failure_fails_store_and_keeps_the_journal() -> None:
    fs = MemoryFileSystem()
    store = open_store(fs, FULL)
    anyio.run(_commit, store, {"a": b"1", "d/b": b"2"})
    fs.fault, fired = _fail_once("fsync", "/store/a", _eio())
    with pytest.raises(walstore.StoreFailedError, match="checkpoint") as info:
        anyio.run(store.checkpoint)
    assert type(info.value) is walstore.StoreFailedError  # no transaction's outcome at stake
    assert fired
    _refused(store, {"x": b"x"})
    anyio.run(store.aclose)  # no checkpoint on close of a failed store
    fs.fault = None
    fs.reboot(power_loss=random.Random(7))
    store = open_store(fs, FULL)
    assert user_files(fs) == {"a": b"1", "d/b": b"2"}
    anyio.run(store.aclose)


def test_staging_error_leaves_transaction_usable() -> None:
    fs = MemoryFileSystem()
    store = open_store(fs, FULL)
    store._inline_threshold = 8
    fs.fault, fired = _fail_once("pwrite", "/staging/", OSError(errno.ENOSPC, "full"))

    async def body() -> walstore.Transaction:
        async with store.transaction() as tx:
            with pytest.raises(OSError):
                await tx.write("big", b"B" * 64)
            await tx.write("small", b"s")
        return tx

    tx = anyio.run(body)
    assert fired
    assert tx.state is walstore.TxState.COMMITTED
    assert user_files(fs) == {"small": b"s"}
    anyio.run(store.checkpoint)
    assert fs.files(ROOT + "/.walstore/staging", skip=()) == {}
    anyio.run(store.aclose)
