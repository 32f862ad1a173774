"""ConflictIndex: which committed LSN last changed each path, for serializable validation.

A transaction remembers what it read, each item with the LSN that was visible when it read
it: files read or found missing (``reads``), directories listed (``listed``) and directories
read as a whole (``subtrees``, by ``delete_dir`` and ``replace_dir(keep=...)``). It may
commit only if none of them was changed by a commit after that LSN (backward validation:
then every value it read is still the committed value at its commit, so it read one
consistent state, the one it commits on).

The index is fed the effects of every applied group (``observe``) and answers ``check``.
Conflicts are reported by *key*: a file's path, or ``dir/`` for a directory's listing or
tree, the same keys ``_contention.PathLocks`` queues on.

Threads: ``observe`` and ``prune`` run in the committer thread under the commit lock and
the apply gate; ``check`` runs there too, and, without ``subtrees``, on the event loop
(``Store._commit`` fails a stale transaction early; single-key lookups are safe beside the
committer thread).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ._paths import PathTree, parents

Reads = Mapping[str, int]  # path -> the LSN visible when it was read


def listing_key(directory: str) -> str:
    """The key a directory's listing (and tree) conflicts under: ``dir/`` (``/`` for the
    root)."""
    return directory + "/"


@dataclass(frozen=True)
class Conflict:
    """What made a transaction stale: the key and the LSN of the commit that changed it (0
    when the change is in the transaction's own group, not yet committed)."""

    key: str
    lsn: int
    what: str  # for the message: "'a.json' was changed by another commit"


@dataclass
class GroupEffects:
    """What the transactions validated so far in one group change (they commit before the
    next transaction of the group, so they count as changes after its reads)."""

    modified: set[str] = field(default_factory=set)  # files written or deleted
    listing_changed: set[str] = field(default_factory=set)  # directories gaining/losing names
    trees: set[str] = field(default_factory=set)  # directories deleted or replaced
    writer: dict[str, int] = field(default_factory=dict)  # file -> txid that changed it last


_NONE = GroupEffects()


class ConflictIndex:
    """The last LSN that changed each file, directory listing and directory tree."""

    def __init__(self) -> None:
        self._modified: dict[str, int] = {}
        self._listing: dict[str, int] = {}
        self._trees: dict[str, int] = {}
        # Where the keys of _modified and _trees lie, so that a subtree read is checked
        # against the changes below it, not against every change (thousands of delete_dir).
        self._modified_at = PathTree()
        self._trees_at = PathTree()
        # Everything read before this LSN counts as changed: commits of other processes
        # this one could not see (``_shared.py``: a checkpoint it did not follow in time).
        self.barrier = 0

    def __len__(self) -> int:
        return len(self._modified) + len(self._listing) + len(self._trees)

    def observe(self, lsn: int, effects: GroupEffects) -> None:
        """Record a committed group's effects at ``lsn``. Requires: the group is applied and
        the caller holds the apply gate (whoever saw its files sees it here too)."""
        for p in effects.modified:
            if p not in self._modified:
                self._modified_at.add(p)
            self._modified[p] = lsn
        for d in effects.listing_changed:
            self._listing[d] = lsn
        for d in effects.trees:
            if d not in self._trees:
                self._trees_at.add(d)
            self._trees[d] = lsn

    def prune(self, oldest: int) -> None:
        """Forget changes at or below ``oldest``, the oldest LSN an open transaction may
        have read at: no read can be stale because of them. Cheap when the index is small."""
        if len(self) < 4096:
            return
        for table, at in (
            (self._modified, self._modified_at),
            (self._listing, None),
            (self._trees, self._trees_at),
        ):
            for key in [k for k, v in table.items() if v <= oldest]:
                del table[key]
                if at is not None:
                    at.discard(key, table)

    def check(
        self,
        reads: Reads,
        listed: Reads,
        subtrees: Reads,
        group: GroupEffects = _NONE,
        deps: Mapping[str, int] | None = None,
    ) -> Conflict | None:
        """The first stale read, or None. ``group``: effects of the transactions ahead of
        this one in its group. ``deps``: files read as a transaction ahead in the group
        wrote them, before it committed (``_contention.py``, rule 5), by path -> its txid:
        valid if that transaction is the last one ahead to have changed them."""
        modified, listing, trees = self._modified, self._listing, self._trees
        if self.barrier:
            for p, seen in (*reads.items(), *listed.items(), *subtrees.items()):
                if seen < self.barrier:
                    what = f"{p!r} may have been changed by another process"
                    return Conflict(p, self.barrier, what)
        for p, txid in (deps or {}).items():
            if group.writer.get(p) != txid or self._tree_changed(p, 1 << 62, group) is not None:
                return Conflict(p, 0, f"{p!r} was read before its writer committed, which failed")
        for p, seen in reads.items():
            lsn = modified.get(p, 0)
            if lsn > seen or p in group.modified:
                return Conflict(p, lsn, f"{p!r} was changed by another commit")
            hit = self._tree_changed(p, seen, group)
            if hit is not None:
                return Conflict(p, hit, f"{p!r} was changed by another commit")
        for d, seen in listed.items():
            lsn = listing.get(d, 0)
            if lsn > seen or d in group.listing_changed:
                return Conflict(listing_key(d), lsn, f"directory {d!r} changed")
            hit = self._tree_changed(d, seen, group)
            if hit is not None:
                return Conflict(listing_key(d), hit, f"directory {d!r} changed")
        for d, seen in subtrees.items():
            prefix = d + "/"
            lsns = [v for k in self._modified_at.under(d) if (v := modified.get(k, 0)) > seen]
            lsns += [v for k in self._trees_at.under(d) if (v := trees.get(k, 0)) > seen]
            hit = self._tree_changed(d, seen, group)
            if lsns or hit is not None or any(k.startswith(prefix) for k in group.modified):
                lsn = max([*lsns, hit or 0])
                return Conflict(listing_key(d), lsn, f"files under {d!r} changed")
        return None

    def _tree_changed(self, path: str, seen: int, group: GroupEffects) -> int | None:
        """The LSN of a change of ``path`` or a directory above it as a whole (deleted or
        replaced) after ``seen``: 0 if in the group, None if none."""
        trees = self._trees
        if not trees and not group.trees:
            return None
        for a in (path, *parents(path)):
            lsn = trees.get(a, 0)
            if lsn > seen:
                return lsn
            if a in group.trees:
                return 0
        return None
