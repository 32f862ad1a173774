"""CPU per transaction of W1's shape (one task, 1 KiB files, one write per transaction), for
telling whether per-op checks cost anything: process CPU time (all threads) over N commits,
medians of rounds. Durability.OFF by default so that fsync waits do not hide the CPU.

    python benchmarks/cpu_per_tx.py [--n 3000] [--rounds 5] [--durability off|full] [--ops 1]
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


async def _round(root: str, n: int, ops: int, durability: walstore.Durability) -> float:
    value = os.urandom(1024)
    async with walstore.open(root, durability=durability) as store:
        start = time.process_time()
        for i in range(n):
            async with store.transaction() as tx:
                for j in range(ops):
                    await tx.write(f"w1/{i % 100}/{j}.bin", value)
        return (time.process_time() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ops", type=int, default=1)
    ap.add_argument("--durability", default="off", choices=["off", "full"])
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    durability = walstore.Durability(args.durability)
    per_tx = []
    for _ in range(args.rounds):
        root = tempfile.mkdtemp(prefix="walstore-cpu-", dir=args.dir)
        try:
            per_tx.append(anyio.run(_round, root, args.n, args.ops, durability))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"{walstore.__file__}: CPU per tx {statistics.median(per_tx) * 1e6:.1f} us "
        f"(median of {args.rounds}; rounds {[round(x * 1e6, 1) for x in per_tx]})"
    )


if __name__ == "__main__":
    main()
