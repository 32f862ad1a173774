"""TxView: what a transaction sees: its own ops first (``TxOps``), else the store's files,
each read remembered with the LSN visible then (``Footprint.reads``, ``listed``,
``subtrees``). On the event loop; the store's reads go through its ``TxLink``.
"""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING

from . import _journal_format as fmt
from ._conflicts import listing_key
from ._engine import Move, PendingReplace
from ._errors import ConflictError
from ._tx_ops import MISSING, TxOps, _FileOp

if TYPE_CHECKING:
    from ._contention import Claim
    from ._footprint import TxLink
    from ._group_commit import PendingWrite


class TxView(TxOps):
    """Reads through the transaction's ops to the store (``Transaction`` sets the state)."""

    txid: int
    _link: TxLink
    _claim: Claim
    _reads: dict[str, int]
    _listed: dict[str, int]
    _subtrees: dict[str, int]
    _deps: dict[str, PendingWrite]

    def _missing(self, exc: OSError) -> Exception:
        """What to raise when the store lacks what an op needs: ConflictError if something
        this transaction read has changed since it read it (its view is stale, and a retry
        in ``Store.atomic`` may well succeed), else ``exc`` itself."""
        conflict = self._link.stale(self._reads, self._listed)
        if conflict is not None:
            err = ConflictError(
                f"txid={self.txid}: {exc.filename!r}: {exc.strerror}, after another commit "
                f"changed what this transaction had read ({conflict.what})",
                paths=(conflict.key,),
                lsn=conflict.lsn,
            )
            err.__cause__ = exc
            return err
        return exc

    async def _note(self, reads: dict[str, int], path: str, key: str) -> None:
        """Remember a read of ``path`` (under lock key ``key``), after waiting for its turn
        if it is hot. Cancellation: propagates; nothing is remembered."""
        if path in reads or path in self._deps:
            return
        await self._link.admit(self._claim, key)
        if reads is self._reads:
            pending = self._link.pending_write(self._claim, path)
            if pending is not None:
                self._deps[path] = pending
                return
        reads.setdefault(path, self._link.visible_lsn)

    async def _content(self, p: str) -> bytes:
        found = self._lookup(p)
        if isinstance(found, fmt.Put):
            return found.data
        if isinstance(found, fmt.PutStaged):
            return await self._link.read_staged(found.staged)
        if isinstance(found, Move):
            await self._note(self._reads, found.src, found.src)
            return await self._read_disk(found.src)
        if isinstance(found, tuple):
            replace, rel = found
            for e in replace.entries:
                if e.path == rel:
                    return (
                        e.data if isinstance(e, fmt.Put) else await self._link.read_staged(e.staged)
                    )
            if not self._keeps(replace, rel):
                raise FileNotFoundError(2, "No such file or directory", p)
            await self._note(self._subtrees, replace.path, listing_key(replace.path))
            return await self._read_disk(p)
        if found is not None:
            raise FileNotFoundError(2, "No such file or directory", p)
        await self._note(self._reads, p, p)
        return await self._read_disk(p)

    async def _read_disk(self, p: str) -> bytes:
        dep = self._deps.get(p)
        if dep is not None:  # the value a transaction queued ahead of this one writes
            if isinstance(dep.op, fmt.Put):
                return dep.op.data
            raise FileNotFoundError(2, "No such file or directory", p)
        try:
            return await self._link.read(p)
        except FileNotFoundError as exc:
            err = self._missing(exc)
            if err is exc:
                raise
            raise err from exc

    async def _seen_kind(self, p: str) -> str | None:
        """ "file", "dir" or None as this transaction sees ``p``."""
        # Something this transaction puts below p, or a directory it replaces at p: a dir.
        self._build_index()
        if p in self._makes or isinstance(self._ops.get(p), PendingReplace):
            return "dir"
        found = self._lookup(p)
        if isinstance(found, _FileOp):
            return "file"
        if found is MISSING:
            return None
        if isinstance(found, tuple):
            replace, rel = found
            if any(e.path == rel for e in replace.entries):
                return "file"
            if any(e.path.startswith(rel + "/") for e in replace.entries):
                return "dir"
            if not self._keeps(replace, rel):
                return None
            await self._note(self._subtrees, replace.path, listing_key(replace.path))
        else:
            await self._note(self._reads, p, p)
            dep = self._deps.get(p)
            if dep is not None:
                return "file" if isinstance(dep.op, fmt.Put) else None
        st = await self._link.lstat(p)
        if st is None:
            return None
        return "dir" if st.kind == "dir" else "file"

    async def _disk_names(self, p: str) -> builtins.list[str]:
        try:
            return await self._link.listdir(p)
        except (FileNotFoundError, NotADirectoryError):
            return []
