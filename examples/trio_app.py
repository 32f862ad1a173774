"""A job queue on trio: producers drop job files into ``inbox/``, a nursery of workers claims
them, and each claim moves the job to ``done/`` together with its result, in one transaction.

A job is never done twice nor lost: the producer's notice of a job goes out after its file
is committed, each notice reaches one worker, and a crash mid-claim leaves the job in the
inbox or in done/ with its result, never one without the other.

Run it from a clone of walstore, after ``pip install -e . trio``:
``python examples/trio_app.py /tmp/jobs``.
"""

from __future__ import annotations

import sys

import trio

import walstore


async def produce(
    store: walstore.Store, first: int, count: int, send: trio.MemorySendChannel[int]
) -> None:
    async with send:
        for n in range(first, first + count):
            await store.write_json(f"inbox/{n:05d}.json", {"n": n})
            await send.send(n)  # after the commit: one notice per job in the inbox


async def claim(tx: walstore.Transaction, name: str, worker: int) -> int:
    """Move job ``name`` from the inbox to done/ and write its result, all or nothing."""
    job = await tx.read_json(f"inbox/{name}")
    await tx.move(f"inbox/{name}", f"done/{name}")
    await tx.write_json(f"results/{name}", {"n": job["n"], "square": job["n"] ** 2, "by": worker})
    return int(job["n"])


async def work(
    store: walstore.Store, worker: int, claimed: list[int], notices: trio.MemoryReceiveChannel[int]
) -> None:
    """Claim the job of each notice received; each notice goes to one worker."""
    async with notices:
        async for n in notices:
            claimed.append(await store.atomic(claim, f"{n:05d}.json", worker))


async def main(root: str, *, jobs: int = 100, workers: int = 8, producers: int = 4) -> list[int]:
    """Run the queue to empty; returns the job numbers in the order they were claimed."""
    claimed: list[int] = []
    async with walstore.open(root) as store:
        send, receive = trio.open_memory_channel[int](0)
        async with trio.open_nursery() as nursery, send, receive:  # originals closed at once
            for w in range(workers):
                nursery.start_soon(work, store, w, claimed, receive.clone())
            per = jobs // producers
            for p in range(producers):
                nursery.start_soon(produce, store, p * per, per, send.clone())
        done = await store.list("done")
        print(f"{len(claimed)} jobs claimed by {workers} workers; {len(done)} in done/")
    return claimed


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "jobs-data")
