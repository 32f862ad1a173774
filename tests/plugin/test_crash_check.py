"""crash_check called directly (anyio's plugin runs each test on asyncio and on trio)."""

from __future__ import annotations

import anyio
import pytest

import walstore
from walstore.pytest_plugin import crash_check

pytestmark = [pytest.mark.anyio, pytest.mark.guarantee(name="Your app's own invariants")]


async def test_concurrent_tasks_crashed_together() -> None:
    """Four tasks commit at once (commit groups); a crash kills them all mid-flight."""

    async def setup(store: walstore.Store) -> None:
        await store.write_json("count.json", 0)

    async def bump(tx: walstore.Transaction, i: int) -> None:
        await tx.write_json("count.json", await tx.read_json("count.json") + 1)
        await tx.write_json(f"ledger/{i}.json", {"i": i})

    async def workload(store: walstore.Store) -> None:
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(store.atomic, bump, i)

    async def invariant(store: walstore.Store) -> None:
        count = await store.read_json("count.json")
        ledger = await store.list("ledger") if await store.exists("ledger") else []
        assert count == len(ledger), f"count {count} but {len(ledger)} ledger entries"

    report = await crash_check(workload, invariant, setup=setup)
    print(report)
    assert report.ok and report.points > 30
    assert report.cases == 2 * report.points + 1


async def test_an_error_of_the_workload_itself_is_not_taken_for_a_crash() -> None:
    async def workload(store: walstore.Store) -> None:
        await store.write("a", b"1")
        raise KeyError("app bug")

    async def invariant(store: walstore.Store) -> None:
        pass

    with pytest.raises(KeyError, match="app bug"):
        await crash_check(workload, invariant)


async def test_invariant_errors_other_than_assertions_are_reported() -> None:
    async def workload(store: walstore.Store) -> None:
        await store.write_json("a.json", {"v": 1})

    async def invariant(store: walstore.Store) -> None:
        await store.read_json("a.json")  # FileNotFoundError when the crash came first

    report = await crash_check(workload, invariant, raise_on_failure=False, power_loss=False)
    assert report.failures and report.cases == report.points + 1
    assert all("FileNotFoundError" in f.error for f in report.failures)
    assert all(f.index >= 0 for f in report.failures)  # the run without a crash wrote it
    assert report.failures[0].index == 0  # nothing at all happened before the first call
