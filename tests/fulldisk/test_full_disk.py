"""A full disk never locks users out (issue 14), on real small file systems: ext4 and XFS made
in image files on loop devices (as root; skipped with the reason elsewhere), with all but
ROOM bytes taken by a filler file, so each case fills its disk in seconds.

Each case fills the disk through the store until it refuses with ENOSPC, with values of
4 KiB, 128 KiB (inline, in the journal) and 4 MiB (staged), then: every acknowledged commit
reads back intact on the full disk; deleting half and checkpointing frees their space
(statvfs); writes work again until the disk is full again; ``aclose`` on the full disk raises
nothing; reopening ON the full disk works (recovery and the checkpoint need no new space: the
journal recycles its spare segment) and reads everything. The same after a real writer
process is SIGKILLed while the disk is full.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import walstore
from tests.fulldisk.values import value_of
from tests.powercut.test_powercut import Disk, _unavailable
from walstore._cli import main as walstore_cli
from walstore._engine import reserve_for

pytestmark = pytest.mark.guarantee(name="A full disk locks no one out")

ROOM = 48 << 20  # bytes left free for the store on each disk
SIZES = {"4k": 4 << 10, "128k": 128 << 10, "4m": 4 << 20}
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["ext4", "xfs"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Disk]:
    fstype: str = request.param
    reason = _unavailable(fstype)
    if reason:
        pytest.skip(reason.replace("real power cuts", "full-disk tests"))
    d = Disk(fstype, tmp_path / f"{fstype}.img", tmp_path / "mnt")
    try:
        d.make()
    except subprocess.CalledProcessError as exc:
        d.destroy()
        pytest.skip(f"could not make {fstype} on a loop device: {exc.stderr!r}")
    try:
        _leave_room(d.mnt, ROOM)
        yield d
    finally:
        d.destroy()


def _leave_room(mnt: Path, room: int) -> None:
    """Take all but ``room`` free bytes with one allocated file outside the store."""
    fd = os.open(mnt / "filler", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.posix_fallocate(fd, 0, max(4096, free_bytes(mnt) - room))
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def reserve(path: Path) -> int:
    st = os.statvfs(path)
    return reserve_for(st.f_blocks * st.f_frsize)


async def fill(store: walstore.Store, size: int, start: int) -> list[str]:
    """Write new values until the store refuses with ENOSPC even one at a time; returns the
    names acknowledged. Small values go many to a transaction, halving on refusal."""
    names: list[str] = []
    batch = max(1, (256 << 10) // size)
    while batch:
        chunk = [f"v/{start + len(names) + k:06d}" for k in range(batch)]
        try:
            async with store.transaction() as tx:
                for name in chunk:
                    await tx.write(name, value_of(name, size))
        except OSError as exc:
            assert exc.errno in NO_SPACE, exc
            batch //= 2
            continue
        names += chunk
    return names


async def check_all(store: walstore.Store, names: list[str], size: int) -> None:
    for name in names:
        assert await store.read(name) == value_of(name, size), name


async def delete(store: walstore.Store, names: list[str]) -> None:
    for i in range(0, len(names), 256):
        async with store.transaction() as tx:
            for name in names[i : i + 256]:
                await tx.delete(name)


def assert_full(mnt: Path, size: int) -> None:
    """Nothing more fits: what is left is the reserve, and less than one more value."""
    assert free_bytes(mnt) < reserve(mnt) + size + (2 << 20), (free_bytes(mnt), reserve(mnt))


async def free_half_and_refill(
    store: walstore.Store, mnt: Path, names: list[str], size: int
) -> list[str]:
    """On the full disk: delete every other value and checkpoint, which must free their
    space; then writes work again, until the disk is full again. Returns the names held."""
    before = free_bytes(mnt)
    gone, kept = names[::2], names[1::2]
    await delete(store, gone)
    await store.checkpoint()
    freed = free_bytes(mnt) - before
    assert freed >= 0.8 * len(gone) * size, (freed, len(gone) * size)
    more = await fill(store, size, int(names[-1][2:]) + 1)
    assert len(more) >= 0.5 * len(gone), (len(more), len(gone))
    assert_full(mnt, size)
    return kept + more


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = walstore_cli(list(argv))
    return code, out.getvalue()


async def scenario(mnt: Path, size: int, exclusive: bool) -> None:
    root = mnt / "store"
    store = await walstore.open(root, exclusive=exclusive)
    try:
        names = await fill(store, size, 0)
        assert len(names) >= (ROOM // 3) // size, len(names)
        assert_full(mnt, size)
        await check_all(store, names, size)  # reads on the full disk
        code, out = cli("info", str(root))  # the tools say so, the store open
        assert code == 0 and "the disk is FULL" in out and "spare segment" in out, out
        code, out = cli("verify", str(root))
        assert code == 0 and "note: disk full" in out, out
        names = await free_half_and_refill(store, mnt, names, size)
        await check_all(store, names, size)
    finally:
        await store.aclose()  # on the full disk: raises nothing
    assert_full(mnt, size)
    async with walstore.open(root, exclusive=exclusive) as store:  # ON the full disk
        await check_all(store, names, size)
        names = await free_half_and_refill(store, mnt, names, size)
    async with walstore.open(root, exclusive=exclusive) as store:
        assert store.recovery.clean
        await check_all(store, names, size)


@pytest.mark.parametrize("exclusive", [False, True], ids=["shared", "exclusive"])
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_fill_the_disk_through_the_store(disk: Disk, size: int, exclusive: bool) -> None:
    anyio.run(scenario, disk.mnt, size, exclusive)


def run_writer_until_killed(root: Path, size: int, start: int, tries: int) -> list[str]:
    """A writer process fills the disk; once it is refused (FULL) and has tried ``tries``
    more times it is SIGKILLed. Returns the names it acknowledged."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.fulldisk.writer", str(root), str(size), str(start)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    assert child.stdout is not None and child.stderr is not None
    acked: list[str] = []
    full, seen = False, 0
    for line in child.stdout:
        if line.startswith("ACK "):
            acked.append(line.split()[1])
        full = full or line.startswith("FULL")
        seen += line.startswith("TRY")
        if full and seen >= tries:
            break
    child.send_signal(signal.SIGKILL)
    out, err = child.stdout.read(), child.stderr.read()
    child.wait()
    child.stdout.close()
    child.stderr.close()
    acked += [line.split()[1] for line in out.splitlines() if line.startswith("ACK ")]
    assert full and child.returncode == -signal.SIGKILL, err[-3000:]
    return acked


async def reopen_after_kill(mnt: Path, acked: list[str], size: int) -> list[str]:
    """Reopen ON the full disk after the kill: every acknowledged value is there (and at
    most the one in flight besides); free half, refill, close."""
    assert_full(mnt, size)
    async with walstore.open(mnt / "store") as store:
        await check_all(store, acked, size)
        on_disk = sorted(await store.list("v"))
        extra = sorted(set(on_disk) - {n[2:] for n in acked})
        assert len(extra) <= 1, extra
        names = acked + [f"v/{n}" for n in extra]
        await check_all(store, names, size)
        return await free_half_and_refill(store, mnt, names, size)


def test_sigkill_a_writer_on_the_full_disk(disk: Disk) -> None:
    size = SIZES["128k"]
    acked = run_writer_until_killed(disk.mnt / "store", size, 0, tries=20)
    assert len(acked) >= (ROOM // 3) // size
    names = anyio.run(reopen_after_kill, disk.mnt, acked, size)
    # Once more from the state that left: the disk is full again.
    start = int(max(names)[2:]) + 1
    acked2 = run_writer_until_killed(disk.mnt / "store", size, start, tries=3)
    anyio.run(reopen_after_kill, disk.mnt, names + acked2, size)
