"""The resolution rule (src/walstore/_fs.py), the same on every FileSystem: under a confined
root no call goes through a symlink, none follows one as the last name (``unlink`` removes
the link itself, ``lstat`` reports it), and ``read_file`` reads regular files only. Checked
on OsFileSystem with openat2, with the component walk, and on MemoryFileSystem (which the
crash tests drive), call by call; then at the store: aliases, FIFOs and devices.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import walstore
from walstore import InvalidPathError
from walstore._confine import _HELD_MAX, _KEPT_MAX
from walstore._fs import FileSystem, NotRegularFileError
from walstore._inspect import Layout
from walstore._libc import _openat2
from walstore._verify import verify
from walstore.testing import MemoryFileSystem

pytestmark = pytest.mark.guarantee(name="Nothing outside the root is touched")

KINDS = [
    pytest.param(
        "openat2", marks=pytest.mark.skipif(_openat2 is None, reason="no openat2 (Linux 5.6+)")
    ),
    "walk",
    "memory",
]


@pytest.fixture(params=KINDS)
def tree(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Any, str, str]]:
    """(fs, root, outside): ``root/d/f``, ``root/l -> d``, ``root/fl -> d/f``,
    ``root/out -> outside`` and ``outside/f``; the root confined."""
    kind = request.param
    fs: Any
    if kind == "memory":
        fs = MemoryFileSystem()
        base = "/t"
        fs.mkdir(base)
        link: Callable[[str, str], None] = fs.symlink
    else:
        fs = walstore.OsFileSystem()
        fs.use_openat2 = kind == "openat2"
        base = str(tmp_path)
        link = os.symlink
    root, outside = f"{base}/root", f"{base}/outside"
    for d in (root, f"{root}/d", outside):
        fs.mkdir(d)
    for f in (f"{root}/d/f", f"{outside}/f"):
        fd = fs.open(f, create=True)
        fs.pwrite(fd, b"inside" if f.startswith(root) else b"outside", 0)
        fs.close(fd)
    link("d", f"{root}/l")
    link("d/f", f"{root}/fl")
    link(outside, f"{root}/out")
    fs.confine(root)
    yield fs, root, outside
    fs.release(root)


def eloop(fn: Callable[..., Any], *args: Any) -> None:
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == errno.ELOOP, info.value


def test_no_call_goes_through_a_symlink(tree: tuple[FileSystem, str, str]) -> None:
    fs, root, outside = tree
    for through in (f"{root}/l/f", f"{root}/out/f"):
        eloop(fs.lstat, through)
        eloop(fs.read_file, through)
        eloop(fs.open, through)
        eloop(fs.unlink, through)
        eloop(fs.rename, f"{root}/d/f", through)
        eloop(fs.rename, through, f"{root}/d/g")
        eloop(fs.link, f"{root}/d/f", through)
        eloop(fs.exchange, f"{root}/d/f", through)
    eloop(lambda: fs.open(f"{root}/out/new", create=True))
    eloop(fs.mkdir, f"{root}/out/new")
    eloop(fs.rmdir, f"{root}/out/d")
    eloop(fs.listdir, f"{root}/out")
    eloop(fs.fsync_dir, f"{root}/l")
    eloop(fs.lock, f"{root}/out/LOCK")
    assert fs.read_file(f"{outside}/f") == b"outside"
    assert fs.listdir(outside) == ["f"]


def test_the_last_name_is_never_followed(tree: tuple[FileSystem, str, str]) -> None:
    fs, root, _ = tree
    for name in ("l", "fl", "out"):
        st = fs.lstat(f"{root}/{name}")
        assert st is not None and st.kind == "symlink"
    eloop(fs.read_file, f"{root}/fl")
    eloop(fs.open, f"{root}/fl")
    fs.unlink(f"{root}/fl")  # the link itself goes
    assert fs.lstat(f"{root}/fl") is None
    assert fs.read_file(f"{root}/d/f") == b"inside"
    with pytest.raises(NotRegularFileError) as info:
        fs.read_file(f"{root}/d")
    assert info.value.errno == errno.EISDIR


def test_release_ends_the_rule(tree: tuple[FileSystem, str, str]) -> None:
    """What refuses is the confinement, not the paths: released, the symlinks are followed."""
    fs, root, _ = tree
    fs.release(root)
    assert fs.read_file(f"{root}/l/f") == b"inside"
    assert fs.read_file(f"{root}/out/f") == b"outside"
    fs.confine(root)


# -- at the store ----------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["os", "memory"])
async def test_an_alias_keeps_isolation_and_the_cache(tmp_path: Path, kind: str) -> None:
    """``inl -> real``: ``delete("inl/r")`` would remove ``real/r`` while recording ``inl/r``,
    so a transaction that read ``real/r`` would still commit and the cache would keep serving
    the old bytes. A path through the alias is refused: ``real/r`` stays, and what isolation
    and the cache know about it stays true."""
    fs: Any = MemoryFileSystem() if kind == "memory" else walstore.OsFileSystem()
    root = "/s" if kind == "memory" else str(tmp_path / "s")
    async with walstore.open(root, fs=fs, cache_bytes=1 << 20) as store:
        await store.write("real/r", b"old")
        if kind == "memory":
            fs.symlink("real", f"{root}/inl")
        else:
            os.symlink("real", f"{root}/inl")
        assert await store.read("real/r") == b"old"  # now cached
        async with store.transaction() as reader:
            assert await reader.read("real/r") == b"old"
            with pytest.raises(InvalidPathError, match="symlink"):
                await store.delete("inl/r")
            with pytest.raises(InvalidPathError, match="symlink"):
                async with store.transaction() as tx:
                    await tx.delete("inl/r")
            with pytest.raises(InvalidPathError, match="symlink"):
                await store.write("inl/r", b"new")
            await reader.write("seen", await reader.read("real/r"))
        assert fs.read_file(f"{root}/real/r") == b"old"
        assert await store.read("real/r") == b"old"
        assert await store.read("seen") == b"old"
        await store.delete("inl")  # the link itself, as a plain entry
        assert sorted(await store.list()) == ["real", "seen"]
        assert await store.read("real/r") == b"old"


READER = textwrap.dedent(
    """
    import resource, sys
    import anyio
    import walstore

    resource.setrlimit(resource.RLIMIT_AS, (1 << 31, 1 << 31))  # a runaway read fails fast

    async def main(root, name, cache):
        async with walstore.open(root, create=False, cache_bytes=int(cache)) as store:
            with anyio.move_on_after(5) as scope:
                try:
                    await store.read(name)
                    print("read")
                except walstore.InvalidPathError as exc:
                    print("InvalidPathError", exc)
            if scope.cancelled_caught:
                print("cancelled")

    anyio.run(main, *sys.argv[1:])
    """
)


def special(tmp_path: Path, kind: str) -> Path:
    root = tmp_path / "s"

    async def make() -> None:
        async with walstore.open(root) as store:
            await store.write("x", b"x")

    anyio.run(make)
    if kind == "fifo":
        os.mkfifo(root / "special")
    else:
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(root / "special", 0o644 | 0o020000, os.makedev(1, 5))  # /dev/zero
    return root


@pytest.mark.guarantee(name="Reads never block on special files")
@pytest.mark.parametrize("cache", [0, 1 << 20])
@pytest.mark.parametrize("kind", ["fifo", "char device"])
def test_special_files_are_refused_at_once(tmp_path: Path, kind: str, cache: int) -> None:
    """A FIFO with no writer would block the read's thread past any ``move_on_after``; a
    character device like /dev/zero would fill memory. Both are refused before any read,
    well within the deadline. In a child process: if either blocked or ran away, the child
    would hang or die, and the parent's timeout fails the test."""
    root = special(tmp_path, kind)
    out = subprocess.run(
        [sys.executable, "-c", READER, str(root), "special", str(cache)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.startswith("InvalidPathError"), out
    assert "not a regular file" in out and "cancelled" not in out


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["os", "memory"])
async def test_two_stores_on_one_file_system_share_the_confinement(
    tmp_path: Path, kind: str
) -> None:
    """A readonly reader and the writer on one root through one FileSystem: closing the
    reader must not close the descriptors the writer resolves through, nor lift the rule."""
    fs: Any = MemoryFileSystem() if kind == "memory" else walstore.OsFileSystem()
    root = "/s" if kind == "memory" else str(tmp_path / "s")
    async with walstore.open(root, fs=fs) as writer:
        await writer.write("d/a", b"1")
        async with walstore.open(root, fs=fs, readonly=True) as reader:
            assert await reader.read("d/a") == b"1"
        await writer.write("d/b", b"2")  # resolves d/ from the root's descriptor
        assert await writer.read("d/b") == b"2"
        if kind == "memory":
            fs.symlink("d", f"{root}/l")
        else:
            os.symlink("d", f"{root}/l")
        with pytest.raises(InvalidPathError, match="symlink"):
            await writer.read("l/a")


@pytest.mark.parametrize("resolver", ["openat2", "walk"])
@pytest.mark.parametrize("how", ["rename", "exchange", "rmdir"])
def test_a_held_directory_is_dropped_when_renamed_or_removed(
    tmp_path: Path, resolver: str, how: str
) -> None:
    """Inside ``hold()`` (one commit group) a directory is resolved once; once this thread
    renames, exchanges or removes it, the next call resolves the path anew, so a write to
    ``d/y`` lands in what is now ``d``, not in the directory that moved away."""
    if resolver == "openat2" and _openat2 is None:
        pytest.skip("no openat2 (Linux 5.6+)")
    fs = walstore.OsFileSystem()
    fs.use_openat2 = resolver == "openat2"
    root = str(tmp_path / "r")
    os.makedirs(f"{root}/p/d")
    os.makedirs(f"{root}/p/other")
    fs.confine(root)
    try:
        with fs.hold():
            fs.close(fs.open(f"{root}/p/d/x", create=True))  # p/d now held
            if how == "rename":
                fs.rename(f"{root}/p/d", f"{root}/p/gone")
                fs.mkdir(f"{root}/p/d")
            elif how == "exchange":
                fs.exchange(f"{root}/p/d", f"{root}/p/other")
            else:
                fs.unlink(f"{root}/p/d/x")
                fs.rmdir(f"{root}/p/d")
                fs.mkdir(f"{root}/p/d")
            fs.close(fs.open(f"{root}/p/d/y", create=True))
        assert sorted(os.listdir(f"{root}/p/d")) == ["y"]
    finally:
        fs.release(root)


def confined(tmp_path: Path, resolver: str, *dirs: str) -> tuple[walstore.OsFileSystem, str]:
    if resolver == "openat2" and _openat2 is None:
        pytest.skip("no openat2 (Linux 5.6+)")
    fs = walstore.OsFileSystem()
    fs.use_openat2 = resolver == "openat2"
    root = str(tmp_path / "r")
    for d in dirs:
        os.makedirs(f"{root}/{d}")
    fs.confine(root)
    return fs, root


@pytest.mark.parametrize("resolver", ["openat2", "walk"])
@pytest.mark.parametrize("how", ["directory", "parent", "symlink", "parent-symlink"])
def test_a_kept_directory_is_checked_before_use(tmp_path: Path, resolver: str, how: str) -> None:
    """Directory descriptors outlive a ``hold()`` block (one commit group) for the next one,
    which uses each only if it still is that directory beneath the root: ``p/d`` (or ``p``)
    replaced between two blocks by another directory, or by a symlink to one outside, and
    the second block's file lands in what the path is now, or is refused (ELOOP): never in
    the directory that moved away, never outside."""
    fs, root = confined(tmp_path, resolver, "p/d")
    outside = tmp_path / "outside"
    (outside / "d").mkdir(parents=True)
    try:
        with fs.hold():
            fs.close(fs.open(f"{root}/p/d/x", create=True))  # p and p/d now kept
        moved = {"directory": "p/d", "parent": "p", "symlink": "p/d", "parent-symlink": "p"}
        os.rename(f"{root}/{moved[how]}", f"{root}/gone")
        if how.endswith("symlink"):
            os.symlink(
                outside if how == "parent-symlink" else outside / "d", f"{root}/{moved[how]}"
            )
            with fs.hold():
                eloop(lambda: fs.open(f"{root}/p/d/y", create=True))
                eloop(fs.lstat, f"{root}/p/d/x")
        else:
            os.makedirs(f"{root}/p/d", exist_ok=True)
            with fs.hold():
                fs.close(fs.open(f"{root}/p/d/y", create=True))
            assert sorted(os.listdir(f"{root}/p/d")) == ["y"]
        gone = f"{root}/gone" if how in ("directory", "symlink") else f"{root}/gone/d"
        assert sorted(os.listdir(gone)) == ["x"]
        assert os.listdir(outside / "d") == []
    finally:
        fs.release(root)


@pytest.mark.parametrize("resolver", ["openat2", "walk"])
def test_a_rename_across_more_directories_than_one_block_holds(
    tmp_path: Path, resolver: str
) -> None:
    """A block holds at most so many directories; making room for a rename's target never
    closes its source's directory (whose descriptor number the target's would then take,
    renaming within the target's directory instead)."""
    last = _HELD_MAX  # d0 to d{last - 1} held, d0 the first
    fs, root = confined(tmp_path, resolver, *(f"d{i}" for i in range(last + 1)))
    try:
        for i in range(last + 1):
            Path(f"{root}/d{i}/f").write_bytes(b"%d" % i)
        with fs.hold():
            for i in range(last):
                assert fs.lstat(f"{root}/d{i}/f") is not None
            fs.rename(f"{root}/d0/f", f"{root}/d{last}/g")
        assert os.listdir(f"{root}/d0") == []
        assert sorted(os.listdir(f"{root}/d{last}")) == ["f", "g"]
        assert Path(f"{root}/d{last}/g").read_bytes() == b"0"
    finally:
        fs.release(root)


@pytest.mark.parametrize("resolver", ["openat2", "walk"])
def test_descriptors_held_and_kept_are_bounded(tmp_path: Path, resolver: str) -> None:
    """A block that writes into far more directories than it holds passes the oldest on to
    be kept, and the root keeps a bounded number; release closes them all."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc/self/fd")
    before = len(os.listdir("/proc/self/fd"))
    fs, root = confined(tmp_path, resolver, "src")
    try:
        most = 0
        for block in range(3):
            with fs.hold():
                for i in range(300):
                    d = f"{root}/d{i}/e"
                    if block == 0:
                        fs.mkdir(f"{root}/d{i}")
                        fs.mkdir(d)
                    fs.close(fs.open(f"{root}/src/f", create=True))
                    fs.rename(f"{root}/src/f", f"{d}/g{block}")  # d: only ever a 2nd path
                    most = max(most, len(os.listdir("/proc/self/fd")))
        assert most <= before + 1 + _HELD_MAX + 2 + _KEPT_MAX, (most, before)
        assert sorted(os.listdir(f"{root}/d299/e")) == ["g0", "g1", "g2"]
    finally:
        fs.release(root)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.guarantee(name="Reads never block on special files")
@pytest.mark.asyncio
@pytest.mark.parametrize("swap", ["symlink", "fifo"])
async def test_verify_reads_nothing_through_a_symlink_or_from_a_fifo(
    tmp_path: Path, swap: str
) -> None:
    """``walstore verify`` reads the store as the store does: a staged value's directory
    moved out of the root and replaced by a symlink to it is not read through (a path-string
    read found the very bytes there and called the store sound), and a FIFO in a staged
    value's place is refused at once instead of blocking the read."""
    root, outside = tmp_path / "s", tmp_path / "outside"
    outside.mkdir()
    async with walstore.open(root) as store:
        await store.write("a/big", os.urandom(300_000))
        staging = root / ".walstore" / "staging"
        (txid,) = os.listdir(staging)
        if swap == "symlink":
            os.rename(staging / txid, outside / txid)
            os.symlink(outside / txid, staging / txid)
        else:
            (value,) = os.listdir(staging / txid)
            os.unlink(staging / txid / value)
            os.mkfifo(staging / txid / value)
        result = await anyio.to_thread.run_sync(verify, Layout.of(str(root)))
        assert [p.kind for p in result.problems] == ["staged"], result.problems
        assert "unreadable" in result.problems[0].detail
        if swap == "symlink":
            assert "symlink" in result.problems[0].detail
            os.unlink(staging / txid)
            os.rename(outside / txid, staging / txid)
        else:
            os.unlink(staging / txid / value)
