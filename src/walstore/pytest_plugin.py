"""walstore's pytest plugin, registered under the ``pytest11`` entry point when walstore is
installed: nothing to add to ``conftest.py``.

Fixtures (async ones run by anyio's pytest plugin: mark the test ``@pytest.mark.anyio``; it
runs on asyncio, or on trio too if you parametrize ``anyio_backend``):

* ``walstore_store``: an open ``walstore.Store`` in ``tmp_path / "store"``, closed after the test.
* ``walstore_crash_check``: the ``crash_check`` function below, for tests that prefer a
  fixture to an import.

``crash_check(workload, invariant)`` runs an async workload under a crash at every
file-system call it makes, reopens the store after each and checks the invariant; it raises
AssertionError naming every crash point whose state broke it. Example::

    import pytest
    from walstore.pytest_plugin import crash_check

    @pytest.mark.anyio
    async def test_transfer_conserves_money():
        async def setup(store):
            await store.write_json("a.json", 100)
            await store.write_json("b.json", 0)

        async def workload(store):
            async with store.transaction() as tx:
                await tx.write_json("a.json", await tx.read_json("a.json") - 10)
                await tx.write_json("b.json", await tx.read_json("b.json") + 10)

        async def invariant(store):
            assert await store.read_json("a.json") + await store.read_json("b.json") == 100

        report = await crash_check(workload, invariant, setup=setup)
        assert report.points > 0
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from ._crashcheck import CrashFailure, CrashReport, crash_check
from ._open import open as open_store
from ._store import Store

__all__ = ["CrashFailure", "CrashReport", "crash_check", "walstore_crash_check", "walstore_store"]


@pytest.fixture
async def walstore_store(tmp_path: Path) -> AsyncIterator[Store]:
    """An open store in ``tmp_path / "store"`` (default options), closed after the test.
    Needs an async test run by anyio's plugin (``@pytest.mark.anyio``)."""
    async with open_store(tmp_path / "store") as store:
        yield store


@pytest.fixture
def walstore_crash_check() -> Callable[..., Any]:
    """``walstore.pytest_plugin.crash_check``, as a fixture."""
    return crash_check
