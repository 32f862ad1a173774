"""Real power cuts: ext4 and XFS made in image files on loop devices; the workload of
tests/torture/workload.py runs in a child process on the mounted file system; after a random
number of acknowledged transactions the file system is shut down without flushing its log
(XFS_IOC_GOINGDOWN / EXT4_IOC_SHUTDOWN with the NOLOGFLUSH flag: whatever the journal of the
file system had not committed is gone, as at a power cut), the child is killed, the file
system unmounted and mounted again (the kernel replays its journal), then the raw walstore
journal must parse (at most a torn tail), and the reopened store must hold every
acknowledged transaction byte for byte with none half-applied.

One image per file system, made once; each cut continues on what the last one left.
Skipped, with the reason, without root, loop devices or mkfs.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.support import tally
from tests.torture import workload
from tests.torture.test_sigkill import kill_and_drain, spawn, wait_for_acks

pytestmark = pytest.mark.guarantee(name="Durable")

SOAK = 10 if os.environ.get("WALSTORE_SOAK") else 1
CUTS = 50 * SOAK
TASKS = 8
# _IOR('X', 125, __u32): XFS_IOC_GOINGDOWN and EXT4_IOC_SHUTDOWN share the number and the flag
FS_IOC_SHUTDOWN = 0x8004587D
GOING_FLAGS_NOLOGFLUSH = 2
IMAGE_SIZE = {"ext4": 64 << 20, "xfs": 300 << 20}  # XFS refuses file systems under 300 MiB
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"]}
TALLY = tally("real power cuts")


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _unavailable(fstype: str) -> str | None:
    if os.geteuid() != 0:
        return "real power cuts need root (losetup, mount)"
    if not os.path.exists("/dev/loop-control"):
        return "real power cuts need loop devices (/dev/loop-control is missing)"
    for tool in (MKFS[fstype][0], "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"real power cuts on {fstype} need {tool} (not installed)"
    return None


class Disk:
    """A file system in an image file on a loop device, mounted at ``mnt``."""

    def __init__(self, fstype: str, image: Path, mnt: Path) -> None:
        self.fstype = fstype
        self.image = image
        self.mnt = mnt
        self.dev: str | None = None
        self.mounted = False

    def make(self) -> None:
        with open(self.image, "wb") as fh:
            fh.truncate(IMAGE_SIZE[self.fstype])
        out = subprocess.run(
            ["losetup", "--find", "--show", str(self.image)],
            check=True,
            capture_output=True,
            text=True,
        )
        self.dev = out.stdout.strip()
        _run(*MKFS[self.fstype], self.dev)
        self.mnt.mkdir()
        self.mount()

    def mount(self) -> None:
        assert self.dev is not None
        _run("mount", "-t", self.fstype, self.dev, str(self.mnt))
        self.mounted = True

    def unmount(self) -> None:
        _run("umount", str(self.mnt))
        self.mounted = False

    def power_cut(self) -> None:
        """Shut the file system down as a power cut would: no log flush."""
        fd = os.open(self.mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("I", GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)

    def destroy(self) -> None:
        if self.mounted:
            r = subprocess.run(["umount", str(self.mnt)], capture_output=True)
            if r.returncode:
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
            self.mounted = False
        if self.dev is not None:
            subprocess.run(["losetup", "-d", self.dev], capture_output=True)
            self.dev = None
        self.image.unlink(missing_ok=True)


@pytest.fixture(params=["ext4", "xfs"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Disk]:
    fstype: str = request.param
    reason = _unavailable(fstype)
    if reason:
        pytest.skip(reason)
    d = Disk(fstype, tmp_path / f"{fstype}.img", tmp_path / "mnt")
    try:
        d.make()
    except subprocess.CalledProcessError as exc:
        d.destroy()
        pytest.skip(f"could not make {fstype} on a loop device: {exc.stderr!r}")
    try:
        yield d
    finally:
        d.destroy()


def check_raw_journal(root: str) -> list[str]:
    """Before recovery: each segment parses, with at most a torn tail (or, for a segment
    whose creation was cut short, a torn start)."""
    from walstore._journal_reader import TornSegment, scan_segment

    problems = []
    journal = os.path.join(root, ".walstore", "journal")
    for name in sorted(os.listdir(journal)):
        if name == "spare":  # a retired segment kept for the next checkpoint: never parsed
            continue
        with open(os.path.join(journal, name), "rb") as fh:
            data = fh.read()
        try:
            scan_segment(name, data)
        except TornSegment:
            pass
        except Exception as exc:
            problems.append(f"journal segment {name} after the cut: {exc!r}")
    return problems


def assert_the_cut_loses_unsynced_writes(disk: Disk) -> None:
    """The cut is real: an fsynced file survives it, a file written without fsync does not
    (it comes back missing or empty). Otherwise the test below could not fail."""
    synced, unsynced = disk.mnt / "synced", disk.mnt / "unsynced"
    for path, sync in ((synced, True), (unsynced, False)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT)
        os.write(fd, b"x" * 8192)
        if sync:
            os.fsync(fd)
            dfd = os.open(disk.mnt, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)
        os.close(fd)
    disk.power_cut()
    disk.unmount()
    disk.mount()
    assert synced.read_bytes() == b"x" * 8192
    assert not unsynced.exists() or unsynced.read_bytes() != b"x" * 8192
    synced.unlink()
    unsynced.unlink(missing_ok=True)


def test_real_power_cuts(disk: Disk) -> None:
    assert_the_cut_loses_unsynced_writes(disk)
    root = str(disk.mnt / "store")
    anyio.run(workload.setup, root)
    rng = random.Random(f"power cuts on {disk.fstype}")
    acked: dict[int, int] = {}
    total_acks = unacked = 0
    for k in range(CUTS):
        target = rng.choice([0, 1, rng.randint(2, 10), rng.randint(10, 60)])
        child = spawn(root, TASKS, "full")
        try:
            got = wait_for_acks(child, target, acked)
            disk.power_cut()
        finally:
            err = kill_and_drain(child, acked)
        assert got >= target, f"child died on its own:\n{err[-3000:]}"
        assert child.returncode in (-signal.SIGKILL, 1), err[-3000:]
        total_acks += got
        disk.unmount()
        disk.mount()
        problems = check_raw_journal(root)
        steps, more = workload.check(root, acked, TASKS)
        problems += more
        unacked += sum(1 for i, n in steps.items() if n > acked.get(i, 0))
        TALLY.cases += 1
        TALLY.parts[disk.fstype] = TALLY.parts.get(disk.fstype, 0) + 1
        TALLY.violations += [f"{disk.fstype} cut {k} ({got} ACKs): {p}" for p in problems]
        assert not problems, problems[:10]
        acked = {i: n for i, n in steps.items() if n}
    print(f"{disk.fstype}: {CUTS} cuts, {total_acks} ACKs, {unacked} unacknowledged commits kept")
    assert total_acks >= CUTS * 5
