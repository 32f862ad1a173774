"""``walstore backup``: a consistent online snapshot that restores by opening it as a store,
taken while another process commits; ``--keep`` prunes only what it wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import walstore
from walstore import _backup

from .helpers import (
    WRITER,
    child_env,
    crashed_store,
    run_cli,
    run_in_process,
    tree_state,
    user_files,
)
from .writer import ACCOUNTS, START

Cap = pytest.CaptureFixture[str]


async def _recovered_files(root: Path) -> tuple[Any, dict[str, bytes]]:
    async with walstore.open(root, create=False) as store:
        report = store.recovery
    return report, user_files(root)


def test_backup_restores_to_the_recovered_state(tmp_path: Path, capsys: Cap) -> None:
    store = crashed_store(tmp_path / "s")
    before = tree_state(store)
    r = run_in_process(capsys, "backup", str(store), str(tmp_path / "b"), "--json")
    assert r.code == 0, r.err
    d = r.json()
    assert tree_state(store) == before  # the backup only read the store
    assert d["transactions"] == 4 and d["attempts"] == 1 and d["copied"] == 0
    assert d["linked"] == len(user_files(store)) + 4  # the files and the 4 staged values
    backup = Path(d["path"])
    assert backup.parent == tmp_path / "b" and _backup.NAME_RE.fullmatch(backup.name)
    assert not (backup / ".walstore" / "LOCK").exists()

    report, restored = anyio.run(_recovered_files, backup)
    assert report.rolled_forward == (2, 3, 4, 5)  # replayed over the linked files
    _, original = anyio.run(_recovered_files, store)
    assert restored == original
    # Restoring renamed new inodes into the backup: the live store's files kept their bytes.
    assert user_files(store) == original


def test_backup_copy_makes_independent_files(tmp_path: Path, capsys: Cap) -> None:
    store = crashed_store(tmp_path / "s")
    d = run_in_process(capsys, "backup", str(store), str(tmp_path / "b"), "--copy", "--json")
    doc = d.json()
    assert doc["linked"] == 0 and doc["copied"] > 0 and doc["copied_bytes"] > 3000
    backup = Path(doc["path"])
    for rel in user_files(store):
        assert not os.path.samefile(store / rel, backup / rel)
    _, restored = anyio.run(_recovered_files, backup)
    _, original = anyio.run(_recovered_files, store)
    assert restored == original


def test_backup_across_file_systems_copies(tmp_path: Path, capsys: Cap) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system to back up to")
    store = crashed_store(tmp_path / "s")
    dest = shm / f"walstore-cli-test-{os.getpid()}"
    try:
        doc = run_in_process(capsys, "backup", str(store), str(dest), "--json").json()
        assert doc["linked"] == 0 and doc["copied"] == len(user_files(store)) + 4
        _, restored = anyio.run(_recovered_files, Path(doc["path"]))
        _, original = anyio.run(_recovered_files, store)
        assert restored == original
    finally:
        subprocess.run(["rm", "-rf", str(dest)], check=True)


def test_keep_prunes_our_oldest_backups_and_nothing_else(tmp_path: Path, capsys: Cap) -> None:
    store = crashed_store(tmp_path / "s")
    dest = tmp_path / "b"
    dest.mkdir()
    foreign = {
        "notes.txt": "file",
        "walstore-backup-notes.txt": "file",
        "walstore-backup-00001-20200101T000000Z": "dir",  # not our width
        "walstore-backup-000001-2020-01-01": "dir",  # not our time format
        "2020-01-01T00:00:00": "dir",
        ".walstore-backup-000001-20200101T000000Z.partial": "dir",  # an interrupted one
    }
    for name, kind in foreign.items():
        (dest / name).mkdir() if kind == "dir" else (dest / name).write_text("x")
    # One of ours, with a timestamp far in the future: order is by sequence, not by date.
    ours_old = "walstore-backup-000002-99991231T235959Z"
    (dest / ours_old).mkdir()

    made = []
    for _ in range(4):
        r = run_in_process(capsys, "backup", str(store), str(dest), "--keep", "2", "--json")
        assert r.code == 0, r.err
        made.append(r.json()["name"])
    seqs = [m.group(1) for n in made if (m := _backup.NAME_RE.fullmatch(n))]
    assert seqs == ["000003", "000004", "000005", "000006"]
    assert sorted(os.listdir(dest)) == sorted([*foreign, *made[-2:]])
    fifth = run_in_process(capsys, "backup", str(store), str(dest), "--keep", "1", "--json")
    assert fifth.json()["pruned"] == made[-2:]
    assert sorted(os.listdir(dest)) == sorted([*foreign, fifth.json()["name"]])
    human = run_in_process(capsys, "backup", str(store), str(dest), "--keep", "1")
    assert f"--keep 1: pruned 1 older backup(s): {fifth.json()['name']}" in human.out
    assert len(os.listdir(dest)) == len(foreign) + 1


# -- online: another process commits all along ---------------------------------------------------


class Bank:
    """The ``bank`` workload in a child process; collects its acknowledgements."""

    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, WRITER, "bank", str(root)],
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "READY\n"
        self.acked: set[int] = set()
        self._lock = threading.Lock()
        self._more = threading.Condition(self._lock)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("ACK "):
                with self._more:
                    self.acked.add(int(line.split()[1]))
                    self._more.notify_all()

    def snapshot(self) -> set[int]:
        with self._lock:
            return set(self.acked)

    def wait_for(self, n: int) -> None:
        with self._more:
            ok = self._more.wait_for(
                lambda: len(self.acked) >= n or self.proc.poll() is not None, 60
            )
        assert ok and self.proc.poll() is None, "the workload stopped"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


async def _check_backup(root: Path) -> tuple[list[int], set[int], int]:
    """Open a backup; return the balances, the ledger entries, and the conversation version
    (asserting the conversation is whole)."""
    async with walstore.open(root, create=False) as store:
        balances = [(await store.read_json(f"bank/{i}.json"))["balance"] for i in range(ACCOUNTS)]
        names = await store.list("ledger") if await store.exists("ledger") else []
        ledger = {int(n.split(".")[0]) for n in names}
        expect = [START] * ACCOUNTS
        for n in ledger:
            e = await store.read_json(f"ledger/{n}.json")
            expect[e["src"]] -= e["amount"]
            expect[e["dst"]] += e["amount"]
        assert balances == expect, "balances disagree with the ledger: a half-applied transfer"
        events = await store.read_json("conv/c1/events.json")
        meta = await store.read_json("conv/c1/meta.json")
        assert events["version"] == meta["version"], "the conversation is mixed"
        assert sorted(await store.list("conv/c1")) == ["events.json", "meta.json"]
    return balances, ledger, meta["version"]


def test_online_backup_while_another_process_commits(tmp_path: Path) -> None:
    store = tmp_path / "s"
    dest = tmp_path / "b"
    bank = Bank(store)
    results = []
    verified: list[dict[str, Any]] = []
    try:
        for i in range(5):
            bank.wait_for(25 * (i + 1))
            acked = bank.snapshot()  # acknowledged before this backup starts
            r = run_cli("backup", str(store), str(dest), "--keep", "3", "--json")
            assert r.code == 0, r.out + r.err
            results.append((r.json(), acked))
            # verify reads the busy store too: commits in flight are not problems
            v = run_cli("verify", str(store), "--json")
            assert v.code == 0, v.out + v.err
            verified.append(v.json())
        assert bank.proc.poll() is None  # it committed all along
    finally:
        bank.stop()
    assert len(os.listdir(dest)) == 3  # --keep 3, applied after each backup
    checked = 0
    versions = []
    for doc, acked in results:
        assert doc["in_use_by"] == bank.proc.pid
        if doc["name"] not in os.listdir(dest):
            continue  # pruned
        balances, ledger, version = anyio.run(_check_backup, Path(doc["path"]))
        assert sum(balances) == START * ACCOUNTS
        assert acked <= ledger, f"{len(acked - ledger)} acknowledged transfers missing"
        versions.append(version)
        checked += 1
    assert checked == 3
    assert versions == sorted(versions)  # later backups are later states
    assert all(v["in_use_by"] == bank.proc.pid for v in verified)
    assert sum(v["paths_checked"] for v in verified) > 0  # (zero right after a checkpoint)
    print(f"backup attempts: {[d['attempts'] for d, _ in results]}")
    print(f"verify: {[(v['paths_checked'], v['notes']) for v in verified]}")


# -- the protocol's two races, forced -----------------------------------------------------------


@pytest.mark.asyncio
async def test_backup_retries_after_a_checkpoint_and_links_values_staged_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint during the walk makes the attempt start over; a transaction that stages
    and commits after the walk is in the backup through its staged value, linked after the
    journal was copied."""
    root = tmp_path / "s"
    real_walk = _backup._copy_tree
    walks = 0

    async with walstore.open(root, inline_threshold=64) as store:
        await store.write_json("a.json", {"v": 0})

        async def during_first() -> None:
            await store.write_json("a.json", {"v": 1})
            await store.checkpoint()

        async def after_second() -> None:
            await store.write("late.bin", b"L" * 1000)  # staged: above inline_threshold

        def walk(src: str, dst: str, rel: str, *args: Any) -> None:
            nonlocal walks
            if rel == "":
                walks += 1
                if walks == 1:
                    anyio.from_thread.run(during_first)
            real_walk(src, dst, rel, *args)
            if rel == "" and walks == 2:
                anyio.from_thread.run(after_second)

        monkeypatch.setattr(_backup, "_copy_tree", walk)
        result = await anyio.to_thread.run_sync(
            lambda: _backup.backup(str(root), str(tmp_path / "b"))
        )
        assert result.attempts == 2 and walks == 2
        assert result.in_use_by == os.getpid()
        assert result.transactions == 1  # late.bin, committed after the walk
    backup = Path(result.path)
    assert not (backup / "late.bin").exists()  # the walk missed it...
    async with walstore.open(backup, create=False) as restored:
        assert await restored.read("late.bin") == b"L" * 1000  # ...the replay did not
        assert await restored.read_json("a.json") == {"v": 1}
