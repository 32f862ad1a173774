"""Crash at every file-system operation of commit, checkpoint and recovery, in real processes.

For every shape: a probe child runs the workload to its end and records every operation it
makes after the setup (staging, commit, checkpoints, the checkpoint of ``aclose``); then one
child per operation index k dies with ``os._exit`` right before operation k, a recovery child
is crashed at some operation j of its own, and the store is reopened and checked (see
realproc.py). Recovery is then crashed at *every* one of its operations, from the image of a
workload that died just after its last commit point (the most recovery work there is). The
test asserts that every seam method the commit, checkpoint and recovery code calls was a
crash point.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import walstore
from tests.crash.realproc import (
    SEAM,
    STREAM,
    Case,
    Result,
    check_store,
    copy_tree,
    make_image,
    make_setup,
    run_case,
    scratch_dir,
    warm_up,
)
from tests.crash.shapes import BY_NAME, SHAPES, SOAK
from tests.support import tally

pytestmark = [pytest.mark.guarantee(name="Atomic"), pytest.mark.guarantee(name="Recovered on open")]

TALLY = tally("crash points (real processes)")  # cases: processes killed at an operation
WORKERS = (os.cpu_count() or 2) + 1  # children often wait for thread hops


def _run(args: tuple[Case, str]) -> Result:
    return run_case(*args)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    scratch = scratch_dir(str(tmp_path_factory.mktemp("crash")))
    os.makedirs(scratch, exist_ok=True)
    warm_up(scratch)
    with multiprocessing.get_context("fork").Pool(WORKERS) as p:
        yield p, scratch
    shutil.rmtree(scratch, ignore_errors=True)


def _commit_points(trace: list[tuple[str, str]]) -> list[int]:
    return [i for i, (name, path) in enumerate(trace) if name == "fdatasync" and ".wal" in path]


@dataclass
class Probe:
    """A shape's setup store, the operations of a clean run of its workload, the image of
    a workload killed right after its last commit point, and the operations recovering it."""

    setup: str
    trace: list[tuple[str, str]]
    k_star: int
    image: str
    acked: tuple[int, ...]
    recovery: list[tuple[str, str]]

    @property
    def names(self) -> set[tuple[str, str]]:
        return {("workload", n) for n, _ in self.trace} | {
            ("recovery", n) for n, _ in self.recovery
        }


PROBED: dict[str, set[tuple[str, str]]] = {}  # shape -> (phase, method) of its probes


def probe(shape: str, scratch: str) -> Probe:
    setup = os.path.join(scratch, f"setup-{shape}")
    make_setup(shape, setup)
    run = run_case(Case(shape, setup, None, None, record=True), scratch)
    assert not run.violations, run.violations
    assert run.trace is not None
    n_tx = len(BY_NAME[shape].txs)
    assert sorted(run.acked) == list(range(n_tx))
    last_ack = max(run.ack_at.values())
    k_star = max(i for i in _commit_points(run.trace) if i < last_ack) + 1
    image = os.path.join(scratch, f"image-{shape}")
    made = make_image(Case(shape, setup, k_star, None), image)
    assert not made.violations and made.crashes, (made.violations, made.crashes)
    acked = tuple(made.acked)
    rec = run_case(Case(shape, setup, None, -1, image=image, acked=acked, record=True), scratch)
    assert not rec.violations, rec.violations
    assert rec.trace is not None
    p = Probe(setup, run.trace, k_star, image, acked, rec.trace)
    PROBED[shape] = p.names
    return p


def sweep(shape: str, pool: Any, scratch: str) -> None:
    """Crash ``shape`` at every operation and check that every kind of operation its probes
    made was a crash point."""
    p = probe(shape, scratch)
    setup, trace, k_star, image, acked = p.setup, p.trace, p.k_star, p.image, p.acked
    n_rec = len(p.recovery)

    # every k; a recovery crash after every third one (soak: after every one, ten times)
    cases = [Case(shape, setup, k, None) for k in range(len(trace) + 1) if SOAK == 1 and k % 3]
    cases += [
        Case(shape, setup, k, (k * 7 + 3 + r * 13) % (n_rec + 2))
        for k in range(len(trace) + 1)
        if SOAK > 1 or not k % 3
        for r in range(SOAK)
    ]
    cases += [Case(shape, setup, k_star, j, image=image, acked=acked) for j in range(n_rec + 1)]
    results = pool.map(_run, [(c, scratch) for c in cases], chunksize=4)
    shutil.rmtree(image, ignore_errors=True)
    shutil.rmtree(setup, ignore_errors=True)

    crashed = {c for r in results for c in r.crashes}
    TALLY.cases += sum(len(r.crashes) for r in results)
    TALLY.add(shapes=1, stores_reopened_and_checked=len(results))
    for phase, part in (("workload", "in commit or checkpoint"), ("recovery", "in recovery")):
        n = sum(1 for r in results for ph, _ in r.crashes if ph == phase)
        TALLY.parts[part] = TALLY.parts.get(part, 0) + n
    bad = [f"{kind}: {shape} k={r.k} j={r.j}: {msg}" for r in results for kind, msg in r.violations]
    TALLY.violations += bad
    assert not bad, bad[:5]
    # every kind of operation the probes made was a crash point
    assert p.names <= crashed, sorted(p.names - crashed)


@pytest.mark.parametrize("shape", [s.name for s in SHAPES])
def test_crash_at_every_operation(shape: str, pool: tuple[Any, str]) -> None:
    sweep(shape, *pool)


def _seam_calls() -> set[str]:
    """The seam methods that the commit, checkpoint and recovery code calls."""
    src = Path(walstore.__file__).parent
    called: set[str] = set()
    for module in (
        "_engine",
        "_group_steps",
        "_checkpoint",
        "_apply",
        "_recovery",
        "_journal_writer",
        "_store",
        "_store_base",
        "_store_reads",
        "_group_commit",
        "_open",
        "_transaction",
        "_tx_view",
        "_tx_writers",
    ):
        text = (src / f"{module}.py").read_text()
        called |= set(re.findall(r"\bfs\.(\w+)\(", text))
    return called


def test_every_seam_method_was_a_crash_point(pool: tuple[Any, str]) -> None:
    """Each shape's sweep crashed at every kind of operation its probes made (asserted there);
    together the probes make every operation the commit, checkpoint and recovery code calls."""
    for s in SHAPES:
        if s.name not in PROBED:  # swept by another xdist worker, or deselected
            p = probe(s.name, pool[1])
            shutil.rmtree(p.setup)
            shutil.rmtree(p.image)
    probed = set().union(*PROBED.values())
    # confine/release/hold only open and close descriptors of directories (no change a
    # crash could cut in two): not crash points.
    called = _seam_calls() - {"confine", "release", "hold"}
    assert called <= set(SEAM) | {"open_writer"}, called - set(SEAM)
    assert called | set(STREAM) <= {name for _, name in probed}
    # and in the phase each belongs to
    commit = {"open", "pwrite", "fsync", "fdatasync", "close", "rename", "exchange", "link"}
    commit |= {"unlink", "mkdir", "rmdir", "lstat", "listdir", "fsync_dir", "unlock", *STREAM}
    commit |= {"flock", "funlock"}  # the commit lock, through GATE's and LOCK's kept handles
    commit |= {"syncfs"}  # a checkpoint of many files
    commit |= {"free_space"}  # the reserve, before the commit point
    recovery = {"lock", "unlock", "truncate", "realpath", "read_file", "listdir", "lstat"}
    recovery |= {"open", "pwrite", "fsync", "fsync_dir", "close", "rename", "exchange", "link"}
    recovery |= {"unlink", "mkdir", "rmdir", "syncfs"}
    want = {("workload", n) for n in commit} | {("recovery", n) for n in recovery}
    assert want <= probed, sorted(want - probed)


def test_the_checker_sees_lost_partial_and_stray(pool: tuple[Any, str]) -> None:
    """The oracle can fail: a store missing an acknowledged transaction, one holding half of
    one, and one with a temporary file in the user's tree are each reported."""
    _, scratch = pool
    shape = BY_NAME["seq-three"]  # tx 0 writes a and b
    setup = os.path.join(scratch, "checker-setup")
    make_setup(shape.name, setup)
    root = os.path.join(scratch, "checker")

    def kinds(acked: set[int], extra: dict[str, bytes]) -> list[str]:
        shutil.rmtree(root, ignore_errors=True)
        copy_tree(setup, root)
        for rel, data in extra.items():
            Path(root, rel).write_bytes(data)
        return sorted(kind for kind, _ in check_store(root, shape, acked))

    assert kinds(set(), {}) == []
    assert kinds({0, 1}, {}) == ["lost"]
    assert kinds(set(), {"a": b"1"}) == ["partial"]
    assert kinds(set(), {"a": b"1", "b": b"1"}) == []
    assert "leftover" in kinds(set(), {"x.tmp": b""})
    shutil.rmtree(root)
    shutil.rmtree(setup)
