"""A directory swapped 1,000 times is never missing: not to a thread polling the real file
system, not to a task polling the store (Linux, renameat2 RENAME_EXCHANGE)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import anyio
import pytest

import walstore
from walstore import OsFileSystem

pytestmark = pytest.mark.guarantee(name="Directories whole")


def test_swapped_directory_is_never_missing(tmp_path: Path) -> None:
    fs = OsFileSystem()
    try:
        os.mkdir(tmp_path / "a")
        os.mkdir(tmp_path / "b")
        fs.exchange(str(tmp_path / "a"), str(tmp_path / "b"))
    except OSError as exc:
        pytest.skip(f"renameat2(RENAME_EXCHANGE) unavailable here: {exc}")
    root = tmp_path / "s"
    conv = root / "conversations" / "c1"
    done = threading.Event()
    polls = {"thread": 0, "task": 0}
    missing = {"thread": 0, "task": 0}

    def poll_files() -> None:
        while not done.is_set():
            polls["thread"] += 1
            if not os.path.exists(conv / "meta.json"):
                missing["thread"] += 1

    async def main() -> None:
        async with walstore.open(root, durability=walstore.Durability.OFF) as store:
            async with store.transaction() as tx:
                async with tx.replace_dir("conversations/c1") as d:
                    await d.write_json("meta.json", {"v": 0})
            thread = threading.Thread(target=poll_files)
            thread.start()
            try:
                async with anyio.create_task_group() as tg:

                    async def poll_store() -> None:
                        while not done.is_set():
                            polls["task"] += 1
                            if not await store.exists("conversations/c1/meta.json"):
                                missing["task"] += 1

                    tg.start_soon(poll_store)
                    for v in range(1, 1001):
                        async with store.transaction() as tx:
                            async with tx.replace_dir("conversations/c1") as d:
                                await d.write_json("meta.json", {"v": v})
                                await d.write_text("notes.md", f"v{v}")
                    done.set()
            finally:
                done.set()
                thread.join()
            assert await store.read_json("conversations/c1/meta.json") == {"v": 1000}

    anyio.run(main)
    assert polls["thread"] > 100 and polls["task"] > 100, polls
    assert missing == {"thread": 0, "task": 0}
