"""Recover a store on the simulated file system and check what the crash families check."""

from __future__ import annotations

import walstore
from tests.crash.shapes import CHECKPOINT_BYTES
from tests.support import ROOT, Model, segment_files, user_files
from walstore._engine import Engine
from walstore._journal_reader import scan_segment
from walstore.testing import MemoryFileSystem


def recover(fs: MemoryFileSystem) -> None:
    """What ``walstore.open`` runs in its worker thread, then ``aclose``."""
    engine = Engine(fs, ROOT, walstore.Durability.FULL, checkpoint_bytes=CHECKPOINT_BYTES)
    engine.open(create=True, readonly=False)
    engine.close()


def check(fs: MemoryFileSystem, ok: list[Model], lost: list[Model]) -> list[str]:
    """Recover ``fs`` and check that it holds one of the states ``ok`` (states in ``lost`` miss
    an acknowledged transaction); returns violations as "kind: message"."""
    try:
        recover(fs)
    except Exception as exc:
        return [f"failed recovery: {exc!r}"]
    out = []
    found = user_files(fs)
    if found not in ok:
        kind = "lost" if found in lost else "partial"
        want = {p for m in ok for p in m}
        out.append(f"{kind}: {sorted(set(found) ^ want)} differ")
    staging = fs.files(ROOT + "/.walstore/staging", skip=())
    if staging:
        out.append(f"leftover: staging {sorted(staging)}")
    segments = segment_files(fs.files(ROOT + "/.walstore/journal", skip=()))
    if len(segments) != 1:
        out.append(f"journal: {len(segments)} segments")
    for name, data in segments.items():
        try:
            scan = scan_segment(name, data)
        except Exception as exc:
            out.append(f"journal: {name} does not parse: {exc!r}")
            continue
        if scan.torn_bytes or scan.commits:
            out.append(
                f"journal: {name}: {scan.torn_bytes} torn bytes, {len(scan.commits)} commits"
            )
    if fs.open_fds():
        out.append(f"fd leak: {fs.open_fds()} handles open after close")
    return out
