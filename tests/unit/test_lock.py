"""One writer process at a time (``exclusive=True``): the flock on ``.walstore/LOCK``.

Other processes are real subprocesses running this interpreter. They are coordinated with
pipes only: a holder prints ``READY <pid>`` once it has the store open and closes it when its
stdin reaches EOF; no test sleeps.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import walstore

pytestmark = pytest.mark.guarantee(name="One writer process, with exclusive=True")

TIMEOUT = 60  # seconds; only a guard against a hung child, never waited out when all is well

# Tries to open the store once (or for lock_timeout seconds) and reports what happened.
TRY_OPEN = textwrap.dedent(
    """
    import asyncio, os, sys
    import walstore

    async def main():
        try:
            timeout = float(sys.argv[2])
            store = await walstore.open(sys.argv[1], exclusive=True, lock_timeout=timeout)
        except walstore.StoreLockedError as exc:
            print("LOCKED", exc, flush=True)
            return
        try:
            await store.write(f"from-{os.getpid()}.txt", b"child")
            print("OPENED", os.getpid(), flush=True)
        finally:
            await store.aclose()

    asyncio.run(main())
    """
)

# Waits up to lock_timeout for the store, saying REFUSED after its first refused attempt.
WAITER = textwrap.dedent(
    """
    import asyncio, os, sys
    import walstore

    class FS(walstore.OsFileSystem):
        refused = 0

        def lock(self, path):
            fd = super().lock(path)
            if fd is None:
                self.refused += 1
                if self.refused == 1:
                    print("REFUSED", flush=True)
            return fd

    async def main():
        fs = FS()
        timeout = float(sys.argv[2])
        async with walstore.open(sys.argv[1], exclusive=True, fs=fs, lock_timeout=timeout) as s:
            await s.write(f"from-{os.getpid()}.txt", b"child")
        print("OPENED", os.getpid(), fs.refused, flush=True)

    asyncio.run(main())
    """
)

# Opens the store, says READY, holds it until stdin is closed, then closes it and says CLOSED.
HOLDER = textwrap.dedent(
    """
    import asyncio, os, sys
    import walstore

    async def main():
        async with walstore.open(sys.argv[1], exclusive=True) as store:
            await store.write("held.txt", str(os.getpid()).encode())
            print("READY", os.getpid(), flush=True)
            await asyncio.to_thread(sys.stdin.read)
        print("CLOSED", flush=True)

    asyncio.run(main())
    """
)


def lock_path(root: Path) -> Path:
    return root / ".walstore" / "LOCK"


def lock_pid(root: Path) -> int:
    return int(lock_path(root).read_text().strip())


def try_open(root: Path, lock_timeout: float = 0.0) -> str:
    """Run TRY_OPEN in a new process; return its one line of output."""
    proc = subprocess.run(
        [sys.executable, "-c", TRY_OPEN, str(root), str(lock_timeout)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


class Holder:
    """A subprocess that holds the store open until ``release()``."""

    def __init__(self, root: Path) -> None:
        self._mutex = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=TIMEOUT)
            pytest.fail(f"holder did not start: {line!r} {err}")
        self.pid = int(line.split()[1])
        assert self.pid == self.proc.pid

    def release(self) -> None:
        """Close the holder's stdin: it closes the store and exits (may run in any thread)."""
        with self._mutex:
            stdin, self.proc.stdin = self.proc.stdin, None  # so communicate() leaves it be
        if stdin is not None:
            stdin.close()

    def wait(self) -> str:
        self.release()
        out, err = self.proc.communicate(timeout=TIMEOUT)
        assert self.proc.returncode == 0, err
        return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def holder(root: Path) -> Iterator[Holder]:
    h = Holder(root)
    try:
        yield h
    finally:
        if h.proc.poll() is None:
            h.release()
            try:
                h.proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                h.proc.kill()
                h.proc.communicate()


class CountingFS(walstore.OsFileSystem):
    """Counts refused lock attempts; calls ``on_refused`` after the first one."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0
        self.on_refused: list[Callable[[], None]] = []
        self._mutex = threading.Lock()

    def lock(self, path: str) -> int | None:
        fd = super().lock(path)
        if fd is None:
            with self._mutex:
                self.refused += 1
                first = self.refused == 1
            if first:
                for callback in self.on_refused:
                    callback()
        return fd


# -- another process while we hold the store -------------------------------------------------


@pytest.mark.asyncio
async def test_second_process_gets_store_locked_error_with_holder_pid(root: Path) -> None:
    async with walstore.open(root, exclusive=True) as store:
        await store.write("a.txt", b"ours")
        assert lock_path(root).is_file()
        assert lock_pid(root) == os.getpid()

        out = try_open(root)
        assert out.startswith("LOCKED "), out
        assert re.search(rf"\bpid {os.getpid()}\b", out), out

        # The refused opener changed nothing: the LOCK still names us, our store works.
        assert lock_pid(root) == os.getpid()
        await store.write("b.txt", b"still ours")
    assert sorted(os.listdir(root)) == [".walstore", "a.txt", "b.txt"]


@pytest.mark.asyncio
async def test_second_open_in_the_same_process_is_refused(root: Path) -> None:
    async with walstore.open(root, exclusive=True) as store:
        with pytest.raises(walstore.StoreLockedError, match=rf"\bpid {os.getpid()}\b"):
            await walstore.open(root, exclusive=True)
        await store.write("a.txt", b"still usable")
        assert lock_pid(root) == os.getpid()
    async with walstore.open(root, exclusive=True) as store:
        assert await store.read("a.txt") == b"still usable"


@pytest.mark.asyncio
async def test_after_close_another_process_can_open(root: Path) -> None:
    async with walstore.open(root, exclusive=True) as store:
        await store.write("a.txt", b"ours")
    assert lock_path(root).is_file()  # closing never unlinks it

    out = try_open(root)
    assert out.startswith("OPENED "), out
    child = int(out.split()[1])
    assert child != os.getpid()
    assert lock_path(root).is_file()
    assert lock_pid(root) == child  # the last holder's pid stays in the file

    async with walstore.open(root, exclusive=True) as store:
        assert lock_pid(root) == os.getpid()
        assert await store.read(f"from-{child}.txt") == b"child"
        assert await store.read("a.txt") == b"ours"


@pytest.mark.asyncio
async def test_lock_file_is_never_unlinked(root: Path) -> None:
    async with walstore.open(root, exclusive=True) as store:
        await store.write("a", b"1")
        ino = os.stat(lock_path(root)).st_ino
        try_open(root)  # refused
        assert os.stat(lock_path(root)).st_ino == ino
    assert os.stat(lock_path(root)).st_ino == ino
    for _ in range(3):
        async with walstore.open(root, exclusive=True) as store:
            assert os.stat(lock_path(root)).st_ino == ino
            await store.write("a", b"2")
            await store.checkpoint()
        assert os.stat(lock_path(root)).st_ino == ino
    assert try_open(root).startswith("OPENED ")
    assert os.stat(lock_path(root)).st_ino == ino
    async with walstore.open(root, exclusive=True, readonly=True):
        pass
    assert os.stat(lock_path(root)).st_ino == ino


# -- we wait for another process ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_held_by_another_process_refuses_at_once(root: Path, holder: Holder) -> None:
    fs = CountingFS()
    with pytest.raises(walstore.StoreLockedError, match=rf"\bpid {holder.pid}\b"):
        await walstore.open(root, exclusive=True, fs=fs)
    assert fs.refused == 1  # lock_timeout=0: one attempt
    assert lock_pid(root) == holder.pid
    assert holder.proc.poll() is None  # still holding
    assert "CLOSED" in holder.wait()


@pytest.mark.asyncio
async def test_lock_timeout_succeeds_when_the_holder_closes_in_time(
    root: Path, holder: Holder
) -> None:
    fs = CountingFS()
    fs.on_refused.append(holder.release)  # once we have been refused, let the holder go
    async with walstore.open(root, exclusive=True, fs=fs, lock_timeout=TIMEOUT) as store:
        assert fs.refused >= 1  # we did wait
        assert holder.proc.wait(timeout=TIMEOUT) == 0
        assert lock_pid(root) == os.getpid()
        assert await store.read("held.txt") == str(holder.pid).encode()
        await store.write("mine.txt", b"after waiting")
    assert "CLOSED" in holder.wait()
    assert (root / "mine.txt").read_bytes() == b"after waiting"


@pytest.mark.asyncio
async def test_lock_timeout_fails_when_the_holder_keeps_it(root: Path, holder: Holder) -> None:
    fs = CountingFS()
    with pytest.raises(walstore.StoreLockedError, match=rf"\bpid {holder.pid}\b"):
        await walstore.open(root, exclusive=True, fs=fs, lock_timeout=0.1)
    assert fs.refused >= 2  # it retried before giving up
    assert holder.proc.poll() is None
    assert lock_pid(root) == holder.pid
    assert "CLOSED" in holder.wait()
    async with walstore.open(root, exclusive=True) as store:  # free now
        assert await store.read("held.txt") == str(holder.pid).encode()


@pytest.mark.asyncio
async def test_a_waiting_process_gets_the_store_when_we_close(root: Path) -> None:
    """The waiting side in another process: it reports its first refusal on stdout, then we
    close and its ``lock_timeout`` wait succeeds."""
    async with walstore.open(root, exclusive=True) as store:
        await store.write("a.txt", b"ours")
        proc = subprocess.Popen(
            [sys.executable, "-c", WAITER, str(root), str(TIMEOUT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "REFUSED", (line, proc.stderr and proc.stderr.read())
            assert lock_pid(root) == os.getpid()
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert out.split()[0] == "OPENED", out
    child = int(out.split()[1])
    assert lock_pid(root) == child
    async with walstore.open(root, exclusive=True) as store:
        assert await store.read(f"from-{child}.txt") == b"child"


# -- readonly ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_readonly_opens_and_reads_while_another_process_holds_the_lock(
    root: Path,
) -> None:
    async with walstore.open(root, exclusive=True) as store:
        await store.write_json("docs/a.json", {"a": 1})
    h = Holder(root)
    try:
        async with walstore.open(root, exclusive=True, readonly=True) as ro:
            assert await ro.read_json("docs/a.json") == {"a": 1}
            assert await ro.read("held.txt") == str(h.pid).encode()
            assert await ro.list() == ["docs", "held.txt"]
            assert ro.recovery.clean
            with pytest.raises(walstore.StoreReadOnlyError):
                ro.transaction()
            assert lock_pid(root) == h.pid  # readonly did not touch the LOCK
        # Closing the readonly store released nothing: the holder still holds it.
        assert lock_pid(root) == h.pid
        with pytest.raises(walstore.StoreLockedError, match=rf"\bpid {h.pid}\b"):
            await walstore.open(root, exclusive=True)
        assert h.proc.poll() is None
    finally:
        out = h.wait()
    assert "CLOSED" in out


@pytest.mark.asyncio
async def test_readonly_in_the_same_process_while_we_hold_the_lock(root: Path) -> None:
    async with walstore.open(root, exclusive=True) as store:
        await store.write("a", b"1")
        async with walstore.open(root, exclusive=True, readonly=True) as ro:
            assert await ro.read("a") == b"1"
            await store.write("a", b"2")
            assert await ro.read("a") == b"2"  # plain files: sees the commit at once
        await store.write("b", b"still writable")
        assert lock_pid(root) == os.getpid()


@pytest.mark.asyncio
async def test_a_shared_open_beside_an_exclusive_holder_times_out_naming_it(
    root: Path, holder: Holder
) -> None:
    """The holder opened the store exclusive (LOCK held for life): a shared open waits its
    lock_timeout for the commit lock, then says whose it is."""
    with pytest.raises(walstore.StoreLockedError, match=rf"\bpid {holder.pid}\b"):
        await walstore.open(root, lock_timeout=0.1)
    assert holder.proc.poll() is None
    assert "CLOSED" in holder.wait()
