"""What the installed distribution ships for users: type information and the pytest plugin."""

from __future__ import annotations

import importlib.metadata
from importlib import resources


def test_py_typed_is_in_the_package() -> None:
    assert (resources.files("walstore") / "py.typed").is_file()


def test_the_pytest_plugin_is_registered_by_entry_point() -> None:
    plugins = importlib.metadata.entry_points(group="pytest11")
    assert [ep.value for ep in plugins if ep.name == "walstore"] == ["walstore.pytest_plugin"]
