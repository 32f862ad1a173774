"""Nothing outside the root is ever touched, raced by a second real process.

A second process (``swapper.py``) swaps the store's directory ``a`` with a symlink to a
directory outside the root in a tight loop (renameat2 RENAME_EXCHANGE), while this one runs
one kind of operation under ``a/`` over and over: write, delete, move, replace_dir,
delete_dir, read, list, recovery replay, backup. The outside directory holds the same names
as ``a/`` with other bytes, so any call that followed the symlink would change it (or read
it): afterwards it is byte-identical (hashed), no read returned its bytes, no backup holds
them. Each op must also have met the symlink at least once (refused), so the race was run.
Both resolvers run: openat2 and the component walk.

Errors are expected and counted, not failures: an op refused at the call or at commit
(InvalidPathError), a file not there (FileNotFoundError), an apply that met the symlink after
its commit point (StoreFailedError; the store is reopened, its recovery replaying under the
same race, and a replay that meets the symlink says so: CorruptionError, tried again).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import walstore
from walstore import CorruptionError, InvalidPathError, StoreFailedError
from walstore._backup import backup
from walstore._libc import _openat2

from .swapper import Swapper

pytestmark = pytest.mark.guarantee(name="Nothing outside the root is touched")

SLOW = bool(os.environ.get("WALSTORE_SLOW") or os.environ.get("WALSTORE_SOAK"))
SWAPS = 30_000 if SLOW else 3_000  # at least this many swaps per test (CI: 30 min in all)
OPS = 1_000 if SLOW else 150  # and this many operations run against them
OUTSIDE = b"OUTSIDE-"  # every outside file's bytes start so; no store value does

RESOLVERS = [
    pytest.param(
        "openat2", marks=pytest.mark.skipif(_openat2 is None, reason="no openat2 (Linux 5.6+)")
    ),
    "walk",
]


def tree_hash(top: Path) -> str:
    """sha256 over every entry under ``top``: names, kinds, bytes, symlink targets, modes."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(top)):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            h.update(f"{os.path.relpath(full, top)}\0{st.st_mode}\0".encode())
            if os.path.islink(full):
                h.update(os.readlink(full).encode())
            elif os.path.isfile(full):
                h.update(Path(full).read_bytes())
    return h.hexdigest()


def make_outside(top: Path) -> None:
    """The names the ops use under ``a/``, and more, with outside bytes."""
    (top / "sub").mkdir(parents=True)
    (top / "rep").mkdir()
    for rel in ("x", "y", "r", "sub/y", "rep/old", "outside-only", *(f"w{i}" for i in range(8))):
        (top / rel).write_bytes(OUTSIDE + rel.encode())


class Run:
    """The store under the race, reopened whenever an apply failed after its commit point."""

    def __init__(self, root: Path, resolver: str, cache_bytes: int = 1 << 20) -> None:
        self.root = root
        self.resolver = resolver
        self.cache_bytes = cache_bytes
        self.store: walstore.Store | None = None
        self.refused = 0
        self.failed = 0
        self.replays_refused = 0

    def fs(self) -> walstore.OsFileSystem:
        fs = walstore.OsFileSystem()
        fs.use_openat2 = self.resolver == "openat2"
        return fs

    async def open(self) -> walstore.Store:
        for _ in range(100_000):
            try:
                self.store = await walstore.open(
                    self.root, fs=self.fs(), create=False, cache_bytes=self.cache_bytes
                )
                return self.store
            except CorruptionError as exc:  # replay met the symlink: never followed it
                assert "symlink" in str(exc)
                self.replays_refused += 1
        raise AssertionError("the store never reopened")

    async def step(self, op: Callable[[walstore.Store, int], Awaitable[None]], i: int) -> None:
        store = self.store or await self.open()
        try:
            await op(store, i)
        except (InvalidPathError, FileNotFoundError, NotADirectoryError) as exc:
            assert "symlink" in str(exc) or isinstance(exc, FileNotFoundError | NotADirectoryError)
            self.refused += 1
        except StoreFailedError:
            self.failed += 1
            self.refused += 1
            await store.aclose()
            self.store = None


async def op_write(store: walstore.Store, i: int) -> None:
    await store.write(f"a/w{i % 8}", b"inside %d" % i)


async def op_delete(store: walstore.Store, i: int) -> None:
    await store.write("a/x", b"inside x")
    await store.delete("a/x")


async def op_move(store: walstore.Store, i: int) -> None:
    async with store.transaction() as tx:
        if await tx.exists("a/x"):
            await tx.move("a/x", "moved")
        else:
            await tx.write("a/x", b"inside x")
    async with store.transaction() as tx:
        if await tx.exists("moved"):
            await tx.move("moved", "a/y")


async def op_replace_dir(store: walstore.Store, i: int) -> None:
    async with store.transaction() as tx, tx.replace_dir("a/rep") as d:
        await d.write("old", b"inside rep %d" % i)
        await d.write("big", b"inside" * 1000)


async def op_delete_dir(store: walstore.Store, i: int) -> None:
    await store.write("a/sub/y", b"inside sub")
    async with store.transaction() as tx:
        await tx.delete_dir("a/sub")


async def op_read(store: walstore.Store, i: int) -> None:
    for rel in ("a/x", "a/r", "a/sub/y"):
        data = await store.read(rel)
        assert not data.startswith(OUTSIDE), f"{rel} read outside content"
    async with store.transaction() as tx:
        assert not (await tx.read("a/r")).startswith(OUTSIDE)


async def op_list(store: walstore.Store, i: int) -> None:
    names = await store.list("a")
    assert "outside-only" not in names, "listed the outside directory"
    assert await store.exists("a/outside-only") is False


OPS_BY_NAME: dict[str, Callable[[walstore.Store, int], Awaitable[None]]] = {
    "write": op_write,
    "delete": op_delete,
    "move": op_move,
    "replace_dir": op_replace_dir,
    "delete_dir": op_delete_dir,
    "read": op_read,
    "list": op_list,
}


async def seed(root: Path) -> None:
    async with walstore.open(root) as store, store.transaction() as tx:
        for rel in ("a/x", "a/r", "a/sub/y", "a/rep/old"):
            await tx.write(rel, b"inside " + rel.encode())


def arrange(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "store", tmp_path / "outside"
    make_outside(outside)
    return root, outside


def start_swapping(root: Path, outside: Path) -> Swapper:
    os.symlink(outside, root / "a.link")
    return Swapper(str(root / "a"), str(root / "a.link"))


@pytest.mark.asyncio
@pytest.mark.parametrize("resolver", RESOLVERS)
@pytest.mark.parametrize("op", list(OPS_BY_NAME))
async def test_swapped_directory_never_leads_out(tmp_path: Path, op: str, resolver: str) -> None:
    root, outside = arrange(tmp_path)
    await seed(root)
    before = tree_hash(outside)
    run = Run(root, resolver, cache_bytes=0 if op == "read" else 1 << 20)  # reads: the disk
    await run.open()
    i = 0
    with start_swapping(root, outside) as swapper:
        while swapper.swaps < SWAPS or i < OPS:
            await run.step(OPS_BY_NAME[op], i)
            i += 1
        swaps = swapper.swaps
    assert tree_hash(outside) == before
    assert run.refused > 0, "no op ever met the symlink: the race did not run"
    store = run.store or await run.open()
    await store.aclose()
    print(
        f"{op}/{resolver}: {i} ops, {swaps} swaps, {run.refused} refused, "
        f"{run.failed} failed after commit, {run.replays_refused} replays refused"
    )


CRASHING_WRITER = textwrap.dedent(
    """
    import os, sys
    import anyio
    import walstore

    async def main(root):
        fs = walstore.OsFileSystem()
        fs.use_openat2 = sys.argv[2] == "openat2"
        try:
            store = await walstore.open(root, fs=fs, create=False)
            for i in range(12):
                async with store.transaction() as tx:
                    await tx.write(f"a/w{i % 8}", b"inside %d" % i)
                    await tx.delete("a/x")
                    await tx.write("a/x", b"inside x")
                async with store.transaction() as tx:
                    await tx.delete_dir("a/sub")
                    await tx.write("a/sub/y", b"inside sub")
                async with store.transaction() as tx, tx.replace_dir("a/rep") as d:
                    await d.write("old", b"inside rep")
        except Exception:
            pass  # refused, or failed after a commit point: crash all the same
        os._exit(0)  # a crash: no checkpoint, the next open replays every commit

    anyio.run(main, sys.argv[1])
    """
)


@pytest.mark.asyncio
@pytest.mark.parametrize("resolver", RESOLVERS)
async def test_recovery_replay_never_leads_out(tmp_path: Path, resolver: str) -> None:
    """A writer process crashes with commits not checkpointed, again and again; each open
    replays them (puts, deletes, delete_dir, replace_dir under ``a/``) while ``a`` swaps."""
    root, outside = arrange(tmp_path)
    await seed(root)
    before = tree_hash(outside)
    run = Run(root, resolver)
    rounds = 40 if SLOW else 4
    with start_swapping(root, outside) as swapper:
        for _ in range(rounds):
            subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(root), resolver], check=True)
            store = await run.open()  # the replay, raced
            await store.aclose()
            run.store = None
        swaps = swapper.swaps
    assert tree_hash(outside) == before
    print(
        f"replay/{resolver}: {rounds} crashes, {swaps} swaps, {run.replays_refused} replays refused"
    )


def backup_holds_outside(top: Path) -> bool:
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full) and Path(full).read_bytes().startswith(OUTSIDE):
                return True
    return False


@pytest.mark.asyncio
@pytest.mark.parametrize("copy", [False, True], ids=["link", "copy"])
async def test_backup_never_leads_out(tmp_path: Path, copy: bool) -> None:
    root, outside = arrange(tmp_path)
    await seed(root)
    before = tree_hash(outside)
    dest = tmp_path / "backups"
    made = 0
    with start_swapping(root, outside) as swapper:
        while swapper.swaps < SWAPS or made < (OPS // 10):
            result = backup(str(root), str(dest), copy=copy, keep=1)
            made += 1
            assert not backup_holds_outside(Path(result.path)), "the backup took outside bytes"
        swaps = swapper.swaps
    assert tree_hash(outside) == before
    print(f"backup: {made} backups, {swaps} swaps")
