"""A conversation directory, rewritten whole on every turn.

Each conversation is a directory: ``QUERY_MESSAGE.md`` (written once by the user, not managed
by the rewrite), and ``events.json``, ``meta.json`` and ``messages/<turn>.md`` regenerated
from the event list on every turn. ``tx.replace_dir(..., keep=["QUERY_MESSAGE.md"])`` swaps
the directory in one step: readers and crash recovery see exactly the old version or the new
one, never a mix, never the directory missing, and ``QUERY_MESSAGE.md`` is carried over.

Run it from a clone of walstore, after ``pip install -e .``:
``python examples/conversations.py /tmp/conversations``.
"""

from __future__ import annotations

import sys
from typing import Any

import anyio

import walstore

QUERY = "QUERY_MESSAGE.md"


def render(events: list[dict[str, Any]]) -> dict[str, str | dict[str, Any]]:
    """The managed files of a conversation, from its events."""
    files: dict[str, str | dict[str, Any]] = {
        "events.json": {"events": events},
        "meta.json": {"turns": len(events), "last": events[-1]["role"] if events else None},
    }
    for i, e in enumerate(events):
        files[f"messages/{i:04d}.md"] = f"**{e['role']}**: {e['text']}\n"
    return files


async def start(store: walstore.Store, cid: str, query: str) -> None:
    async with store.transaction() as tx:
        await _rewrite(tx, cid, [], query=query)


async def _rewrite(
    tx: walstore.Transaction, cid: str, events: list[dict[str, Any]], query: str | None = None
) -> None:
    # keep= carries QUERY_MESSAGE.md over as the store holds it when the transaction commits
    # (not as this transaction wrote it): a new conversation writes its query in the new tree.
    async with tx.replace_dir(f"conversations/{cid}", keep=[QUERY]) as d:
        if query is not None:
            await d.write_text(QUERY, query)
        for rel, content in render(events).items():
            if isinstance(content, str):
                await d.write_text(rel, content)
            else:
                await d.write_json(rel, content)


async def add_turn(tx: walstore.Transaction, cid: str, role: str, text: str) -> int:
    """Append one event and regenerate the whole directory; returns the number of turns."""
    events: list[dict[str, Any]] = (await tx.read_json(f"conversations/{cid}/events.json"))[
        "events"
    ]
    events.append({"role": role, "text": text})
    await _rewrite(tx, cid, events)
    return len(events)


async def main(root: str, turns: int = 10) -> None:
    async with walstore.open(root) as store:
        await start(store, "c1", "What is walstore?\n")
        for t in range(turns):
            role = "assistant" if t % 2 else "user"
            n = await store.atomic(add_turn, "c1", role, f"turn {t}")
        print(f"conversations/c1: {n} turns in {await store.list('conversations/c1/messages')}")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else "conversations-data")
