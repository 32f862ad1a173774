"""StoreReads: the reads a Store makes for itself and for its transactions, and its read
cache (``_cache.py``), which serves small files with no worker-thread hop.

On the event loop; each read that misses the cache hops to a worker thread (``_run``).
"""

from __future__ import annotations

import os

import anyio
import anyio.lowlevel

from ._fs import FileStat
from ._store_base import StoreBase


class StoreReads(StoreBase):
    """Reads of files, directories and staged values, and what other processes changed."""

    def _see_others(self) -> None:
        """Before a read, with other processes: their commits since this one last looked
        are visible on disk, so reads from here on are tagged with the header's applied
        LSN; the read cache may hold files they changed, so it is dropped. One pread."""
        engine = self._engine
        if engine.exclusive or self._readonly:
            return
        applied = engine.peers.shared_applied()
        if applied <= self._shared_seen:
            return
        self._shared_seen = applied
        if applied > engine.last_lsn and self._cache is not None:
            self._cache.clear()
        self._visible_lsn = max(self._visible_lsn, applied)

    async def _read_staged(self, name: str) -> bytes:
        return await self._run(
            self._engine.fs.read_file, os.path.join(self._engine.staging_dir, name)
        )

    async def _read_raw(self, path: str) -> bytes:
        self._check_open()
        cache = self._cache
        if cache is None or self._engine.partial:
            self._see_others()
            return await self._run(self._engine.read, path)
        self._see_others()
        hit = cache.get(path)
        if hit is not None:
            committing = self._committing
            if committing is None:
                await anyio.lowlevel.checkpoint()  # still a checkpoint, as every await here is
                return hit
            # A group is being committed in a worker thread, which needs the GIL at every
            # step. Readers served from memory in a loop would hold it: each of the thread's
            # syscalls would then wait out the 5 ms switch interval, and commits would crawl
            # (benchmarks/RESULTS.md: the visibility test with polling readers). So a hit
            # waits for that group, once, and reads what it left: as fresh, and the loop is
            # idle while the thread runs.
            await committing.wait()
            hit = cache.get(path)
            if hit is not None:
                return hit
        generation = cache.generation
        data, cacheable = await self._run(self._engine.read_cacheable, path)
        if cacheable:
            cache.insert(path, data, generation)
        return data

    async def _lstat_raw(self, path: str) -> FileStat | None:
        self._check_open()
        self._see_others()
        return await self._run(self._engine.lstat, path)

    async def _check_parents(self, path: str) -> None:
        self._check_open()
        await self._run(self._engine.check_parents, path)

    async def _list_raw(self, path: str) -> list[str]:
        self._check_open()
        self._see_others()
        return await self._run(self._engine.listdir, path)
