"""Stable counts behind the speed: syscalls and thread hops on the commit path."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import walstore
from walstore import OsFileSystem


class RecordingFs(OsFileSystem):
    """The real file system, remembering the path of every fsync."""

    def __init__(self) -> None:
        super().__init__()
        self.fds: dict[int, str] = {}
        self.synced: list[str] = []

    def open(self, path: str, *, create: bool = False, truncate: bool = False) -> int:
        fd = super().open(path, create=create, truncate=truncate)
        self.fds[fd] = path
        return fd

    def rename(self, src: str, dst: str) -> None:
        super().rename(src, dst)
        self.fds = {fd: dst if p == src else p for fd, p in self.fds.items()}

    def fsync(self, fd: int) -> None:
        self.synced.append(self.fds[fd])
        super().fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self.synced.append(self.fds[fd])
        super().fdatasync(fd)

    def fsync_dir(self, path: str) -> None:
        self.synced.append(path + "/")
        super().fsync_dir(path)


@pytest.mark.guarantee(name="One fdatasync per commit group")
@pytest.mark.asyncio
async def test_one_small_transaction_costs_one_journal_fdatasync(tmp_path: Path) -> None:
    fs = RecordingFs()
    async with walstore.open(tmp_path / "s", fs=fs) as store:
        await store.write("warm.json", b"{}")  # the first commit after open, out of the way
        before = fs.calls.copy()
        fs.synced.clear()
        hops = store.stats().thread_hops
        async with store.transaction() as tx:
            await tx.write("users/1.json", b'{"n": 1}')
            await tx.write("users/2.json", b'{"n": 2}')
            await tx.write_text("notes/a.md", "hi")
        delta = fs.calls - before
        assert delta["fdatasync"] == 1
        assert delta["fsync"] == 0 and delta["fsync_dir"] == 0
        assert len(fs.synced) == 1 and fs.synced[0].endswith(".wal")
        assert store.stats().thread_hops - hops == 1  # the whole commit: one worker call
        assert (tmp_path / "s" / "users" / "2.json").read_bytes() == b'{"n": 2}'


@pytest.mark.guarantee(name="One fdatasync per commit group")
@pytest.mark.asyncio
async def test_staged_value_is_synced_when_staged_not_at_commit(tmp_path: Path) -> None:
    fs = RecordingFs()
    async with walstore.open(tmp_path / "s", fs=fs, inline_threshold=16) as store:
        fs.synced.clear()  # opening a new store synced its layout
        async with store.transaction() as tx:
            await tx.write("big.bin", b"x" * 100)
            staged = list(fs.synced)
            fs.synced.clear()
        assert len(staged) == 1 and "/staging/" in staged[0]
        # Commit: the staging directories (names of staged files), then the journal.
        assert [p.endswith("/") for p in fs.synced] == [True, True, False]
        assert fs.synced[-1].endswith(".wal")


@pytest.mark.guarantee(name="One fdatasync per commit group")
def test_concurrent_commits_share_journal_syncs(tmp_path: Path) -> None:
    """64 tasks committing at once: far fewer journal fdatasyncs than commits."""

    async def main() -> walstore.StoreStats:
        async with walstore.open(tmp_path / "s") as store:
            async with anyio.create_task_group() as tg:
                for i in range(64):
                    tg.start_soon(store.write, f"f/{i}.json", b"{}")
            return store.stats()

    stats = anyio.run(main)
    assert stats.commits == 64
    assert stats.journal_syncs == stats.groups
    assert stats.groups <= 8, stats
    assert sorted(p.name for p in (tmp_path / "s" / "f").iterdir()) == sorted(
        f"{i}.json" for i in range(64)
    )


@pytest.mark.asyncio
async def test_open_of_a_clean_store_does_not_scan_the_tree(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "s") as store, store.transaction() as tx:
        for i in range(50):
            await tx.write(f"d{i % 5}/f{i}", b"x")
    fs = OsFileSystem()
    async with walstore.open(tmp_path / "s", fs=fs) as store:
        assert store.recovery.clean
        # journal/ and staging/, and procs/ (the slots of the processes that have it open)
        # when joining and when closing; never the user's tree
        assert fs.calls["listdir"] == 4


@pytest.mark.asyncio
async def test_commits_overwrite_a_preallocated_segment(tmp_path: Path) -> None:
    """The live segment is zero-filled ahead, so a commit's fdatasync does not change the
    file's size (no metadata to commit), and a clean reopen appends in place."""
    journal = tmp_path / "s" / ".walstore" / "journal"
    async with walstore.open(tmp_path / "s", checkpoint_bytes=1 << 20) as store:
        await store.write("first", b"1")
        [segment] = list(journal.iterdir())
        size = segment.stat().st_size
        assert size == (1 << 20) * 2  # zeros up to about where the next checkpoint starts
        for i in range(100):
            await store.write(f"f{i}.json", b"x" * 1000)
        assert segment.stat().st_size == size
        assert [p.name for p in journal.iterdir()] == [segment.name]
    async with walstore.open(tmp_path / "s", checkpoint_bytes=1 << 20) as store:
        assert store.recovery.clean
        assert len(await store.list()) == 101


async def _calls_of_one_commit(root: Path, exclusive: bool) -> dict[str, int]:
    fs = OsFileSystem()
    async with walstore.open(root, fs=fs, exclusive=exclusive) as store:
        await store.write("users/0.json", b"{}")  # the first commit after open, out of the way
        before = fs.calls.copy()
        async with store.transaction() as tx:
            await tx.write("users/1.json", b'{"n": 1}')
        return dict(fs.calls - before)


@pytest.mark.asyncio
async def test_what_sharing_the_store_adds_to_a_commit(tmp_path: Path) -> None:
    """Beside no other process, a shared store's commit adds to the exclusive one's calls:
    taking and releasing GATE and LOCK through handles kept open (no open or close of
    them), one read of the journal's tail (catch-up) and one write of the shared header."""
    exclusive = await _calls_of_one_commit(tmp_path / "x", exclusive=True)
    shared = await _calls_of_one_commit(tmp_path / "s", exclusive=False)
    added = {k: shared.get(k, 0) - exclusive.get(k, 0) for k in shared.keys() | exclusive.keys()}
    assert {k: n for k, n in added.items() if n} == {
        "flock": 2,  # GATE, then LOCK
        "funlock": 2,
        "pread": 1,
        "pwrite": 1,
    }
    assert exclusive["fdatasync"] == shared["fdatasync"] == 1
