"""Simulated power loss at every file-system call of commit, checkpoint and recovery.

Each shape's workload runs once on the simulated file system with a hook that takes a copy of
the disk right before every call: exactly what a crash at that call leaves (the simulated
file system's ``crash_at`` stops the process there, before the call). Each copy then loses
power many times, each time with other damage (every unsynced write kept, dropped, torn,
zero-filled or garbled; every directory change not covered by a directory fsync kept or
lost), some of them crashing again, at a random call of the recovery, and losing power again.
Then the store is recovered and checked: every acknowledged transaction present byte for
byte, every other wholly or not at all, no staging leftovers, one journal segment that parses
with nothing after its checkpoint, no handle left open.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
from collections.abc import Callable

import anyio
import pytest

import walstore
from tests.crash.shapes import BY_NAME, SHAPES, SOAK, TUNING, Shape, run_tx, run_workload
from tests.crash.simcheck import check, recover
from tests.support import ROOT, tally
from walstore import _apply
from walstore.testing import MemoryFileSystem

pytestmark = pytest.mark.guarantee(name="Durable")

TALLY = tally("power-loss images")
IMAGES = 100_000 * SOAK  # at least this many in all
MIN_PER_POINT = 20
SMALL = 100  # crash points of a shape whose images are cheap
RECOVERY_CRASH_EVERY = 4  # one image in this many crashes during recovery too

Snapshot = tuple[MemoryFileSystem, frozenset[int]]  # the disk, the ACKs so far


def snapshots(shape: Shape) -> list[Snapshot]:
    """The disk right before every call of the workload (and at its end), with its ACKs."""
    fs = MemoryFileSystem()
    acked: list[int] = []
    snaps: list[Snapshot] = []

    def before_call(index: int, name: str, path: str) -> None:
        snaps.append((fs.clone(), frozenset(acked)))

    async def main() -> None:
        store = await walstore.open(ROOT, fs=fs, **TUNING)
        for ops in shape.setup:
            await run_tx(store, ops)
        fs.fault = before_call
        await run_workload(store, shape, acked.append)

    anyio.run(main)
    fs.fault = None
    snaps.append((fs.clone(), frozenset(acked)))
    return snaps


def fingerprint(fs: MemoryFileSystem) -> int:
    """Identifies a disk image after a reboot: every path, its kind, which paths share an
    inode (hard links), file contents and symlink targets."""
    parts: list[tuple[str, str, int, bytes, str]] = []
    ids: dict[int, int] = {}

    def walk(ino: int, prefix: str) -> None:
        for name, child in sorted(fs._inodes[ino].entries.items()):
            node = fs._inodes[child]
            parts.append(
                (
                    prefix + name,
                    node.kind,
                    ids.setdefault(child, len(ids)),
                    bytes(node.data),
                    node.target,
                )
            )
            if node.kind == "dir":
                walk(child, prefix + name + "/")

    walk(fs.ROOT, "/")
    return hash(tuple(parts))


def _run_all_in_turn(fn: Callable[[str], None], items: list[str]) -> None:
    """``_apply._run_all`` without its threads: every call, then the first error (one of the
    orders the threads may take; thread start-up would cost more than the simulated fsyncs)."""
    first: BaseException | None = None
    for item in items:
        try:
            fn(item)
        except BaseException as exc:
            first = first or exc
    if first is not None:
        raise first


def sweep(name: str, per_point: int) -> tuple[int, int, int, int, list[str]]:
    """(crash points, images, distinct images, recovery crashes, violations) of a shape.

    Recovery is deterministic, so an image identical to one already recovered and checked
    (with the same ACKs) is counted without recovering it again."""
    _apply._run_all = _run_all_in_turn  # in a pool worker: this process only
    shape = BY_NAME[name]
    snaps = snapshots(shape)
    images = rec_crashes = 0
    seen: set[tuple[frozenset[int], int]] = set()
    bad: list[str] = []
    for k, (snap, acked) in enumerate(snaps):
        rec_calls = 50
        for d in range(per_point):
            img = snap.clone()
            rng = random.Random(f"{name}/{k}/{d}")
            img.reboot(power_loss=rng)
            what = f"{name} k={k} damage={d}"
            if d % RECOVERY_CRASH_EVERY == RECOVERY_CRASH_EVERY - 1:
                at = rng.randrange(rec_calls)
                img.crash_at = img.count + at
                try:
                    recover(img)
                except BaseException:
                    if not img.crashed:
                        bad.append(f"failed recovery: {what}, recovery crash at {at}")
                        continue
                rec_crashes += img.crashed
                img.reboot(power_loss=random.Random(rng.random()))
                what += f" recovery-crash={at}"
            images += 1
            key = (acked, fingerprint(img))
            if key in seen:
                continue
            seen.add(key)
            start = img.count
            ok, lost = shape.allowed(set(acked))
            bad += [f"{v} ({what}, acked {sorted(acked)})" for v in check(img, ok, lost)]
            if d == 0:
                rec_calls = max(1, img.count - start)
    return len(snaps), images, len(seen), rec_crashes, bad


def _sweep(args: tuple[str, int]) -> tuple[str, int, int, int, int, list[str]]:
    return (args[0], *sweep(*args))


def test_power_loss_at_every_call() -> None:
    shapes = [s.name for s in SHAPES if not s.real_only]
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 2) as pool:
        points = dict(pool.map(_count, shapes))
        # Every point gets MIN_PER_POINT images; the small shapes, whose images are cheap,
        # get more, up to IMAGES in all.
        base = MIN_PER_POINT * SOAK
        small = {n for n, p in points.items() if p <= SMALL}
        extra = max(0, IMAGES - base * sum(points.values()))
        more = math.ceil(extra / sum(points[n] for n in small))
        work = [(n, base + (more if n in small else 0)) for n in shapes]
        work.sort(key=lambda w: -points[w[0]])  # the longest first
        results = list(pool.imap_unordered(_sweep, work))
    bad = [v for r in results for v in r[5]]
    images, distinct = sum(r[2] for r in results), sum(r[3] for r in results)
    TALLY.cases += images
    TALLY.parts["recovered"] = TALLY.parts.get("recovered", 0) + distinct
    key = "identical to one recovered"
    TALLY.parts[key] = TALLY.parts.get(key, 0) + images - distinct
    TALLY.add(
        shapes=len(results),
        crash_points=sum(r[1] for r in results),
        crashed_again_in_recovery=sum(r[4] for r in results),
    )
    TALLY.violations += bad
    assert not bad, bad[:5]
    assert sum(r[2] for r in results) >= IMAGES


def _count(name: str) -> tuple[str, int]:
    return name, len(snapshots(BY_NAME[name]))
