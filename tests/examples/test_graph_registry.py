"""examples/graph_registry.py: the index and the graph directories change together."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

import walstore
from tests.examples.conftest import load_example
from walstore.pytest_plugin import crash_check

reg = load_example("graph_registry")
G = {"nodes": ["a", "b", "c"], "relations": [["a", "b"]], "attributes": {"a": {"color": "red"}}}


def snapshot(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def test_main(tmp_path: Path) -> None:
    anyio.run(reg.main, str(tmp_path / "g"))
    assert sorted(os.listdir(tmp_path / "g/graphs/g1/nodes")) == ["a.json", "b.json"]
    assert not (tmp_path / "g/graphs/g2").exists()


@pytest.mark.anyio
async def test_a_refused_save_changes_nothing(tmp_path: Path) -> None:
    async with walstore.open(tmp_path / "g") as store:
        await store.atomic(reg.save_graph, "g1", G)
        before = snapshot(tmp_path / "g")
        with pytest.raises(ValueError, match="unknown nodes"):
            await store.atomic(reg.save_graph, "g1", {**G, "relations": [["a", "zed"]]})
        with pytest.raises(KeyError):
            await store.atomic(reg.delete_graph, "g9")
        assert snapshot(tmp_path / "g") == before
        await reg.check_registry(store)


@pytest.mark.guarantee(name="Your app's own invariants")
@pytest.mark.anyio
async def test_save_and_delete_crashed_at_every_call_keep_the_index_true() -> None:
    async def setup(store: walstore.Store) -> None:
        await store.atomic(reg.save_graph, "g1", G)
        await store.atomic(reg.save_graph, "g2", G)

    async def workload(store: walstore.Store) -> None:
        await store.atomic(reg.save_graph, "g1", {**G, "nodes": ["a", "b"], "relations": []})
        await store.atomic(reg.delete_graph, "g2")

    report = await crash_check(workload, reg.check_registry, setup=setup)
    print(report)
    assert report.points > 30
