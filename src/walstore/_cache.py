"""ReadCache: small files' contents kept on the event-loop side, so reads skip the thread hop.

A thread hop costs tens of microseconds (benchmarks/RESULTS.md), an in-memory lookup under
one. The store knows every change made through it: the committer updates the cache after each group
is applied, on the event-loop thread, in one synchronous step, so a reader sees either none or
all of a group. Changes of other processes that share the store are dropped from it when this
one catches up on them, or wholesale when a read finds it behind (``Store._see_others``).
Only the event-loop thread touches it.

A value read from disk in a worker thread may be older than a group applied while the read was
in flight; ``generation`` counts updates so that such a value is never inserted (the caller
takes ``generation`` before the hop and passes it to ``insert``).
"""

from __future__ import annotations

from collections import OrderedDict

from ._paths import PathTree


class ReadCache:
    """LRU of file contents by store path, bounded by total bytes."""

    def __init__(self, max_bytes: int, max_file: int) -> None:
        self.max_bytes = max_bytes
        self.max_file = min(max_file, max_bytes)
        self.generation = 0
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._at = PathTree()  # where _data's paths lie: a dropped tree costs what it holds
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, path: str) -> bytes | None:
        data = self._data.get(path)
        if data is None:
            self.misses += 1
            return None
        self._data.move_to_end(path)
        self.hits += 1
        return data

    def insert(self, path: str, data: bytes, generation: int) -> None:
        """Cache ``data`` read from disk when ``generation`` was current, if it still is."""
        if generation == self.generation:
            self._put(path, data)

    def _put(self, path: str, data: bytes) -> None:
        if len(data) > self.max_file:
            self._drop(path)
            return
        old = self._data.pop(path, None)
        if old is None:
            self._at.add(path)
        else:
            self._bytes -= len(old)
        self._data[path] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            evicted, old = self._data.popitem(last=False)
            self._at.discard(evicted, self._data)
            self._bytes -= len(old)

    def _drop(self, path: str) -> None:
        old = self._data.pop(path, None)
        if old is not None:
            self._at.discard(path, self._data)
            self._bytes -= len(old)

    # -- updates by the committer, after a group is applied -------------------------------

    def written(self, path: str, data: bytes) -> None:
        self.generation += 1
        self._put(path, data)

    def dropped(self, path: str) -> None:
        self.generation += 1
        self._drop(path)

    def dropped_tree(self, path: str) -> None:
        """Forget ``path`` and everything under it (a directory deleted or replaced)."""
        self.generation += 1
        for k in [path, *self._at.under(path)]:
            self._drop(k)

    def clear(self) -> None:
        self.generation += 1
        self._data.clear()
        self._at.clear()
        self._bytes = 0
