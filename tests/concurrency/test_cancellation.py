"""Cancellation at every await point of commit, open, checkpoint and close.

The file system seam drives it, as httpcore's ``SlowWriteStream`` does: a MemoryFileSystem
fault hook blocks the worker thread at file-system call ``k`` (counted from the start of the
operation), the test cancels the scope around the operation, then lets the call go on. ``k``
runs over every call the operation makes, measured first by a dry run on an identical store.

After each cancellation: the outcome is exactly committed or not and the caller knows which
(``tx.state``), the files are the old or the new state accordingly, the cancellation came out
of the operation, nothing leaked (handles, staging), and the store works without a reopen.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import walstore
from walstore import Durability, TxState
from walstore.testing import MemoryFileSystem

from .helpers import (
    ROOT,
    Blocker,
    cancel_at_call,
    count_calls,
    nth_call,
    open_memory,
    staging_leftovers,
    user_files,
)

pytestmark = [pytest.mark.anyio, pytest.mark.guarantee(name="Cancellation never half-commits")]

INLINE = 64  # inline threshold: BIG is staged on disk while the transaction runs
BIG = bytes(range(256)) * 2
CHUNK = b"s" * 700_000  # open_write buffers 1 MiB per worker-thread hop: 3 chunks, 2 hops
OLD = {
    "w": b"w0",
    "x": b"x0",
    "conv/c1/QUERY.md": b"q",
    "conv/c1/events.json": b"[]",
    "old/a": b"a",
    "old/b/c": b"c",
}


def changed(drop: tuple[str, ...] = (), put: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """OLD without the files (or directories) in ``drop``, plus ``put``."""
    out = {k: v for k, v in OLD.items() if not any(k == d or k.startswith(d + "/") for d in drop)}
    out.update(put or {})
    return out


async def seeded(
    durability: Durability = Durability.FULL, *, checkpointing: bool = False, cache: bool = False
) -> tuple[MemoryFileSystem, walstore.Store]:
    """A store on a fresh MemoryFileSystem holding OLD. ``checkpointing``: every commit is
    followed by a checkpoint inside the commit (checkpoint_bytes=1). Without ``cache`` every
    read is a file-system call, a point to cancel at; with it, cached reads make none."""
    fs = MemoryFileSystem()
    store = await open_memory(
        fs,
        durability=durability,
        inline_threshold=INLINE,
        checkpoint_bytes=1 if checkpointing else 8 << 20,
        cache_bytes=(1 << 20) if cache else 0,
    )
    async with store.transaction() as tx:
        for path, value in OLD.items():
            await tx.write(path, value)
    return fs, store


class HandleLeak(AssertionError):
    """A file handle was left open (raised last, after every other check of a sweep)."""


# -- the operations swept ----------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """An operation on a seeded store: ``run(store, txs)`` appends the transaction it uses
    (if it has one in hand) to ``txs``; ``new`` is the user files once it committed."""

    name: str
    run: Callable[[walstore.Store, list[walstore.Transaction]], Awaitable[None]]
    new: dict[str, bytes]


async def mixed_transaction(store: walstore.Store, txs: list[walstore.Transaction]) -> None:
    async with store.transaction() as tx:
        txs.append(tx)
        assert await tx.read("x") == b"x0"  # a read: one more await, and a read set
        await tx.write("big.bin", BIG)  # staged now: its own worker call
        await tx.write("d/y", b"y1")  # inline, in a new directory
        await tx.delete("w")  # checks existence: more awaits


async def directory_transaction(store: walstore.Store, txs: list[walstore.Transaction]) -> None:
    async with store.transaction() as tx:
        txs.append(tx)
        await tx.move("x", "archive/x")  # linked into staging at commit
        async with tx.replace_dir("conv/c1", keep=["QUERY.md"]) as d:  # swapped in at commit
            await d.write_json("events.json", [1])
            await d.write("big.bin", BIG)
        await tx.delete_dir("old")


async def streamed_transaction(store: walstore.Store, txs: list[walstore.Transaction]) -> None:
    async with store.transaction() as tx:
        txs.append(tx)
        async with tx.open_write("stream.bin") as f:
            for _ in range(3):
                await f.write(CHUNK)
        await tx.write("x", b"x1")


async def store_write_big(store: walstore.Store, txs: list[walstore.Transaction]) -> None:
    await store.write("big.bin", BIG)


async def atomic_increment(store: walstore.Store, txs: list[walstore.Transaction]) -> None:
    async def bump(tx: walstore.Transaction) -> None:
        txs.append(tx)
        await tx.write("x", await tx.read("x") + b"+")

    await store.atomic(bump)


OPS = [
    pytest.param(
        Op("transaction", mixed_transaction, changed(("w",), {"big.bin": BIG, "d/y": b"y1"})),
        id="transaction",
    ),
    pytest.param(
        Op(
            "directories",
            directory_transaction,
            changed(
                ("x", "old", "conv/c1/events.json"),
                {"archive/x": b"x0", "conv/c1/events.json": b"[\n  1\n]\n", "conv/c1/big.bin": BIG},
            ),
        ),
        id="directories",
    ),
    pytest.param(
        Op("open_write", streamed_transaction, changed(put={"stream.bin": CHUNK * 3, "x": b"x1"})),
        id="open_write",
    ),
    pytest.param(
        Op("store.write", store_write_big, changed(put={"big.bin": BIG})), id="store.write"
    ),
    pytest.param(
        Op("store.atomic", atomic_increment, changed(put={"x": b"x0+"})), id="store.atomic"
    ),
]


async def check_store_still_works(
    fs: MemoryFileSystem,
    store: walstore.Store,
    expected: dict[str, bytes],
    where: str,
    leaks: list[str] | None = None,
) -> None:
    """A later commit works without a reopen; after a checkpoint nothing is left in staging;
    a reopen finds the same files and has nothing to recover. A handle still open once the
    store is closed goes to ``leaks``."""
    await store.write("after.txt", b"ok")
    assert await store.read("after.txt") == b"ok", where
    await store.checkpoint()
    assert staging_leftovers(fs) == {}, where
    await store.aclose()
    if fs.open_fds():
        leak = f"{where}: {fs.open_fds()} handles open after aclose"
        if leaks is None:
            raise HandleLeak(leak)
        leaks.append(leak)
    async with walstore.open(ROOT, fs=fs) as again:
        assert again.recovery.clean, (where, again.recovery)
        assert user_files(fs) == {**expected, "after.txt": b"ok"}, where


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("durability", [Durability.FULL, Durability.OFF], ids=lambda d: d.name)
@pytest.mark.parametrize("op", OPS)
async def test_cancel_at_every_call_of_a_commit(
    op: Op, durability: Durability, checkpointing: bool
) -> None:
    fs, store = await seeded(durability, checkpointing=checkpointing)
    calls = await count_calls(fs, lambda: op.run(store, []))
    assert user_files(fs) == op.new
    await store.aclose()
    assert calls >= 5

    outcomes: dict[str, list[int]] = {"committed": [], "rolled back": []}
    leaks: list[str] = []
    for k in range(calls):
        fs, store = await seeded(durability, checkpointing=checkpointing)
        handles = fs.open_fds()
        txs: list[walstore.Transaction] = []
        out = await cancel_at_call(fs, k, lambda: op.run(store, txs))  # noqa: B023
        where = f"{op.name}: cancelled at call {k} {out.blocked}"
        assert out.blocked is not None, where
        assert out.error is None, (where, out.error)
        assert out.cancelled_caught, f"{where}: the cancellation did not propagate"

        files = user_files(fs)
        assert files in (OLD, op.new), (where, files)
        committed = files == op.new
        for tx in txs:  # known to the caller: never left COMMITTING or ACTIVE
            assert tx.state in (TxState.COMMITTED, TxState.ROLLED_BACK), (where, tx)
        if txs:
            assert (txs[-1].state is TxState.COMMITTED) == committed, (where, txs[-1])
        assert sum(tx.state is TxState.COMMITTED for tx in txs) <= 1, where
        if fs.open_fds() != handles:
            leaks.append(f"{where}: {fs.open_fds() - handles} handles left open")
        outcomes["committed" if committed else "rolled back"].append(k)

        await check_store_still_works(fs, store, files, where, leaks)
    # The sweep crossed the commit point: a cancellation before it rolled back (a pending one
    # included: commit() checks for it first), one after it committed.
    assert outcomes["committed"] and outcomes["rolled back"], outcomes
    if leaks:
        raise HandleLeak("\n".join(leaks))


async def test_cancelled_before_commit_starts_rolls_back() -> None:
    """A cancellation already pending when the block ends (here: requested in the block
    with no await after it) is before the commit point: commit() rolls back."""
    fs, store = await seeded()
    with anyio.CancelScope() as scope:
        async with store.transaction() as tx:
            await tx.write("big.bin", BIG)
            await tx.write("x", b"x1")
            scope.cancel()  # the block then ends cleanly: __aexit__ calls commit()
    assert scope.cancelled_caught
    assert tx.state is TxState.ROLLED_BACK, tx
    assert user_files(fs) == OLD
    assert staging_leftovers(fs) == {}
    await check_store_still_works(fs, store, OLD, "cancelled before commit")


async def test_cancel_inside_write_of_a_staged_value() -> None:
    """A scope around just ``tx.write`` of a large value, cancelled at each call of the
    staging: either the cancellation comes out and the value is not recorded, or the write
    completed and the value is recorded; the transaction stays usable either way."""
    fs, store = await seeded()
    async with store.transaction() as tx:
        calls = await count_calls(fs, lambda: tx.write("big.bin", BIG))
        await tx.rollback()
    assert calls >= 3
    seen = set()
    for k in range(calls):
        fs, store = await seeded()
        async with store.transaction() as tx:
            await tx.write("before", b"b")
            out = await cancel_at_call(fs, k, lambda: tx.write("big.bin", BIG))
            where = f"cancelled at staging call {k} {out.blocked}"
            assert out.blocked is not None and out.error is None, (where, out.error)
            recorded = await tx.exists("big.bin")
            assert recorded != out.cancelled_caught, (where, out.cancelled_caught)
            seen.add(recorded)
            assert tx.state is TxState.ACTIVE, where
            await tx.write("after", b"a")  # still usable
        assert tx.state is TxState.COMMITTED, where
        expected = {**OLD, "before": b"b", "after": b"a"}
        if recorded:
            expected["big.bin"] = BIG
        assert user_files(fs) == expected, where
        await check_store_still_works(fs, store, expected, where)
    # Today the staging call always completes (worker threads are not abandoned), so the
    # value is recorded and the cancellation is delivered at the next checkpoint, if any.
    assert seen


async def test_cancel_the_whole_transaction_while_it_stages() -> None:
    """Cancelled while a large value is being staged: rolled back, staged file removed at
    once (not only at the next checkpoint)."""
    fs, store = await seeded()
    txs: list[walstore.Transaction] = []

    async def op() -> None:
        async with store.transaction() as tx:
            txs.append(tx)
            await tx.write("big.bin", BIG)
            await tx.write("x", b"x1")
            await tx.read("w")  # an await after the write: the cancellation lands here

    out = await cancel_at_call(fs, nth_call("fsync", 1, "/staging/"), op)
    assert out.blocked is not None and out.cancelled_caught and out.error is None
    assert txs[0].state is TxState.ROLLED_BACK
    assert user_files(fs) == OLD
    assert staging_leftovers(fs) == {}
    await check_store_still_works(fs, store, OLD, "cancelled while staging")


@pytest.mark.parametrize("how", ["error", "cancel"])
async def test_open_write_block_that_fails_closes_its_staging_file(how: str) -> None:
    """An error or a cancellation inside ``open_write``'s block: nothing recorded, the
    transaction rolls back, its staged file is removed and its handle closed."""
    fs, store = await seeded()
    handles = fs.open_fds()
    with anyio.CancelScope() as scope:
        with pytest.raises(RuntimeError) if how == "error" else contextlib.nullcontext():
            async with store.transaction() as tx, tx.open_write("stream.bin") as f:
                await f.write(CHUNK * 2)  # one hop to the staging file
                if how == "error":
                    raise RuntimeError("the producer failed")
                scope.cancel()
                await f.write(b"more")
                await anyio.lowlevel.checkpoint()
    assert scope.cancelled_caught == (how == "cancel")
    assert tx.state is TxState.ROLLED_BACK
    assert user_files(fs) == OLD
    assert staging_leftovers(fs) == {}
    if fs.open_fds() != handles:
        raise HandleLeak(f"{fs.open_fds() - handles} handles left open by the rollback")
    await check_store_still_works(fs, store, OLD, how)


# -- the commit queue --------------------------------------------------------------------------


async def test_cancel_while_queued_behind_another_group_rolls_back() -> None:
    """B waits in the commit queue while A's group is blocked at its journal sync; B is
    cancelled there: B rolls back (its staged value removed), A commits."""
    fs, store = await seeded()
    blocker = Blocker(nth_call("fdatasync", 1))
    fs.fault = blocker
    txs: dict[str, walstore.Transaction] = {}
    b_staged, b_go = anyio.Event(), anyio.Event()
    b_scope = anyio.CancelScope()

    async def a() -> None:
        async with store.transaction() as tx:
            txs["a"] = tx
            await tx.write("a", b"A")

    async def b() -> None:
        with b_scope:
            async with store.transaction() as tx:
                txs["b"] = tx
                await tx.write("b.bin", BIG)  # staged before A's group starts
                await tx.write("b", b"B")
                b_staged.set()
                await b_go.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(b)
        await b_staged.wait()
        tg.start_soon(a)
        await blocker.wait()  # A's group holds the commit: blocked at its fdatasync
        assert blocker.call is not None and blocker.call[1] == "fdatasync"
        b_go.set()
        await anyio.wait_all_tasks_blocked()
        assert txs["b"].state is TxState.COMMITTING  # queued behind A's group
        assert txs["a"].state is TxState.COMMITTING
        b_scope.cancel()
        blocker.release()
    fs.fault = None
    assert b_scope.cancelled_caught
    assert txs["b"].state is TxState.ROLLED_BACK
    assert txs["a"].state is TxState.COMMITTED
    assert user_files(fs) == {**OLD, "a": b"A"}
    assert staging_leftovers(fs) == {}  # removed by the rollback, before any checkpoint
    stats = store.stats()
    assert stats.commits == 2 and stats.conflicts == 0
    await check_store_still_works(fs, store, {**OLD, "a": b"A"}, "queued")


async def test_cancel_inside_a_group_being_committed_commits_then_delivers() -> None:
    """B and C queue behind A's group; B leads the next group with C in it. Both are
    cancelled while that group is blocked at its journal sync: the group is past the point
    of no return (taken by the committer), so both commit, ``state`` says so, and the
    cancellation is delivered after."""
    fs, store = await seeded()
    first = Blocker(nth_call("fdatasync", 1))
    second = Blocker(nth_call("fdatasync", 2))

    def hook(index: int, name: str, path: str) -> BaseException | None:
        first(index, name, path)
        return second(index, name, path)

    fs.fault = hook
    txs: dict[str, walstore.Transaction] = {}
    scopes = {name: anyio.CancelScope() for name in "abc"}
    go = anyio.Event()

    async def commit(name: str) -> None:
        with scopes[name]:
            async with store.transaction() as tx:
                txs[name] = tx
                await tx.write(name, name.encode())
                if name != "a":
                    await go.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(commit, "b")
        tg.start_soon(commit, "c")
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(commit, "a")
        await first.wait()  # A's group: blocked at its fdatasync
        go.set()
        await anyio.wait_all_tasks_blocked()
        assert all(tx.state is TxState.COMMITTING for tx in txs.values())
        first.release()
        await second.wait()  # the next group (B and C) is blocked at its fdatasync
        scopes["b"].cancel()
        scopes["c"].cancel()
        second.release()
    fs.fault = None
    assert not scopes["a"].cancelled_caught
    for name in "bc":
        assert scopes[name].cancelled_caught, name
    assert all(tx.state is TxState.COMMITTED for tx in txs.values()), txs
    assert txs["b"].lsn == txs["c"].lsn != txs["a"].lsn  # B and C were one group
    expected = {**OLD, "a": b"a", "b": b"b", "c": b"c"}
    assert user_files(fs) == expected
    stats = store.stats()
    assert stats.groups == 3 and stats.commits == 4  # the seed, A, then B+C
    await check_store_still_works(fs, store, expected, "in a group")


# -- open ----------------------------------------------------------------------------------------


async def crashed_store() -> tuple[MemoryFileSystem, dict[str, bytes]]:
    """A store whose process died with committed work only in the journal's tail (nothing
    checkpointed) and an uncommitted transaction's staged value: recovery has work to do."""
    fs = MemoryFileSystem()
    store = await open_memory(fs, inline_threshold=INLINE)
    await store.write("a/1", b"one")
    await store.write("big.bin", BIG)
    async with store.transaction() as tx:
        await tx.write("a/2", b"two")
        await tx.write("b/c/3", BIG[:100])
        await tx.delete("a/1")
    orphan = store.transaction()
    await orphan.write("orphan.bin", BIG)  # staged, never committed
    fs.reboot()  # the process dies: no close, no checkpoint; the page cache survives
    return fs, {"a/2": b"two", "b/c/3": BIG[:100], "big.bin": BIG}


async def fresh_store() -> tuple[MemoryFileSystem, dict[str, bytes]]:
    return MemoryFileSystem(), {}


@pytest.mark.parametrize("durability", [Durability.FULL, Durability.OFF], ids=lambda d: d.name)
@pytest.mark.parametrize("make", [crashed_store, fresh_store], ids=["recovering", "creating"])
async def test_cancel_open_at_every_call(
    make: Callable[[], Awaitable[tuple[MemoryFileSystem, dict[str, bytes]]]],
    durability: Durability,
) -> None:
    base, expected = await make()

    async def open_on(fs: MemoryFileSystem) -> walstore.Store:
        return await walstore.open(ROOT, fs=fs, durability=durability, inline_threshold=INLINE)

    dry = base.clone()
    calls = await count_calls(dry, lambda: open_on(dry))
    assert calls >= 5
    for k in range(calls):
        fs = base.clone()
        out = await cancel_at_call(fs, k, lambda: open_on(fs))  # noqa: B023
        where = f"open cancelled at call {k} {out.blocked}"
        assert out.blocked is not None, where
        assert out.error is None, (where, out.error)
        assert out.cancelled_caught, f"{where}: the cancellation did not propagate"
        assert out.result is None, f"{where}: open returned a store despite the cancellation"
        assert fs.open_fds() == 0, f"{where}: a handle (or the LOCK) leaked"
        # Not left locked: a new open succeeds at once; the data is intact.
        async with walstore.open(ROOT, fs=fs, lock_timeout=0) as store:
            assert user_files(fs) == expected, where
            assert staging_leftovers(fs) == {}, where
            await store.write("after.txt", b"ok")
        assert user_files(fs) == {**expected, "after.txt": b"ok"}, where


async def test_cancel_open_while_it_waits_for_the_lock() -> None:
    fs, store = await seeded()
    handles = fs.open_fds()
    out = await cancel_at_call(
        fs,
        nth_call("lock", 1),
        lambda: walstore.open(ROOT, fs=fs, lock_timeout=3600),
    )
    assert out.blocked is not None
    assert out.error is None, out.error  # no StoreLockedError: the wait was cancelled
    assert out.cancelled_caught and out.result is None
    assert fs.open_fds() == handles
    await store.write("x", b"x1")  # the holder is untouched
    await check_store_still_works(fs, store, {**OLD, "x": b"x1"}, "lock wait")


# -- checkpoint and close ------------------------------------------------------------------------


async def do_checkpoint(store: walstore.Store) -> None:
    await store.checkpoint()


async def do_aclose(store: walstore.Store) -> None:
    await store.aclose()


@pytest.mark.parametrize("op", [do_checkpoint, do_aclose], ids=["checkpoint", "aclose"])
async def test_cancel_checkpoint_and_close_at_every_call(
    op: Callable[[walstore.Store], Awaitable[Any]],
) -> None:
    """Both run to their end shielded, then the cancellation is delivered."""

    async def prepared() -> tuple[MemoryFileSystem, walstore.Store]:
        fs, store = await seeded()
        await store.write("big.bin", BIG)  # something for the checkpoint to sync and drop
        await store.write("x", b"x1")
        return fs, store

    expected = {**OLD, "big.bin": BIG, "x": b"x1"}
    fs, store = await prepared()
    calls = await count_calls(fs, lambda: op(store))
    await store.aclose()
    assert calls >= 5
    for k in range(calls):
        fs, store = await prepared()
        out = await cancel_at_call(fs, k, lambda: op(store))  # noqa: B023
        where = f"{op.__name__} cancelled at call {k} {out.blocked}"
        assert out.blocked is not None and out.error is None, (where, out.error)
        assert out.cancelled_caught, where
        assert staging_leftovers(fs) == {}, where  # it ran to its end
        assert user_files(fs) == expected, where
        if op is do_aclose:
            assert fs.open_fds() == 0, where
            with pytest.raises(walstore.StoreClosedError):
                await store.write("y", b"")
            async with walstore.open(ROOT, fs=fs) as again:
                assert again.recovery.clean, where
        else:
            await check_store_still_works(fs, store, expected, where)


# -- readers and many tasks ----------------------------------------------------------------------


async def test_cancel_a_reader_held_off_by_the_apply_gate() -> None:
    """A store read (not cached) waits while a group is applied; cancelled there, it returns
    the new value or raises the cancellation (the read in flight finishes either way), and the
    gate is not left held: later commits and reads work."""
    fs, store = await seeded()
    blocker = Blocker(nth_call("exchange", 1))  # inside the apply step: readers held off
    fs.fault = blocker
    scope = anyio.CancelScope()
    got: list[bytes] = []

    async def reader() -> None:
        with scope:
            got.append(await store.read("x"))
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(store.write, "x", b"x1")
        await blocker.wait()
        tg.start_soon(reader)
        await anyio.wait_all_tasks_blocked()
        scope.cancel()
        blocker.release()
    fs.fault = None
    assert scope.cancelled_caught
    assert got in ([], [b"x1"])  # never the old value: it waited for the whole group
    await check_store_still_works(fs, store, {**OLD, "x": b"x1"}, "gate")


async def test_a_cached_read_during_a_commit_waits_for_it_and_is_a_checkpoint() -> None:
    """With the read cache, a read that hits it while a group is being committed waits for
    that group (so the event loop leaves the GIL to the committing thread) and then returns
    what the group left, from the cache: never part of the group, never a file-system call.
    A read cancelled while it waits raises the cancellation and holds nothing up; a cached
    read is still a point where a pending cancellation is delivered."""
    fs, store = await seeded(cache=True)
    blocker = Blocker(nth_call("exchange", 1))  # inside the apply step (x is replaced)
    fs.fault = blocker
    got: list[bytes] = []
    cancelled = anyio.CancelScope()

    async def reader() -> None:
        got.append(await store.read("x"))

    async def cancelled_reader() -> None:
        with cancelled:
            await store.read("x")
            raise AssertionError("read past the cancellation")  # pragma: no cover

    async with anyio.create_task_group() as tg:
        tg.start_soon(store.write, "x", b"x1")
        await blocker.wait()
        reads = fs.calls["read_file"]
        tg.start_soon(reader)
        tg.start_soon(cancelled_reader)
        await anyio.wait_all_tasks_blocked()
        assert got == []  # waiting for the group
        cancelled.cancel()
        await anyio.wait_all_tasks_blocked()
        assert cancelled.cancelled_caught
        blocker.release()
    fs.fault = None
    assert got == [b"x1"]
    assert fs.calls["read_file"] == reads  # served from the cache
    assert await store.read("x") == b"x1"
    with anyio.CancelScope() as scope:
        scope.cancel()
        await store.read("x")
        raise AssertionError("the cancellation was not delivered")  # pragma: no cover
    assert scope.cancelled_caught
    await check_store_still_works(fs, store, {**OLD, "x": b"x1"}, "cached")


@pytest.mark.parametrize("seed", range(3))
async def test_cancellation_storm_while_groups_commit(seed: int) -> None:
    """64 tasks each run 4 transactions in turn (odd ones staging a large value) while a
    canceller cancels the current transaction of random tasks at random points: every
    transaction ends COMMITTED or ROLLED_BACK, only cancelled ones roll back, the files are
    exactly those of the last committed transaction of each task, and the store is clean
    and usable after."""
    rng = random.Random(seed)
    fs, store = await seeded()
    tasks, rounds = 64, 4
    current: dict[int, anyio.CancelScope] = {}
    results: dict[tuple[int, int], tuple[walstore.Transaction, anyio.CancelScope]] = {}
    finished = 0

    async def run(i: int) -> None:
        nonlocal finished
        for r in range(rounds):
            with anyio.CancelScope() as scope:
                current[i] = scope
                async with store.transaction() as tx:
                    results[i, r] = tx, scope
                    await tx.write(f"f/{i}", f"{i}:{r}".encode())
                    if i % 2:
                        await tx.write(f"big/{i}", BIG + bytes([r]))
                    await anyio.lowlevel.checkpoint()
                    assert await tx.read("w") == b"w0"  # one more await; nobody writes w
        finished += 1

    async def canceller() -> None:
        while finished < tasks:
            await anyio.lowlevel.checkpoint()
            if current and rng.random() < 0.3:
                current[rng.choice(sorted(current))].cancel()

    async with anyio.create_task_group() as tg:
        for i in range(tasks):
            tg.start_soon(run, i)
        tg.start_soon(canceller)

    assert len(results) == tasks * rounds
    expected = dict(OLD)
    outcome = {TxState.COMMITTED: 0, TxState.ROLLED_BACK: 0}
    for (i, r), (tx, scope) in sorted(results.items()):
        assert tx.state in outcome, tx
        outcome[tx.state] += 1
        if tx.state is TxState.ROLLED_BACK:
            assert scope.cancelled_caught, (i, r)  # only a cancellation rolls back here
        else:
            expected[f"f/{i}"] = f"{i}:{r}".encode()
            if i % 2:
                expected[f"big/{i}"] = BIG + bytes([r])
    assert user_files(fs) == expected
    assert outcome[TxState.COMMITTED] and outcome[TxState.ROLLED_BACK], outcome
    await check_store_still_works(fs, store, expected, f"storm seed {seed}")
