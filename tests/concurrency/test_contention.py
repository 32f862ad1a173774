"""Contention: many transactions on a few hot documents commit with ``atomic``'s defaults.

A path that transactions conflict on gets a queue (``walstore._contention``): retries and
later readers of it take turns in arrival order, and a holder queued for commit hands its
pending value to the next one, so a chain of read-modify-writes commits in one group. These
tests hold the contract to counts, never to times: every call commits, the values are exact,
conflicts and thread hops per commit stay bounded, and each call needs few attempts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import anyio
import pytest

import walstore
from walstore import ConflictError, TxState
from walstore.testing import MemoryFileSystem

from .helpers import STRESS, Blocker, nth_call, open_memory

pytestmark = [pytest.mark.anyio, pytest.mark.guarantee(name="Contention never fails atomic")]


async def incr(tx: walstore.Transaction, path: str, calls: list[int] | None = None) -> int:
    if calls is not None:
        calls[0] += 1
    doc = json.loads(await tx.read(path))
    doc["n"] += 1
    await tx.write(path, json.dumps(doc).encode())
    return int(doc["n"])


@pytest.mark.parametrize("handlers", [256, 2000] if STRESS else [256])
async def test_handlers_on_one_document_all_commit_with_the_defaults(
    tmp_path: Path, handlers: int
) -> None:
    """The issue's server shape: every handler at once runs ``atomic(incr)`` on one JSON
    counter with the defaults. None gets ConflictError, the counter is exact, each value is
    handed out once, each call needs at most two attempts (one conflict before the queue
    formed), and the commits share thread hops (groups)."""
    async with walstore.open(tmp_path / "s") as store:
        await store.write_json("counter.json", {"n": 0})
        before = store.stats()
        seen: list[int] = []
        attempts: list[int] = []

        async def handler() -> None:
            calls = [0]
            seen.append(await store.atomic(incr, "counter.json", calls))
            attempts.append(calls[0])

        async with anyio.create_task_group() as tg:
            for _ in range(handlers):
                tg.start_soon(handler)
        after = store.stats()
        assert await store.read_json("counter.json") == {"n": handlers}
    assert sorted(seen) == list(range(1, handlers + 1))
    assert max(attempts) <= 2
    commits = after.commits - before.commits
    assert commits == handlers
    assert after.conflicts - before.conflicts <= 2 * commits
    assert after.thread_hops - before.thread_hops <= commits // 4  # groups of 4+


async def test_a_loop_of_writers_conflicts_only_until_the_queue_forms(tmp_path: Path) -> None:
    """64 tasks each increment one counter 20 times. Once the path is hot every later
    transaction waits for its turn instead of conflicting: conflicts stay at most one per
    task (the first wave, before the path is hot), and consecutive holders share groups."""
    tasks, rounds = 64, 20
    async with walstore.open(tmp_path / "s") as store:
        await store.write_json("counter.json", {"n": 0})
        before = store.stats()

        async def worker() -> None:
            for _ in range(rounds):
                await store.atomic(incr, "counter.json")

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(worker)
        after = store.stats()
        assert await store.read_json("counter.json") == {"n": tasks * rounds}
    commits = after.commits - before.commits
    assert after.conflicts - before.conflicts <= tasks
    assert after.groups - before.groups <= commits // 4
    assert after.turn_waits > 0  # they did queue


async def test_sixteen_hot_documents_are_exact(tmp_path: Path) -> None:
    """W8's shape: 64 tasks, each transaction on one of 16 documents chosen at random."""
    rng = random.Random(8)
    picks = [rng.randrange(16) for _ in range(1200)]
    async with walstore.open(tmp_path / "s") as store:
        for d in range(16):
            await store.write_json(f"doc{d}.json", {"n": 0})
        before = store.stats()
        it = iter(picks)

        async def worker() -> None:
            for d in it:
                await store.atomic(incr, f"doc{d}.json")

        async with anyio.create_task_group() as tg:
            for _ in range(64):
                tg.start_soon(worker)
        after = store.stats()
        for d in range(16):
            assert await store.read_json(f"doc{d}.json") == {"n": picks.count(d)}
    commits = after.commits - before.commits
    assert after.conflicts - before.conflicts <= commits
    assert after.thread_hops - before.thread_hops <= commits // 4


async def transfer(tx: walstore.Transaction, src: str, dst: str) -> None:
    a = await tx.read_json(f"accounts/{src}.json")
    b = await tx.read_json(f"accounts/{dst}.json")
    await tx.write_json(f"accounts/{src}.json", a - 1)
    await tx.write_json(f"accounts/{dst}.json", b + 1)
    n = len(await tx.list("ledger")) if await tx.exists("ledger") else 0
    await tx.write_json(f"ledger/{n:06d}.json", [src, dst])


async def test_transfers_over_a_ledger_directory_conserve_money_and_entries(
    tmp_path: Path,
) -> None:
    """Several hot keys per transaction, taken in different orders, and a directory listed
    and added to by every one: money is conserved, no ledger entry is lost (each transfer
    numbered its entry by the listing it read), and no call gives up."""
    rng = random.Random(3)
    names = "abcd"
    pairs = [tuple(rng.sample(names, 2)) for _ in range(300)]
    async with walstore.open(tmp_path / "s") as store:
        for x in names:
            await store.write_json(f"accounts/{x}.json", 1000)
        it = iter(pairs)

        async def worker() -> None:
            for src, dst in it:
                await store.atomic(transfer, src, dst)

        async with anyio.create_task_group() as tg:
            for _ in range(32):
                tg.start_soon(worker)
        balances = [await store.read_json(f"accounts/{x}.json") for x in names]
        entries = [await store.read_json(f"ledger/{n}") for n in await store.list("ledger")]
    assert sum(balances) == 4000
    assert sorted(map(tuple, entries)) == sorted(pairs)
    for x, balance in zip(names, balances, strict=True):
        assert balance == 1000 - [s for s, _ in pairs].count(x) + [d for _, d in pairs].count(x)


async def always_conflicts(tx: walstore.Transaction, store: walstore.Store) -> None:
    await tx.read("x")
    await store.write_text("x", "changed")  # another commit changes what tx read
    await tx.write_text("y", "never")


async def test_a_user_given_attempts_limit_still_raises(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "s") as store:
        await store.write_text("x", "0")
        with pytest.raises(ConflictError) as info:
            await store.atomic(always_conflicts, store, attempts=3)
        assert "gave up after 3 attempt(s)" in str(info.value)
        assert "attempts=3" in str(info.value)
        assert info.value.paths == ("x",)
        assert not await store.exists("y")


async def test_a_user_given_timeout_still_raises(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "s") as store:
        await store.write_text("x", "0")
        with pytest.raises(ConflictError) as info:
            await store.atomic(always_conflicts, store, timeout=0.05)
        assert "timeout=0.05 s" in str(info.value)
        assert not await store.exists("y")
        for bad in ({"attempts": 0}, {"timeout": 0}, {"timeout": -1.0}):
            with pytest.raises(ValueError):
                await store.atomic(always_conflicts, store, **bad)


async def test_a_stale_transaction_fails_on_the_event_loop(tmp_path: Path) -> None:
    """A transaction whose read was overwritten before it commits is refused before it
    queues: no thread hop, no journal byte."""
    async with walstore.open(tmp_path / "s") as store:
        await store.write_text("x", "0")
        async with store.transaction() as tx:
            await tx.read("x")
            await store.write_text("x", "1")
            await tx.write_text("y", "stale")
            before = store.stats()
            with pytest.raises(ConflictError):
                await tx.commit()
        after = store.stats()
        assert tx.state is TxState.ROLLED_BACK
        assert after.thread_hops == before.thread_hops
        assert after.journal_bytes == before.journal_bytes
        assert after.conflicts == before.conflicts + 1
        assert not await store.exists("y")


async def test_a_retry_waits_for_the_commit_that_beat_it() -> None:
    """The conflict is found on the event loop while the winning group is applied but not
    yet published: the retry waits for it, so its second attempt reads the winner's value
    and commits (without the wait it would read the old value and conflict again)."""
    fs = MemoryFileSystem()
    store = await open_memory(fs)
    try:
        await store.write("x", b"1")
        # The old x is unlinked right after the group is applied and the conflict index
        # updated, before the group is published.
        blocker = Blocker(nth_call("unlink", 1, ".tmp"))
        calls = 0
        async with anyio.create_task_group() as tg:

            async def copy(tx: walstore.Transaction) -> None:
                nonlocal calls
                calls += 1
                value = await tx.read("x")
                if calls == 1:
                    fs.fault = blocker
                    tg.start_soon(store.write, "x", b"2")
                    await blocker.wait()
                await tx.write("y", value)

            async def release_when_all_wait() -> None:
                await blocker.wait()
                await anyio.wait_all_tasks_blocked()
                blocker.release()

            tg.start_soon(release_when_all_wait)
            await store.atomic(copy)
        fs.fault = None
        assert calls == 2
        assert await store.read("y") == b"2"
    finally:
        await store.aclose()


async def hold_turn(
    store: walstore.Store, entered: anyio.Event, go: anyio.Event, path: str = "p"
) -> None:
    """An ``atomic`` call whose first attempt conflicts on ``path`` (another commit changes
    it), so that its retry holds ``path``'s turn; the retry waits for ``go`` while holding
    it."""
    calls = 0

    async def body(tx: walstore.Transaction) -> None:
        nonlocal calls
        calls += 1
        n = int(await tx.read_text(path))
        if calls == 1:
            await store.write_text(path, str(n + 100))
        else:
            entered.set()
            await go.wait()
        await tx.write_text(path, str(n + 1))

    await store.atomic(body)


async def test_a_blind_write_takes_its_turn_after_the_holder(tmp_path: Path) -> None:
    """A blind write of a hot path while another transaction holds its turn waits for the
    holder's commit instead of making it conflict again (which could go on forever)."""
    async with walstore.open(tmp_path / "s") as store:
        await store.write_text("p", "0")
        entered, go = anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold_turn, store, entered, go)
            await entered.wait()
            tg.start_soon(store.write_text, "p", "blind")
            await anyio.wait_all_tasks_blocked()
            assert await store.read_text("p") == "100"  # the blind write waits
            go.set()
        assert await store.read_text("p") == "blind"  # after the holder's 101
        assert store.stats().conflicts == 1


async def test_cancelled_while_waiting_for_a_turn_rolls_back(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "s") as store:
        await store.write_text("p", "0")
        entered, go = anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold_turn, store, entered, go)
            await entered.wait()
            scope = anyio.CancelScope()
            txs: list[walstore.Transaction] = []

            async def waiter() -> None:
                with scope:
                    async with store.transaction() as tx:
                        txs.append(tx)
                        await tx.read("p")  # waits for its turn
                        await tx.write_text("q", "never")

            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
            await anyio.wait_all_tasks_blocked()
            assert txs[0].state is TxState.ROLLED_BACK
            go.set()
        assert scope.cancelled_caught
        assert await store.read_text("p") == "101"
        assert not await store.exists("q")
        assert await store.atomic(incr_text, "p") == 102  # the queue is not left blocked


async def incr_text(tx: walstore.Transaction, path: str) -> int:
    n = int(await tx.read_text(path)) + 1
    await tx.write_text(path, str(n))
    return n


async def test_a_task_never_waits_for_its_own_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction opened inside another one by the same task, on a path the outer one
    holds the turn of, goes ahead instead of waiting for itself forever (the stuck-holder
    fallback is put out of reach, so that only this rule can save it)."""
    monkeypatch.setattr("walstore._contention.STUCK_AFTER", 3600.0)
    async with walstore.open(tmp_path / "s") as store:
        await store.write_text("p", "0")
        calls = 0

        async def nested(tx: walstore.Transaction) -> None:
            nonlocal calls
            calls += 1
            n = int(await tx.read_text("p"))
            if calls == 1:
                await store.write_text("p", "10")  # a conflict: the retry holds p's turn
            else:
                with anyio.fail_after(10):
                    async with store.transaction() as inner:
                        assert await inner.read_text("p") == "10"
            await tx.write_text("p", str(n + 1))

        await store.atomic(nested)
        assert await store.read_text("p") == "11"


async def test_a_stuck_holder_is_waited_for_only_so_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder that waits for the very task queued behind it (a user's deadlock the queue
    would create) is given up on: the waiter goes on optimistically, as without a queue."""
    monkeypatch.setattr("walstore._contention.STUCK_AFTER", 0.05)
    async with walstore.open(tmp_path / "s") as store:
        await store.write_text("p", "0")
        entered, go = anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold_turn, store, entered, go)
            await entered.wait()
            with anyio.fail_after(10):
                async with store.transaction() as tx:
                    assert await tx.read_text("p") == "100"  # waited, then went on
            go.set()  # only now does the holder go on
        assert await store.read_text("p") == "101"
