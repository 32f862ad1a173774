"""Every test in this directory runs on asyncio and on trio (anyio's pytest plugin), under a
hang guard: a concurrency bug here tends to show as a task waiting forever, and the guard
turns that into a failure. It is never waited out when the code is right."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest

HANG_GUARD = 120.0  # seconds for one test


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _guarded(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def run(*args: Any, **kwargs: Any) -> Any:
        with anyio.fail_after(HANG_GUARD):
            return await fn(*args, **kwargs)

    return run


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Iterator[None]:
    """Run the async test (through anyio's hook, which calls ``pyfuncitem.obj``) inside
    ``fail_after(HANG_GUARD)``."""
    original = pyfuncitem.obj
    if pyfuncitem.get_closest_marker("anyio") is not None:
        pyfuncitem.obj = _guarded(original)
    try:
        return (yield)
    finally:
        pyfuncitem.obj = original
