"""TxOps: a transaction's buffered ops, one per path in order of last touch, and the indexes
that keep each op O(its depth) (``Transaction`` is built on it). On the event loop.
"""

from __future__ import annotations

from collections.abc import Callable

from . import _journal_format as fmt
from ._engine import Move, PendingReplace, TxOp
from ._paths import parents


class _Missing:
    """A path the transaction's own ops say does not exist."""


MISSING = _Missing()


_FileOp = fmt.Put | fmt.PutStaged | Move


class TxOps:
    """The ops and their indexes; what they say about a path (``_lookup``)."""

    def __init__(self) -> None:
        self._ops: dict[str, TxOp] = {}  # path -> last op on it, in order of last touch
        # Indexes of _ops, so that each op costs O(its depth), not O(the transaction's ops)
        # (every op scanning them all made a large transaction quadratic):
        self._seq: dict[str, int] = {}  # path -> when its op was last set
        self._tick = 0
        # Made on first need (a transaction that only writes never needs them), then kept:
        self._indexed = False
        self._below: dict[str, set[str]] = {}  # directory -> paths of ops strictly below it
        self._makes: dict[str, int] = {}  # directory -> ops below it that are not deletes

    def _put(self, op: TxOp) -> None:
        """Record ``op`` as the last on its path (``Transaction._set`` checks the state)."""
        path = op.path
        if path in self._ops:
            self._unset(path)
        self._ops[path] = op
        self._tick += 1
        self._seq[path] = self._tick
        if self._indexed:
            self._index(path, op)

    def _index(self, path: str, op: TxOp) -> None:
        makes = not isinstance(op, fmt.Delete | fmt.DeleteDir)
        below, counts = self._below, self._makes
        for a in parents(path):
            below.setdefault(a, set()).add(path)
            if makes:
                counts[a] = counts.get(a, 0) + 1

    def _build_index(self) -> None:
        """``_below`` and ``_makes``, the first time an op needs them: once, in the ops'
        number; kept up to date by ``_set`` and ``_unset`` from then on."""
        if not self._indexed:
            self._indexed = True
            for path, op in self._ops.items():
                self._index(path, op)

    def _unset(self, path: str) -> None:
        op = self._ops.pop(path, None)
        if op is None:
            return
        del self._seq[path]
        if not self._indexed:
            return
        makes = not isinstance(op, fmt.Delete | fmt.DeleteDir)
        for a in parents(path):
            under = self._below[a]
            under.discard(path)
            if not under:
                del self._below[a]
            if makes:
                self._makes[a] -= 1
                if not self._makes[a]:
                    del self._makes[a]

    def _drop_below(self, path: str) -> None:
        self._build_index()
        for k in list(self._below.get(path, ())):
            self._unset(k)

    def _lookup(self, p: str) -> TxOp | _Missing | tuple[PendingReplace, str] | None:
        """What the transaction's ops say about file ``p``: an op on it, MISSING, (a
        replace_dir above it, the path relative to it), or None (ask the disk)."""
        ops, seq = self._ops, self._seq
        if not ops:
            return None
        # The newest op at p or above it decides: a dict lookup for p and each ancestor.
        k, newest = p, seq.get(p, -1)
        for a in parents(p):
            at = seq.get(a, -1)
            if at > newest:
                k, newest = a, at
        if newest < 0:
            return None
        op = ops[k]
        if k == p:
            if isinstance(op, fmt.Delete | fmt.DeleteDir):
                return MISSING
            return op
        if isinstance(op, fmt.DeleteDir):
            return MISSING
        if isinstance(op, PendingReplace):
            return op, p[len(k) + 1 :]
        return MISSING  # an ancestor is a file this transaction writes

    def _keeps(self, op: PendingReplace, rel: str) -> bool:
        return op.keep is not None and _kept_by(op.keep, rel)


def _kept_by(keep: frozenset[str] | Callable[[str], bool], rel: str) -> bool:
    top = rel.split("/")[0]
    return keep(top) if callable(keep) else top in keep


def _retarget(op: fmt.Put | fmt.PutStaged | Move, path: str) -> TxOp:
    if isinstance(op, fmt.Put):
        return fmt.Put(path, op.data)
    if isinstance(op, fmt.PutStaged):
        return fmt.PutStaged(path, op.staged, op.size, op.crc)
    return Move(path, op.src)
