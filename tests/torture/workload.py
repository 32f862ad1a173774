"""The multi-file workload of the SIGKILL and power-cut tortures, and its checker.

Run as a child process (``python -m tests.torture.workload ROOT TASKS DURABILITY``, after
``setup(ROOT)``): it opens the store and runs TASKS tasks forever; task ``i`` commits step
after step, and each step is one transaction that

- rewrites the task's three files ``t{i}/a.bin`` (a payload of 16-700 bytes, so some are
  inline and some staged), ``t{i}/b.json`` (the step and the payload's CRC) and
  ``t{i}/c.txt`` (the step), which must always agree;
- appends a line to ``t{i}/log.txt`` (keeping the last 16 lines);
- creates ``t{i}/hist/{n}`` and deletes ``t{i}/hist/{n-3}``;
- moves money between two of the shared ``bank/`` accounts (a read-modify-write that
  conflicts with other tasks; ``store.atomic`` retries it).

After each commit the task prints ``ACK i n`` (flushed). Everything a step writes is a pure
function of ``(i, n)``, so the checker can rebuild the exact state from the last step of each
task: every acknowledged step must be there byte for byte, each task at most one step past its
last ACK, the bank exactly the sum of the steps found, and nothing else in the tree.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from collections.abc import Iterator

import anyio

import walstore
from walstore._journal_reader import scan_segment

INLINE = 256
ACCOUNTS = 64
START_BALANCE = 1000
LOG_LINES = 16
HIST = 3


def payload(i: int, n: int) -> bytes:
    size = 16 + (n * 37 + i * 11) % 700
    seed = f"{i}:{n}:".encode()
    return (seed * (size // len(seed) + 1))[:size]


def transfer(i: int, n: int) -> tuple[int, int, int]:
    """(from, to, amount) of task i's step n."""
    src = (i * 7 + n * 3) % ACCOUNTS
    dst = (src + 1 + (i + n) % (ACCOUNTS - 1)) % ACCOUNTS
    return src, dst, 1 + (i * 31 + n * 17) % 50


def log_text(i: int, n: int) -> str:
    return "".join(f"{i} {m}\n" for m in range(max(1, n - LOG_LINES + 1), n + 1))


def task_files(i: int, n: int) -> dict[str, bytes]:
    """Task i's files once its step n is committed (nothing at step 0)."""
    if n == 0:
        return {}
    data = payload(i, n)
    out = {
        f"t{i:02}/a.bin": data,
        f"t{i:02}/b.json": json.dumps({"n": n, "crc": zlib.crc32(data)}).encode(),
        f"t{i:02}/c.txt": f"{n}\n".encode(),
        f"t{i:02}/log.txt": log_text(i, n).encode(),
    }
    for m in range(max(1, n - HIST + 1), n + 1):
        out[f"t{i:02}/hist/{m}"] = f"{i} {m}\n".encode()
    return out


def expected_tree(steps: dict[int, int]) -> dict[str, bytes]:
    """The whole tree when task i's last committed step is steps[i]."""
    balances = [START_BALANCE] * ACCOUNTS
    tree: dict[str, bytes] = {}
    for i, last in steps.items():
        for n in range(1, last + 1):
            src, dst, amount = transfer(i, n)
            balances[src] -= amount
            balances[dst] += amount
        tree.update(task_files(i, last))
    for k, b in enumerate(balances):
        tree[f"bank/{k:02}"] = f"{b}\n".encode()
    return tree


async def step(tx: walstore.Transaction, i: int) -> int:
    d = f"t{i:02}"
    try:
        n = int(await tx.read_text(f"{d}/c.txt")) + 1
    except FileNotFoundError:
        n = 1
    await tx.write(f"{d}/a.bin", payload(i, n))
    await tx.write(f"{d}/b.json", json.dumps({"n": n, "crc": zlib.crc32(payload(i, n))}).encode())
    await tx.write_text(f"{d}/c.txt", f"{n}\n")
    try:
        old = await tx.read_text(f"{d}/log.txt")
    except FileNotFoundError:
        old = ""
    lines = [*old.splitlines(keepends=True), f"{i} {n}\n"][-LOG_LINES:]
    await tx.write_text(f"{d}/log.txt", "".join(lines))
    await tx.write_text(f"{d}/hist/{n}", f"{i} {n}\n")
    if n > HIST:
        await tx.delete(f"{d}/hist/{n - HIST}")
    src, dst, amount = transfer(i, n)
    a = int(await tx.read_text(f"bank/{src:02}"))
    b = int(await tx.read_text(f"bank/{dst:02}"))
    await tx.write_text(f"bank/{src:02}", f"{a - amount}\n")
    await tx.write_text(f"bank/{dst:02}", f"{b + amount}\n")
    return n


async def setup(root: str) -> None:
    """Create the store with its bank, unless it exists."""
    async with walstore.open(root, inline_threshold=INLINE) as store:
        if not await store.exists("bank/00"):
            async with store.transaction() as tx:
                for k in range(ACCOUNTS):
                    await tx.write_text(f"bank/{k:02}", f"{START_BALANCE}\n")


async def run(root: str, tasks: int, durability: walstore.Durability) -> None:
    async with walstore.open(root, durability=durability, inline_threshold=INLINE) as store:

        async def worker(i: int) -> None:
            while True:
                n = await store.atomic(step, i)
                print(f"ACK {i} {n}", flush=True)

        print("READY", flush=True)
        async with anyio.create_task_group() as tg:
            for i in range(tasks):
                tg.start_soon(worker, i)


def parse_acks(lines: Iterator[str], acked: dict[int, int]) -> None:
    for line in lines:
        if line.startswith("ACK "):
            _, i, n = line.split()
            acked[int(i)] = max(acked.get(int(i), 0), int(n))


def read_tree(root: str) -> dict[str, bytes]:
    """Every plain file under root, outside .walstore/, as any tool sees it."""
    out: dict[str, bytes] = {}
    for d, dirs, files in os.walk(root):
        rel = os.path.relpath(d, root)
        if rel == ".walstore" or rel.startswith(".walstore" + os.sep):
            continue
        dirs.sort()
        for f in files:
            p = os.path.normpath(os.path.join(rel, f))
            with open(os.path.join(d, f), "rb") as fh:
                out[p] = fh.read()
    return out


def check(root: str, acked: dict[int, int], tasks: int) -> tuple[dict[int, int], list[str]]:
    """Reopen (recover) the store at root and check it against the acknowledged steps.
    Returns the steps found per task and the violations."""

    async def reopen() -> None:
        async with walstore.open(root, inline_threshold=INLINE, create=False):
            pass

    problems: list[str] = []
    try:
        anyio.run(reopen)
    except Exception as exc:
        return {}, [f"recovery failed: {exc!r}"]
    tree = read_tree(root)
    steps: dict[int, int] = {}
    for i in range(tasks):
        raw = tree.get(f"t{i:02}/c.txt")
        try:
            steps[i] = int(raw) if raw is not None else 0
        except ValueError:
            problems.append(f"t{i:02}/c.txt holds {raw!r}")
            steps[i] = 0
        low = acked.get(i, 0)
        if not low <= steps[i] <= low + 1:
            problems.append(f"task {i}: step {steps[i]} found, last ACK was {low}")
    want = expected_tree(steps)
    for p in sorted(set(want) | set(tree)):
        if want.get(p) != tree.get(p):
            problems.append(f"{p}: found {tree.get(p)!r:.60}, want {want.get(p)!r:.60}")
    problems += check_internals(root)
    return steps, problems


def check_internals(root: str) -> list[str]:
    """After a clean close: the journal parses with no torn tail, staging is empty."""
    problems = []
    journal = os.path.join(root, ".walstore", "journal")
    for name in sorted(os.listdir(journal)):
        if name == "spare":  # a retired segment kept for the next checkpoint: never parsed
            continue
        with open(os.path.join(journal, name), "rb") as fh:
            data = fh.read()
        try:
            scan = scan_segment(name, data)
        except Exception as exc:
            problems.append(f"journal segment {name} does not parse: {exc!r}")
            continue
        if scan.torn_bytes:
            problems.append(f"journal segment {name}: {scan.torn_bytes} torn bytes after close")
    staging = os.path.join(root, ".walstore", "staging")
    left = os.listdir(staging) if os.path.isdir(staging) else []
    if left:
        problems.append(f"staging leftovers after close: {sorted(left)[:5]}")
    return problems


if __name__ == "__main__":
    root, tasks, durability = sys.argv[1], int(sys.argv[2]), walstore.Durability(sys.argv[3])
    anyio.run(run, root, tasks, durability)
