"""I/O errors (EIO, ENOSPC) at every call of a commit, its checkpoint and a recovery, judged
by the commit point: before it the transaction rolls back and the store stays usable (or, if
the failed call was a sync, refuses writes: a failed fsync is never retried); at it the
outcome is unknown; after it the transaction is committed and the store refuses writes until
reopened; a checkpoint short of space is postponed. Each case is then reopened after a power
cut, and what recovery made of it must survive another one (``tests/crash/oracle.py``).
tests/crash/test_io_errors.py sweeps more errors and shapes; these follow each case through
a power cut after its recovery.
"""

from __future__ import annotations

import errno
import random

import anyio
import pytest

import walstore
from tests.crash.oracle import (
    FULL,
    SETUP,
    TX,
    attempt,
    commit_point,
    crashed_mid_apply,
    reopen,
    survives_power_cut,
)
from tests.support import ROOT, applied, fresh, open_store, run_tx, user_files

pytestmark = pytest.mark.guarantee(name="Fail-stop")


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
            name in ("unlock", "funlock")
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
            or (name in ("lock", "flock") and path.startswith(ROOT + "/.walstore/"))  # no-op
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
                locking = name in ("lock", "flock")
                assert cp_exc.errno == err and (err == errno.ENOSPC or locking), cp_exc
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


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_io_error_at_every_call_of_recovery(err: int) -> None:
    base, after = crashed_mid_apply()
    t = base.clone()
    t.trace = []
    open_store(t, FULL)
    for k in range(t.count):
        for power in (False, True):
            fs = base.clone()
            fs.fault = lambda i, n, p, k=k: OSError(err, "injected") if i == k else None
            what = f"errno {err} at recovery call {k} {t.trace[k][1:]} power={power}"
            if t.trace[k][1] in ("unlock", "funlock") and "/.walstore/" in t.trace[k][2]:
                anyio.run(open_store(fs, FULL).aclose)  # a lock's close: tolerated, logged
            else:
                with pytest.raises(OSError):
                    open_store(fs, FULL)
            fs.fault = None
            fs.reboot(power_loss=random.Random(k) if power else None)
            reopen(fs, [after], what, close=False)
            survives_power_cut(fs, after, what, seeds=1)
