"""What a transaction hands out for writing: ``StreamWriter`` (a large value streamed into
staging) and ``DirWriter`` (the new content of a directory, ``replace_dir``), and the value
conversions they share with it. On the event loop.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from . import _journal_format as fmt
from ._errors import InvalidPathError, TransactionClosedError
from ._fs import AsyncWriter, byte_view
from ._paths import check_path, parents

if TYPE_CHECKING:
    from ._transaction import Transaction

Path = str | os.PathLike[str]


def to_bytes(data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"data must be bytes, bytearray or memoryview, not {type(data).__name__}")


def encode_json(obj: Any, indent: int | None) -> bytes:
    """Serialise before anything is recorded, so an unserialisable value changes nothing."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode()


STREAM_CHUNK = 1 << 20  # open_write buffers this much per worker-thread hop


class StreamWriter:
    """A large value being streamed into staging (see ``Transaction.open_write``)."""

    def __init__(self, path: str, name: str, handle: AsyncWriter, sync: bool) -> None:
        self._path = path
        self._name = name
        self._handle = handle
        self._sync = sync
        self._buf = bytearray()
        self._size = 0
        self._crc = 0
        self._closed = False

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; a worker-thread hop happens once at least 1 MiB is buffered.
        Cancellation: propagates; the value will not be recorded."""
        if self._closed:
            raise TransactionClosedError("the streamed value is already closed")
        view = byte_view(
            to_bytes(data) if not isinstance(data, bytes | bytearray | memoryview) else data
        )
        self._size += len(view)  # bytes (nbytes), whatever the view's item size
        if not self._buf and len(view) >= STREAM_CHUNK:
            await self._write(view)  # big enough for a hop of its own: no copy
            return
        self._buf += view
        if len(self._buf) >= STREAM_CHUNK:
            await self._flush()

    async def _flush(self) -> None:
        if self._buf:
            chunk = bytes(self._buf)
            self._buf.clear()
            await self._write(memoryview(chunk))

    async def _write(self, chunk: memoryview) -> None:
        self._crc = zlib.crc32(chunk, self._crc)
        await self._handle.write(chunk)

    @asynccontextmanager
    async def _closing(self) -> AsyncIterator[None]:
        """Around the user's block: on a clean exit flush and (FULL) fsync; the handle is
        closed whatever happens, shielded from cancellation."""
        try:
            yield
            self._closed = True
            await self._flush()
            if self._sync:
                await self._handle.sync()
        finally:
            self._closed = True
            with anyio.CancelScope(shield=True):
                await self._handle.aclose()

    def _op(self) -> fmt.PutStaged:
        return fmt.PutStaged(self._path, self._name, self._size, self._crc)


class DirWriter:
    """The new contents of a directory being replaced (see ``Transaction.replace_dir``).
    Paths are relative to that directory."""

    def __init__(self, tx: Transaction, path: str) -> None:
        self._tx = tx
        self.path = path
        self._entries: dict[str, fmt.Put | fmt.PutStaged] = {}
        self._dirs: set[str] = set()  # directories the entries are in

    def _rel(self, path: Path) -> str:
        rel = check_path(path)
        self._tx._path(f"{self.path}/{rel}")  # the limits, on the path it is applied at
        if rel in self._dirs:
            other = next(e for e in self._entries if e.startswith(rel + "/"))
            raise InvalidPathError(f"{rel!r} and {other!r}: one is inside the other")
        for a in parents(rel):
            if a in self._entries:
                raise InvalidPathError(f"{rel!r} and {a!r}: one is inside the other")
        return rel

    def _add(self, rel: str, op: fmt.Put | fmt.PutStaged) -> None:
        self._entries[rel] = op
        self._dirs.update(parents(rel))

    async def write(self, path: Path, data: bytes | bytearray | memoryview) -> None:
        """Put ``data`` at ``path`` inside the new directory. Cancellation: not recorded."""
        self._tx._check_active()
        rel = self._rel(path)
        self._add(rel, await self._tx._value_op(rel, to_bytes(data)))

    async def write_text(self, path: Path, text: str, encoding: str = "utf-8") -> None:
        """``write`` of encoded text. Cancellation: not recorded."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        await self.write(path, text.encode(encoding))

    async def write_json(self, path: Path, obj: Any, *, indent: int | None = 2) -> None:
        """``write`` of JSON. Cancellation: not recorded."""
        await self.write(path, encode_json(obj, indent))

    @asynccontextmanager
    async def open_write(self, path: Path) -> AsyncIterator[StreamWriter]:
        """Stream a large file into the new directory (as ``Transaction.open_write``)."""
        self._tx._check_active()
        rel = self._rel(path)
        writer = await self._tx._open_stream(rel)
        async with writer._closing():
            yield writer
        op = writer._op()
        assert isinstance(op, fmt.PutStaged)
        self._add(rel, op)
