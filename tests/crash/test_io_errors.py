"""I/O errors at every file-system call of commit, checkpoint and recovery: EIO, ENOSPC, EDQUOT,
EROFS and short writes, once (transient) and from that call on (persistent).

The verdicts (DESIGN.md 1.7, docs/commit-protocol.md 4):

* before the commit point: the transaction raises a clean error (not StoreFailedError), is
  ROLLED_BACK and nothing changed; after a transient error the store is still usable (unless
  the failed call was a sync, which is never retried: then it refuses writes);
* the journal fdatasync (the commit point): CommitOutcomeUnknownError and the transaction
  FAILED, never ROLLED_BACK; reopening finds it wholly or not at all;
* after it: in apply CommittedNotAppliedError, in the checkpoint the plain StoreFailedError;
  the transaction COMMITTED, the store refuses writes (the plain StoreFailedError) until
  reopened, and reopening recovers a state holding the transaction;
* except ENOSPC or EDQUOT in the checkpoint at a call on ``.walstore/`` other than a sync (the
  journal's recycled spare segment, a new segment, the reserve's free_space, the clean-up):
  the checkpoint is postponed with an OSError of that errno (or, for free_space, succeeds), the
  store stays usable, and reopening recovers the transaction;
* a short write is no error at all.

Each case then reopens (after a process restart, or a power cut) and checks the state
against what the verdict allows, with no staging leftovers and a clean journal. Recovery gets
the same errors from a store whose process died half-way through applying a commit: it fails
with a clean error, leaks no handle, and the next open recovers.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
from collections.abc import Awaitable, Callable

import anyio
import pytest

import walstore
from tests.crash.shapes import BY_NAME, SHAPES, SOAK, TUNING, Shape, TxOps, fill, run_tx
from tests.crash.simcheck import check as check_recovered
from tests.crash.simcheck import recover
from tests.support import ROOT, Model, tally, user_files
from walstore.testing import MemoryFileSystem, ShortWrite

pytestmark = [
    pytest.mark.guarantee(name="Fail-stop"),
    pytest.mark.guarantee(name="A full disk locks no one out"),
]

TALLY = tally("injected I/O errors")
ERRNOS = (errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EROFS)
KINDS = (*(errno.errorcode[e] for e in ERRNOS), "short write")
MODES = ("once", "persistent", "twice")
SYNCS = {"fsync", "fdatasync", "fsync_dir"}
NO_SPACE = ("ENOSPC", "EDQUOT")
PROBE: TxOps = [("probe/p", b"probe")]
Hook = Callable[[int, str, str], BaseException | None]


def _hook(kind: str, at: int, mode: str, fired: list[tuple[int, str, str]]) -> Hook:
    """Fail call ``at`` with ``kind``: only that call ("once"), that one and the next one
    ("twice"), or every call from there on ("persistent")."""
    last = {"once": at, "twice": at + 1}.get(mode)

    def hook(index: int, name: str, path: str) -> BaseException | None:
        if index < at or (last is not None and index > last):
            return None
        if kind == "short write":
            if name != "pwrite":
                return None
            fired.append((index, name, path))
            return ShortWrite()  # type: ignore[return-value]  # the hook may return one
        fired.append((index, name, path))
        code = getattr(errno, kind)
        return OSError(code, f"injected {kind}", path)

    return hook


class Setup:
    """A shape's store with all but its last transaction committed (closed), the last one's
    ops, the states before and after it, and the trace of a clean run of it."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.ops = shape.txs[-1]
        self.fs = MemoryFileSystem()
        self.before: Model = shape.state(set(range(len(shape.txs) - 1)))
        self.after: Model = shape.final

        async def setup() -> None:
            async with walstore.open(ROOT, fs=self.fs, **TUNING) as store:
                for ops in [*shape.setup, *shape.txs[:-1]]:
                    await run_tx(store, ops)

        anyio.run(setup)
        fs = self.fs.clone()
        fs.trace = []
        self.opened, self.tx_end, self.cp_end, excs, _ = anyio.run(_attempt, fs, self.ops)
        assert not any(excs), excs
        self.trace = fs.trace


async def _attempt(
    fs: MemoryFileSystem, ops: TxOps, hook: Hook | None = None
) -> tuple[int, int, int, list[BaseException | None], walstore.Transaction]:
    """Open, run the transaction (with ``hook`` armed), checkpoint, commit a probe, close.
    Returns the call index before and after the transaction and after the checkpoint, the
    exceptions of the four steps and the transaction."""
    store = await walstore.open(ROOT, fs=fs, **TUNING)
    start = fs.count
    fs.fault = hook
    excs: list[BaseException | None] = []
    tx = store.transaction()
    try:
        async with tx:
            await fill(tx, ops)
        excs.append(None)
    except Exception as exc:
        excs.append(exc)
    tx_end = fs.count
    excs.append(await _capture(store.checkpoint) if excs[0] is None else None)
    cp_end = fs.count
    excs.append(await _capture(lambda: run_tx(store, PROBE)))
    excs.append(await _capture(store.aclose))
    fs.fault = None
    return start, tx_end, cp_end, excs, tx


async def _capture(step: Callable[[], Awaitable[object]]) -> Exception | None:
    try:
        await step()
    except Exception as exc:
        return exc
    return None


def commit_case(s: Setup, at: int, kind: str, mode: str, power: bool) -> tuple[str, list[str]]:
    """Inject ``kind`` at call ``at`` of the transaction or its checkpoint; check the verdict
    and the reopened state. Returns the verdict and violations."""
    fs = s.fs.clone()
    fs.trace = []
    fired: list[tuple[int, str, str]] = []
    _, tx_end, cp_end, excs, tx = anyio.run(_attempt, fs, s.ops, _hook(kind, at, mode, fired))
    tx_exc, cp_exc, probe_exc, close_exc = excs
    persistent = mode != "once"  # (twice: the next call fails too)
    what = f"{s.shape.name}: {kind} {mode} at call {at} {fired[:1]}"
    bad: list[str] = []
    commit_point = next(
        (i for i, n, p in fs.trace if n == "fdatasync" and p.endswith(".wal") and i < tx_end),
        None,
    )
    state = tx.state
    with_probe = probe_exc is None
    # Calls whose failure the store takes in its stride, so that they change nothing: the
    # close of a lock's descriptor (GATE or LOCK, taken per commit; close(2) frees it even
    # when it fails), and the checkpoint's look at which processes have the store open (if
    # it cannot tell, the old segment is dropped instead of kept as the spare). The verdict
    # follows the first other call that failed.
    tolerated = [f for f in fired if _tolerated(f)]
    fired = [f for f in fired if f not in tolerated]
    if tolerated and (not fired or fired[0][0] >= cp_end) and kind != "short write":
        # (persistent: what failed next was the probe's or the close's)
        allowed = [_with_probe(s.after)] if with_probe else [s.after]
        verdict = "a tolerated call failed: no effect"
        if tx_exc is not None or cp_exc is not None or state is not walstore.TxState.COMMITTED:
            bad.append(f"a tolerated call's failure changed the outcome: {excs}, {state}")
        if not persistent and not with_probe:
            bad.append(f"store unusable after a tolerated call failed: {probe_exc!r}")
    elif kind == "short write":
        verdict = "short write completed"
        if any(excs) or state is not walstore.TxState.COMMITTED:
            bad.append(f"short write not completed: {excs}, {state}")
        allowed = [_with_probe(s.after)]
    elif not fired or fired[0][0] >= cp_end:
        return "none", [f"nothing injected during the transaction or checkpoint: {what}"]
    elif commit_point is None or fired[0][0] < commit_point:
        # before the commit point
        name = fired[0][1]
        verdict = "before the commit point, " + ("usable" if with_probe else "refusing")
        unknown = isinstance(tx_exc, walstore.CommitOutcomeUnknownError)
        if state is walstore.TxState.FAILED and unknown:
            # a journal append that failed and could not be cut back: outcome unknown
            allowed = [s.before, s.after]
            if not (persistent and name in ("pwrite", "truncate")):
                bad.append(f"outcome unknown before the commit point: {tx_exc!r}")
        else:
            allowed = [s.before]
            if state is not walstore.TxState.ROLLED_BACK:
                bad.append(f"state {state} before the commit point")
            if not isinstance(tx_exc, OSError | walstore.StoreError) or isinstance(
                tx_exc, walstore.StoreFailedError
            ):
                bad.append(f"unclean error before the commit point: {tx_exc!r}")
        if not persistent and name not in SYNCS and not with_probe:
            bad.append(f"store unusable after a transient {name} error: {probe_exc!r}")
        if with_probe:
            allowed = [_with_probe(m) for m in allowed]
    elif fired[0][0] == commit_point:
        verdict = "commit point: outcome unknown"
        allowed = [s.before, s.after]
        if state is not walstore.TxState.FAILED:
            bad.append(f"journal sync failed but the transaction is {state}")
        unknown = isinstance(tx_exc, walstore.CommitOutcomeUnknownError)
        if not unknown or "unknown" not in str(tx_exc):
            bad.append(f"journal sync failed but the error is {tx_exc!r}")
        if not _refusal(probe_exc):
            bad.append(f"store not poisoned after a failed journal sync: {probe_exc!r}")
    elif _postponable(kind, fired[0], tx_end):
        verdict = "checkpoint postponed for space"
        allowed = [s.after]
        if state is not walstore.TxState.COMMITTED:
            bad.append(f"state {state} after the commit point")
        code = getattr(errno, kind, None)
        if cp_exc is not None and (
            not isinstance(cp_exc, OSError)
            or isinstance(cp_exc, walstore.StoreError)
            or cp_exc.errno != code
        ):
            bad.append(f"checkpoint without space is not a clean {kind}: {cp_exc!r}")
        if not persistent and not with_probe:
            bad.append(f"store unusable after a postponed checkpoint: {probe_exc!r}")
        if with_probe:
            allowed = [_with_probe(s.after)]
    else:
        # after the commit point: in apply, or in the checkpoint
        allowed = [s.after]
        in_tx = fired[0][0] < tx_end
        verdict = "after the commit point, " + ("apply" if in_tx else "checkpoint")
        exc = tx_exc if in_tx else cp_exc
        if state is not walstore.TxState.COMMITTED:
            bad.append(f"state {state} after the commit point")
        # apply: the transaction's own outcome (committed); a checkpoint: the store's only
        want = walstore.CommittedNotAppliedError if in_tx else walstore.StoreFailedError
        if type(exc) is not want:
            bad.append(f"no {want.__name__} after the commit point: {tx_exc!r} / {cp_exc!r}")
        if not _refusal(probe_exc):
            bad.append(f"store not poisoned after the commit point: {probe_exc!r}")
    if close_exc is not None and not isinstance(close_exc, OSError | walstore.StoreError):
        bad.append(f"aclose raised {close_exc!r}")
    leaked = not persistent and fired and fired[0][1] not in ("close", "unlock", "funlock")
    if (leaked or kind == "short write") and fs.open_fds():
        bad.append(f"fd leak: {fs.open_fds()} handles open after aclose")
    if not bad and with_probe and user_files(fs) not in allowed:
        bad.append(f"state before reopening: {sorted(user_files(fs))}")
    fs.reboot(power_loss=random.Random(f"{what}") if power else None)
    bad += _reopen(fs, allowed)
    return verdict, [f"{b} ({what}, power={power})" for b in bad]


def _refusal(exc: BaseException | None) -> bool:
    """A failed store's refusal of a later transaction: the plain StoreFailedError, neither
    subclass (that transaction has no outcome to learn)."""
    return type(exc) is walstore.StoreFailedError


def _tolerated(call: tuple[int, str, str]) -> bool:
    _, name, path = call
    meta = ROOT + "/.walstore/"
    if name in ("unlock", "funlock"):  # releasing a lock: logged, its handle closed
        return path.startswith(meta)
    if name == "close" and path in (meta + "GATE", meta + "LOCK"):
        return True  # the kept handle of a lock whose release failed: logged
    return name in ("lstat", "listdir", "lock") and path.startswith(meta + "procs")


def _postponable(kind: str, call: tuple[int, str, str], tx_end: int) -> bool:
    """No space in the checkpoint at a call on the store's own files that is not a sync, any
    error of its last look at free space, or any error taking the commit lock before it
    starts: nothing committed is at risk, so it must not fail the store."""
    index, name, path = call
    if index < tx_end:
        return False
    if name == "free_space":  # the checkpoint's last look, for its triggers
        return True
    if name in ("lock", "flock") and path.startswith(ROOT + "/.walstore/"):
        return True  # the checkpoint could not take the commit lock: it did nothing yet
    meta = ROOT + "/.walstore/"
    return kind in NO_SPACE and name not in SYNCS | {"syncfs"} and path.startswith(meta)


def _with_probe(model: Model) -> Model:
    return {**model, "probe/p": b"probe"}


def _reopen(fs: MemoryFileSystem, allowed: list[Model]) -> list[str]:
    return check_recovered(fs, allowed, [])


def recovery_image(s: Setup) -> MemoryFileSystem:
    """The disk of a process that died half-way between the commit point and the end of the
    transaction (recovery must roll it forward)."""
    cp = max(i for i, n, p in s.trace if n == "fdatasync" and p.endswith(".wal") and i < s.tx_end)
    fs = s.fs.clone()
    fs.crash_at = cp + 1 + (s.tx_end - cp) // 2
    try:
        anyio.run(_attempt, fs, s.ops)
    except BaseException:
        pass
    assert fs.crashed
    fs.reboot()
    return fs


def recovery_case(
    image: MemoryFileSystem, after: Model, at: int, kind: str, mode: str, power: bool
) -> list[str]:
    fs = image.clone()
    fired: list[tuple[int, str, str]] = []
    fs.fault = _hook(kind, at, mode, fired)
    persistent = mode != "once"
    bad: list[str] = []
    try:
        recover(fs)
    except Exception as exc:
        if kind == "short write":
            bad.append(f"short write failed recovery: {exc!r}")
        elif not isinstance(exc, OSError | walstore.StoreError):
            bad.append(f"failed recovery: raised {exc!r}")
        # (a close that fails keeps its handle in the simulation; a real close frees it)
        closes = persistent or (fired and fired[0][1] in ("close", "unlock", "funlock"))
        if fs.open_fds() and not closes:
            bad.append(f"fd leak: {fs.open_fds()} handles open after a failed recovery")
    fs.fault = None
    fs.reboot(power_loss=random.Random(f"{at}/{kind}") if power else None)
    bad += _reopen(fs, [after])
    what = f"recovery: {kind} {mode} at call {at} {fired[:1]}"
    return [f"{b} ({what}, power={power})" for b in bad]


def _cases(n: int, pwrite: bool) -> list[tuple[str, str, bool]]:
    """(kind, mode, power cut before reopening) for the ``n``th call: once and persistently,
    one errno (in turn) or, soaking, every errno, and twice in a row, each with and without a
    power cut; short writes at each pwrite."""
    if SOAK == 1:
        out = [(KINDS[(n + m) % 4], mode, (n + m) % 2 == 1) for m, mode in enumerate(MODES[:2])]
    else:
        out = [(k, mode, p) for k in KINDS[:4] for mode in MODES for p in (False, True)]
    if pwrite:
        out += [("short write", mode, n % 2 == 1) for mode in MODES[:2]]
    return out


def sweep(name: str) -> tuple[str, dict[str, int], dict[str, int], list[str]]:
    """Every call of the last transaction of ``name``, its checkpoint and a recovery.
    Returns the cases by kind of error and by verdict, and the violations."""
    s = Setup(BY_NAME[name])
    counts: dict[str, int] = {}
    verdicts: dict[str, int] = {}
    bad: list[str] = []
    pwrites = {i for i, n, _ in s.trace if n == "pwrite"}
    for n, at in enumerate(range(s.opened, s.cp_end)):
        for kind, mode, power in _cases(n, at in pwrites):
            verdict, v = commit_case(s, at, kind, mode, power)
            bad += v
            counts[kind] = counts.get(kind, 0) + 1
            verdicts[verdict] = verdicts.get(verdict, 0) + 1
    # The calls swept include the spare segment's recycling and the reserve's look at space.
    swept = [(n, p) for i, n, p in s.trace if s.opened <= i < s.cp_end]
    spare = {n for n, p in swept if p.startswith(ROOT + "/.walstore/journal/spare")}
    for call in ("open", "pwrite", "rename"):
        counts[f"{call}(spare)"] = int(call in spare)
    counts["free_space()"] = int(any(n == "free_space" for n, _ in swept))
    image = recovery_image(s)
    t = image.clone()
    t.trace = []
    recover(t)
    rec_pwrites = {i for i, n, _ in t.trace if n == "pwrite"}
    for at in range(image.count, t.count):
        for kind, mode, power in _cases(at, at in rec_pwrites):
            bad += recovery_case(image, s.after, at, kind, mode, power)
            counts[kind] = counts.get(kind, 0) + 1
            verdicts["recovery"] = verdicts.get("recovery", 0) + 1
    return name, counts, verdicts, bad


def test_io_errors_at_every_call() -> None:
    shapes = [s.name for s in SHAPES if not s.real_only and not s.concurrent]
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 2) as pool:
        results = list(pool.imap_unordered(sweep, shapes))
    bad = [v for *_, b in results for v in b]
    counts: dict[str, int] = {}
    verdicts: dict[str, int] = {}
    covered: dict[str, int] = {}
    for _, c, v, _ in results:
        for kind, n in c.items():
            if "(" in kind:
                covered[kind] = covered.get(kind, 0) + n
                continue
            counts[kind] = counts.get(kind, 0) + n
        for verdict, n in v.items():
            verdicts[verdict] = verdicts.get(verdict, 0) + n
    TALLY.cases += sum(counts.values())
    for kind, n in counts.items():
        TALLY.parts[kind] = TALLY.parts.get(kind, 0) + n
    TALLY.add(shapes=len(results))
    TALLY.violations += bad
    assert not bad, bad[:5]
    assert set(counts) == set(KINDS)
    # shapes whose sweep failed at the spare's recycling and at the reserve's free_space
    assert all(covered.values()) and len(covered) == 4, covered
    assert set(verdicts) == {
        "short write completed",
        "before the commit point, usable",
        "before the commit point, refusing",
        "commit point: outcome unknown",
        "after the commit point, apply",
        "after the commit point, checkpoint",
        "checkpoint postponed for space",
        "a tolerated call failed: no effect",
        "recovery",
    }, verdicts
    assert sum(counts.values()) >= 2000 * SOAK
