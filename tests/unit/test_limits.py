"""Poison inputs: whatever apply could fail on for the input's sake is refused before the
commit point (InvalidPathError), one transaction's bad input never fails another of its
group, and the store opens again afterwards. Trees of any depth are walked iteratively.

Each input was, before these checks, committed and then failed at apply (and at every open's
replay after it), or failed its whole commit group in the encoder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest

import walstore
from walstore import InvalidPathError, TxState, _limits
from walstore import _journal_format as fmt
from walstore._backup import _rmtree, backup
from walstore._inspect import Layout, read_staging
from walstore._limits import PathLimits
from walstore._verify import verify
from walstore.testing import MemoryFileSystem

pytestmark = [pytest.mark.anyio, pytest.mark.guarantee(name="No input poisons the store")]

LONG_NAME = "n" * 256  # one byte over Linux's NAME_MAX
LONG_UTF8_NAME = "é" * 128  # 128 characters, 256 bytes
DEEP = 1200  # levels: over Python's recursion limit of 1000


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path: Path) -> Iterator[None]:
    """Deep trees removed here, iteratively: pytest's own clean-up of old temporary
    directories (shutil.rmtree, recursive on Python 3.11) would die on them."""
    yield
    _rmtree(str(tmp_path), ignore_errors=True)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry below ``root`` (``.walstore/`` included): files by content, dirs None."""
    out: dict[str, bytes | None] = {}
    stack = [root]
    while stack:
        d = stack.pop()
        for e in os.scandir(d):
            rel = os.path.relpath(e.path, root)
            if e.is_dir(follow_symlinks=False):
                out[rel] = None
                stack.append(Path(e.path))
            else:
                out[rel] = Path(e.path).read_bytes()
    return out


async def _replace(tx: walstore.Transaction, rel: str) -> None:
    async with tx.replace_dir("d") as d:
        await d.write("ok.txt", b"ok")
        await d.write(rel, b"x")


async def _stream(tx: walstore.Transaction, path: str) -> None:
    async with tx.open_write(path) as f:
        await f.write(b"x")


async def _move(tx: walstore.Transaction, dst: str) -> None:
    await tx.move("existing.txt", dst)


# Each poison input, given as the op that takes it.
POISON: dict[str, Callable[[walstore.Transaction], Awaitable[None]]] = {
    "write: name over NAME_MAX": lambda tx: tx.write(LONG_NAME, b"x"),
    "write: UTF-8 name over NAME_MAX": lambda tx: tx.write(f"d/{LONG_UTF8_NAME}", b"x"),
    "write: path over PATH_MAX": lambda tx: tx.write("/".join(["abc"] * 1400), b"x"),
    "write_json: long dir name": lambda tx: tx.write_json(f"{LONG_NAME}/x.json", {}),
    "open_write: name over NAME_MAX": lambda tx: _stream(tx, LONG_NAME),
    "move: destination over NAME_MAX": lambda tx: _move(tx, f"d/{LONG_NAME}"),
    "delete: name over NAME_MAX": lambda tx: tx.delete(LONG_NAME),
    "delete_dir: name over NAME_MAX": lambda tx: tx.delete_dir(LONG_NAME),
    "replace_dir: entry name over NAME_MAX": lambda tx: _replace(tx, LONG_NAME),
    "replace_dir: entry path over PATH_MAX": lambda tx: _replace(tx, "/".join(["e"] * 2100)),
    "replace_dir: entry path over 64 KiB": lambda tx: _replace(tx, "/".join(["f" * 250] * 270)),
    "replace_dir: directory name over NAME_MAX": lambda tx: tx.replace_dir(LONG_NAME).__aenter__(),
}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("poison", sorted(POISON))
async def test_poison_input_is_refused_at_the_op_call(tmp_path: Path, poison: str) -> None:
    """Refused with InvalidPathError by the op itself (not a bare OSError at commit, nor a
    StoreFailedError after it); nothing changed; the transaction goes on and commits; the
    store opens again."""
    root = tmp_path / "s"
    async with walstore.open(root) as store:
        await store.write("existing.txt", b"existing")
        await store.write("d/old.txt", b"old")
        before = tree(root)
        async with store.transaction() as tx:
            with pytest.raises(InvalidPathError) as info:
                await POISON[poison](tx)
            assert "NAME_MAX" in str(info.value) or "PATH_MAX" in str(info.value)
            assert tree(root) == before
            await tx.write("after.txt", b"the transaction goes on")
        assert tx.state is TxState.COMMITTED
    async with walstore.open(root) as store:
        assert await store.read("after.txt") == b"the transaction goes on"
        assert await store.read("d/old.txt") == b"old"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_plain_write_of_a_long_name_is_invalid_path_error(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "s") as store:
        for name in (LONG_NAME, LONG_UTF8_NAME, f"a/{LONG_NAME}/b"):
            with pytest.raises(InvalidPathError, match="NAME_MAX of 255"):
                await store.write(name, b"x")
            with pytest.raises(InvalidPathError):
                await store.read(name)
        await store.write("n" * 255, b"255 bytes is a name")  # the limit itself is fine
        assert await store.read("n" * 255) == b"255 bytes is a name"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_longest_path_a_store_takes_can_be_deleted_and_reopened(
    tmp_path: Path,
) -> None:
    """A path of exactly the store's limit is taken, and everything apply then does with it
    works: delete_dir moves its tree into staging (a longer prefix than the root), the
    checkpoint removes it there, the store reopens. One byte more is refused. (With room for
    the root alone, the checkpoint failed with ENAMETOOLONG, and so did every open after.)"""
    root = tmp_path / "s"
    async with walstore.open(root) as store:
        limit = store._limits.path_max
        path = "t"  # a short name: its trash path in staging/ is longer than the path
        while limit - len(path) - 1 > 201:
            path += "/" + "p" * 200
        path += "/" + "q" * (limit - len(path) - 1)
        assert len(path) == limit
        await store.write(path, b"deepest")
        assert await store.read(path) == b"deepest"
        with pytest.raises(InvalidPathError, match="PATH_MAX"):
            await store.write(path + "q", b"one byte more")
        await store.write(path[:-1] + "r", b"sibling")
        async with store.transaction() as tx:
            await tx.delete_dir("t")
        await store.checkpoint()
    async with walstore.open(root) as store:
        assert await store.list() == []
        assert store.recovery.clean


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_limits_come_from_the_file_system(tmp_path: Path) -> None:
    """NAME_MAX and PATH_MAX through the seam (pathconf), and on a simulated disk its own."""
    root = tmp_path / "s"
    async with walstore.open(root) as store:
        assert store._limits.name_max == os.pathconf(tmp_path, "PC_NAME_MAX")
        room = len(os.fsencode(store._engine.staging_dir)) + 2 + _limits.STAGING_NAME_MAX
        assert store._limits.path_max == os.pathconf(tmp_path, "PC_PATH_MAX") - 1 - room
    fs = MemoryFileSystem()
    fs.name_max = 32
    async with walstore.open("/m", fs=fs) as store:
        await store.write("a" * 32, b"x")
        with pytest.raises(InvalidPathError, match="NAME_MAX of 32"):
            await store.write("a" * 33, b"x")


async def _one_group(store: walstore.Store, *txs: walstore.Transaction) -> list[BaseException]:
    """Commit ``txs`` at once (they form one group); the errors they raised."""
    errors: list[BaseException] = []

    async def commit(tx: walstore.Transaction) -> None:
        try:
            await tx.commit()
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for tx in txs:
            tg.start_soon(commit, tx)
    return errors


def _unlimited() -> PathLimits:
    return PathLimits(name_max=1 << 20, path_max=1 << 20)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_validation_refuses_what_the_op_calls_let_through(tmp_path: Path) -> None:
    """With the op calls' checks off (as a caller of a future op, or a path built in some
    other way, would get past them), validation refuses a name over NAME_MAX before the
    commit point, and only the transaction holding it: the other one of its group commits.
    (Without it: committed, failed at apply, StoreFailedError, and no open replayed it.)"""
    root = tmp_path / "s"
    async with walstore.open(root) as store:
        store._limits = _unlimited()
        groups = store.stats().groups
        bad, good = store.transaction(), store.transaction()
        await _replace(bad, LONG_NAME)
        await good.write("good.txt", b"good")
        errors = await _one_group(store, bad, good)
        assert [type(e) for e in errors] == [InvalidPathError], errors
        assert (bad.state, good.state) == (TxState.ROLLED_BACK, TxState.COMMITTED)
        assert store.stats().groups == groups + 1  # they did share a group
    async with walstore.open(root) as store:
        assert await store.read("good.txt") == b"good"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_encoder_refuses_one_transaction_not_its_group(tmp_path: Path) -> None:
    """The last line: with every path check off, a path over the record's 64 KiB makes the
    encoder fail for its own transaction only (it failed the whole group, "outcome unknown",
    and the store with it)."""
    root = tmp_path / "s"
    async with walstore.open(root) as store:
        store._limits = store._engine.limits = _unlimited()
        bad, good = store.transaction(), store.transaction()
        await _replace(bad, "/".join(["f" * 250] * 270))  # 67 KB; entries are not looked up
        await good.write("good.txt", b"good")
        errors = await _one_group(store, bad, good)
        assert [type(e) for e in errors] == [InvalidPathError], errors
        assert "record format" in str(errors[0])
        assert (bad.state, good.state) == (TxState.ROLLED_BACK, TxState.COMMITTED)
        await store.write("later.txt", b"the store carries on")
    async with walstore.open(root) as store:
        assert await store.read("good.txt") == b"good"
        assert await store.read("later.txt") == b"the store carries on"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_transaction_too_big_for_the_record_is_refused_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction over MAX_TX_BYTES of journal (1 GiB; lowered here) is refused at commit,
    before its group forms; the other transaction of the group commits."""
    monkeypatch.setattr(_limits, "MAX_TX_BYTES", 64 << 10)
    async with walstore.open(tmp_path / "s", inline_threshold=1 << 20) as store:
        big, good = store.transaction(), store.transaction()
        await big.write("big.bin", b"b" * (128 << 10))
        await good.write("good.txt", b"good")
        errors = await _one_group(store, big, good)
        assert [type(e) for e in errors] == [InvalidPathError], errors
        assert "open_write" in str(errors[0])
        assert (big.state, good.state) == (TxState.ROLLED_BACK, TxState.COMMITTED)
        assert not await store.exists("big.bin")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_groups_are_cut_to_what_one_record_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Transactions that fit a COMMIT record alone but not together commit in two groups
    (taken as one, the group was too big for its record and failed)."""
    monkeypatch.setattr(fmt, "MAX_PAYLOAD", 96 << 10)
    async with walstore.open(tmp_path / "s", inline_threshold=1 << 20) as store:
        groups = store.stats().groups
        a, b = store.transaction(), store.transaction()
        await a.write("a.bin", b"a" * (64 << 10))
        await b.write("b.bin", b"b" * (64 << 10))
        assert await _one_group(store, a, b) == []
        assert (a.state, b.state) == (TxState.COMMITTED, TxState.COMMITTED)
        assert store.stats().groups == groups + 2


# -- deep trees --------------------------------------------------------------------------------


def _deep(levels: int) -> str:
    return "/".join(["d"] * levels)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_deep_tree_is_deleted_replaced_backed_up_and_verified(tmp_path: Path) -> None:
    """1,200 levels (the recursive walks died with RecursionError at ~500: after the commit
    point, then at every open, in backup and in verify)."""
    root = tmp_path / "s"
    async with walstore.open(root) as store:
        await store.write(f"{_deep(DEEP)}/f", b"deep")
        await store.write(f"r/{_deep(DEEP)}/f", b"deep in r")
    result = backup(str(root), str(tmp_path / "backups"))
    copy = Path(result.path)
    assert (copy / _deep(DEEP) / "f").read_bytes() == b"deep"
    assert verify(Layout.of(str(root))).ok
    async with walstore.open(root) as store:
        async with store.transaction() as tx:
            await tx.delete_dir("d")
            async with tx.replace_dir("r", keep=["d"]) as r:
                await r.write("new.txt", b"new")
        assert await store.read(f"r/{_deep(DEEP)}/f") == b"deep in r"
        # The journal holds the replacement (verify walks the new tree) and staging the
        # deleted tree (info counts it).
        assert verify(Layout.of(str(root))).ok
        assert read_staging(Layout.of(str(root))).entries > DEEP
        async with store.transaction() as tx:
            await tx.delete_dir("r")
    async with walstore.open(root) as store:
        assert await store.list() == []
    backup(str(root), str(tmp_path / "backups"), keep=1)  # prunes the deep one
    assert not copy.exists()


_CRASHING_WRITER = """
import os, sys, anyio, walstore
async def main():
    store = await walstore.open(sys.argv[1])
    await store.write("/".join(["d"] * {levels}) + "/f", b"deep")
    await store.checkpoint()
    async with store.transaction() as tx:
        await tx.delete_dir("d")
    os.kill(os.getpid(), {signal})  # committed and applied; its tree still in staging
anyio.run(main)
"""


def test_recovery_replays_a_deep_delete_dir_and_clears_its_tree(tmp_path: Path) -> None:
    """A real process killed after committing a delete_dir of a 1,200-level tree: the next
    open replays it and removes the tree from staging (it died with RecursionError)."""
    root = tmp_path / "s"
    script = _CRASHING_WRITER.format(levels=DEEP, signal=int(signal.SIGKILL))
    p = subprocess.run([sys.executable, "-c", script, str(root)], timeout=120)
    assert p.returncode == -signal.SIGKILL
    assert os.listdir(root / ".walstore" / "staging")  # the tree waits there

    async def reopen() -> walstore.RecoveryReport:
        async with walstore.open(root) as store:
            assert await store.list() == []
            return store.recovery

    report = anyio.run(reopen)
    assert report.rolled_forward and report.orphans_removed > DEEP
    assert os.listdir(root / ".walstore" / "staging") == []


def test_memory_file_system_lists_a_deep_tree() -> None:
    fs = MemoryFileSystem()
    path = "/r"
    fs.mkdir(path)
    for _ in range(DEEP):
        path += "/d"
        fs.mkdir(path)
    fd = fs.open(path + "/f", create=True)
    fs.pwrite(fd, b"deep", 0)
    fs.close(fd)
    assert fs.files("/r") == {_deep(DEEP) + "/f": b"deep"}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_store_poisoned_by_an_older_version_opens_again(tmp_path: Path) -> None:
    """A store whose journal holds an op no file system can apply (committed with the
    checks off, as versions before them did): the commit fails after its commit point, and
    every open's replay failed with ENAMETOOLONG. Now the replay skips that op, says so in
    ``recovery.ops_skipped`` (and the log), applies the rest, and the store opens."""
    root = tmp_path / "s"
    async with walstore.open(root) as store:
        await store.write("d/old.txt", b"old")
        store._limits = store._engine.limits = _unlimited()  # as an unchecked version
        with pytest.raises(walstore.CommittedNotAppliedError):
            async with store.transaction() as tx:
                await tx.write("first.txt", b"applied before the poison")
                await _replace(tx, LONG_NAME)
                await tx.write("last.txt", b"after the poison")
    async with walstore.open(root) as store:
        assert len(store.recovery.ops_skipped) == 1
        assert await store.read("first.txt") == b"applied before the poison"
        assert await store.read("last.txt") == b"after the poison"
        assert await store.read("d/old.txt") == b"old"  # the replacement could not be made
    async with walstore.open(root) as store:  # the skip was checkpointed, not repeated
        assert store.recovery.clean
        assert await store.read("last.txt") == b"after the poison"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_recovery_reports_the_skipped_op(tmp_path: Path) -> None:
    root = tmp_path / "s"
    async with walstore.open(root) as store:
        store._limits = store._engine.limits = _unlimited()
        with pytest.raises(walstore.CommittedNotAppliedError):
            async with store.transaction() as tx:
                await _replace(tx, LONG_NAME)
                await tx.write("last.txt", b"after the poison")
    async with walstore.open(root) as store:
        (what,) = store.recovery.ops_skipped
        assert "ReplaceDir 'd'" in what and "too long" in what
        assert await store.read("last.txt") == b"after the poison"
        assert not store.recovery.clean
