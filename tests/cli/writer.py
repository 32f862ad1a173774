"""Store workloads the CLI tests run in a child process (``python writer.py MODE ROOT``).

* ``crash``: commit a mix of every op kind, then exit without closing (no checkpoint), as a
  crash after the last acknowledgement would: the journal holds the commits.
* ``hold``: like ``crash``, then keep the store open until stdin closes; ``hold-exclusive``
  the same, opened ``exclusive=True`` (its LOCK held).
* ``bank``: transfers between accounts (each with a ledger entry staged as a large value) and a
  conversation directory replaced over and over, from many tasks, until killed; prints
  ``ACK <n>`` after each transfer commits. Small checkpoints, so that they happen often.
"""

from __future__ import annotations

import os
import random
import sys

import anyio

import walstore

ACCOUNTS = 6
START = 1000
INLINE = 64


async def crash_workload(store: walstore.Store) -> None:
    async with store.transaction() as tx:
        await tx.write_text("docs/a.txt", "alpha")
        await tx.write("blobs/big.bin", bytes(range(256)) * 8)  # staged
        await tx.write_text("old.txt", "to be deleted")
        await tx.write_text("tree/x/1.txt", "one")
        async with tx.replace_dir("conv/c1") as d:
            await d.write_json("events.json", {"v": 1, "events": list(range(40))})
            await d.write_text("QUERY.md", "what?")
    await store.checkpoint()  # the journal holds only what follows
    async with store.transaction() as tx:
        await tx.write_text("docs/a.txt", "alpha v2")
        await tx.write("blobs/big2.bin", b"\x01" * 3000)  # staged
        await tx.delete("old.txt")
    async with store.transaction() as tx:
        await tx.move("docs/a.txt", "archive/a.txt")
        await tx.delete_dir("tree")
    async with store.transaction() as tx:
        async with tx.replace_dir("conv/c1", keep=["QUERY.md"]) as d:
            await d.write_json("events.json", {"v": 2, "events": list(range(50))})
    await store.write_text("docs/b.txt", "bravo")


async def crash(root: str, hold: bool, exclusive: bool = False) -> None:
    store = await walstore.open(root, inline_threshold=INLINE, exclusive=exclusive)
    await crash_workload(store)
    if hold:
        print("READY", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
    os._exit(0)  # no aclose(): nothing is checkpointed


async def _transfer(tx: walstore.Transaction, n: int, rng: random.Random) -> None:
    src, dst = rng.sample(range(ACCOUNTS), 2)
    a = await tx.read_json(f"bank/{src}.json")
    b = await tx.read_json(f"bank/{dst}.json")
    amount = rng.randint(1, 50)
    a["balance"] -= amount
    b["balance"] += amount
    await tx.write_json(f"bank/{src}.json", a)
    await tx.write_json(f"bank/{dst}.json", b)
    entry = {"src": src, "dst": dst, "amount": amount, "pad": "x" * rng.randint(0, 200)}
    await tx.write_json(f"ledger/{n}.json", entry)  # mostly above INLINE: staged


async def bank(root: str) -> None:
    async with walstore.open(root, inline_threshold=INLINE, checkpoint_bytes=48 << 10) as store:
        if not await store.exists("bank"):
            async with store.transaction() as tx:
                for i in range(ACCOUNTS):
                    await tx.write_json(f"bank/{i}.json", {"balance": START})
                async with tx.replace_dir("conv/c1") as d:
                    await d.write_json("events.json", {"version": 0})
                    await d.write_json("meta.json", {"version": 0})
        counter = iter(range(1, 10**9))
        print("READY", flush=True)

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while True:
                n = next(counter)
                await store.atomic(_transfer, n, rng)
                print(f"ACK {n}", flush=True)

        async def conversation() -> None:
            version = 0
            while True:
                version += 1
                async with store.transaction() as tx:
                    async with tx.replace_dir("conv/c1") as d:
                        await d.write_json("events.json", {"version": version, "pad": "e" * 300})
                        await d.write_json("meta.json", {"version": version})

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(worker, i)
            tg.start_soon(conversation)


def main() -> None:
    mode, root = sys.argv[1], sys.argv[2]
    if mode in ("crash", "hold", "hold-exclusive"):
        anyio.run(crash, root, mode != "crash", mode == "hold-exclusive")
    elif mode == "bank":
        anyio.run(bank, root)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
