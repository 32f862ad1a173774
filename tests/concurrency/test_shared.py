"""Several writer processes on one store (``walstore._shared``), with real processes.

Each test starts children from ``shared_child.py`` and waits for their output or exit;
nothing sleeps. ``fail_after`` is only a guard against a hung child.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import walstore

from .helpers import GUARD

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.guarantee(name="Several writer processes (the default)"),
]

CHILD = str(Path(__file__).with_name("shared_child.py"))


def spawn(*args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, CHILD, *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(p: subprocess.Popen[str]) -> str:
    out, err = p.communicate(timeout=GUARD * 4)
    assert p.returncode == 0, err
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


async def test_four_processes_count_exactly(root: Path) -> None:
    """4 processes x 16 tasks x N increments of one counter through ``atomic``'s defaults:
    not one lost, not one ConflictError."""
    n = 8
    procs = [spawn("count", str(root), "16", str(n)) for _ in range(4)]
    outs = [finish(p) for p in procs]
    assert all(o.startswith("done ") for o in outs), outs
    async with walstore.open(root, exclusive=False) as store:
        assert await store.read_json("counter.json") == 4 * 16 * n
    assert sum(int(o.split()[1]) for o in outs) == 4 * 16 * n  # commits


async def test_a_process_sees_what_another_committed(root: Path) -> None:
    """Reads through one store see commits another process made since, though the file is
    in its read cache; a transaction that read a value another process then changed does
    not commit on it."""
    async with walstore.open(root, exclusive=False) as store:
        finish(spawn("count", str(root), "1", "1"))  # counter.json = 1, elsewhere
        assert await store.read_json("counter.json") == 1  # cached now
        finish(spawn("count", str(root), "1", "1"))
        assert await store.read_json("counter.json") == 2
        tx = store.transaction()
        async with tx:
            value = await tx.read_json("counter.json")
            finish(spawn("count", str(root), "1", "1"))  # another process: 3
            await tx.write_json("counter.json", value + 10)
            with pytest.raises(walstore.ConflictError):
                await tx.commit()
        assert await store.read_json("counter.json") == 3


async def test_transfers_conserve_money_while_processes_are_killed(root: Path) -> None:
    """Bank transfers from 4 processes, SIGKILLed at random and restarted: the total never
    changes and every transfer a process was told committed is in the ledger."""
    accounts = 8
    async with walstore.open(root, exclusive=False) as store, store.transaction() as tx:
        for i in range(accounts):
            await tx.write_json(f"bank/acc{i}.json", 100)
    rng = random.Random(7)
    acked: set[str] = set()

    def collect(p: subprocess.Popen[str]) -> None:
        out, _ = p.communicate(timeout=GUARD * 4)
        acked.update(line.split()[1] for line in out.splitlines() if line.startswith("ack "))

    procs = [spawn("bank", str(root), str(accounts)) for _ in range(4)]
    for _ in range(12):
        victim = rng.randrange(len(procs))
        p = procs[victim]
        assert p.stdout is not None
        for _ in range(rng.randint(1, 30)):  # let it commit a few first
            line = p.stdout.readline()
            assert line.startswith("ack "), line
            acked.add(line.split()[1])
        p.send_signal(signal.SIGKILL)
        collect(p)
        procs[victim] = spawn("bank", str(root), str(accounts))
    for p in procs:
        p.send_signal(signal.SIGKILL)
        collect(p)
    async with walstore.open(root, exclusive=False) as store:
        balances = [await store.read_json(f"bank/acc{i}.json") for i in range(accounts)]
        ledger = set(await store.list("ledger"))
        moved = 0
        for name in ledger:
            moved += (await store.read_json(f"ledger/{name}"))["amount"]
    assert sum(balances) == 100 * accounts
    assert {a.split("/")[1] for a in acked} <= ledger
    assert moved > 0 and len(acked) > 12


def _trace(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_a_process_killed_at_every_call_of_its_commit_leaves_all_or_nothing(
    root: Path, tmp_path: Path
) -> None:
    """Process A dies at each file-system call of a commit of three files while this process
    keeps the store open and commits after it: this process's next group finishes what A
    committed (A died after the commit point, before or while applying) or never shows it;
    A's staging is gone once the store is opened again; no commit of ours is lost."""
    async with walstore.open(root, exclusive=False) as store:
        await store.write("a.txt", b"old a")
        await store.write("b.txt", b"old b")
    k = 0
    seen = {"old": 0, "new": 0}
    while True:
        trace = tmp_path / f"trace{k}"
        async with walstore.open(root, exclusive=False) as store:
            p = spawn("die", str(root), str(k), str(trace))
            out, err = p.communicate(timeout=GUARD * 4)
            if p.returncode == 0:
                assert "survived" in out
                break
            assert p.returncode == 9, err
            calls = _trace(trace)
            appended = any(c.startswith("pwrite") and "/journal/" in c for c in calls)
            await store.write("ours.txt", str(k).encode())  # catch up: A's tail
            a, b = await store.read("a.txt"), await store.read("b.txt")
            state = "new" if a == b"new a" else "old"
            assert (a, b) == ((b"new a", b"new b") if state == "new" else (b"old a", b"old b"))
            if state == "new":
                assert await store.read("big.bin") == b"B" * 100_000
            assert state == ("new" if appended else "old"), (k, calls)
            seen[state] += 1
            if state == "new":  # back to the old values for the next round
                async with store.transaction() as tx:
                    await tx.write("a.txt", b"old a")
                    await tx.write("b.txt", b"old b")
                    await tx.delete("big.bin")
        async with walstore.open(root, exclusive=False) as store:
            assert await store.read("ours.txt") == str(k).encode()
            staging = os.listdir(root / ".walstore" / "staging")
            assert staging == [], (k, staging)
        k += 1
    assert seen["old"] > 3 and seen["new"] > 3, seen


async def test_a_commit_waits_for_a_stopped_holder_and_times_out_naming_it(root: Path) -> None:
    """A process holding the commit lock (here: stopped with SIGSTOP) blocks commits only
    while it holds it; ``lock_timeout`` turns the wait into StoreLockedError naming it."""
    holder = spawn("hold", str(root), stdin=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline() == "held\n"
    holder.send_signal(signal.SIGSTOP)
    try:
        async with walstore.open(root, exclusive=False, lock_timeout=0.2) as store:
            pytest.fail("opened while the lock was held")  # pragma: no cover
    except walstore.StoreLockedError as exc:
        assert "lock" in str(exc)
    holder.send_signal(signal.SIGCONT)
    finish(holder)  # EOF on its stdin: it releases the lock and closes
    async with walstore.open(root, exclusive=False, lock_timeout=0.2) as store:
        assert await store.read("held.txt") == str(holder.pid).encode()
        # Now hold the lock from here (another open file: flock treats it as a stranger).
        fd = os.open(root / ".walstore" / "LOCK", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            with pytest.raises(walstore.StoreLockedError, match=rf"pid {os.getpid()}"):
                await store.write("x", b"1")
        finally:
            os.close(fd)
        assert not await store.exists("x")
        await store.write("x", b"2")
        assert await store.read("x") == b"2"


async def test_a_task_cancelled_while_waiting_for_the_lock_rolls_back(root: Path) -> None:
    async with walstore.open(root, exclusive=False) as store:
        await store.write("x", b"1")
        fd = os.open(root / ".walstore" / "LOCK", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        tx = store.transaction()
        try:
            with anyio.move_on_after(0.1):
                async with tx:
                    await tx.write("x", b"2")
            assert tx.state is walstore.TxState.ROLLED_BACK
        finally:
            os.close(fd)
        assert await store.read("x") == b"1"
        await store.write("x", b"3")
        assert await store.read("x") == b"3"


async def test_a_store_used_after_fork_refuses(root: Path) -> None:
    """A child of os.fork() shares the parent's lock and journal handles: every use of the
    store there is refused, and the parent goes on."""
    async with walstore.open(root, exclusive=False) as store:
        await store.write("x", b"1")
        pid = os.fork()
        if pid == 0:  # the child: never returns to the event loop
            code = 1
            try:
                store.transaction()
            except walstore.StoreMisuseError as exc:
                code = 0 if "fork" in str(exc) else 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        await store.write("x", b"2")
    async with walstore.open(root, exclusive=False) as store:
        assert await store.read("x") == b"2"


async def test_several_processes_checkpoint_and_follow_each_other(root: Path) -> None:
    """With a tiny checkpoint threshold every few commits start a new segment, taken by
    whichever process holds the lock; the others follow it and nothing is lost."""
    async with walstore.open(root, exclusive=False, checkpoint_bytes=4096) as store:
        procs = [spawn("count", str(root), "4", "10") for _ in range(2)]
        for i in range(40):
            await store.write_json(f"mine/{i}.json", {"i": i, "pad": "x" * 200})
        for p in procs:
            finish(p)
        assert await store.read_json("counter.json") == 80
        assert store.stats().checkpoints >= 1
    async with walstore.open(root, exclusive=False) as store:
        assert [await store.read_json(f"mine/{i}.json") for i in range(40)] == [
            {"i": i, "pad": "x" * 200} for i in range(40)
        ]
        assert await store.read_json("counter.json") == 80
    assert json.loads((root / "counter.json").read_text()) == 80


@pytest.mark.parametrize("erase", [True, False], ids=["erased", "erase-failed"])
async def test_a_failed_journal_sync_in_one_process_while_another_commits(
    root: Path, erase: bool
) -> None:
    """Process A's journal fdatasync fails (EIO) while this process commits beside it. A
    fails (outcome unknown) and refuses writes; this process goes on. A erased its record
    before it let the commit lock go, so no process ever applies it and a restart does not
    roll it forward; only if the erasure failed too is it taken as committed (as recovery
    after a restart would take it: the outcome was unknown)."""
    async with walstore.open(root) as store:
        await store.write_json("ours.json", 0)
        a = spawn("eio", str(root), "yes" if erase else "no", stdin=subprocess.PIPE)
        assert a.stdout is not None and a.stdin is not None
        with anyio.fail_after(GUARD):
            line = await anyio.to_thread.run_sync(a.stdout.readline)
        assert line == "failed\n", a.stderr.read() if a.stderr else ""
        for i in range(1, 21):  # A is still open, failed; we commit on
            await store.write_json("ours.json", i)
        expected_a = 1 if erase else 2
        assert await store.read_json("a.json") == expected_a
        assert await store.exists("b.json") is False
        out, err = a.communicate("", timeout=GUARD * 4)  # EOF: A closes its store
        assert a.returncode == 0 and "closed" in out, err
        await store.write_json("ours.json", 21)
    async with walstore.open(root) as store:
        assert await store.read_json("a.json") == expected_a
        assert await store.read_json("ours.json") == 21
        assert not await store.exists("b.json")


async def test_the_command_reads_backs_up_and_checkpoints_beside_two_writers(
    root: Path, tmp_path: Path
) -> None:
    """`walstore info`, `log`, `verify`, `backup` and `checkpoint` while two processes keep
    transferring: each succeeds, the writers never stop, the backup holds a whole state, and
    the checkpoint is taken in its turn (the writers follow it)."""
    from tests.cli.helpers import run_cli

    accounts = 6
    async with walstore.open(root) as store, store.transaction() as tx:
        for i in range(accounts):
            await tx.write_json(f"bank/acc{i}.json", 100)
    procs = [spawn("bank", str(root), str(accounts)) for _ in range(2)]
    acked: set[str] = set()

    def some_acks(n: int) -> None:
        for p in procs:
            assert p.stdout is not None
            for _ in range(n):
                line = p.stdout.readline()
                assert line.startswith("ack "), line
                acked.add(line.split()[1])

    try:
        some_acks(10)
        for argv in (["info"], ["log"], ["verify"], ["backup", str(tmp_path / "b")]):
            r = await anyio.to_thread.run_sync(lambda a=argv: run_cli(a[0], str(root), *a[1:]))
            assert r.code == 0, (argv, r.out, r.err)
            some_acks(3)  # the writers went on
        before = json.loads(run_cli("info", str(root), "--json").out)["checkpoint_lsn"]
        r = await anyio.to_thread.run_sync(lambda: run_cli("checkpoint", str(root), "--json"))
        assert r.code == 0, r.out + r.err
        assert json.loads(r.out)["checkpoint_lsn"] > before
        some_acks(10)  # they followed the new segment
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            out, _ = p.communicate(timeout=GUARD * 4)
            acked.update(x.split()[1] for x in out.splitlines() if x.startswith("ack "))
    [backup] = list((tmp_path / "b").iterdir())
    ledgers = {}
    for where in (root, backup):
        async with walstore.open(where) as store:
            balances = [await store.read_json(f"bank/acc{i}.json") for i in range(accounts)]
            ledgers[where] = set(await store.list("ledger"))
        assert sum(balances) == 100 * accounts, where
    assert {a.split("/")[1] for a in acked} <= ledgers[root]
    assert ledgers[backup] < ledgers[root]  # an earlier state
