"""What ``walstore info``, ``walstore log`` and ``walstore recover --plan`` print: read-only,
from the pieces ``_inspect.py`` reads (nothing takes the LOCK or changes a file)."""

from __future__ import annotations

from typing import Any

from . import _journal_format as fmt
from ._inspect import (
    Layout,
    LockState,
    probe_lock,
    read_journal,
    read_staging,
    reading,
    space,
)
from ._journal_writer import segment_name
from ._os_fs import OsFileSystem
from ._recovery import _superseded


def info(layout: Layout) -> dict[str, Any]:
    with reading(layout) as fs:
        return _info(fs, layout)


def _info(fs: OsFileSystem, layout: Layout) -> dict[str, Any]:
    lock = probe_lock(layout, fs)
    journal = read_journal(layout, retry_corruption=lock.held, fs=fs)
    staging = read_staging(layout, fs)
    live = journal.live
    pending = [tx.txid for _, tx in journal.transactions()]
    return {
        "root": layout.root,
        "in_use_by": lock.holder,
        "lock": {"held": lock.held, "pid": lock.pid, "processes": list(lock.pids)},
        "journal_bytes": journal.bytes,
        "segments": [{"name": n, "bytes": s} for n, s in journal.segments],
        "live_segment": live.name if live else None,
        "checkpoint_lsn": live.checkpoint.lsn if live else None,
        "last_lsn": live.next_lsn - 1 if live else None,
        "commit_groups": len(live.commits) if live else 0,
        "pending_transactions": len(pending),
        "pending_txids": pending,
        "torn_tail_bytes": live.torn_bytes if live else 0,
        "staged_bytes": staging.bytes,
        "staging_transactions": len(staging.txids),
        "staging_other_entries": len(staging.other),
        "space": space(layout, live, fs).as_json(),
    }


def describe_op(op: fmt.Op) -> dict[str, Any]:
    if isinstance(op, fmt.Put):
        return {"kind": "put", "path": op.path, "size": len(op.data)}
    if isinstance(op, fmt.PutStaged):
        return {"kind": "put-staged", "path": op.path, "size": op.size, "staged": op.staged}
    if isinstance(op, fmt.Delete):
        return {"kind": "delete", "path": op.path, "size": None}
    if isinstance(op, fmt.DeleteDir):
        return {"kind": "delete-dir", "path": op.path, "size": None}
    entries = [describe_op(e) for e in op.entries]
    return {
        "kind": "replace-dir",
        "path": op.path,
        "size": sum(e["size"] for e in entries),
        "entries": entries,
    }


def log(layout: Layout, since: int | None = None) -> dict[str, Any]:
    lock = probe_lock(layout)
    journal = read_journal(layout, retry_corruption=lock.held)
    live = journal.live
    txs = [
        {"txid": tx.txid, "lsn": commit.lsn, "ops": [describe_op(op) for op in tx.ops]}
        for commit, tx in journal.transactions()
        if since is None or tx.txid > since
    ]
    return {
        "root": layout.root,
        "in_use_by": lock.holder,
        "checkpoint_lsn": live.checkpoint.lsn if live else None,
        "transactions": txs,
    }


def recovery_plan(layout: Layout) -> dict[str, Any]:
    """What opening the store would do now (``_recovery.recover``), computed from the journal
    and the staging area without touching them. The count of staging entries removed is a
    lower bound: directories a replayed ``delete_dir``/``replace_dir`` moves into staging are
    removed too."""
    lock = probe_lock(layout)
    journal = read_journal(layout, retry_corruption=lock.held)
    staging = read_staging(layout)
    live = journal.live
    commits = live.commits if live else []
    torn = live.torn_bytes if live else 0
    staged_any = bool(staging.txids or staging.other)
    segs = [n for n, _ in journal.segments]
    if live is not None and not commits and not torn and not staged_any and not journal.others:
        return _plan(layout, lock, clean=True)
    skip = _superseded(commits)
    rolled_forward = [tx.txid for _, tx in journal.transactions()]
    replayed = sum(
        1
        for ri, c in enumerate(commits)
        for ti, tx in enumerate(c.txs)
        for oi in range(len(tx.ops))
        if (ri, ti, oi) not in skip
    )
    began_after = live.checkpoint.next_txid if live else 1
    committed = set(rolled_forward)
    rolled_back = sorted(t for t in staging.txids if t >= began_after and t not in committed)
    new_segment = segment_name(live.next_lsn if live else 1)
    return _plan(
        layout,
        lock,
        clean=False,
        rolled_forward=rolled_forward,
        rolled_back=rolled_back,
        torn_bytes=torn,
        segments_removed=sum(1 for n in segs if n != new_segment),
        ops_replayed=replayed,
        orphans_removed_at_least=staging.entries,
    )


def _plan(layout: Layout, lock: LockState, *, clean: bool, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "root": layout.root,
        "in_use_by": lock.holder,
        "clean": clean,
        "rolled_forward": [],
        "rolled_back": [],
        "torn_bytes": 0,
        "segments_removed": 0,
        "ops_replayed": 0,
        "orphans_removed_at_least": 0,
    }
    out.update(fields)
    return out
