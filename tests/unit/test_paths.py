"""Containment: every hostile path is refused with InvalidPathError and nothing changes.

Lexical checks refuse at the call; checks that need the disk (symlinks, a file where a
directory is needed) refuse at the latest at commit, under the commit lock, before the commit
point, so the whole transaction (its valid writes included) changes nothing. Every test
snapshots the whole tree, ``.walstore/`` included, and the directory outside the root.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import pytest_asyncio

import walstore
from walstore import InvalidPathError, TxState

pytestmark = pytest.mark.guarantee(name="Contained")


def snapshot(*dirs: Path) -> dict[str, Any]:
    """Every entry under each of ``dirs``: kind and content (symlinks not followed)."""
    out: dict[str, Any] = {}
    for top in dirs:
        if not top.exists():
            out[str(top)] = None
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                if os.path.islink(full):
                    out[full] = ("symlink", os.readlink(full))
                elif os.path.isdir(full):
                    out[full] = ("dir",)
                else:
                    with open(full, "rb") as f:
                        out[full] = ("file", f.read())
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the root, outside it, with a file a symlink could reach."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_bytes(b"secret")
    (d / "x").write_bytes(b"outside x")
    return d


@pytest_asyncio.fixture
async def store(root: Path) -> AsyncIterator[walstore.Store]:
    async with walstore.open(root, inline_threshold=1024) as s:
        await s.write("existing.txt", b"existing")
        await s.write("d/in.txt", b"in")
        yield s


# -- lexically hostile paths: refused at the call ------------------------------------------

LEXICAL = [
    "/etc/passwd",
    "//etc/passwd",
    "/",
    "..",
    "../x",
    "a/..",
    "a/../../x",
    "a/../b",
    "a//b",
    "a/./b",
    "./a",
    ".",
    "a/",
    "a/b/",
    "",
    "a\x00b",
    "\x00",
    "x\x00/../../etc/passwd",
    ".walstore",
    ".walstore/",
    ".walstore/LOCK",
    ".walstore/journal/x",
    ".walstore/journal/0000000000000001.wal",
    ".walstore/staging/1/0",
]

Op = Callable[[walstore.Store, Any], Awaitable[Any]]

STORE_OPS: dict[str, Op] = {
    "store.write": lambda s, p: s.write(p, b"data"),
    "store.write_text": lambda s, p: s.write_text(p, "data"),
    "store.write_json": lambda s, p: s.write_json(p, {"x": 1}),
    "store.read": lambda s, p: s.read(p),
    "store.read_text": lambda s, p: s.read_text(p),
    "store.read_json": lambda s, p: s.read_json(p),
    "store.delete": lambda s, p: s.delete(p),
    "store.delete_missing_ok": lambda s, p: s.delete(p, missing_ok=True),
}

TxOp = Callable[[walstore.Transaction, Any], Awaitable[Any]]

TX_OPS: dict[str, TxOp] = {
    "tx.write": lambda t, p: t.write(p, b"data"),
    "tx.write_big": lambda t, p: t.write(p, b"B" * 4096),
    "tx.write_text": lambda t, p: t.write_text(p, "data"),
    "tx.write_json": lambda t, p: t.write_json(p, {"x": 1}),
    "tx.read": lambda t, p: t.read(p),
    "tx.delete": lambda t, p: t.delete(p),
    "tx.delete_missing_ok": lambda t, p: t.delete(p, missing_ok=True),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("op", sorted(STORE_OPS))
@pytest.mark.parametrize("path", LEXICAL, ids=repr)
async def test_lexical_hostile_path_refused_by_store(
    store: walstore.Store, root: Path, outside: Path, op: str, path: str
) -> None:
    before = snapshot(root, outside)
    with pytest.raises(InvalidPathError) as info:
        await STORE_OPS[op](store, path)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, walstore.StoreError)
    assert snapshot(root, outside) == before
    assert await store.read("existing.txt") == b"existing"  # the store is still usable


@pytest.mark.asyncio
@pytest.mark.parametrize("op", sorted(TX_OPS))
@pytest.mark.parametrize("path", LEXICAL, ids=repr)
async def test_lexical_hostile_path_refused_by_transaction_at_the_call(
    store: walstore.Store, root: Path, outside: Path, op: str, path: str
) -> None:
    before = snapshot(root, outside)
    reached = False
    with pytest.raises(InvalidPathError) as info:
        async with store.transaction() as tx:
            await tx.write("valid.txt", b"valid")
            await TX_OPS[op](tx, path)
            reached = True
    assert not reached, "refused only at commit, not at the call"
    assert isinstance(info.value, ValueError)
    assert tx.state is TxState.ROLLED_BACK
    assert snapshot(root, outside) == before


@pytest.mark.asyncio
@pytest.mark.parametrize("path", LEXICAL, ids=repr)
async def test_lexical_refusal_leaves_the_transaction_usable(
    store: walstore.Store, root: Path, path: str
) -> None:
    async with store.transaction() as tx:
        await tx.write("valid.txt", b"valid")
        with pytest.raises(InvalidPathError):
            await tx.write(path, b"data")
        assert tx.state is TxState.ACTIVE
    assert tx.state is TxState.COMMITTED
    assert (root / "valid.txt").read_bytes() == b"valid"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "path", ["/etc", "..", "a/..", "a//b", "a/", "\x00", ".walstore", ".walstore/journal"], ids=repr
)
async def test_lexical_hostile_path_refused_by_list_exists_stat(
    store: walstore.Store, root: Path, path: str
) -> None:
    before = snapshot(root)
    for call in (store.list, store.exists, store.stat):
        with pytest.raises(InvalidPathError):
            await call(path)
    async with store.transaction() as tx:
        with pytest.raises(InvalidPathError):
            await tx.list(path)
        with pytest.raises(InvalidPathError):
            await tx.exists(path)
    assert snapshot(root) == before


# -- hostile on disk: symlinks and files where a directory is needed --------------------------


def setup_case(case: str, root: Path, outside: Path) -> str:
    """Arrange the disk for ``case``; return the hostile store path."""
    if case == "symlink dir to outside":
        os.symlink(outside, root / "out")
        return "out/x"
    if case == "symlink dir to outside, new file":
        os.symlink(outside, root / "out")
        return "out/new.txt"
    if case == "symlink dir to /tmp":
        os.symlink("/tmp", root / "out")
        return f"out/walstore-test-{os.getpid()}-{root.parent.name}"
    if case == "relative symlink dir to outside":
        os.symlink("../outside", root / "out")
        return "out/secret.txt"
    if case == "symlink deeper in the path":
        os.symlink(outside, root / "d" / "link")
        return "d/link/x"
    if case == "symlink as final component to outside":
        os.symlink(outside / "secret.txt", root / "link")
        return "link"
    if case == "dangling symlink as final component to outside":
        os.symlink(outside / "nothing-here", root / "link")
        return "link"
    if case == "symlink into .walstore":
        os.symlink(".walstore", root / "meta")
        return "meta/LOCK"
    if case == "symlink into .walstore/journal":
        os.symlink(root / ".walstore" / "journal", root / "j")
        return "j/0000000000000001.wal"
    if case == "file where a directory is needed":
        (root / "a").write_bytes(b"a file")
        return "a/b"
    if case == "file where a directory is needed, deeper":
        (root / "a").write_bytes(b"a file")
        return "a/b/c"
    raise AssertionError(case)


CASES = [
    "symlink dir to outside",
    "symlink dir to outside, new file",
    "symlink dir to /tmp",
    "relative symlink dir to outside",
    "symlink deeper in the path",
    "symlink as final component to outside",
    "dangling symlink as final component to outside",
    "symlink into .walstore",
    "symlink into .walstore/journal",
    "file where a directory is needed",
    "file where a directory is needed, deeper",
]


def assert_link_removed(root: Path, outside: Path, path: str, before: dict[str, Any]) -> None:
    """A delete of a symlink removed the link itself and nothing else of the user's tree;
    what it pointed to (outside the root) is as it was."""
    full = str(root / path)
    assert not os.path.lexists(full)
    after = snapshot(root, outside)
    meta = str(root / ".walstore")
    keep = {k: v for k, v in before.items() if k != full and not k.startswith(meta)}
    assert {k: v for k, v in after.items() if not k.startswith(meta)} == keep


def _params(ops: list[str]) -> list[Any]:
    return [pytest.param(case, op, id=f"{case}-{op}") for case in CASES for op in ops]


def tmp_target(path: str) -> str | None:
    """The file a '/tmp' case would reach, if it escaped."""
    if path.startswith("out/walstore-test-"):
        return os.path.join("/tmp", path.removeprefix("out/"))
    return None


@pytest.mark.asyncio
@pytest.mark.parametrize(("case", "op"), _params(["store.write", "store.read", "store.delete"]))
async def test_disk_hostile_path_refused_by_store(
    store: walstore.Store, root: Path, outside: Path, case: str, op: str
) -> None:
    path = setup_case(case, root, outside)
    escaped = tmp_target(path)
    before = snapshot(root, outside)
    if op == "store.delete" and os.path.islink(root / path):
        await store.delete(path)  # a symlink is a plain entry: the link goes, never its target
        assert_link_removed(root, outside, path, before)
        return
    try:
        with pytest.raises(InvalidPathError) as info:
            if op == "store.write":
                await store.write(path, b"data")
            elif op == "store.read":
                await store.read(path)
            else:
                await store.delete(path)
        assert isinstance(info.value, ValueError)
        assert snapshot(root, outside) == before
        assert escaped is None or not os.path.lexists(escaped)
    finally:
        if escaped is not None and os.path.lexists(escaped):
            os.unlink(escaped)
    assert await store.read("existing.txt") == b"existing"
    await store.write("after.txt", b"the store is still usable")


@pytest.mark.asyncio
@pytest.mark.parametrize(("case", "op"), _params(["tx.write", "tx.write_big", "tx.delete"]))
async def test_disk_hostile_path_refused_by_transaction(
    store: walstore.Store, root: Path, outside: Path, case: str, op: str
) -> None:
    """Refused at the call or at commit; either way the valid writes of the same
    transaction are not applied either."""
    path = setup_case(case, root, outside)
    escaped = tmp_target(path)
    before = snapshot(root, outside)
    if op == "tx.delete" and os.path.islink(root / path):
        async with store.transaction() as tx:
            await tx.delete(path)
        assert_link_removed(root, outside, path, before)
        return
    try:
        with pytest.raises(InvalidPathError) as info:
            async with store.transaction() as tx:
                await tx.write("valid.txt", b"valid")
                await tx.write("big-valid.bin", b"V" * 4096)
                await tx.delete("existing.txt")
                await TX_OPS[op](tx, path)
        assert isinstance(info.value, ValueError)
        assert tx.state is TxState.ROLLED_BACK
        assert snapshot(root, outside) == before
        assert escaped is None or not os.path.lexists(escaped)
    finally:
        if escaped is not None and os.path.lexists(escaped):
            os.unlink(escaped)
    assert await store.read("existing.txt") == b"existing"
    await store.write("after.txt", b"the store is still usable")


@pytest.mark.asyncio
@pytest.mark.parametrize(("case", "op"), _params(["tx.read"]))
async def test_disk_hostile_path_refused_by_tx_read(
    store: walstore.Store, root: Path, outside: Path, case: str, op: str
) -> None:
    path = setup_case(case, root, outside)
    before = snapshot(root, outside)
    with pytest.raises(InvalidPathError):
        async with store.transaction() as tx:
            await tx.read(path)
    assert snapshot(root, outside) == before


@pytest.mark.asyncio
async def test_symlink_final_component_inside_root_is_not_written_through(
    store: walstore.Store, root: Path, outside: Path
) -> None:
    """Writing over a symlink (even one pointing inside the root) is refused at commit; the
    link and its target stay as they were."""
    os.symlink("existing.txt", root / "alias")
    before = snapshot(root, outside)
    with pytest.raises(InvalidPathError):
        await store.write("alias", b"new")
    with pytest.raises(InvalidPathError):
        async with store.transaction() as tx:
            await tx.write("valid.txt", b"valid")
            await tx.write("alias", b"new")
    assert snapshot(root, outside) == before
    with pytest.raises(InvalidPathError, match="symlink"):  # never followed, not even inside
        await store.read("alias")
    assert (await store.stat("alias")).kind == "symlink"  # reported as what it is


@pytest.mark.asyncio
async def test_symlink_dir_inside_root_is_not_written_through(
    store: walstore.Store, root: Path, outside: Path
) -> None:
    os.symlink("d", root / "dalias")
    before = snapshot(root, outside)
    with pytest.raises(InvalidPathError):
        await store.write("dalias/new.txt", b"new")
    assert snapshot(root, outside) == before
    with pytest.raises(InvalidPathError, match="symlink"):
        await store.read("dalias/in.txt")
    assert await store.read("d/in.txt") == b"in"


@pytest.mark.asyncio
async def test_read_through_symlink_to_outside_does_not_leak(
    store: walstore.Store, root: Path, outside: Path
) -> None:
    os.symlink(outside, root / "out")
    os.symlink(outside / "secret.txt", root / "link")
    for path in ("out/secret.txt", "link"):
        with pytest.raises(InvalidPathError):
            await store.read(path)
        with pytest.raises(InvalidPathError):
            await store.read_text(path)
    for path in ("out/secret.txt",):
        with pytest.raises(InvalidPathError):
            await store.stat(path)
    for path in ("out", "link"):  # the links themselves, not what they point to
        st = await store.stat(path)
        assert st is not None and st.kind == "symlink" and st.size == len(os.readlink(root / path))
    with pytest.raises(InvalidPathError):
        await store.list("out")


# -- a file and a directory at the same path -------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "writes",
    [["a", "a/b"], ["a/b", "a"], ["x/a", "x/a/b/c"], ["x/a/b/c", "x/a"]],
    ids=["a then a/b", "a/b then a", "deep file then under it", "deep then its ancestor"],
)
async def test_transaction_writing_a_file_and_under_it_is_refused(
    store: walstore.Store, root: Path, outside: Path, writes: list[str]
) -> None:
    before = snapshot(root, outside)
    with pytest.raises(InvalidPathError):
        async with store.transaction() as tx:
            await tx.write("valid.txt", b"valid")
            for p in writes:
                await tx.write(p, b"data")
    assert tx.state is TxState.ROLLED_BACK
    assert snapshot(root, outside) == before


@pytest.mark.asyncio
async def test_writing_an_existing_directory_is_refused(
    store: walstore.Store, root: Path, outside: Path
) -> None:
    before = snapshot(root, outside)
    with pytest.raises(InvalidPathError):
        await store.write("d", b"data")
    with pytest.raises(InvalidPathError):
        await store.write_json("d", {})
    with pytest.raises(InvalidPathError):
        async with store.transaction() as tx:
            await tx.write("valid.txt", b"valid")
            await tx.write("d", b"data")
    with pytest.raises(InvalidPathError):
        async with store.transaction() as tx:
            await tx.write("valid.txt", b"valid")
            await tx.delete("d")
    assert snapshot(root, outside) == before


# -- path types ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pure_posix_paths_work(store: walstore.Store, root: Path) -> None:
    P = PurePosixPath
    await store.write(P("pp/a.bin"), b"a")
    await store.write_text(P("pp/b.txt"), "b")
    await store.write_json(P("pp/c.json"), [1])
    assert await store.read(P("pp/a.bin")) == b"a"
    assert await store.read_text(P("pp/b.txt")) == "b"
    assert await store.read_json(P("pp") / "c.json") == [1]
    assert await store.exists(P("pp/a.bin"))
    assert await store.list(P("pp")) == ["a.bin", "b.txt", "c.json"]
    assert (await store.stat(P("pp/a.bin"))).size == 1
    async with store.transaction() as tx:
        await tx.write(P("pp/d.bin"), b"d")
        assert await tx.read(P("pp/d.bin")) == b"d"
        assert await tx.read("pp/d.bin") == b"d"  # the same key as the str form
        await tx.delete(P("pp/a.bin"))
        assert not await tx.exists("pp/a.bin")
        assert await tx.list(P("pp")) == ["b.txt", "c.json", "d.bin"]
    await store.delete(P("pp/b.txt"))
    assert sorted(os.listdir(root / "pp")) == ["c.json", "d.bin"]
    assert (root / "pp" / "d.bin").read_bytes() == b"d"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "path",
    [PurePosixPath("/etc/passwd"), PurePosixPath("../x"), PurePosixPath(".walstore/LOCK")],
    ids=str,
)
async def test_pure_posix_paths_are_checked_too(
    store: walstore.Store, root: Path, path: PurePosixPath
) -> None:
    before = snapshot(root)
    with pytest.raises(InvalidPathError):
        await store.write(path, b"x")
    with pytest.raises(InvalidPathError):
        await store.read(path)
    assert snapshot(root) == before


# -- names the file system cannot hold ---------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "path",
    ["x" * 300, "y" * 300 + "/z", "d/" + "z" * 256, "/".join(["abc"] * 1500)],
    ids=["long name", "long dir name", "long name in existing dir", "long path"],
)
async def test_overlong_names_are_refused_before_the_commit_point(
    store: walstore.Store, root: Path, path: str
) -> None:
    before = snapshot(root)
    with pytest.raises(InvalidPathError):  # at the call (tests/unit/test_limits.py)
        async with store.transaction() as tx:
            await tx.write("valid.txt", b"valid")
            await tx.write(path, b"data")
    assert tx.state is TxState.ROLLED_BACK
    assert snapshot(root) == before
    await store.write("after.txt", b"the store is still usable")
    assert (root / "after.txt").read_bytes() == b"the store is still usable"
