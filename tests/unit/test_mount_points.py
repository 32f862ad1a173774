"""Mount points inside a store. walstore commits by renaming from ``.walstore/staging`` into
place, and Linux renames (and links) within one mount only, so a change at or under a mount
point is refused before the commit point (``InvalidPathError``), and a store whose
``.walstore/`` is not on its root's mount does not open (``StoreLayoutError``). Before, such a
change was committed, failed with EXDEV while being applied, and every later open failed the
same way in its replay.

Mounts known at open come from the mount table (any file system, bind mounts too); a file
system mounted later is known by its device. MemoryFileSystem.mount simulates both kinds (its
renames across mounts fail with EXDEV); the last tests use real tmpfs and bind mounts
(skipped, with the reason, without root or mount)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import walstore
from walstore.testing import MemoryFileSystem

pytestmark = pytest.mark.guarantee(name="Mount points are checked")

ROOT = "/store"


async def _store_with_mount(
    *, same_device: bool, after_open: bool
) -> tuple[MemoryFileSystem, walstore.Store]:
    fs = MemoryFileSystem()
    async with walstore.open(ROOT, fs=fs) as store:
        await store.write("keep", b"1")
        await store.write("d/m/old", b"o")  # d/m becomes the mount point
        await store.write("d/sibling", b"s")
    if not after_open:
        fs.mount(f"{ROOT}/d/m", same_device=same_device)
    store = await walstore.open(ROOT, fs=fs)
    if after_open:
        fs.mount(f"{ROOT}/d/m", same_device=same_device)
    return fs, store


async def _refused(store: walstore.Store, *changes: str) -> None:
    for change in changes:
        with pytest.raises(walstore.InvalidPathError, match="mount point"):
            async with store.transaction() as tx:
                await tx.write("keep", b"2")  # all or nothing: this is not applied either
                if change == "write":
                    await tx.write("d/m/x", b"x")
                elif change == "write deeper":
                    await tx.write("d/m/a/b", b"x")
                elif change == "delete":
                    await tx.delete("d/m/old")
                elif change == "move out":
                    await tx.move("d/m/old", "moved")
                elif change == "delete_dir above":
                    await tx.delete_dir("d")
                elif change == "replace_dir above":
                    async with tx.replace_dir("d") as new:
                        await new.write("y", b"y")
    assert await store.read("keep") == b"1"


CASES = ["write", "write deeper", "delete", "move out", "delete_dir above", "replace_dir above"]


@pytest.mark.parametrize("same_device", [False, True], ids=["other file system", "bind mount"])
@pytest.mark.asyncio
async def test_changes_at_mounts_known_at_open_are_refused(same_device: bool) -> None:
    fs, store = await _store_with_mount(same_device=same_device, after_open=False)
    try:
        await _refused(store, *CASES)
        await store.write("d/sibling", b"s2")  # beside the mount: fine, and the store is well
        assert await store.read("d/m/old") == b"o"
    finally:
        await store.aclose()
    async with walstore.open(ROOT, fs=fs, create=False) as again:
        assert again.recovery.clean
        assert await again.read("d/sibling") == b"s2"


@pytest.mark.asyncio
async def test_a_file_system_mounted_after_open_is_known_by_its_device() -> None:
    """Not in the mount table the open read, but its paths report another device: writes
    and deletes under it are refused (a delete would be synced by no checkpoint)."""
    _, store = await _store_with_mount(same_device=False, after_open=True)
    try:
        await _refused(store, "write", "write deeper", "delete")
        await store.write("d/sibling", b"s2")
    finally:
        await store.aclose()


@pytest.mark.asyncio
async def test_without_the_check_the_change_would_be_committed_and_never_applied() -> None:
    """What the refusal prevents (so the tests above can fail): the simulated disk, like
    Linux, refuses the rename into the mount only after the commit point."""
    fs, store = await _store_with_mount(same_device=True, after_open=False)
    store._engine._mounts = frozenset()  # the check, blinded
    try:
        with pytest.raises(walstore.CommittedNotAppliedError, match="not applied"):
            await store.write("d/m/x", b"x")
    finally:
        await store.aclose()
    with pytest.raises(OSError) as replay:
        await walstore.open(ROOT, fs=fs, create=False)  # every replay fails the same way
    assert replay.value.errno == errno.EXDEV, replay.value


@pytest.mark.parametrize("where", [".walstore", ".walstore/staging", ".walstore/journal"])
@pytest.mark.parametrize("same_device", [False, True], ids=["other file system", "bind mount"])
@pytest.mark.asyncio
async def test_a_store_whose_walstore_dir_is_on_another_mount_does_not_open(
    where: str, same_device: bool
) -> None:
    fs = MemoryFileSystem()
    async with walstore.open(ROOT, fs=fs) as store:
        await store.write("keep", b"1")
    fs.mount(f"{ROOT}/{where}", same_device=same_device)
    with pytest.raises(walstore.StoreLayoutError, match="another file system or mount"):
        await walstore.open(ROOT, fs=fs, create=False)


@pytest.mark.parametrize("where", [".walstore", ".walstore/staging"])
@pytest.mark.asyncio
async def test_a_symlinked_walstore_dir_does_not_open(where: str) -> None:
    """A symlink may lead onto another mount, which lstat would not show: the open wants
    real directories (as creating the layout always did)."""
    fs = MemoryFileSystem()
    async with walstore.open(ROOT, fs=fs) as store:
        await store.write("keep", b"1")
    fs.mkdir("/elsewhere")
    fs.rename(f"{ROOT}/{where}", f"/elsewhere/{os.path.basename(where)}")
    fs.mount("/elsewhere")  # now another file system, reached through the symlink
    fs.symlink(f"/elsewhere/{os.path.basename(where)}", f"{ROOT}/{where}")
    with pytest.raises(walstore.StoreLayoutError, match="not a directory"):
        await walstore.open(ROOT, fs=fs, create=False)


# -- real mounts ------------------------------------------------------------------------------


def _mount(*args: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting needs root and mount")
    out = subprocess.run(["mount", *args], capture_output=True)
    if out.returncode:
        pytest.skip(f"could not mount: {out.stderr!r}")


@pytest.fixture(params=["tmpfs", "bind"])
def mounted(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A store at tmp_path/store holding ``keep``, with a tmpfs, or a bind mount of another
    directory of the same file system, at its ``mnt``."""
    root = tmp_path / "store"
    (root / "mnt").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if request.param == "tmpfs":
        _mount("-t", "tmpfs", "tmpfs", str(root / "mnt"))
    else:
        _mount("--bind", str(elsewhere), str(root / "mnt"))
    try:
        yield root
    finally:
        subprocess.run(["umount", str(root / "mnt")], check=True)


@pytest.mark.asyncio
async def test_real_mounts_inside_the_store_are_refused_before_the_commit_point(
    mounted: Path,
) -> None:
    root = mounted
    async with walstore.open(root) as store:
        await store.write("keep", b"1")
        with pytest.raises(walstore.InvalidPathError, match="mount point"):
            async with store.transaction() as tx:  # all or nothing: keep is not changed
                await tx.write("keep", b"2")
                await tx.write("mnt/x", b"x")
        with pytest.raises(walstore.InvalidPathError, match="mount point"):
            await store.write("mnt/deeper/y", b"y")
        with pytest.raises(walstore.InvalidPathError, match="mount point"):
            async with store.transaction() as tx:
                await tx.delete_dir("mnt")
        await store.write("after", b"3")  # the store did not fail
        assert await store.read("keep") == b"1"
    assert os.listdir(root / "mnt") == []  # nothing was written across
    async with walstore.open(root, create=False) as store:  # and it opens again
        assert store.recovery.clean
        assert await store.read("after") == b"3"


@pytest.mark.asyncio
async def test_a_real_mount_on_staging_stops_the_open(tmp_path: Path) -> None:
    root = tmp_path / "store"
    async with walstore.open(root) as store:
        await store.write("keep", b"1")
    _mount("-t", "tmpfs", "tmpfs", str(root / ".walstore" / "staging"))
    try:
        with pytest.raises(walstore.StoreLayoutError, match="another file system or mount"):
            await walstore.open(root, create=False)
    finally:
        subprocess.run(["umount", str(root / ".walstore" / "staging")], check=True)
    async with walstore.open(root, create=False) as store:
        assert await store.read("keep") == b"1"


@pytest.mark.asyncio
async def test_a_mount_made_after_open_inside_a_removed_directory_is_not_emptied(
    tmp_path: Path,
) -> None:
    """Not detected at validation (mounted after the open, deeper than any path the change
    names), so delete_dir moves it, mount and all, into staging. Removing that tree must not
    delete what the other file system holds: the checkpoint fails instead (EXDEV)."""
    root = tmp_path / "store"
    async with walstore.open(root) as store:
        await store.write("d/sub/f", b"1")
    store = await walstore.open(root)
    (root / "d" / "sub" / "m").mkdir()
    _mount("-t", "tmpfs", "tmpfs", str(root / "d" / "sub" / "m"))
    try:
        (root / "d" / "sub" / "m" / "precious").write_bytes(b"p")
        async with store.transaction() as tx:
            await tx.delete_dir("d")
        with pytest.raises(walstore.StoreFailedError, match="checkpoint failed"):
            await store.checkpoint()
        (moved,) = walstore.OsFileSystem().mount_points(str(tmp_path))  # it went along
        assert os.path.relpath(moved, root).startswith(".walstore/staging/")
        assert (Path(moved) / "precious").read_bytes() == b"p"
        await store.aclose()
    finally:
        for point in walstore.OsFileSystem().mount_points(str(tmp_path)):
            subprocess.run(["umount", point], check=True)
    async with walstore.open(root, create=False) as store:  # unmounted: it opens and cleans up
        assert not await store.exists("d")
