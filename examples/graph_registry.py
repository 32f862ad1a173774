"""A graph registry: each graph is a directory of per-item JSON files and composed views,
listed in one index, ``registry.json``; the index and the directories change together.

Saving a graph replaces its directory whole (nodes removed from the graph lose their files)
and updates its index entry in the same transaction; deleting removes both. After any crash
the index names exactly the graph directories that exist, with their current sizes.

Run it from a clone of walstore, after ``pip install -e .``:
``python examples/graph_registry.py /tmp/graphs``.
"""

from __future__ import annotations

import sys
from typing import Any

import anyio

import walstore

INDEX = "registry.json"

Graph = dict[str, Any]  # {"nodes": [...], "relations": [[a, b], ...], "attributes": {...}}


async def _index(tx: walstore.Transaction) -> dict[str, Any]:
    index: dict[str, Any] = await tx.read_json(INDEX) if await tx.exists(INDEX) else {}
    return index


def yaml_of(graph: Graph) -> str:
    lines = ["nodes:"] + [f"  - {n}" for n in graph["nodes"]]
    lines += ["relations:"] + [f"  - {a} -> {b}" for a, b in graph["relations"]]
    return "\n".join(lines) + "\n"


async def save_graph(tx: walstore.Transaction, gid: str, graph: Graph) -> None:
    unknown = {n for rel in graph["relations"] for n in rel} - set(graph["nodes"])
    if unknown:  # an app error inside the transaction: nothing is written
        raise ValueError(f"relations name unknown nodes {sorted(unknown)}")
    async with tx.replace_dir(f"graphs/{gid}") as d:
        for n in graph["nodes"]:
            await d.write_json(f"nodes/{n}.json", {"id": n, **graph["attributes"].get(n, {})})
        for i, (a, b) in enumerate(graph["relations"]):
            await d.write_json(f"relations/{i}.json", {"from": a, "to": b})
        await d.write_json("composed.json", graph)
        await d.write_text("composed.yaml", yaml_of(graph))
    index = await _index(tx)
    index[gid] = {"nodes": len(graph["nodes"]), "relations": len(graph["relations"])}
    await tx.write_json(INDEX, index)


async def delete_graph(tx: walstore.Transaction, gid: str) -> None:
    index = await _index(tx)
    if gid not in index:
        raise KeyError(gid)
    del index[gid]
    await tx.delete_dir(f"graphs/{gid}")
    await tx.write_json(INDEX, index)


async def check_registry(store: walstore.Store) -> None:
    """The invariant: the index names exactly the graph directories, with their sizes."""
    index = await store.read_json(INDEX) if await store.exists(INDEX) else {}
    dirs = await store.list("graphs") if await store.exists("graphs") else []
    assert sorted(index) == dirs, f"index {sorted(index)} but directories {dirs}"
    for gid, entry in index.items():
        graph = await store.read_json(f"graphs/{gid}/composed.json")
        nodes = await store.list(f"graphs/{gid}/nodes") if graph["nodes"] else []
        assert entry == {"nodes": len(nodes), "relations": len(graph["relations"])}, gid
        assert sorted(nodes) == sorted(f"{n}.json" for n in graph["nodes"]), gid


async def main(root: str) -> None:
    async with walstore.open(root) as store:
        g: Graph = {"nodes": ["a", "b", "c"], "relations": [["a", "b"]], "attributes": {}}
        await store.atomic(save_graph, "g1", g)
        await store.atomic(save_graph, "g2", {**g, "relations": [["b", "c"], ["a", "c"]]})
        await store.atomic(save_graph, "g1", {**g, "nodes": ["a", "b"]})  # c's file goes
        await store.atomic(delete_graph, "g2")
        await check_registry(store)
        print(f"{INDEX}: {await store.read_json(INDEX)}")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else "graphs-data")
