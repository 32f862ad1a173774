"""``walstore demo DIR``: a workload SIGKILLed mid-commit, reopened and checked, a few times.

A child process runs 16 tasks moving money between eight accounts (each transfer also writes
a numbered ledger entry, all in one transaction) and one task rewriting a conversation
directory. The parent kills it with SIGKILL after some acknowledged transfers, reopens the
store (which recovers it) and checks: no money made or lost, the balances are the balances at
the start of this run plus this run's ledger entries, every acknowledged transfer is in the
ledger, the conversation's two files are from one version.

The demo can be run again in the same directory: each run takes the store as it finds it
(after recovery) as its baseline and numbers its ledger entries after the ones already there,
so nothing it checks depends on an earlier run. It refuses a directory holding anything the
demo did not write, rather than mix its files into someone's data.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import anyio

from . import _open, _store
from ._backup import UsageError
from ._recovery import RecoveryReport
from ._transaction import Transaction

ACCOUNTS = 8
START = 100
# What a demo store holds at its root; anything else there is someone else's.
DEMO_NAMES = frozenset({".walstore", "bank", "ledger", "conversations"})


async def _transfer(tx: Transaction, n: int, rng: random.Random) -> int:
    src, dst = rng.sample(range(ACCOUNTS), 2)
    a = await tx.read_json(f"bank/{src}.json")
    b = await tx.read_json(f"bank/{dst}.json")
    amount = rng.randint(1, 10)
    a["balance"] -= amount
    b["balance"] += amount
    await tx.write_json(f"bank/{src}.json", a)
    await tx.write_json(f"bank/{dst}.json", b)
    await tx.write_json(f"ledger/{n}.json", {"src": src, "dst": dst, "amount": amount})
    return n


async def _rewrite_conversation(tx: Transaction, version: int) -> None:
    events = [{"turn": i, "text": f"message {i} of v{version}"} for i in range(version % 7 + 1)]
    await tx.write_json("conversations/c1/events.json", {"version": version, "events": events})
    await tx.write_json("conversations/c1/meta.json", {"version": version})


async def child(root: str, first: int) -> None:
    """The workload the demo kills: many tasks transferring money, one rewriting a
    conversation; prints ``ACK <n>`` for every committed transfer, numbered from ``first``."""
    async with _open.open(root) as store:
        counter = iter(range(first, first + 10**9))

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while True:
                n = next(counter)
                await store.atomic(_transfer, n, rng)
                print(f"ACK {n}", flush=True)

        async def writer() -> None:
            version = (await store.read_json("conversations/c1/meta.json"))["version"]
            while True:
                version += 1
                async with store.transaction() as tx:
                    await _rewrite_conversation(tx, version)

        async with anyio.create_task_group() as tg:
            for i in range(16):
                tg.start_soon(worker, first * 100 + i)
            tg.start_soon(writer)


@dataclass
class _Baseline:
    """The store as this run found it: what its checks compare against."""

    balances: list[int]
    first: int  # this run's first ledger number: after every entry already there
    entries: int  # ledger entries from earlier runs
    version: int  # the conversation's version
    reused: bool  # the store is an earlier run's
    acked: set[int] = field(default_factory=set)


def _refuse_foreign(root: str) -> None:
    """Refuse a directory the demo would mix its files into (or that is a file)."""
    if not os.path.lexists(root):
        return
    if not os.path.isdir(root):
        raise UsageError(f"demo: {root} is not a directory; give it a new or empty directory")
    foreign = sorted(set(os.listdir(root)) - DEMO_NAMES)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise UsageError(
            f"demo: {root} holds files the demo did not write ({shown}); "
            "give it a new or empty directory, or the directory of an earlier demo"
        )


async def _ledger(store: _store.Store) -> set[int]:
    names = await store.list("ledger") if await store.exists("ledger") else []
    return {int(n.split(".")[0]) for n in names}


async def _setup(root: str) -> _Baseline:
    async with _open.open(root) as store:
        reused = await store.exists("bank")
        if not reused:
            async with store.transaction() as tx:
                for i in range(ACCOUNTS):
                    await tx.write_json(f"bank/{i}.json", {"account": i, "balance": START})
                await _rewrite_conversation(tx, 0)
                await tx.write_text("conversations/c1/QUERY_MESSAGE.md", "What is walstore?\n")
        expected = {f"{i}.json" for i in range(ACCOUNTS)}
        if set(await store.list("bank")) != expected or not await store.exists(
            "conversations/c1/meta.json"
        ):
            raise UsageError(
                f"demo: {root} holds a store that is not the demo's (bank/ does not hold its "
                f"{ACCOUNTS} accounts, or conversations/c1/ is missing); give it a new or "
                "empty directory"
            )
        balances = [(await store.read_json(f"bank/{i}.json"))["balance"] for i in range(ACCOUNTS)]
        ledger = await _ledger(store)
        version = (await store.read_json("conversations/c1/meta.json"))["version"]
    return _Baseline(balances, max(ledger, default=0) + 1, len(ledger), version, reused)


async def _check(root: str, base: _Baseline) -> tuple[RecoveryReport, dict[str, int], list[str]]:
    """Reopen (recover) the store and compare it with the baseline and the ACKs."""
    problems: list[str] = []
    async with _open.open(root) as store:
        report = store.recovery
        balances = [(await store.read_json(f"bank/{i}.json"))["balance"] for i in range(ACCOUNTS)]
        ours = {n for n in await _ledger(store) if n >= base.first}
        expect = list(base.balances)
        for n in ours:
            entry = await store.read_json(f"ledger/{n}.json")
            expect[entry["src"]] -= entry["amount"]
            expect[entry["dst"]] += entry["amount"]
        if sum(balances) != sum(base.balances):
            problems.append(f"money not conserved: {sum(balances)} != {sum(base.balances)}")
        if balances != expect:
            problems.append("balances disagree with the ledger (a half-applied transfer)")
        lost = base.acked - ours
        if lost:
            problems.append(f"{len(lost)} acknowledged transfers lost")
        events = await store.read_json("conversations/c1/events.json")
        meta = await store.read_json("conversations/c1/meta.json")
        if events["version"] != meta["version"]:
            problems.append("conversation files from different versions (mixed)")
        if not await store.exists("conversations/c1/QUERY_MESSAGE.md"):
            problems.append("QUERY_MESSAGE.md lost")
        summary = {
            "money": sum(balances),
            "ledger": len(ours),
            "next": max(ours, default=base.first - 1) + 1,
            "version": meta["version"],
        }
    return report, summary, problems


def _kill_after_acks(root: str, first: int, acks: int, acked: set[int]) -> tuple[int, int]:
    """Run the child until it acknowledged about ``acks`` transfers, then SIGKILL it.

    Adds the ACKed numbers to ``acked``; returns the child's pid and how many it ACKed."""
    child_proc = subprocess.Popen(
        [sys.executable, "-m", "walstore", "_demo-child", root, str(first)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child_proc.stdout is not None
    got = 0
    for line in child_proc.stdout:
        if line.startswith("ACK "):
            acked.add(int(line.split()[1]))
            got += 1
            if got >= acks + random.randrange(acks):
                break
    child_proc.send_signal(signal.SIGKILL)
    for line in child_proc.stdout.read().splitlines():  # ACKs read ahead or overtaken count too
        if line.startswith("ACK "):
            acked.add(int(line.split()[1]))
            got += 1
    child_proc.wait()
    child_proc.stdout.close()
    return child_proc.pid, got


def demo(root: str, rounds: int, acks_per_round: int) -> int:
    """Run the demo in ``root``; 0 when every round's check passed, else 1."""
    root = os.path.abspath(root)
    _refuse_foreign(root)
    print(f"walstore demo in {root}")
    base = anyio.run(_setup, root)
    if base.reused:
        print(
            f"  setup: the store of an earlier demo run, as recovered: {ACCOUNTS} accounts "
            f"holding {sum(base.balances)}, {base.entries} ledger entries, conversation c1 at "
            f"version {base.version}; this run checks against that"
        )
    else:
        print(f"  setup: {ACCOUNTS} accounts of {START}, conversation c1 with QUERY_MESSAGE.md")
    failures = 0
    first = base.first
    for r in range(1, rounds + 1):
        pid, got = _kill_after_acks(root, first, acks_per_round, base.acked)
        print(f"  round {r}: child {pid} acknowledged {got} transfers, then SIGKILL")
        report, summary, problems = anyio.run(_check, root, base)
        first = summary["next"]
        print(
            f"    reopen: rolled forward {len(report.rolled_forward)} txs, rolled back "
            f"{len(report.rolled_back)}, torn journal bytes {report.torn_bytes}, "
            f"staging files removed {report.orphans_removed}"
        )
        print(
            f"    check: money {summary['money']} == {sum(base.balances)}, "
            f"{len(base.acked)} acknowledged transfers all present in {summary['ledger']} "
            f"ledger entries of this run, conversation at version {summary['version']} "
            "(not mixed)"
            if not problems
            else "    PROBLEMS: " + "; ".join(problems)
        )
        failures += bool(problems)
    if failures:
        print(f"FAILED in {failures} of {rounds} rounds")
    else:
        print("OK: every acknowledged transaction survived, none was half-applied")
    return 1 if failures else 0
