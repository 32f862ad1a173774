"""A second process that swaps a directory of a store with a symlink to a directory outside
it, as fast as it can, until told to stop (tests/escapes).

Each swap is one renameat2(RENAME_EXCHANGE) of the two names, so at every instant the path
is either the real directory or the symlink. Swaps come in batches of an even number: between
batches, and when the process stops, the path is the directory again.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import multiprocessing.synchronize
import os
from types import TracebackType
from typing import Any

BATCH = 16  # even: the directory is back in place after each batch


def swap_loop(a: str, b: str, count: Any, stop: Any, ready: Any) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.renameat2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    here, there = os.fsencode(a), os.fsencode(b)
    ready.set()
    n = 0
    while not stop.is_set():
        for _ in range(BATCH):
            if fn(-100, here, -100, there, 2):
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code), a)
        n += BATCH
        count.value = n


class Swapper:
    """``with Swapper(dir, link):`` runs ``swap_loop`` in another process; ``swaps`` says how
    many it made so far."""

    def __init__(self, a: str, b: str) -> None:
        ctx = mp.get_context("spawn")
        self._count = ctx.Value("q", 0, lock=False)
        self._stop: multiprocessing.synchronize.Event = ctx.Event()
        self._ready: multiprocessing.synchronize.Event = ctx.Event()
        self._proc = ctx.Process(
            target=swap_loop, args=(a, b, self._count, self._stop, self._ready), daemon=True
        )

    @property
    def swaps(self) -> int:
        return int(self._count.value)

    def __enter__(self) -> Swapper:
        self._proc.start()
        if not self._ready.wait(60):
            raise RuntimeError("the swapper process did not start")
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._proc.join(60)
        if self._proc.exitcode != 0:
            raise RuntimeError(f"the swapper process failed (exit code {self._proc.exitcode})")
