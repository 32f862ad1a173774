"""examples/trio_app.py: a nursery of workers drains a job queue; every job done exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

import walstore
from tests.examples.conftest import load_example

trio_app = load_example("trio_app")


def test_every_job_claimed_exactly_once(tmp_path: Path) -> None:
    claimed = trio.run(lambda: trio_app.main(str(tmp_path / "q"), jobs=80, workers=8))
    assert sorted(claimed) == list(range(80))
    root = tmp_path / "q"
    assert not list((root / "inbox").iterdir())
    assert len(list((root / "done").iterdir())) == 80
    results = [json.loads(p.read_text()) for p in (root / "results").iterdir()]
    assert sorted(r["n"] for r in results) == list(range(80))
    assert all(r["square"] == r["n"] ** 2 for r in results)
    assert len({r["by"] for r in results}) > 1  # the work was shared


def test_a_read_made_stale_by_a_commit_is_a_conflict(tmp_path: Path) -> None:
    async def go() -> None:
        async with walstore.open(tmp_path / "s") as store:
            await store.write_json("inbox/1.json", {"n": 1})
            async with store.transaction() as tx:
                await tx.read_json("inbox/1.json")  # read: the job is there
                await store.delete("inbox/1.json")  # another transaction takes it, commits
                with pytest.raises(walstore.ConflictError):
                    await tx.move("inbox/1.json", "done/1.json")
                await tx.rollback()

    trio.run(go)
