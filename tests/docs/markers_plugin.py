"""A pytest plugin for tests/docs/test_guarantees_marked.py, loaded with ``-p`` into a
``--collect-only`` run: when collection is over it writes each collected test's ``guarantee``
markers, as JSON, to the file named by ``WALSTORE_GUARANTEES_OUT``. Nothing runs."""

from __future__ import annotations

import json
import os

import pytest


def pytest_collection_finish(session: pytest.Session) -> None:
    out = os.environ.get("WALSTORE_GUARANTEES_OUT")
    if not out:
        return
    found = {
        item.nodeid: [{"args": list(m.args), "kwargs": m.kwargs} for m in marks]
        for item in session.items
        if (marks := list(item.iter_markers("guarantee")))
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(found, f)
