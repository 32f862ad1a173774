"""The ``walstore`` command (also ``python -m walstore``)."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
from typing import Any

import anyio

from . import _store
from ._errors import StoreError
from ._transaction import Transaction

ACCOUNTS = 8
START = 100


# -- demo -------------------------------------------------------------------------------------


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


async def _child(root: str, first: int) -> None:
    """The workload the demo kills: many tasks transferring money, one rewriting a
    conversation; prints ``ACK <n>`` for every committed transfer."""
    async with _store.open(root) as store:
        counter = iter(range(first, first + 10**9))

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while True:
                n = next(counter)
                await store.atomic(_transfer, n, rng, attempts=100)
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


async def _setup(root: str) -> None:
    async with _store.open(root) as store:
        if await store.exists("bank"):
            return
        async with store.transaction() as tx:
            for i in range(ACCOUNTS):
                await tx.write_json(f"bank/{i}.json", {"account": i, "balance": START})
            await _rewrite_conversation(tx, 0)
            await tx.write_text("conversations/c1/QUERY_MESSAGE.md", "What is walstore?\n")


async def _check(root: str, acked: set[int]) -> tuple[Any, list[str]]:
    problems: list[str] = []
    async with _store.open(root) as store:
        report = store.recovery
        balances = [(await store.read_json(f"bank/{i}.json"))["balance"] for i in range(ACCOUNTS)]
        names = await store.list("ledger") if await store.exists("ledger") else []
        ledger = {int(n.split(".")[0]) for n in names}
        expect = [START] * ACCOUNTS
        for n in ledger:
            entry = await store.read_json(f"ledger/{n}.json")
            expect[entry["src"]] -= entry["amount"]
            expect[entry["dst"]] += entry["amount"]
        if sum(balances) != START * ACCOUNTS:
            problems.append(f"money not conserved: {sum(balances)}")
        if balances != expect:
            problems.append("balances disagree with the ledger (a half-applied transfer)")
        lost = acked - ledger
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
            "ledger": len(ledger),
            "acked": len(acked),
            "version": meta["version"],
        }
    return (report, summary), problems


def demo(root: str, rounds: int, acks_per_round: int) -> int:
    root = os.path.abspath(root)
    print(f"walstore demo in {root}")
    anyio.run(_setup, root)
    print(f"  setup: {ACCOUNTS} accounts of {START}, conversation c1 with QUERY_MESSAGE.md")
    acked: set[int] = set()
    failures = 0
    for r in range(1, rounds + 1):
        first = r * 1_000_000
        child = subprocess.Popen(
            [sys.executable, "-m", "walstore", "_demo-child", root, str(first)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        got = 0
        for line in child.stdout:
            if line.startswith("ACK "):
                acked.add(int(line.split()[1]))
                got += 1
                if got >= acks_per_round + random.randrange(acks_per_round):
                    break
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        print(f"  round {r}: child {child.pid} acknowledged {got} transfers, then SIGKILL")
        (report, summary), problems = anyio.run(_check, root, acked)
        print(
            f"    reopen: rolled forward {len(report.rolled_forward)} txs, rolled back "
            f"{len(report.rolled_back)}, torn journal bytes {report.torn_bytes}, "
            f"staging files removed {report.orphans_removed}"
        )
        print(
            f"    check: money {summary['money']} == {START * ACCOUNTS}, "
            f"{summary['acked']} acknowledged transfers all present in {summary['ledger']} "
            f"ledger entries, conversation at version {summary['version']} (not mixed)"
            if not problems
            else "    PROBLEMS: " + "; ".join(problems)
        )
        failures += bool(problems)
    if failures:
        print(f"FAILED in {failures} of {rounds} rounds")
    else:
        print("OK: every acknowledged transaction survived, none was half-applied")
    return 1 if failures else 0


# -- info ---------------------------------------------------------------------------------------


async def _info(root: str) -> dict[str, Any]:
    async with _store.open(root, create=False, readonly=True) as store:
        journal = os.path.join(store.root, ".walstore", "journal")
        segments = sorted(os.listdir(journal))
        size = sum(os.path.getsize(os.path.join(journal, s)) for s in segments)
        return {"root": store.root, "segments": segments, "journal_bytes": size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="walstore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the crash-and-recover demo in DIR")
    p.add_argument("dir")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--acks", type=int, default=40, help="transfers to wait for per round")
    p = sub.add_parser("info", help="print what a store holds")
    p.add_argument("root")
    p = sub.add_parser("_demo-child")
    p.add_argument("root")
    p.add_argument("first", type=int)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return demo(args.dir, args.rounds, args.acks)
        if args.command == "info":
            print(json.dumps(anyio.run(_info, args.root), indent=2))
            return 0
        if args.command == "_demo-child":
            anyio.run(_child, args.root, args.first)
            return 0
    except StoreError as exc:
        print(f"walstore: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2
