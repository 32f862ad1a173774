"""walstore's pytest plugin as a user meets it: installed through the ``pytest11`` entry point
(nothing in conftest.py), run by pytester on a user's test file."""

from __future__ import annotations

import re

import pytest

BANK = """
import pytest
from walstore.pytest_plugin import crash_check


async def setup(store):
    await store.write_json("bank/a.json", {"balance": 100})
    await store.write_json("bank/b.json", {"balance": 0})


async def money(store):
    a = (await store.read_json("bank/a.json"))["balance"]
    b = (await store.read_json("bank/b.json"))["balance"]
    assert a + b == 100, f"money not conserved: a={a} b={b}"
"""

GOOD = (
    BANK
    + """

async def transfer(store):
    for amount in (10, 20):
        async with store.transaction() as tx:
            a = await tx.read_json("bank/a.json")
            b = await tx.read_json("bank/b.json")
            await tx.write_json("bank/a.json", {"balance": a["balance"] - amount})
            await tx.write_json("bank/b.json", {"balance": b["balance"] + amount})


@pytest.mark.anyio
async def test_transfer_conserves_money():
    report = await crash_check(transfer, money, setup=setup)
    print(report)
    assert report.ok
"""
)

BROKEN = (
    BANK
    + """

async def transfer(store):  # two transactions: a crash between them loses the money
    a = await store.read_json("bank/a.json")
    await store.write_json("bank/a.json", {"balance": a["balance"] - 10})
    b = await store.read_json("bank/b.json")
    await store.write_json("bank/b.json", {"balance": b["balance"] + 10})


@pytest.mark.anyio
async def test_transfer_conserves_money():
    await crash_check(transfer, money, setup=setup)


@pytest.mark.anyio
async def test_report_without_raising(walstore_crash_check):
    report = await walstore_crash_check(transfer, money, setup=setup, raise_on_failure=False)
    indexes = sorted({f.index for f in report.failures})
    # Broken only between the two commits: never before the first call, never when the
    # workload ran to its end, and in one contiguous stretch of calls.
    assert indexes and 0 not in indexes and -1 not in indexes
    assert indexes == list(range(indexes[0], indexes[-1] + 1))
    assert all("money not conserved: a=90 b=0" in f.error for f in report.failures)
    print(report)
"""
)

# anyio's plugin runs each ``@pytest.mark.anyio`` test on every backend installed: asyncio and
# trio here, so each inner test runs twice.


@pytest.fixture(autouse=True)
def _quiet_ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")


SUMMARY = re.compile(r"walstore crash check: (\d+) crash points, (\d+) cases checked, (\d+) broke")


@pytest.mark.guarantee(name="Your app's own invariants")
def test_good_workload_passes_and_counts_the_crash_points(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_bank=GOOD)
    result = pytester.runpytest("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    found = SUMMARY.findall(result.stdout.str())
    assert len(found) == 2, result.stdout.str()
    assert found[0] == found[1]  # the same file-system calls on asyncio and on trio
    points, cases, broke = map(int, found[0])
    assert points > 20  # two commits and the close's checkpoint: many calls
    assert cases == 2 * points + 1  # crash, crash + power cut, and the run without a crash
    assert broke == 0


@pytest.mark.guarantee(name="Your app's own invariants")
def test_broken_workload_reports_the_failing_crash_points(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_bank=BROKEN)
    result = pytester.runpytest("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=2)
    out = result.stdout.str()
    found = SUMMARY.search(out)
    assert found, out
    points, _cases, broke = map(int, found.groups())
    assert 0 < broke < points
    # each failing point is named: call index, call name, path, and the assertion
    line = re.search(r"crash at call (\d+) (\w+)\(([^)]*)\).*: money not conserved: a=90 b=0", out)
    assert line, out
    assert line.group(3).startswith(".walstore/"), line.group(0)  # relative to the store root
    result.stdout.fnmatch_lines(["*AssertionError: walstore crash check:*broke the invariant*"])


def test_store_fixture_on_asyncio_and_trio_beside_pytest_asyncio(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_store="""
import pytest
import pytest_asyncio
import walstore

@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param

@pytest.mark.anyio
async def test_store(walstore_store, tmp_path):
    assert isinstance(walstore_store, walstore.Store)
    async with walstore_store.transaction() as tx:
        await tx.write_json("users/42.json", {"name": "Ada"})
    assert (tmp_path / "store" / "users" / "42.json").exists()
    assert await walstore_store.read_json("users/42.json") == {"name": "Ada"}

@pytest_asyncio.fixture
async def other():
    yield 1

@pytest.mark.asyncio
async def test_a_pytest_asyncio_test_is_unaffected(other):
    assert other == 1
"""
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_the_store_fixture_is_closed_after_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_closed="""
import pytest
import walstore

kept = []

@pytest.mark.anyio
async def test_one(walstore_store):
    kept.append(walstore_store)
    await walstore_store.write("a", b"1")

def test_two():
    assert len(kept) == 2  # asyncio and trio
    for store in kept:
        with pytest.raises(walstore.StoreClosedError):
            store.transaction()
"""
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
