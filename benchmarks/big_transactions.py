"""One transaction of many ops: the time per op as the count grows. The ops are indexed by
path (16,000 deletes in one transaction took 62 s; now about 3 s, a thread hop each), and so
is what a commit of many delete_dirs drops or checks below each directory in validation,
the conflict check, apply and the read cache (8,000 of them took 37 s to commit when each
scanned everything; about 0.6 s since).

    python benchmarks/big_transactions.py [--counts 2000,8000,16000]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import anyio

import walstore


async def _run(root: str, n: int, kind: str) -> tuple[float, float]:
    async with walstore.open(root, durability=walstore.Durability.OFF) as store:
        async with store.transaction() as tx:
            for i in range(n):
                await tx.write(f"d{i}/f" if kind == "delete_dir" else f"f/{i}", b"x")
        start = time.perf_counter()
        async with store.transaction() as tx:
            for i in range(n):
                if kind == "delete_dir":
                    await tx.delete_dir(f"d{i}")
                else:
                    await tx.delete(f"f/{i}")
            ops = time.perf_counter()
        return ops - start, time.perf_counter() - ops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="2000,8000,16000")
    args = ap.parse_args()
    for kind in ("delete", "delete_dir"):
        for n in map(int, args.counts.split(",")):
            root = tempfile.mkdtemp(prefix="walstore-big-")
            try:
                ops, commit = anyio.run(_run, root, n, kind)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            print(
                f"{n:>6} x {kind:<10} ops {ops:6.2f} s ({ops / n * 1e6:5.0f} us each), "
                f"commit {commit:6.2f} s ({commit / n * 1e6:5.0f} us each)"
            )


if __name__ == "__main__":
    main()
