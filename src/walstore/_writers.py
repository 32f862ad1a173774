"""The async stream writers ``OsFileSystem.open_writer`` hands out (``AsyncWriter``): on
asyncio through aiofiles, elsewhere (trio) through anyio's worker threads. Each call is one
worker-thread hop; they run on the event loop.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

import anyio

from ._fs import byte_view

if TYPE_CHECKING:
    from ._os_fs import OsFileSystem


class AiofilesWriter:
    """Streams through aiofiles, one worker-thread hop per call."""

    def __init__(self, f: Any, fs: OsFileSystem) -> None:
        self._f = f
        self._fs = fs

    async def write(self, data: bytes | memoryview) -> None:
        self._fs.calls["stream_write"] += 1
        view = byte_view(data)
        while view:  # a raw (unbuffered) file may write short
            n = await self._f.write(view)
            view = view[n:]

    async def sync(self) -> None:
        self._fs.calls["fsync"] += 1
        await anyio.to_thread.run_sync(os.fsync, self._f.fileno())

    async def aclose(self) -> None:
        self._fs.calls["close"] += 1
        await self._f.close()


def on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class ThreadWriter:
    """The same as AiofilesWriter, through anyio worker threads (for trio)."""

    def __init__(self, fd: int, fs: OsFileSystem) -> None:
        self._fd = fd
        self._fs = fs

    async def write(self, data: bytes | memoryview) -> None:
        self._fs.calls["stream_write"] += 1

        def run() -> None:
            view = byte_view(data)
            while view:
                view = view[os.write(self._fd, view) :]

        await anyio.to_thread.run_sync(run)

    async def sync(self) -> None:
        self._fs.calls["fsync"] += 1
        await anyio.to_thread.run_sync(os.fsync, self._fd)

    async def aclose(self) -> None:
        self._fs.calls["close"] += 1
        await anyio.to_thread.run_sync(os.close, self._fd)
