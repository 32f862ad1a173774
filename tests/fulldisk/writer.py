"""A writer process for tests/fulldisk: writes values of SIZE bytes into the store at ROOT
until the disk is full, prints ``ACK <name>`` after each commit, ``FULL <errno>`` at the
first ENOSPC, then ``TRY`` before each further attempt, forever (the test SIGKILLs it).

    python -m tests.fulldisk.writer ROOT SIZE START
"""

from __future__ import annotations

import errno
import sys

import anyio

import walstore
from tests.fulldisk.values import value_of


async def main(root: str, size: int, start: int) -> None:
    async with walstore.open(root) as store:
        i, full = start, False
        while True:
            if full:
                print("TRY", flush=True)
            name = f"v/{i:06d}"
            try:
                await store.write(name, value_of(name, size))
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                if not full:
                    print(f"FULL {exc.errno}", flush=True)
                full = True
                continue
            print(f"ACK {name}", flush=True)
            i += 1


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
