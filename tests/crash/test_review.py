"""Review of the commit protocol: ALICE / LevelDB fault_injection_test style attacks.

Passing tests add what the sweep and the model test lack: an I/O error (EIO, ENOSPC) at every
call of commit, checkpoint and recovery with the store-usable / store-failed verdict checked; a
commit-point-aware oracle (after the journal fdatasync only the new state is allowed); process
crash -> full recovery -> power cut (the recovered state must already be durable); two crashes in
a row inside recovery; multi-transaction groups; and checks of MemoryFileSystem itself.
xfail(strict) tests are bugs found by this review.
"""

from __future__ import annotations

import errno
import random

import anyio
import pytest

import walstore
from tests.support import (
    ROOT,
    Model,
    Ops,
    applied,
    fresh,
    open_store,
    run_tx,
    segment_files,
    user_files,
)
from walstore.testing import MemoryFileSystem

FULL, OFF = walstore.Durability.FULL, walstore.Durability.OFF
BIG = bytes(range(256)) * 2  # over the inline threshold: staged
STAGING, JOURNAL = ROOT + "/.walstore/staging", ROOT + "/.walstore/journal"


class LoseAll(random.Random):
    """A power cut that loses every directory change not made durable by an fsync."""

    def random(self) -> float:
        return 0.99


async def _tx_body(store: walstore.Store, ops: Ops, box: list[walstore.Transaction]) -> None:
    async with store.transaction() as tx:
        box.append(tx)
        for path, value in ops:
            await (tx.delete(path) if value is None else tx.write(path, value))


def attempt(store: walstore.Store, ops: Ops) -> tuple[walstore.Transaction, BaseException | None]:
    box: list[walstore.Transaction] = []
    try:
        anyio.run(_tx_body, store, ops, box)
        return box[0], None
    except BaseException as exc:  # SimulatedCrash, OSError, StoreFailedError
        return box[0], exc


def reopen(fs: MemoryFileSystem, allowed: list[Model], what: str, *, close: bool = True) -> Model:
    """Open (recover), check the state, leftovers and segments; return the state found."""
    store = open_store(fs, FULL)
    found = user_files(fs)
    assert found in allowed, f"{what}: {sorted(found)} not in {[sorted(m) for m in allowed]}"
    assert fs.files(STAGING, skip=()) == {}, f"{what}: staging leftovers"
    assert len(segment_files(fs.files(JOURNAL, skip=()))) == 1, f"{what}: segments"
    if close:
        anyio.run(store.aclose)
    return found


def survives_power_cut(fs: MemoryFileSystem, state: Model, what: str, seeds: int = 2) -> None:
    """The state a finished recovery reported must already be durable."""
    for seed in range(seeds):
        other = fs.clone()
        other.reboot(power_loss=random.Random(f"{what}/{seed}"))
        reopen(other, [state], f"{what}, power cut after recovery (seed {seed})")


def commit_point(trace: list[tuple[int, str, str]]) -> int:
    return next(i for i, name, path in trace if name == "fdatasync" and path.endswith(".wal"))


# -- I/O errors at every call ------------------------------------------------------------------

SETUP: Ops = [("a", b"old"), ("d1/b", b"old-b"), ("x", BIG), ("z", b"z")]
TX: Ops = [("a", BIG), ("d1/b", None), ("n/m/c", b"c"), ("x", b"tiny"), ("e", b""), ("z", BIG)]


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_io_error_at_every_call_of_commit_and_checkpoint(err: int) -> None:
    base, model = fresh(SETUP)
    after = applied(model, TX)
    probe = applied(model, [("probe", b"p")])
    t = base.clone()
    store = open_store(t, FULL)
    start, t.trace = t.count, []
    anyio.run(run_tx, store, TX)
    tx_end = t.count
    anyio.run(store.checkpoint)
    total, cp = t.count, commit_point(t.trace)
    anyio.run(store.aclose)
    verdicts = set()
    for k in range(start, total):
        fs = base.clone()
        store = open_store(fs, FULL)
        assert fs.count == start
        fs.fault = lambda i, n, p, k=k: OSError(err, "injected") if i == k else None
        tx, exc = attempt(store, TX)
        _, name, path = t.trace[k - start]
        # Closing a lock's descriptor (GATE or LOCK, per commit) or the checkpoint's look at
        # which processes have the store open may fail and change nothing (logged).
        tolerated = path.startswith(ROOT + "/.walstore/") and (
            name == "unlock"
            or (name in ("lstat", "listdir", "lock") and path.startswith(ROOT + "/.walstore/procs"))
        )
        if tolerated:
            assert exc is None, (k, exc)
            assert tx.state is walstore.TxState.COMMITTED, k
            fs.fault = None
            anyio.run(store.checkpoint)
            anyio.run(run_tx, store, [("probe", b"p")])
            anyio.run(store.aclose)
            verdicts |= {"tolerated"}
            fs.reboot(power_loss=random.Random(k))
            what = f"errno {err} at call {k} ({t.trace[k - start][1:]})"
            found = reopen(fs, [applied(after, [("probe", b"p")])], what, close=False)
            survives_power_cut(fs, found, what, seeds=1)
            continue
        # No space for the checkpoint's own files (not a sync): postponed, not a failure.
        postponed = k >= tx_end and (
            name == "free_space"  # the checkpoint's last look at space: it may fail
            or (name == "lock" and path.startswith(ROOT + "/.walstore/"))  # it did nothing
            or (
                err == errno.ENOSPC
                and name not in ("fsync", "fdatasync", "fsync_dir", "syncfs")
                and path.startswith(ROOT + "/.walstore/")
            )
        )
        if k < tx_end:
            assert exc is not None, k
        elif postponed:
            assert exc is None, (k, exc)
            try:
                anyio.run(store.checkpoint)
            except OSError as cp_exc:
                assert cp_exc.errno == err and (err == errno.ENOSPC or name == "lock"), cp_exc
        else:
            assert exc is None, (k, exc)
            with pytest.raises(walstore.StoreFailedError):
                anyio.run(store.checkpoint)
        fs.fault = None
        what = f"errno {err} at call {k} ({t.trace[k - start][1:]})"
        if postponed:  # still usable, the transaction committed
            anyio.run(run_tx, store, [("probe", b"p")])
            anyio.run(store.aclose)
            allowed = [applied(after, [("probe", b"p")])]
            verdicts |= {"checkpoint postponed"}
        elif k < cp:  # before the commit point: rolled back, nothing changed
            assert not isinstance(exc, walstore.StoreFailedError), what
            assert isinstance(exc, OSError), what
            assert tx.state is walstore.TxState.ROLLED_BACK, what
            assert user_files(fs) == model, what
            if t.trace[k - start][1] == "fsync_dir":
                # a failed fsync is never retried: the store refuses writes until reopened
                with pytest.raises(walstore.StoreFailedError):
                    anyio.run(run_tx, store, [("probe", b"p")])
                anyio.run(store.aclose)
                allowed, verdicts = [model], verdicts | {"failed before the commit point"}
            else:  # still usable
                anyio.run(run_tx, store, [("probe", b"p")])
                anyio.run(store.aclose)
                allowed, verdicts = [probe], verdicts | {"usable"}
        else:  # at or after it: the store refuses writes until reopened
            if k < tx_end:
                unknown = k == cp  # the journal sync: the outcome is unknown
                want_exc = (
                    walstore.CommitOutcomeUnknownError
                    if unknown
                    else walstore.CommittedNotAppliedError
                )
                assert type(exc) is want_exc, (what, exc)
                want = walstore.TxState.FAILED if unknown else walstore.TxState.COMMITTED
                assert tx.state is want, what
            with pytest.raises(walstore.StoreFailedError):
                anyio.run(run_tx, store, [("probe", b"p")])
            anyio.run(store.aclose)
            allowed, verdicts = ([model, after] if k == cp else [after]), verdicts | {"failed"}
        fs.reboot(power_loss=random.Random(k))
        found = reopen(fs, allowed, what, close=False)
        survives_power_cut(fs, found, what, seeds=1)
    want = {"usable", "failed", "failed before the commit point", "tolerated"}
    assert verdicts == want | {"checkpoint postponed"}


def _crashed_mid_apply() -> tuple[MemoryFileSystem, Model]:
    """A process that died half-way through applying a committed group (staged, inline,
    delete, new directories): recovery has real work to do."""
    base, model = fresh(SETUP)
    t = base.clone()
    store = open_store(t, FULL)
    t.trace = []
    anyio.run(run_tx, store, TX)
    cp = commit_point(t.trace)
    fs = base.clone()
    store = open_store(fs, FULL)
    fs.crash_at = cp + (t.count - cp) // 2
    _, exc = attempt(store, TX)
    assert exc is not None
    fs.reboot()
    return fs, applied(model, TX)


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_io_error_at_every_call_of_recovery(err: int) -> None:
    base, after = _crashed_mid_apply()
    t = base.clone()
    t.trace = []
    open_store(t, FULL)
    for k in range(t.count):
        for power in (False, True):
            fs = base.clone()
            fs.fault = lambda i, n, p, k=k: OSError(err, "injected") if i == k else None
            what = f"errno {err} at recovery call {k} {t.trace[k][1:]} power={power}"
            if t.trace[k][1] == "unlock" and "/.walstore/" in t.trace[k][2]:
                anyio.run(open_store(fs, FULL).aclose)  # a lock's close: tolerated, logged
            else:
                with pytest.raises(OSError):
                    open_store(fs, FULL)
            fs.fault = None
            fs.reboot(power_loss=random.Random(k) if power else None)
            reopen(fs, [after], what, close=False)
            survives_power_cut(fs, after, what, seeds=1)


def test_two_crashes_in_a_row_inside_recovery() -> None:
    base, after = _crashed_mid_apply()
    t = base.clone()
    open_store(t, FULL)
    n = t.count
    for k in range(n + 1):
        for power in (None, 1):
            fs = base.clone()
            for j, rec_k in enumerate((k, (k * 7 + 3) % n)):
                fs.crash_at = fs.count + rec_k
                try:  # after a power cut recovery may need fewer calls than rec_k
                    open_store(fs, FULL)
                except BaseException:
                    pass
                fs.reboot(power_loss=random.Random(f"{k}/{j}") if power else None)
            reopen(fs, [after], f"recovery crashed at {k} then at {(k * 7 + 3) % n}")


# -- crashes, with a commit-point-aware oracle ---------------------------------------------------


@pytest.mark.parametrize("shape", ["mixed", "staged-superseded"])
def test_crash_then_full_recovery_then_power_cut(shape: str) -> None:
    """Crash at every call of a commit and its checkpoint. After the commit point only the new
    state is allowed (the sweep allows both), and once recovery returned, a power cut must not
    change what it recovered (the sweep cuts power only *before* recovery)."""
    tx_ops = TX if shape == "mixed" else [("x", BIG[::-1]), ("v", BIG), ("v", None), ("x", b"s")]
    base, model = fresh(SETUP)
    after = applied(model, tx_ops)
    t = base.clone()
    store = open_store(t, FULL)
    t.trace, start = [], t.count
    anyio.run(run_tx, store, tx_ops)
    anyio.run(store.aclose)
    cp = commit_point(t.trace)
    for k in range(start, t.count + 1):
        for power in (None, 1, 2):
            fs = base.clone()
            store = open_store(fs, FULL)
            fs.crash_at = k
            _, exc = attempt(store, tx_ops)
            if exc is None:
                try:
                    anyio.run(store.aclose)
                except BaseException:
                    pass
            fs.reboot(power_loss=random.Random(f"{shape}{k}/{power}") if power else None)
            what = f"{shape}: crash at {k} (commit point {cp}) power={power}"
            found = reopen(fs, [after] if k > cp else [model, after], what, close=False)
            survives_power_cut(fs, found, what)


def test_group_commit_crash_sweep() -> None:
    """Groups of several transactions (the sweep and the model test only ever commit groups of
    one): staged values superseded in the same group by a staged and then an inline value, a
    value staged and deleted in one transaction, new directories next to deleted files."""
    base, s0 = fresh([("a", b"old"), ("x", BIG), ("z", b"z"), ("d1/b", b"b")])
    txs: list[Ops] = [
        [("a", b"1")],
        [("x", BIG[::-1]), ("y", b"y"), ("v", BIG), ("v", None)],
        [("x", BIG[:300]), ("z", None), ("d1/d2/new", b"n")],
        [("n/d/f", b"f"), ("x", b"small"), ("d1/b", None)],
    ]
    s1 = applied(s0, txs[0])
    s2 = applied(s1, [op for ops in txs[1:] for op in ops])

    async def commit_all(store: walstore.Store) -> None:
        prepared = []
        for ops in txs:  # stage sequentially: the call order stays deterministic
            tx = store.transaction()
            for path, value in ops:
                await (tx.delete(path) if value is None else tx.write(path, value))
            prepared.append(tx)
        await prepared[0].commit()  # [t1] alone, then t2..t4 queue and commit as one group
        async with anyio.create_task_group() as tg:
            for tx in prepared[1:]:
                tg.start_soon(tx.commit)

    t = base.clone()
    store = open_store(t, FULL)
    t.trace, start = [], t.count
    ungated: list[str] = []  # user-visible changes made while readers are not held off

    def gate_check(index: int, name: str, path: str) -> None:
        dst = path.split(" -> ")[-1].split(" <-> ")[-1]
        user = dst.startswith(ROOT + "/") and not dst.startswith(ROOT + "/.walstore")
        if name in ("rename", "exchange", "unlink", "mkdir", "link") and user and not gate._writer:
            ungated.append(path)

    gate, t.fault = store._engine._gate, gate_check
    anyio.run(commit_all, store)
    anyio.run(store.aclose)
    syncs = [i for i, name, path in t.trace if name == "fdatasync" and path.endswith(".wal")]
    assert len(syncs) == 2 and store.stats().groups == 2
    assert user_files(t) == s2 and not ungated
    assert t.files(STAGING, skip=()) == {}  # a clean close leaves nothing staged
    for k in range(start, t.count + 1):
        for power in (None, 1):
            fs = base.clone()
            store = open_store(fs, FULL)
            fs.crash_at = k
            try:
                anyio.run(commit_all, store)
                anyio.run(store.aclose)
            except BaseException:
                pass
            fs.reboot(power_loss=random.Random(k) if power else None)
            allowed = [s2] if k > syncs[1] else [s1, s2] if k > syncs[0] else [s0, s1]
            found = reopen(fs, allowed, f"group crash at {k} power={power}", close=False)
            survives_power_cut(fs, found, f"group crash at {k}", seeds=1)


# -- MemoryFileSystem: faithful to its docstring, and where it is lenient ------------------------


def _disk() -> MemoryFileSystem:
    fs = MemoryFileSystem()
    for d in ("/x", "/y"):
        fs.mkdir(d)
    fs.fsync_dir("/")
    return fs


def _put(fs: MemoryFileSystem, path: str, data: bytes, *, sync: bool = True) -> None:
    fd = fs.open(path, create=True, truncate=True)
    fs.pwrite(fd, data, 0)
    if sync:
        fs.fsync(fd)
    fs.close(fd)


def test_memoryfs_fsync_dir_makes_exactly_that_directory_durable() -> None:
    fs = _disk()
    _put(fs, "/x/f", b"1")
    _put(fs, "/y/g", b"2")
    fs.mkdir("/x/new")
    _put(fs, "/x/new/h", b"3")
    fs.fsync_dir("/x/new")  # its entries, not its own name in /x
    fs.fsync_dir("/y")
    fs.reboot(power_loss=LoseAll())
    assert fs.files("/") == {"x/": b"", "y/g": b"2"}


def test_memoryfs_unsynced_state_of_a_dead_process_is_lost_by_a_later_power_cut() -> None:
    fs = _disk()
    _put(fs, "/x/f", b"data", sync=False)
    fs.reboot()  # the process died: the page cache keeps everything
    assert fs.files("/x") == {"f": b"data"}
    fs.reboot(power_loss=LoseAll())
    assert fs.files("/x") == {}


def test_memoryfs_renames_are_atomic_under_power_loss() -> None:
    seen = set()
    for seed in range(200):
        fs = _disk()
        _put(fs, "/y/t", b"old")
        fs.rename("/y/t", "/x/a")
        fs.fsync_dir("/x")  # durable through its destination
        _put(fs, "/y/t2", b"new")
        fs.rename("/y/t2", "/x/a")  # not durable: old or new, never neither, never both names
        fs.reboot(power_loss=random.Random(seed))
        files = {p: v for p, v in fs.files("/").items() if not p.endswith("/")}
        seen.add(tuple(sorted(files.items())))
        assert files in ({"x/a": b"old"}, {"x/a": b"new"}, {"x/a": b"old", "y/t2": b"new"})
    assert len(seen) == 3


def test_memoryfs_models_fsyncgate() -> None:
    """A failed file fsync loses the unsynced data for good, even if a retry "succeeds"."""
    kept = 0
    for seed in range(20):
        fs = _disk()
        fs.fault = lambda i, n, p: OSError(errno.EIO, "x") if n == "fsync" else None
        fd = fs.open("/x/f", create=True)
        fs.pwrite(fd, b"data", 0)
        with pytest.raises(OSError):
            fs.fsync(fd)
        fs.fault = None
        fs.fsync(fd)  # "succeeds"
        fs.close(fd)
        fs.fsync_dir("/x")
        fs.reboot(power_loss=random.Random(seed))
        kept += fs.files("/x") == {"f": b"data"}
    assert kept < 20


# -- bugs -----------------------------------------------------------------------------------------


def test_layout_of_a_crashed_first_open_is_made_durable() -> None:
    t = MemoryFileSystem()
    t.trace = []
    anyio.run(open_store(t, FULL).aclose)
    layout_syncs = [i for i, name, _ in t.trace if name == "fsync_dir"][:3]
    lost = []
    for k in layout_syncs:
        fs = MemoryFileSystem()
        fs.crash_at = k
        with pytest.raises(BaseException):
            open_store(fs, FULL)
        fs.reboot()
        anyio.run(run_tx, open_store(fs, FULL), [("a", b"acked")])
        fs.reboot(power_loss=LoseAll())
        anyio.run(open_store(fs, FULL).aclose)
        lost += [k] if user_files(fs) != {"a": b"acked"} else []
    assert not lost


def test_full_after_off_is_durable() -> None:
    fs, _ = fresh([])
    store = open_store(fs, OFF)
    anyio.run(run_tx, store, [("x", b"off")])
    anyio.run(store.aclose)
    store = open_store(fs, FULL)
    anyio.run(run_tx, store, [("a", b"acked")])
    fs.reboot(power_loss=LoseAll())
    anyio.run(open_store(fs, FULL).aclose)
    assert user_files(fs).get("a") == b"acked"


@pytest.mark.parametrize("same_tx", [False, True])
def test_replay_delete_of_a_name_that_became_a_directory(same_tx: bool) -> None:
    fs, _ = fresh([("a", b"file")])
    store = open_store(fs, FULL)
    if same_tx:
        anyio.run(run_tx, store, [("a", None), ("a/b", b"nested")])
    else:
        anyio.run(run_tx, store, [("a", None)])
        anyio.run(run_tx, store, [("a/b", b"nested")])
    fs.crashed = True  # the process dies before any checkpoint
    fs.reboot()
    reopen(fs, [{"a/b": b"nested"}], "replay")


def test_failed_store_never_shows_half_a_group() -> None:
    fs, _ = fresh([("a", b"old"), ("b", b"old")])
    store = open_store(fs, FULL)
    fs.fault = lambda i, n, p: (
        OSError(errno.EIO, "x") if n in ("rename", "exchange") and p.endswith("/b") else None
    )
    _, exc = attempt(store, [("a", b"new"), ("b", b"new")])
    assert isinstance(exc, walstore.CommittedNotAppliedError)

    async def both() -> tuple[bytes, bytes] | None:
        try:
            return await store.read("a"), await store.read("b")
        except walstore.StoreFailedError:
            return None

    assert anyio.run(both) in (None, (b"old", b"old"), (b"new", b"new"))


def test_failed_staging_fsync_is_not_retried() -> None:
    """An EIO from fsync_dir(staging/) before the commit point rolls its group back and fails
    the store: a later group must not retry that fsync and acknowledge a transaction whose
    staged value's name the failed fsync may have lost (fsyncgate)."""
    fs, _ = fresh([])
    store = open_store(fs, FULL)
    fired: list[int] = []

    def fsyncgate(index: int, name: str, path: str) -> OSError | None:
        if name == "fsync_dir" and path == STAGING and not fired:
            fired.append(index)  # the kernel drops the dirty entries and reports them clean
            d = fs._get(path)
            fs._pending = [
                o for o in fs._pending if o[1] != d and not (o[0] == "rename" and o[3] == d)
            ]
            return OSError(errno.EIO, "injected")
        return None

    async def main() -> walstore.Transaction:
        tb = store.transaction()
        await tb.write("b", BIG)  # staged, waits
        fs.fault = fsyncgate
        with pytest.raises(OSError):
            async with store.transaction() as ta:
                await ta.write("a", BIG)
        with pytest.raises(walstore.StoreFailedError):
            await tb.commit()
        return tb

    tb = anyio.run(main)
    assert fired and tb.state is walstore.TxState.ROLLED_BACK  # never acknowledged
    anyio.run(store.aclose)
    fs.reboot(power_loss=LoseAll())
    reopen(fs, [{}], "after fsyncgate")


def test_failed_recovery_leaks_no_handle() -> None:
    base, _ = _crashed_mid_apply()
    fs = base.clone()
    # Dropping the old segment fails (it is unlinked, or renamed to be the spare).
    fs.fault = lambda i, n, p: (
        OSError(errno.EIO, "x")
        if (n == "unlink" and p.endswith(".wal")) or (n == "rename" and p.endswith("/spare"))
        else None
    )
    with pytest.raises(OSError):
        open_store(fs, FULL)
    assert fs.open_fds() == 0
