"""Fixtures of the unit tests: a store's root under ``tmp_path``, and a store open there with
a small ``inline_threshold`` (``api_support.THRESHOLD``), so that ``BIG`` values are staged.
A test file that needs another store defines its own fixture of the same name."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

import walstore
from tests.unit.api_support import THRESHOLD


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest_asyncio.fixture
async def store(root: Path) -> AsyncIterator[walstore.Store]:
    async with walstore.open(root, inline_threshold=THRESHOLD) as s:
        yield s
