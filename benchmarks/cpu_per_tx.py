"""CPU per transaction of W1's shape (one task, 1 KiB files, one write per transaction), for
telling whether per-op checks cost anything: process CPU time (all threads) over N commits,
medians of rounds. Durability.OFF by default so that fsync waits do not hide the CPU.

    python benchmarks/cpu_per_tx.py [--n 3000] [--rounds 5] [--durability off|full] [--ops 1]
        [--mode shared|exclusive]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import anyio

import walstore


async def _round(
    root: str, n: int, ops: int, durability: walstore.Durability, exclusive: bool
) -> tuple[float, float]:
    """(process CPU, event-loop thread CPU) per transaction."""
    value = os.urandom(1024)
    async with walstore.open(root, durability=durability, exclusive=exclusive) as store:
        start, loop_start = time.process_time(), time.thread_time()
        for i in range(n):
            async with store.transaction() as tx:
                for j in range(ops):
                    await tx.write(f"w1/{i % 100}/{j}.bin", value)
        return (time.process_time() - start) / n, (time.thread_time() - loop_start) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ops", type=int, default=1)
    ap.add_argument("--durability", default="off", choices=["off", "full"])
    ap.add_argument("--dir", default=None)
    ap.add_argument("--mode", default="shared", choices=["shared", "exclusive"])
    args = ap.parse_args()
    durability = walstore.Durability(args.durability)
    per_tx, on_loop = [], []
    for _ in range(args.rounds):
        root = tempfile.mkdtemp(prefix="walstore-cpu-", dir=args.dir)
        try:
            cpu, loop = anyio.run(
                _round, root, args.n, args.ops, durability, args.mode == "exclusive"
            )
            per_tx.append(cpu)
            on_loop.append(loop)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"{walstore.__file__}: CPU per tx {statistics.median(per_tx) * 1e6:.1f} us, of it "
        f"on the event loop {statistics.median(on_loop) * 1e6:.1f} us (medians of "
        f"{args.rounds}; {args.ops} write(s) of 1 KiB per tx, durability {args.durability}, "
        f"{args.mode})"
    )


if __name__ == "__main__":
    main()
