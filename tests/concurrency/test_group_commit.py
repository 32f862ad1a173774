"""Group commit: one journal write, one fdatasync and one worker-thread hop serve every
transaction ready at that moment (LevelDB's ``writers_``)."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path

import anyio
import pytest

import walstore
from walstore import Durability, TxState
from walstore.testing import MemoryFileSystem

from .helpers import GUARD, ROOT, Blocker, nth_call, open_memory, user_files

pytestmark = [pytest.mark.anyio, pytest.mark.guarantee(name="One fdatasync per commit group")]

TASKS = 64


async def test_concurrent_commits_share_journal_syncs(tmp_path: Path) -> None:
    """64 tasks, each committing one-file transactions in a loop, on real files with
    Durability.FULL: far fewer journal syncs and thread hops than commits."""
    rounds = 5
    async with walstore.open(tmp_path / "s") as store:
        before = store.stats()

        async def worker(i: int) -> None:
            for r in range(rounds):
                await store.write_json(f"f/{i}.json", {"i": i, "round": r})

        async with anyio.create_task_group() as tg:
            for i in range(TASKS):
                tg.start_soon(worker, i)
        after = store.stats()
        commits = after.commits - before.commits
        syncs = after.journal_syncs - before.journal_syncs
        hops = after.thread_hops - before.thread_hops
        assert commits == TASKS * rounds
        assert after.groups - before.groups == syncs  # one fdatasync per group
        assert syncs <= commits / 4, after
        assert hops <= commits / 4, after  # one hop per group, none per transaction
        assert after.mean_group_size > 4, after
        assert after.conflicts == 0
        for i in range(TASKS):
            assert await store.read_json(f"f/{i}.json") == {"i": i, "round": rounds - 1}


# asyncio only: trio runs ready tasks in a deliberately random order, so where its groups
# split varies from run to run (the whole concurrency suite runs there too).
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("tasks", [16, 64])
async def test_writers_released_by_a_group_make_the_next_one_whole(tasks: int) -> None:
    """Tasks committing in a loop: the leader of each group waits one turn of the event loop,
    in which every task the last group released queues its next transaction, so every group
    holds all of them (without that turn the released half missed each group and groups
    alternated at half the size: twice the syncs and hops)."""
    fs = MemoryFileSystem()
    store = await open_memory(fs)
    rounds = 6
    before = store.stats()

    async def worker(i: int) -> None:
        for r in range(rounds):
            await store.write(f"f/{i}", b"%d" % r)

    async with anyio.create_task_group() as tg:
        for i in range(tasks):
            tg.start_soon(worker, i)
    after = store.stats()
    assert after.commits - before.commits == tasks * rounds
    # Every group whole, the first too (its leader's turn lets the others start and queue).
    # Without the turn: 2 * rounds groups of half the tasks.
    assert after.groups - before.groups == rounds, after
    assert user_files(fs) == {f"f/{i}": b"%d" % (rounds - 1) for i in range(tasks)}
    await store.aclose()


async def test_every_transaction_ready_joins_the_next_group() -> None:
    """The first transaction's group is held at its journal sync while 63 others buffer
    their writes and queue: they all commit in the next group, with one journal write,
    one fdatasync and one worker-thread hop."""
    fs = MemoryFileSystem()
    store = await open_memory(fs)
    blocker = Blocker(nth_call("fdatasync", 1))
    fs.fault = blocker
    before_calls = fs.calls.copy()
    before = store.stats()
    txs: list[walstore.Transaction] = []

    async def commit(i: int) -> None:
        async with store.transaction() as tx:
            txs.append(tx)
            await tx.write_json(f"f/{i}.json", {"i": i})
            await tx.write_text(f"g/{i}.txt", str(i))

    async with anyio.create_task_group() as tg:
        tg.start_soon(commit, 0)
        await blocker.wait()  # the first group is in its fdatasync
        for i in range(1, TASKS):
            tg.start_soon(commit, i)
        await anyio.wait_all_tasks_blocked()
        # Their buffered writes did not wait for the committer: all are queued.
        assert len(txs) == TASKS
        assert all(tx.state is TxState.COMMITTING for tx in txs)
        blocker.release()
    fs.fault = None

    after = store.stats()
    delta = fs.calls - before_calls
    assert after.commits - before.commits == TASKS
    assert after.groups - before.groups == 2
    assert after.journal_syncs - before.journal_syncs == 2
    assert delta["fdatasync"] == 2
    # 2 journal appends; one tmp file per value; after each group's apply, the applied LSN
    # in the header other processes read (.walstore/shared)
    assert delta["pwrite"] == 2 + 2 * TASKS + 2
    assert after.thread_hops - before.thread_hops == 2
    assert {tx.lsn for tx in txs[1:]} == {txs[1].lsn} != {txs[0].lsn}
    assert all(tx.state is TxState.COMMITTED for tx in txs)
    files = user_files(fs)
    assert len(files) == 2 * TASKS
    assert files["g/63.txt"] == b"63"
    await store.aclose()


async def test_a_conflict_leaves_the_group_and_the_rest_commit() -> None:
    """One group holds 8 transactions that all read and bump the same counter and 4 blind
    writers: validation lets the first bump through and refuses the other 7; the rest of
    the group commits, with one journal sync."""
    fs = MemoryFileSystem()
    store = await open_memory(fs)
    await store.write_text("counter", "0")
    outcomes: dict[str, object] = {}
    read = anyio.Event()
    go = anyio.Event()
    readers = 0

    async def bump(name: str) -> None:
        nonlocal readers
        try:
            async with store.transaction() as tx:
                n = int(await tx.read_text("counter"))
                readers += 1
                if readers == 8:
                    read.set()
                await go.wait()
                await tx.write_text("counter", str(n + 1))
                await tx.write_text(f"own/{name}", "x")
            outcomes[name] = tx.state
        except walstore.ConflictError as exc:
            outcomes[name] = exc

    async def blind(name: str) -> None:
        async with store.transaction() as tx:
            await go.wait()
            await tx.write_text(f"own/{name}", "x")
        outcomes[name] = tx.state

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(bump, f"bump{i}")
        for i in range(4):
            tg.start_soon(blind, f"blind{i}")
        await read.wait()  # every bump has read the counter
        blocker = Blocker(nth_call("fdatasync", 1))
        fs.fault = blocker
        tg.start_soon(store.write, "unrelated", b"u")
        await blocker.wait()  # its group holds the commit
        before = store.stats()
        go.set()
        await anyio.wait_all_tasks_blocked()  # all 12 queued behind it
        blocker.release()
    fs.fault = None
    after = store.stats()
    won = [n for n, o in outcomes.items() if o is TxState.COMMITTED]
    lost = [n for n, o in outcomes.items() if isinstance(o, walstore.ConflictError)]
    assert len(won) == 5 and len(lost) == 7, outcomes
    assert sum(n.startswith("bump") for n in won) == 1
    files = user_files(fs)
    assert files["counter"] == b"1"
    assert sorted(p for p in files if p.startswith("own/")) == sorted(f"own/{n}" for n in won)
    assert after.conflicts - before.conflicts == 7
    assert after.groups - before.groups == 2  # the unrelated one, then all 12
    assert after.journal_syncs - before.journal_syncs == 2
    await store.aclose()


@pytest.mark.parametrize("durability", [Durability.FULL, Durability.OFF], ids=lambda d: d.name)
async def test_read_only_transactions_need_no_journal_sync(
    tmp_path: Path, durability: Durability
) -> None:
    async with walstore.open(tmp_path / "s", durability=durability) as store:
        await store.write("a", b"1")
        before = store.stats()

        async def look() -> None:
            async with store.transaction() as tx:
                assert await tx.read("a") == b"1"
                assert await tx.list() == ["a"]

        async with anyio.create_task_group() as tg:
            for _ in range(TASKS):
                tg.start_soon(look)
        after = store.stats()
    assert after.journal_syncs == before.journal_syncs
    assert after.fsyncs == before.fsyncs
    assert after.commits == before.commits


# -- closing while commits are under way ----------------------------------------------------


async def test_aclose_waits_for_the_group_being_committed() -> None:
    fs = MemoryFileSystem()
    store = await open_memory(fs)
    blocker = Blocker(nth_call("fdatasync", 1))
    fs.fault = blocker
    txs: list[walstore.Transaction] = []

    async def commit() -> None:
        async with store.transaction() as tx:
            txs.append(tx)
            await tx.write("a", b"A")

    async with anyio.create_task_group() as tg:
        tg.start_soon(commit)
        await blocker.wait()
        tg.start_soon(store.aclose)
        await anyio.wait_all_tasks_blocked()
        blocker.release()
    fs.fault = None
    assert txs[0].state is TxState.COMMITTED
    assert fs.open_fds() == 0
    async with walstore.open(ROOT, fs=fs) as again:
        assert again.recovery.clean
        assert await again.read("a") == b"A"


async def test_aclose_with_a_transaction_queued_settles_it() -> None:
    """A's group is being committed, B waits in the queue, then the store is closed. B must
    end COMMITTED (close waits for queued commits) or ROLLED_BACK with StoreClosedError,
    never stuck in COMMITTING with an internal error; the store closes and reopens
    consistent."""
    fs = MemoryFileSystem()
    store = await open_memory(fs)
    blocker = Blocker(nth_call("fdatasync", 1))
    fs.fault = blocker
    txs: dict[str, walstore.Transaction] = {}
    errors: dict[str, BaseException] = {}

    async def commit(name: str) -> None:
        try:
            async with store.transaction() as tx:
                txs[name] = tx
                await tx.write(name, name.encode())
        except Exception as exc:
            errors[name] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(commit, "a")
        await blocker.wait()
        tg.start_soon(commit, "b")
        await anyio.wait_all_tasks_blocked()
        assert txs["b"].state is TxState.COMMITTING  # queued
        tg.start_soon(store.aclose)
        await anyio.wait_all_tasks_blocked()
        blocker.release()
    fs.fault = None
    assert txs["a"].state is TxState.COMMITTED
    b = txs["b"]
    assert b.state in (TxState.COMMITTED, TxState.ROLLED_BACK), (b, errors)
    if b.state is TxState.ROLLED_BACK:
        assert isinstance(errors.get("b"), walstore.StoreClosedError), errors
    else:
        assert "b" not in errors, errors
    assert fs.open_fds() == 0
    async with walstore.open(ROOT, fs=fs) as again:
        expected = {"a": b"a"} | ({"b": b"b"} if b.state is TxState.COMMITTED else {})
        assert user_files(fs) == expected
        assert again.recovery.clean


async def test_a_group_reaching_a_closed_engine_is_refused_cleanly() -> None:
    """The engine's own guard behind aclose's wait: a group arriving after the close gets
    StoreClosedError, not an internal error."""
    from walstore._engine import Outcome, PreparedTx
    from walstore._journal_format import Put

    fs = MemoryFileSystem()
    store = await open_memory(fs)
    engine = store._engine
    await store.aclose()
    [result] = engine.commit_group([PreparedTx(99, 0, (Put("x", b"x"),))], 0)
    assert result.outcome is Outcome.REJECTED
    assert isinstance(result.error, walstore.StoreClosedError)


async def test_commits_run_in_the_committer_thread_on_asyncio(anyio_backend: str) -> None:
    """On asyncio each group goes to the store's own thread (a cheaper round trip than
    anyio's worker threads, _worker.py), which ends when the store closes; on trio, anyio's
    threads run it. Either way one hop per group."""
    fs = MemoryFileSystem()
    store = await open_memory(fs)
    names: list[str] = []

    def where(index: int, name: str, path: str) -> None:
        if name == "fdatasync":
            names.append(threading.current_thread().name)

    fs.fault = where
    hops = store.stats().thread_hops
    for i in range(3):
        await store.write(f"f{i}", b"x")
    assert store.stats().thread_hops - hops == 3
    fs.fault = None
    thread = store._committer._thread
    await store.aclose()
    if anyio_backend == "asyncio":
        assert names == ["walstore-commit /store"] * 3
        assert thread is not None
        thread.join(GUARD)  # it ends once the store is closed
        assert not thread.is_alive()
    else:
        assert thread is None
        assert len(names) == 3 and not any(n.startswith("walstore-commit") for n in names)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_store_dropped_without_closing_stops_its_thread(anyio_backend: str) -> None:
    """A store garbage-collected without aclose() stops its committer thread (a server that
    forgets to close stores would gather one per store). Opened ``exclusive``, its LOCK stays
    held, and opening the store again in this process says so plainly."""
    fs = MemoryFileSystem()
    store = await open_memory(fs, exclusive=True)
    await store.write("x", b"1")
    thread = store._committer._thread
    assert thread is not None and thread.is_alive()
    ref = weakref.ref(store)
    del store
    gc.collect()
    assert ref() is None
    thread.join(GUARD)  # ends once the finalizer has told it to
    assert not thread.is_alive()
    with pytest.raises(walstore.StoreLockedError, match="already open in this process"):
        await walstore.open(ROOT, fs=fs, create=False, exclusive=True)
