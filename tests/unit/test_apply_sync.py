"""The two cheap paths of apply and checkpoint, and the fallbacks beside them.

* A value that replaces an existing file is exchanged into place (renameat2 RENAME_EXCHANGE)
  and the old file unlinked once the group is in place; a new file is renamed in. Where the
  system cannot exchange, values are renamed over the old files.
* A checkpoint (or recovery) with at least ``SYNCFS_MIN`` changes makes them durable with one
  ``syncfs``; a smaller one, one with ``checkpoint_syncfs=False``, or one on a system whose
  syncfs cannot report errors fsyncs each file and directory.

Each path is held to its syscall counts (stable, unlike times) and to what survives a power
cut or a crash at each of its calls.
"""

from __future__ import annotations

import errno
import os
import random
import re
from pathlib import Path
from typing import Any

import anyio
import pytest

import walstore
from walstore._apply import SYNCFS_MIN
from walstore.testing import MemoryFileSystem, SimulatedCrash

pytestmark = pytest.mark.guarantee(name="One syncfs per checkpoint")

ROOT = "/store"
MANY = SYNCFS_MIN + 4  # files in a checkpoint big enough for syncfs


def run(fn: Any, *args: Any) -> Any:
    return anyio.run(fn, *args)


async def _write(fs: MemoryFileSystem, files: dict[str, bytes], **kwargs: Any) -> None:
    store = await walstore.open(ROOT, fs=fs, **kwargs)
    try:
        async with store.transaction() as tx:
            for path, data in files.items():
                await tx.write(path, data)
    finally:
        await store.aclose()


def _files(n: int, tag: bytes) -> dict[str, bytes]:
    return {f"d{i % 3}/f{i}.bin": tag + bytes([i]) for i in range(n)}


def _checkpoint_calls(fs: MemoryFileSystem, files: dict[str, bytes], **kw: Any) -> Any:
    """Write ``files`` in one transaction and close (which checkpoints); the calls of the
    close alone."""

    async def main() -> Any:
        store = await walstore.open(ROOT, fs=fs, **kw)
        async with store.transaction() as tx:
            for path, data in files.items():
                await tx.write(path, data)
        before = fs.calls.copy()
        await store.aclose()
        return fs.calls - before

    return run(main)


def test_a_big_checkpoint_is_one_syncfs_and_no_fsync_of_files() -> None:
    fs = MemoryFileSystem()
    calls = _checkpoint_calls(fs, _files(MANY, b"a"))
    assert calls["syncfs"] == 1
    assert calls["fsync"] == 1  # the new journal segment's, not the files'
    assert calls["fsync_dir"] == 1  # journal/, for the new segment's name


def test_a_small_checkpoint_fsyncs_each_file() -> None:
    fs = MemoryFileSystem()
    calls = _checkpoint_calls(fs, _files(2, b"a"))
    assert calls["syncfs"] == 0
    assert calls["fsync"] == 2 + 1  # the two files, then the new segment


@pytest.mark.parametrize("how", ["checkpoint_syncfs=False", "no syncfs on the system"])
def test_without_syncfs_a_big_checkpoint_fsyncs_each_file(how: str) -> None:
    fs = MemoryFileSystem()
    kw: dict[str, Any] = {}
    if how == "checkpoint_syncfs=False":
        kw["checkpoint_syncfs"] = False
    else:
        fs.syncfs_supported = False
    calls = _checkpoint_calls(fs, _files(MANY, b"a"), **kw)
    assert calls["fsync"] == MANY + 1
    assert calls["syncfs"] == (0 if kw else 1)  # tried once, refused with ENOSYS
    # Every file survives a power cut all the same.
    fs.reboot(power_loss=random.Random(1))
    assert fs.files(ROOT) == _files(MANY, b"a")


@pytest.mark.parametrize("seed", range(6))
def test_a_power_cut_after_a_syncfs_checkpoint_loses_nothing(seed: int) -> None:
    """The journal segment that held the values is gone after the checkpoint: only syncfs
    made them durable. Power cuts at random tear, drop or garble whatever is unsynced."""
    fs = MemoryFileSystem()
    run(_write, fs, _files(MANY, b"a"))  # closed: checkpointed by one syncfs
    assert fs.calls["syncfs"] == 1
    fs.reboot(power_loss=random.Random(seed))
    assert fs.files(ROOT) == _files(MANY, b"a")


def _crash_sweep(fs_setup: MemoryFileSystem, name: str) -> int:
    """Overwrite every file of the setup (and add MANY more) in one transaction, then close:
    crash at each call, cut the power, reopen; the store holds all old or all new files."""
    old = fs_setup.files(ROOT)
    new = {**{p: b"new" + d for p, d in old.items()}, **_files(MANY, b"more")}
    cases = 0
    k = 0
    while True:
        fs = fs_setup.clone()
        fs.crash_at = fs.count + k
        try:
            run(_write, fs, new)
        except SimulatedCrash:
            pass
        else:
            assert k > 0
            return cases
        fs.reboot(power_loss=random.Random(k))
        run(_write, fs, {})  # reopen: recovery
        got = fs.files(ROOT)
        assert got in (old, new), f"{name}: crash at call {k}: neither old nor new"
        assert fs.files(ROOT + "/.walstore/staging", skip=()) == {}
        cases += 1
        k += 1


def test_crash_at_every_call_of_an_exchanging_syncfs_commit_and_checkpoint() -> None:
    fs = MemoryFileSystem()
    run(_write, fs, _files(MANY, b"old"))
    assert _crash_sweep(fs, "exchange + syncfs") > 2 * MANY


def test_crash_at_every_call_without_exchange_or_syncfs() -> None:
    fs = MemoryFileSystem()
    fs.exchange_supported = False
    fs.syncfs_supported = False
    run(_write, fs, _files(MANY, b"old"))
    assert _crash_sweep(fs, "rename + fsyncs") > 2 * MANY


def test_a_failed_syncfs_fails_the_store_and_reopening_recovers() -> None:
    fs = MemoryFileSystem()
    run(_write, fs, _files(MANY, b"old"))
    files = _files(MANY, b"new")

    async def main() -> None:
        store = await walstore.open(ROOT, fs=fs)
        async with store.transaction() as tx:
            for path, data in files.items():
                await tx.write(path, data)
        fs.fault = lambda i, n, p: OSError(errno.EIO, "injected") if n == "syncfs" else None
        with pytest.raises(walstore.StoreFailedError):
            await store.checkpoint()
        fs.fault = None
        with pytest.raises(walstore.StoreFailedError):  # fail-stop: never retried
            await store.write("later", b"x")
        await store.aclose()

    run(main)
    # What the failed syncfs was to write back may be lost; the journal still has it.
    fs.reboot(power_loss=random.Random(3))
    run(_write, fs, {})
    assert fs.files(ROOT) == files


def test_replacing_files_exchanges_and_unlinks_creating_renames() -> None:
    fs = MemoryFileSystem()
    run(_write, fs, _files(4, b"old"))

    async def main() -> Any:
        store = await walstore.open(ROOT, fs=fs)
        before = fs.calls.copy()
        fs.trace = []
        async with store.transaction() as tx:
            for path in _files(4, b""):
                await tx.write(path, b"new")
            await tx.write("d0/fresh.bin", b"fresh")
        calls = fs.calls - before
        staging = fs.files(ROOT + "/.walstore/staging", skip=())
        await store.aclose()
        return calls, staging

    calls, staging = run(main)
    assert calls["exchange"] == 4 and calls["rename"] == 1  # the fresh file is renamed in
    assert calls["unlink"] == 4  # the four old files, once the group is in place
    assert staging == {}  # nothing left behind until the checkpoint
    # Validation looked each target up; apply (after the commit point) asks no more.
    assert fs.trace is not None
    sync = next(i for i, name, _ in fs.trace if name == "fdatasync")
    user = [p for i, n, p in fs.trace if n == "lstat" and i > sync and "/.walstore" not in p]
    assert user == [], user


def test_without_exchange_values_are_renamed_over_the_old_files() -> None:
    fs = MemoryFileSystem()
    run(_write, fs, _files(4, b"old"))
    fs.exchange_supported = False

    async def main() -> Any:
        store = await walstore.open(ROOT, fs=fs)
        before = fs.calls.copy()
        for _ in range(2):  # refused once, not asked again
            async with store.transaction() as tx:
                for path in _files(4, b""):
                    await tx.write(path, b"new")
        calls = fs.calls - before
        await store.aclose()
        return calls

    calls = run(main)
    assert calls["exchange"] == 1 and calls["rename"] == 8 and calls["unlink"] == 0
    assert fs.files(ROOT) == {p: b"new" for p in _files(4, b"")}


@pytest.mark.asyncio
async def test_the_real_file_system_checkpoints_with_one_syncfs(tmp_path: Path) -> None:
    """On this machine (Linux >= 5.8) the OS file system takes the syncfs path too."""
    fs = walstore.OsFileSystem()
    async with walstore.open(tmp_path / "s", fs=fs) as store:
        async with store.transaction() as tx:
            for path, data in _files(MANY, b"a").items():
                await tx.write(path, data)
        before = fs.calls.copy()
        await store.checkpoint()
        calls = fs.calls - before
    assert calls["syncfs"] == 1 and calls["fsync"] == 1  # the files', then the new segment
    assert (tmp_path / "s" / "d0" / "f0.bin").read_bytes() == b"a\x00"


def test_replay_rewrites_a_value_already_in_place_in_five_calls() -> None:
    """The common recovery: the crashed process had applied its commits. Each such file is
    compared and rewritten through one handle (lstat, open, pread, pwrite, close), not read
    whole and reopened; a file that differs is replaced by a new one, with the journal's
    value either way."""
    fs = MemoryFileSystem()
    files = _files(6, b"v")

    async def crash_after_commit() -> None:
        store = await walstore.open(ROOT, fs=fs)
        async with store.transaction() as tx:
            for path, data in files.items():
                await tx.write(path, data)
        # the process dies here: no close, no checkpoint; the journal holds the commit

    run(crash_after_commit)
    disk = fs.clone()
    fd = disk.open(f"{ROOT}/d1/f1.bin")
    disk.pwrite(fd, b"X", 0)  # same size, other bytes: not the committed value
    disk.close(fd)
    disk.trace = []

    async def reopen() -> tuple[list[tuple[int, str, str]], dict[str, bytes]]:
        async with walstore.open(ROOT, fs=disk) as store:
            assert store.recovery.rolled_forward
            assert disk.trace is not None
            trace = list(disk.trace)  # the open's calls, before the reads below
            return trace, {p: await store.read(p) for p in files}

    trace, found = run(reopen)
    assert found == files
    per_file: dict[str, list[str]] = {}
    for _, name, path in trace:
        target = re.split(" <?-> ", path)[-1]  # a rename or exchange counts for its target
        if target.startswith(f"{ROOT}/d") and "/.walstore" not in target:
            per_file.setdefault(target[len(ROOT) + 1 :], []).append(name)
    for path in files:
        if path == "d1/f1.bin":  # compared, found different, replaced by a new file
            assert per_file[path][:4] == ["lstat", "open", "pread", "close"], per_file[path]
            assert {"exchange", "rename"} & set(per_file[path]), per_file[path]
        else:  # then the checkpoint's fsync of it (open, fsync, close: a small checkpoint)
            replay = ["lstat", "open", "pread", "pwrite", "close"]
            assert per_file[path] == [*replay, "open", "fsync", "close"], per_file[path]


@pytest.mark.parametrize("kind", ["os", "memory"])
def test_pread_reads_short_only_at_the_end_of_the_file(kind: str, tmp_path: Path) -> None:
    fs: Any = walstore.OsFileSystem() if kind == "os" else MemoryFileSystem()
    base = str(tmp_path) if kind == "os" else ""
    if kind == "memory":
        fs.mkdir("/d")
        base = "/d"
    fd = fs.open(f"{base}/f", create=True)
    try:
        fs.pwrite(fd, b"0123456789", 0)
        assert fs.pread(fd, 4, 0) == b"0123"
        assert fs.pread(fd, 4, 3) == b"3456"
        assert fs.pread(fd, 100, 6) == b"6789"
        assert fs.pread(fd, 5, 10) == b""
        assert fs.pread(fd, 11, 0) == b"0123456789"
    finally:
        fs.close(fd)
    assert fs.calls["pread"] == 5


def test_pread_goes_on_after_a_read_cut_short_at_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux returns at most ~2 GiB from one read; a read that long coming back short is
    continued. Scaled down: reads capped at 4 bytes, and 4 counting as long."""
    import walstore._os_fs as fs_mod

    real = os.pread
    monkeypatch.setattr(fs_mod, "_BIG_READ", 4)
    monkeypatch.setattr(fs_mod.os, "pread", lambda fd, n, off: real(fd, min(n, 4), off))
    fs = walstore.OsFileSystem()
    fd = fs.open(str(tmp_path / "f"), create=True)
    try:
        fs.pwrite(fd, b"0123456789", 0)
        assert fs.pread(fd, 10, 0) == b"0123456789"
        assert fs.pread(fd, 20, 1) == b"123456789"
        assert fs.pread(fd, 3, 0) == b"012"
    finally:
        fs.close(fd)


@pytest.mark.parametrize(
    ("sysname", "release", "used"),
    [
        ("Linux", "6.18.44-fc-v669", True),
        ("Linux", "5.8.0-63-generic", True),
        ("Linux", "5.10", True),
        ("Linux", "5.7.19", False),  # syncfs there can return 0 after losing data
        ("Linux", "4.19.0-27-amd64", False),
        ("Linux", "weird", False),
        ("Darwin", "23.1.0", False),
    ],
)
def test_syncfs_is_used_only_where_it_reports_write_back_errors(
    sysname: str, release: str, used: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import walstore._libc as libc

    fake = os.uname_result((sysname, "host", release, "#1", "x86_64"))
    monkeypatch.setattr(libc.os, "uname", lambda: fake)
    assert libc._kernel_at_least(5, 8) is used
