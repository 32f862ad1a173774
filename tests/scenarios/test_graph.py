"""The graph-editing server's scenario: registries, per-item JSON files and composed views
written in one transaction; an application error inside the block comes out unchanged and
nothing on disk changes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import walstore


class NotFound(Exception):
    """The app's own HTTP-404-like error."""

    status = 404


def snapshot(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def yaml_of(graph: dict[str, Any]) -> str:
    lines = ["nodes:"] + [f"  - {n}" for n in graph["nodes"]]
    lines += ["relations:"] + [f"  - {a} -> {b}" for a, b in graph["relations"]]
    return "\n".join(lines) + "\n"


async def save_graph(tx: walstore.Transaction, gid: str, graph: dict[str, Any]) -> None:
    base = f"graphs/{gid}"
    await tx.write_json(f"{base}/registry/nodes.json", sorted(graph["nodes"]))
    await tx.write_json(f"{base}/registry/relations.json", graph["relations"])
    await tx.write_json(f"{base}/registry/attributes.json", graph["attributes"])
    for n in graph["nodes"]:
        await tx.write_json(f"{base}/nodes/{n}.json", {"id": n, **graph["attributes"].get(n, {})})
    for i, (a, b) in enumerate(graph["relations"]):
        await tx.write_json(f"{base}/relations/{i}.json", {"from": a, "to": b})
    await tx.write_json(f"{base}/composed.json", graph)
    await tx.write_text(f"{base}/composed.yaml", yaml_of(graph))


GRAPH = {
    "nodes": ["a", "b", "c"],
    "relations": [["a", "b"], ["b", "c"]],
    "attributes": {"a": {"color": "red"}},
}


@pytest.mark.asyncio
async def test_graph_saved_in_one_transaction(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "s") as store:
        async with store.transaction() as tx:
            await save_graph(tx, "g1", GRAPH)
        assert await store.read_json("graphs/g1/composed.json") == GRAPH
        assert await store.list("graphs/g1/nodes") == ["a.json", "b.json", "c.json"]
        text = (tmp_path / "s/graphs/g1/composed.yaml").read_text()
        assert "  - a -> b" in text


@pytest.mark.asyncio
async def test_app_error_inside_the_block_comes_out_unchanged_and_changes_nothing(
    tmp_path: Path,
) -> None:
    async with walstore.open(tmp_path / "s", inline_threshold=64) as store:
        async with store.transaction() as tx:
            await save_graph(tx, "g1", GRAPH)
        before = snapshot(tmp_path / "s")
        error = NotFound("node z does not exist")
        with pytest.raises(NotFound) as info:
            async with store.transaction() as tx:
                bigger = {**GRAPH, "nodes": [*GRAPH["nodes"], "d"], "blob": "x" * 500}
                await save_graph(tx, "g1", bigger)  # some values staged (over 64 bytes)
                await tx.delete("graphs/g1/relations/0.json")
                await tx.move("graphs/g1/composed.yaml", "graphs/g1/old.yaml")
                async with tx.replace_dir("graphs/g1/nodes") as d:
                    await d.write_json("z.json", {})
                raise error
        assert info.value is error  # the same object, not wrapped
        assert info.value.__cause__ is None and info.value.__context__ is None
        assert tx.state is walstore.TxState.ROLLED_BACK
        assert snapshot(tmp_path / "s") == before  # staging included: nothing left
        assert json.loads((tmp_path / "s/graphs/g1/composed.json").read_text()) == GRAPH
