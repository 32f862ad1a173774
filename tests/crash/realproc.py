"""Crash points with real processes on the real file system (ALICE's checker).

A workload runs in a forked child on an ``OsFileSystem`` wrapped so that file-system operation
``k`` (counted from the moment the child arms it) ends the process with ``os._exit``; the child
writes one ``ACK i`` line to a pipe per acknowledged transaction before its next operation. A
second forked child then recovers the store, itself crashed at operation ``j`` (or not), and
the store is finally reopened in-process and checked against the shape's oracle: every
acknowledged transaction present byte for byte, every other wholly present or absent, recovery
succeeded, no staging leftovers or temporary files, one journal segment that parses cleanly
with nothing after its checkpoint, and no file descriptor left open.

Children are forked from the test process (or a pool worker forked from it): no new
interpreter, no imports. The directories live on tmpfs when there is one: a process crash
keeps the page cache, so fsyncs do not matter for this oracle (power loss is the simulated
file system's job, and the real power cuts').
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

import walstore
from tests.crash.shapes import BY_NAME, CHECKPOINT_BYTES, TUNING, Shape, run_tx, run_workload
from tests.support import INLINE
from walstore._engine import Engine
from walstore._fs import AsyncWriter
from walstore._journal_reader import scan_segment
from walstore._journal_writer import SPARE
from walstore._os_fs import OsFileSystem

CRASHED = 86  # the exit status of a child that died at its crash point
FAILED = 3  # the exit status of a child whose code raised
CHILD_TIMEOUT = 120.0

SEAM = (
    "open",
    "pwrite",
    "truncate",
    "fsync",
    "fdatasync",
    "close",
    "pread",
    "read_file",
    "rename",
    "exchange",
    "link",
    "unlink",
    "mkdir",
    "rmdir",
    "listdir",
    "lstat",
    "realpath",
    "fsync_dir",
    "syncfs",
    "mount_points",
    "free_space",
    "lock",
    "unlock",
    "flock",
    "funlock",
)
STREAM = ("open_writer", "stream_write", "stream_sync", "stream_close")


class CrashFs(OsFileSystem):
    """``OsFileSystem`` whose operation number ``crash_at`` (after ``arm()``) kills the process
    before it happens. With ``record``, it keeps a trace of (name, path) of armed operations."""

    def __init__(self, out: int, crash_at: int | None, record: bool) -> None:
        super().__init__()
        self.out = out
        self.crash_at = crash_at
        self.armed = False
        self.index = 0
        self.trace: list[tuple[str, str]] | None = [] if record else None
        self._mu = threading.Lock()
        self._fd_paths: dict[int, str] = {}

    def arm(self) -> None:
        self.armed = True

    def emit(self, line: str) -> None:
        os.write(self.out, line.encode() + b"\n")

    def tick(self, name: str, args: tuple[Any, ...]) -> None:
        if not self.armed:
            return
        with self._mu:
            k = self.index
            self.index += 1
            if self.trace is not None:
                arg = args[0] if args else ""
                path = self._fd_paths.get(arg, "") if isinstance(arg, int) else str(arg)
                self.trace.append((name, path))
            if k == self.crash_at:
                self.emit(f"CRASH {k} {name}")
                os._exit(CRASHED)

    async def open_writer(self, path: str) -> AsyncWriter:
        self.tick("open_writer", (path,))
        return _TickingWriter(await super().open_writer(path), self)


def _wrap(name: str) -> Callable[..., Any]:
    base = getattr(OsFileSystem, name)

    def method(self: CrashFs, *args: Any, **kwargs: Any) -> Any:
        self.tick(name, args)
        out = base(self, *args, **kwargs)
        if name == "open" and self.trace is not None:
            self._fd_paths[out] = args[0]
        return out

    method.__name__ = name
    return method


for _name in SEAM:
    setattr(CrashFs, _name, _wrap(_name))


class _TickingWriter:
    def __init__(self, inner: AsyncWriter, fs: CrashFs) -> None:
        self._inner = inner
        self._fs = fs

    async def write(self, data: bytes) -> None:
        self._fs.tick("stream_write", ())
        await self._inner.write(data)

    async def sync(self) -> None:
        self._fs.tick("stream_sync", ())
        await self._inner.sync()

    async def aclose(self) -> None:
        self._fs.tick("stream_close", ())
        await self._inner.aclose()


# -- children ----------------------------------------------------------------------------------


def fork_run(fn: Callable[..., None], *args: Any) -> tuple[int, list[str]]:
    """Run ``fn(out_fd, *args)`` in a forked child; returns its exit status and its lines."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(r)
            fn(w, *args)
        except BaseException as exc:
            msg = f"ERR {type(exc).__name__}: {exc}".replace("\n", " ")[:2000]
            try:
                os.write(w, msg.encode() + b"\n")
            except OSError:
                pass
            code = FAILED
        os._exit(code)
    os.close(w)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([r], [], [], CHILD_TIMEOUT)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                chunks.append(b"\nHUNG\n")
                break
            data = os.read(r, 1 << 16)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode().splitlines()


def setup_child(out: int, root: str, shape_name: str) -> None:
    """Make the store a shape starts from: its setup transactions committed, closed."""

    async def main() -> None:
        async with walstore.open(root, **TUNING) as store:
            for ops in BY_NAME[shape_name].setup:
                await run_tx(store, ops)

    anyio.run(main)


def workload_child(
    out: int, root: str, shape_name: str, crash_at: int | None, record: bool
) -> None:
    """Open the store made by ``setup_child`` (a clean open), arm, run the workload."""
    shape = BY_NAME[shape_name]
    fs = CrashFs(out, crash_at, record)

    async def main() -> None:
        before = fd_count()
        store = await walstore.open(root, fs=fs, create=False, exclusive=not shape.shared, **TUNING)
        fs.arm()
        await run_workload(store, shape, lambda i: fs.emit(f"ACK {i} {fs.index}"))
        fs.emit(f"FDS {before} {fd_count()}")  # (after aclose)

    anyio.run(main)
    if fs.trace is not None:
        fs.emit("TRACE " + json.dumps(fs.trace))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def recovery_child(
    out: int, root: str, crash_at: int | None, record: bool, exclusive: bool = True
) -> None:
    """Recover the store (what ``walstore.open`` runs in its worker thread), then close it
    (nothing to checkpoint after a recovery): no event loop needed."""
    fs = CrashFs(out, crash_at, record)
    fs.arm()
    before = fd_count()
    engine = Engine(
        fs,
        root,
        walstore.Durability.FULL,
        checkpoint_bytes=CHECKPOINT_BYTES,
        exclusive=exclusive,
    )
    engine.open(create=False, readonly=False)
    engine.close()
    fs.emit(f"FDS {before} {fd_count()}")
    if fs.trace is not None:
        fs.emit("TRACE " + json.dumps(fs.trace))


def warm_up(scratch: str) -> None:
    """Import and initialise everything a child uses (anyio's backend, aiofiles) before
    forking, so that each child does not pay for it."""
    root = os.path.join(scratch, "warm-up")

    async def main() -> None:
        async with walstore.open(root, **TUNING) as store:
            async with store.transaction() as tx:
                async with tx.open_write("x") as f:
                    await f.write(bytes(2 * INLINE))

    anyio.run(main)
    shutil.rmtree(root)


# -- the checker --------------------------------------------------------------------------------


@dataclass
class Result:
    shape: str
    k: int | None
    j: int | None
    acked: list[int] = field(default_factory=list)
    crashes: list[tuple[str, str]] = field(default_factory=list)  # (phase, seam method)
    violations: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)
    trace: list[tuple[str, str]] | None = None
    ack_at: dict[int, int] = field(default_factory=dict)  # tx -> operations before its ACK


def _parse(res: Result, phase: str, status: int, lines: list[str]) -> None:
    for line in lines:
        word, _, rest = line.partition(" ")
        if word == "ACK":
            i, at = rest.split()
            res.acked.append(int(i))
            res.ack_at[int(i)] = int(at)
        elif word == "CRASH":
            res.crashes.append((phase, rest.split()[1]))
        elif word == "TRACE":
            res.trace = [(n, p) for n, p in json.loads(rest)]
        elif word == "FDS":
            before, after = rest.split()
            if before != after:
                res.violations.append(("fd leak", f"{phase} child: {before} -> {after} fds"))
        elif word in ("ERR", "HUNG"):
            res.violations.append(("failed " + phase, line))
    crashed = any(p == phase for p, _ in res.crashes)
    if status != (CRASHED if crashed else 0):
        res.violations.append(("failed " + phase, f"{phase} child exit status {status}"))


def copy_tree(src: str, dst: str) -> None:
    """Copy a store directory, keeping hard links as hard links (as ``cp -a`` does)."""
    seen: dict[tuple[int, int], str] = {}
    os.makedirs(dst)
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        target = os.path.normpath(os.path.join(dst, rel))
        for d in dirnames:
            os.mkdir(os.path.join(target, d))
        for f in filenames:
            s, t = os.path.join(dirpath, f), os.path.join(target, f)
            st = os.lstat(s)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                os.link(seen[key], t)
            else:
                shutil.copy2(s, t)
                seen[key] = t


def read_tree(root: str) -> tuple[dict[str, bytes], list[str]]:
    """User files under ``root`` (``.walstore`` left out), and any stray temporary names."""
    files: dict[str, bytes] = {}
    stray: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root and ".walstore" in dirnames:
            dirnames.remove(".walstore")
        for f in filenames:
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, root)
            if re.search(r"\.(tmp|dir|del)$", f):
                stray.append(rel)
            with open(full, "rb") as fh:
                files[rel] = fh.read()
    return files, stray


def check_store(root: str, shape: Shape, acked: set[int]) -> list[tuple[str, str]]:
    """Reopen in-process and check the oracle; returns (kind, message) violations."""
    out: list[tuple[str, str]] = []
    before = fd_count()
    try:
        engine = Engine(
            OsFileSystem(), root, walstore.Durability.FULL, checkpoint_bytes=CHECKPOINT_BYTES
        )
        engine.open(create=False, readonly=False)
        engine.close()
    except Exception as exc:
        return [("failed recovery", f"final reopen: {exc!r}")]
    if fd_count() != before:
        out.append(("fd leak", f"final reopen: {before} -> {fd_count()} fds"))
    found, stray = read_tree(root)
    ok, lost = shape.allowed(acked)
    if found not in ok:
        kind = "lost" if found in lost else "partial"
        want = {p for m in ok for p in m}
        out.append((kind, f"acked {sorted(acked)}: {sorted(set(found) ^ want)} differ"))
    if stray:
        out.append(("leftover", f"temporary files in the tree: {stray}"))
    meta = os.path.join(root, ".walstore")
    staging = os.listdir(os.path.join(meta, "staging"))
    if staging:
        out.append(("leftover", f"staging leftovers: {sorted(staging)}"))
    segments = sorted(n for n in os.listdir(os.path.join(meta, "journal")) if n != SPARE)
    if len(segments) != 1:
        out.append(("journal", f"{len(segments)} journal segments: {segments}"))
    for name in segments:
        with open(os.path.join(meta, "journal", name), "rb") as fh:
            data = fh.read()
        try:
            scan = scan_segment(name, data)
        except Exception as exc:
            out.append(("journal", f"{name} does not parse: {exc!r}"))
            continue
        if scan.torn_bytes or scan.commits:
            out.append(("journal", f"{name}: {scan.torn_bytes} torn bytes, {scan.commits}"))
    return out


@dataclass(frozen=True)
class Case:
    shape: str
    setup: str  # the store the workload starts from (see setup_child)
    k: int | None  # crash the workload at its operation k (None: let it finish)
    j: int | None  # crash the recovery at its operation j (None: no recovery child)
    image: str | None = None  # start from a copy of this crashed store (its ACKs in acked)
    acked: tuple[int, ...] = ()
    record: bool = False


def run_case(case: Case, scratch: str) -> Result:
    """One case, in this process (a pool worker): workload child, recovery child, check."""
    shape = BY_NAME[case.shape]
    root = os.path.join(scratch, f"case-{os.getpid()}")
    shutil.rmtree(root, ignore_errors=True)
    res = Result(case.shape, case.k, case.j)
    if case.image is not None:
        copy_tree(case.image, root)
        res.acked = list(case.acked)
    else:
        copy_tree(case.setup, root)
        status, lines = fork_run(workload_child, root, case.shape, case.k, case.record)
        _parse(res, "workload", status, lines)
    if case.j is not None:
        status, lines = fork_run(
            recovery_child,
            root,
            case.j,
            case.record and case.image is not None,
            not shape.shared,
        )
        _parse(res, "recovery", status, lines)
    if not res.violations:
        res.violations += check_store(root, shape, set(res.acked))
    shutil.rmtree(root, ignore_errors=True)
    return res


def make_image(case: Case, path: str) -> Result:
    """Run the workload of ``case`` crashed at ``case.k`` into ``path`` (kept)."""
    shutil.rmtree(path, ignore_errors=True)
    copy_tree(case.setup, path)
    res = Result(case.shape, case.k, None)
    status, lines = fork_run(workload_child, path, case.shape, case.k, False)
    _parse(res, "workload", status, lines)
    return res


def make_setup(shape: str, path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    status, lines = fork_run(setup_child, path, shape)
    assert status == 0, lines


def scratch_dir(tmp: str) -> str:
    """A directory on tmpfs if there is one (fast fsyncs), else under ``tmp``."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return os.path.join(shm, f"walstore-crash-{os.getpid()}-{os.path.basename(tmp)}")
    return os.path.join(tmp, "scratch")
