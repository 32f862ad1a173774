"""examples/conversations.py: a turn rewrites the directory whole; crashed at every
file-system call, the conversation is the old version or the new one, with its query."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import walstore
from tests.examples.conftest import load_example
from walstore.pytest_plugin import crash_check

conv = load_example("conversations")
QUERY = "What is walstore?\n"


async def version(store: walstore.Store) -> int:
    """The number of turns; asserts the directory is exactly one version and has its query."""
    base = "conversations/c1"
    assert await store.read_text(f"{base}/{conv.QUERY}") == QUERY, "query lost"
    events = (await store.read_json(f"{base}/events.json"))["events"]
    expected = {conv.QUERY, *conv.render(events)}
    found = set()
    for top in await store.list(base):
        sub = f"{base}/{top}"
        if (await store.stat(sub)).kind == "dir":
            found |= {f"{top}/{n}" for n in await store.list(sub)}
        else:
            found.add(top)
    assert found == expected, f"mixed versions: {sorted(found ^ expected)}"
    for rel, content in conv.render(events).items():
        if isinstance(content, str):
            assert await store.read_text(f"{base}/{rel}") == content, rel
        else:
            assert await store.read_json(f"{base}/{rel}") == content, rel
    return len(events)


def test_main_writes_ten_turns(tmp_path: Path) -> None:
    anyio.run(conv.main, str(tmp_path / "c"))

    async def check() -> None:
        async with walstore.open(tmp_path / "c") as store:
            assert await version(store) == 10

    anyio.run(check)


@pytest.mark.guarantee(name="Your app's own invariants")
@pytest.mark.anyio
async def test_a_turn_crashed_at_every_call_is_old_or_new() -> None:
    async def setup(store: walstore.Store) -> None:
        await conv.start(store, "c1", QUERY)
        for t in range(2):
            await store.atomic(conv.add_turn, "c1", "user", f"turn {t}")

    async def workload(store: walstore.Store) -> None:
        await store.atomic(conv.add_turn, "c1", "assistant", "a long answer " * 50)

    async def invariant(store: walstore.Store) -> None:
        assert await version(store) in (2, 3)

    report = await crash_check(workload, invariant, setup=setup, inline_threshold=256)
    print(report)
    assert report.points > 20
