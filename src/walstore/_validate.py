"""Step 1 of a group commit, ``validate``, for one transaction at a time: whether its reads
are still current and its ops fit what is on disk plus what the transactions ahead of it in
the group change (docs/commit-protocol.md, section 4). Nothing on disk is touched.

``Validator`` is mixed into ``Engine``; it runs in the committer thread, under the commit
lock (the engine's, and with other processes the cross-process one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import _journal_format as fmt
from ._apply import Applier
from ._conflicts import ConflictIndex, GroupEffects
from ._errors import InvalidPathError
from ._fs import FileSystem
from ._limits import PathLimits
from ._paths import PathDict, parent, parents
from ._prepared import Move, PendingReplace, PreparedTx, TxOp, conflict_error
from ._reads import ReadSide


@dataclass
class Overlay:
    """Paths as a group's validated transactions leave them, before they are applied."""

    kinds: PathDict = field(default_factory=PathDict)  # path -> "file"/"dir"/None
    cleared: set[str] = field(default_factory=set)  # directories deleted or replaced


@dataclass
class GroupValidation:
    """Effects of the transactions validated so far in a group."""

    overlay: Overlay = field(default_factory=Overlay)
    effects: GroupEffects = field(default_factory=GroupEffects)  # for conflict checks
    disk_dirs: set[str] = field(default_factory=set)  # seen on disk as directories
    # (txid, op index) of the puts whose target is a file when they are applied: apply
    # exchanges those into place without looking the target up again.
    replacing: set[tuple[int, int]] = field(default_factory=set)


def collides(rel: str, names: set[str]) -> bool:
    """Whether ``rel`` is one of ``names``, or a directory above or below one of them."""
    return rel in names or any(n.startswith(rel + "/") or rel.startswith(n + "/") for n in names)


class Validator(ReadSide):
    """Step 1 for the engine (the module docstring). REQUIRES: commit lock held."""

    fs: FileSystem
    limits: PathLimits
    conflicts: ConflictIndex
    _applier: Applier
    _dev: int  # the device of the root: a directory on another is a mount made since open
    _mounts: frozenset[str]  # mount points below the root, at open

    def _check_mount_points(self, op: TxOp) -> None:
        """Step 1: refuse an op at or under a mount point below the root (any file system,
        bind mounts too), or a directory op with one inside it."""
        for p in (op.path, op.src) if isinstance(op, Move) else (op.path,):
            for a in (p, *parents(p)):
                if a in self._mounts:
                    raise InvalidPathError(_across_mounts(a))
        if isinstance(op, fmt.DeleteDir | fmt.ReplaceDir | PendingReplace):
            for m in self._mounts:
                if m.startswith(op.path + "/"):
                    raise InvalidPathError(_across_mounts(m))

    def _kept(self, op: PendingReplace) -> list[str]:
        """Files of the existing directory that ``op.keep`` carries over, relative paths."""
        if op.keep is None:
            return []
        base = self._applier.full(op.path)
        st = self._lstat(op.path)
        if st is None or st.kind != "dir":
            return []
        out: list[str] = []
        for name in sorted(self.fs.listdir(base)):
            if not (op.keep(name) if callable(op.keep) else name in op.keep):
                continue
            stack = [name]
            while stack:
                rel = stack.pop()
                kind = self.fs.lstat(os.path.join(base, rel))
                if kind is not None and kind.kind == "dir":
                    stack += [f"{rel}/{c}" for c in self.fs.listdir(os.path.join(base, rel))]
                elif kind is not None and kind.kind == "file":
                    out.append(rel)
        return out

    def _kind_after(self, path: str, state: GroupValidation, local: Overlay) -> str | None:
        """What ``path`` is once the group so far (and this transaction so far) applied."""
        for layer in (local, state.overlay):
            if path in layer.kinds:
                return layer.kinds[path]
        for layer in (local, state.overlay):
            if layer.cleared and any(a in layer.cleared for a in parents(path)):
                return None
        if path in state.disk_dirs:  # seen on disk in this group, under the commit lock
            return "dir"
        st = self._lstat(path)
        if st is not None and st.kind == "dir":
            if st.dev != self._dev:  # a file system mounted after the open
                # Refused here, before the commit point: a rename from staging into it would
                # fail with EXDEV after it, and so would every replay at every open.
                raise InvalidPathError(_across_mounts(path))
            state.disk_dirs.add(path)
        return st.kind if st is not None else None

    def _check_reads(self, tx: PreparedTx, state: GroupValidation) -> None:
        conflict = self.conflicts.check(tx.reads, tx.listed, tx.subtrees, state.effects, tx.deps)
        if conflict is not None:
            raise conflict_error(tx.txid, conflict)

    def _validate_tx(self, tx: PreparedTx, state: GroupValidation) -> None:
        """Step 1 for one transaction: raise ConflictError, InvalidPathError or
        FileNotFoundError, else record its effects in ``state``. Nothing on disk is touched."""
        self._check_reads(tx, state)
        local = Overlay()
        modified: set[str] = set()
        listing: set[str] = set()
        trees: set[str] = set()
        replacing: set[tuple[int, int]] = set()
        for index, op in enumerate(tx.ops):
            self.limits.check_op(op)
            if self._mounts:
                self._check_mount_points(op)
            if not isinstance(op, fmt.Delete):  # a delete makes no directories
                self._check_group_parents(op.path, state, local, listing, modified)
            elif "/" in op.path:  # nor unlink on another file system, which no checkpoint
                self._kind_after(parent(op.path), state, local)  # syncs (a mount above: the same)
            kind = self._kind_after(op.path, state, local)
            if isinstance(op, fmt.Put | fmt.PutStaged | fmt.Delete | Move):
                # A symlink is a plain entry: a delete removes the link itself (never what it
                # points to); anything else refuses to replace it.
                if kind not in (None, "file") and not (
                    kind == "symlink" and isinstance(op, fmt.Delete)
                ):
                    what = {"dir": "a directory", "symlink": "a symlink"}.get(kind, "not a file")
                    raise InvalidPathError(f"cannot change {op.path!r}: it is {what}")
                # The source is linked at step 2, before anything of this transaction is
                # applied: check it as the group before this transaction leaves it.
                if isinstance(op, Move) and self._kind_after(op.src, state, Overlay()) != "file":
                    raise FileNotFoundError(2, "No such file to move", op.src)
                if (kind is None) != isinstance(op, fmt.Delete):
                    listing.add(parent(op.path))
                if kind == "file" and not isinstance(op, fmt.Delete):
                    replacing.add((tx.txid, index))
                local.kinds[op.path] = None if isinstance(op, fmt.Delete) else "file"
                modified.add(op.path)
                continue
            if isinstance(op, fmt.DeleteDir) and kind != "dir":
                if kind is None and any(
                    a in layer.cleared for layer in (local, state.overlay) for a in parents(op.path)
                ):
                    continue  # inside a directory replaced or deleted first: nothing left
                if kind is None:
                    raise FileNotFoundError(2, "No such directory", op.path)
                raise InvalidPathError(f"cannot delete_dir {op.path!r}: it is not a directory")
            if isinstance(op, PendingReplace | fmt.ReplaceDir) and kind not in (None, "dir"):
                raise InvalidPathError(f"cannot replace {op.path!r}: it is not a directory")
            if (kind is None) != isinstance(op, fmt.DeleteDir):
                listing.add(parent(op.path))
            local.cleared.add(op.path)
            local.kinds.drop_under(op.path)
            if isinstance(op, fmt.DeleteDir):
                local.kinds[op.path] = None
            else:
                local.kinds[op.path] = "dir"
                rels = [e.path for e in op.entries]
                if isinstance(op, PendingReplace):
                    named = set(rels)
                    rels += [r for r in self._kept(op) if not collides(r, named)]
                for rel in rels:
                    local.kinds.update((f"{op.path}/{a}", "dir") for a in parents(rel))
                    local.kinds[f"{op.path}/{rel}"] = "file"
            trees.add(op.path)
        for tree in local.cleared:  # what earlier transactions of the group left there is gone
            state.overlay.kinds.drop_under(tree)
        state.overlay.kinds.update(local.kinds)
        state.overlay.cleared |= local.cleared
        state.effects.modified |= modified
        state.effects.writer.update(dict.fromkeys(modified, tx.txid))
        state.effects.listing_changed |= listing
        state.effects.trees |= trees
        state.replacing |= replacing

    def _check_group_parents(
        self,
        path: str,
        state: GroupValidation,
        local: Overlay,
        listing: set[str],
        modified: set[str],
    ) -> None:
        for anc in parents(path):
            kind = self._kind_after(anc, state, local)
            if kind is None:
                local.kinds[anc] = "dir"
                listing.add(parent(anc))
                # Made on the way: a transaction that found it missing read something stale.
                modified.add(anc)
            elif kind != "dir":
                what = "a symlink" if kind == "symlink" else "not a directory"
                raise InvalidPathError(f"cannot write {path!r}: {anc!r} is {what}")


def _across_mounts(path: str) -> str:
    return (
        f"{path!r} is a mount point: walstore commits by renaming into place, which cannot "
        "cross mounts (another file system, or a bind mount)"
    )
