"""The simulated disk the crash tests run on (``walstore.testing.MemoryFileSystem``) is faithful
to POSIX durability and no more lenient: a directory fsync makes exactly that directory's
entries durable, a dead process's unsynced state is lost by a later power cut, renames are
atomic under power loss, and a failed fsync loses its data for good (fsyncgate).
"""

from __future__ import annotations

import errno
import random

import pytest

from tests.crash.oracle import LoseAll
from walstore.testing import MemoryFileSystem

pytestmark = pytest.mark.guarantee(name="Durable")


def _disk() -> MemoryFileSystem:
    fs = MemoryFileSystem()
    for d in ("/x", "/y"):
        fs.mkdir(d)
    fs.fsync_dir("/")
    return fs


def _put(fs: MemoryFileSystem, path: str, data: bytes, *, sync: bool = True) -> None:
    fd = fs.open(path, create=True, truncate=True)
    fs.pwrite(fd, data, 0)
    if sync:
        fs.fsync(fd)
    fs.close(fd)


def test_memoryfs_fsync_dir_makes_exactly_that_directory_durable() -> None:
    fs = _disk()
    _put(fs, "/x/f", b"1")
    _put(fs, "/y/g", b"2")
    fs.mkdir("/x/new")
    _put(fs, "/x/new/h", b"3")
    fs.fsync_dir("/x/new")  # its entries, not its own name in /x
    fs.fsync_dir("/y")
    fs.reboot(power_loss=LoseAll())
    assert fs.files("/") == {"x/": b"", "y/g": b"2"}


def test_memoryfs_unsynced_state_of_a_dead_process_is_lost_by_a_later_power_cut() -> None:
    fs = _disk()
    _put(fs, "/x/f", b"data", sync=False)
    fs.reboot()  # the process died: the page cache keeps everything
    assert fs.files("/x") == {"f": b"data"}
    fs.reboot(power_loss=LoseAll())
    assert fs.files("/x") == {}


def test_memoryfs_renames_are_atomic_under_power_loss() -> None:
    seen = set()
    for seed in range(200):
        fs = _disk()
        _put(fs, "/y/t", b"old")
        fs.rename("/y/t", "/x/a")
        fs.fsync_dir("/x")  # durable through its destination
        _put(fs, "/y/t2", b"new")
        fs.rename("/y/t2", "/x/a")  # not durable: old or new, never neither, never both names
        fs.reboot(power_loss=random.Random(seed))
        files = {p: v for p, v in fs.files("/").items() if not p.endswith("/")}
        seen.add(tuple(sorted(files.items())))
        assert files in ({"x/a": b"old"}, {"x/a": b"new"}, {"x/a": b"old", "y/t2": b"new"})
    assert len(seen) == 3


def test_memoryfs_models_fsyncgate() -> None:
    """A failed file fsync loses the unsynced data for good, even if a retry "succeeds"."""
    kept = 0
    for seed in range(20):
        fs = _disk()
        fs.fault = lambda i, n, p: OSError(errno.EIO, "x") if n == "fsync" else None
        fd = fs.open("/x/f", create=True)
        fs.pwrite(fd, b"data", 0)
        with pytest.raises(OSError):
            fs.fsync(fd)
        fs.fault = None
        fs.fsync(fd)  # "succeeds"
        fs.close(fd)
        fs.fsync_dir("/x")
        fs.reboot(power_loss=random.Random(seed))
        kept += fs.files("/x") == {"f": b"data"}
    assert kept < 20
