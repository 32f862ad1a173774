"""PathSet and PathTree (src/walstore/_paths.py): the same answers as a plain set scanned by
prefix, and memory of one entry per path and per directory on the way, however deep."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from walstore._paths import PathDict, PathSet, PathTree, parents

NAMES = st.sampled_from(["a", "b", "ab"])
PATHS = st.lists(NAMES, min_size=1, max_size=4).map("/".join)
STEPS = st.lists(st.tuples(st.sampled_from(["add", "discard", "under"]), PATHS), max_size=60)


def entries(tree: PathTree) -> int:
    return sum(len(below) for below in tree._kids.values())


@settings(max_examples=300, deadline=None)
@given(STEPS)
def test_a_path_set_is_a_set_that_drops_below_a_directory(steps: list[tuple[str, str]]) -> None:
    paths, model = PathSet(), set()
    kinds, kinds_model = PathDict(), {}
    for step, path in steps:
        if step == "add":
            paths.add(path)
            model.add(path)
            kinds[path] = "file"
            kinds_model[path] = "file"
        elif step == "discard":
            paths.discard(path)
            model.discard(path)
        else:
            paths.discard_under(path)
            model = {p for p in model if not p.startswith(path + "/")}
            kinds.drop_under(path)
            kinds_model = {p: k for p, k in kinds_model.items() if not p.startswith(path + "/")}
        assert set(paths) == model and len(paths) == len(model)
        assert dict(kinds) == kinds_model
        for d in {"a", "b", "a/b", "ab/a"}:
            assert set(paths._tree.under(d)) & model == {p for p in model if p.startswith(d + "/")}
        # Listed: the members and the directories on their way, nothing left over.
        assert entries(paths._tree) == len(model | {a for p in model for a in parents(p)})
    paths.clear()
    assert entries(paths._tree) == 0 and not paths


def test_a_deep_path_costs_one_entry_per_directory() -> None:
    """The index that was reverted kept each path under every ancestor: a 2,000-level path
    and its directories were 2M entries. Here they are one each."""
    deep = "/".join(["d"] * 2000)
    paths = PathSet([deep, *parents(deep)])
    assert entries(paths._tree) == 2000
    paths.discard_under("d")
    assert list(paths) == ["d"] and entries(paths._tree) == 1
    paths.discard("d")
    assert entries(paths._tree) == 0
