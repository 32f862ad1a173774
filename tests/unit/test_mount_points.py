"""A directory inside the store that is the mount point of another file system (a tmpfs
here): walstore commits by renaming from staging into place, which cannot cross file systems,
so a change under it is refused before the commit point. Before, it was committed, failed
with EXDEV while being applied, and every later open failed the same way in its replay.

Real mounts: skipped, with the reason, without root or mount."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import walstore


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Path]:
    """A store at tmp_path/store holding ``keep``, with a tmpfs mounted at its ``mnt``."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount")
    root = tmp_path / "store"
    (root / "mnt").mkdir(parents=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(root / "mnt")], capture_output=True)
    if out.returncode:
        pytest.skip(f"could not mount a tmpfs: {out.stderr!r}")
    try:
        yield root
    finally:
        subprocess.run(["umount", str(root / "mnt")], check=True)


@pytest.mark.asyncio
async def test_changes_under_a_mount_point_are_refused_before_the_commit_point(
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
        with pytest.raises(walstore.InvalidPathError, match="mount point"):
            async with store.transaction() as tx, tx.replace_dir("mnt") as d:
                await d.write("z", b"z")
        await store.write("after", b"3")  # the store did not fail
        assert await store.read("keep") == b"1"
    assert os.listdir(root / "mnt") == []  # nothing was written across
    async with walstore.open(root, create=False) as store:  # and it opens again
        assert store.recovery.clean
        assert await store.read("keep") == b"1"
        assert await store.read("after") == b"3"
