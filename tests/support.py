"""Shared pieces of the crash and model tests: a workload, a model, and the checker.

The checker is ALICE's: after any fault the store is reopened and must equal the model of
every acknowledged transaction, with the interrupted one wholly present or wholly absent.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import anyio

import walstore
from walstore._journal_writer import SPARE
from walstore.testing import MemoryFileSystem, SimulatedCrash

ROOT = "/store"
INLINE = 64  # small inline threshold: values of a few hundred bytes exercise staging

Model = dict[str, bytes]


@dataclass(frozen=True)
class MoveOp:
    src: str
    dst: str


@dataclass(frozen=True)
class DeleteDirOp:
    path: str


@dataclass(frozen=True)
class ReplaceOp:
    path: str
    entries: tuple[tuple[str, bytes], ...]  # relative path, value
    keep: tuple[str, ...]  # top-level names carried over


Op = tuple[str, bytes | None] | MoveOp | DeleteDirOp | ReplaceOp
Ops = list[Op]  # (path, value), (path, None) for a delete, or a directory op

DIRS = ["", "d1/", "d1/d2/", "d3/e/"]
NAMES = ["a", "b.json", "c.txt"]
PATHS = [d + n for d in DIRS for n in NAMES]
TREES = ["d1", "d1/d2", "d3", "d3/e"]
REPLACEABLE = {"d1": ["a", "b.json", "c.txt", "d2/a", "d2/c.txt"], "d1/d2": NAMES, "d3/e": NAMES}


def segment_files(files: dict[str, bytes]) -> dict[str, bytes]:
    """The journal segments among the files of ``.walstore/journal``: all but the spare (a
    retired segment the next checkpoint recycles, never parsed)."""
    return {name: data for name, data in files.items() if name != SPARE}


def _value(rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice([0, 1, 7, INLINE, INLINE + 1, 3 * INLINE, 4 * INLINE]))


def random_ops(rng: random.Random, model: Model, n: int | None = None, dirs: bool = False) -> Ops:
    """1-20 ops: creates, overwrites and deletes, values 0 bytes to 4x the inline threshold;
    with ``dirs``, also moves, delete_dir and replace_dir."""
    ops: Ops = []
    view = dict(model)
    for _ in range(n or rng.randint(1, 20)):
        roll = rng.random()
        files = sorted(view)
        if dirs and roll < 0.12 and files:
            src = rng.choice(files)
            dst = rng.choice([p for p in PATHS if p != src])
            op: Op = MoveOp(src, dst)
        elif dirs and roll < 0.18:
            live = [t for t in TREES if any(k.startswith(t + "/") for k in view)]
            if not live:
                continue
            op = DeleteDirOp(rng.choice(live))
        elif dirs and roll < 0.3:
            path = rng.choice(sorted(REPLACEABLE))
            rels = rng.sample(REPLACEABLE[path], rng.randint(0, 3))
            tops = sorted({r.split("/")[0] for r in REPLACEABLE[path]})
            keep = tuple(rng.sample(tops, rng.randint(0, len(tops))))
            op = ReplaceOp(path, tuple((r, _value(rng)) for r in rels), keep)
        else:
            path = rng.choice(PATHS)
            if path in view and rng.random() < 0.3:
                op = (path, None)
            else:
                op = (path, _value(rng))
        ops.append(op)
        view = applied(view, [op], base=model)
    return ops


def _collides(rel: str, names: set[str]) -> bool:
    return rel in names or any(n.startswith(rel + "/") or rel.startswith(n + "/") for n in names)


def applied(model: Model, ops: Ops, base: Model | None = None) -> Model:
    """``model`` after ``ops``. A replace_dir keeps files as the store holds them when the
    transaction commits: from ``base``, the state before the transaction (``model``)."""
    base = model if base is None else base
    out = dict(model)
    for op in ops:
        if isinstance(op, MoveOp):
            out[op.dst] = out.pop(op.src)
        elif isinstance(op, DeleteDirOp):
            out = {k: v for k, v in out.items() if not k.startswith(op.path + "/")}
        elif isinstance(op, ReplaceOp):
            prefix = op.path + "/"
            names = {r for r, _ in op.entries}
            kept = {
                k: v
                for k, v in base.items()
                if k.startswith(prefix)
                and k[len(prefix) :].split("/")[0] in op.keep
                and not _collides(k[len(prefix) :], names)
            }
            out = {k: v for k, v in out.items() if not k.startswith(prefix)}
            out.update(kept)
            out.update((prefix + r, v) for r, v in op.entries)
        elif op[1] is None:
            out.pop(op[0], None)
        else:
            out[op[0]] = op[1]
    return out


async def run_tx(store: walstore.Store, ops: Ops) -> walstore.Transaction:
    async with store.transaction() as tx:
        for op in ops:
            if isinstance(op, MoveOp):
                await tx.move(op.src, op.dst)
            elif isinstance(op, DeleteDirOp):
                await tx.delete_dir(op.path)
            elif isinstance(op, ReplaceOp):
                async with tx.replace_dir(op.path, keep=op.keep) as d:
                    for rel, value in op.entries:
                        await d.write(rel, value)
            elif op[1] is None:
                await tx.delete(op[0])
            else:
                await tx.write(op[0], op[1])
    return tx


def open_store(fs: MemoryFileSystem, durability: walstore.Durability) -> walstore.Store:
    async def go() -> walstore.Store:
        return await walstore.open(ROOT, fs=fs, durability=durability, inline_threshold=INLINE)

    return anyio.run(go)


def fresh(setup: Ops) -> tuple[MemoryFileSystem, Model]:
    """A closed store on a new simulated disk holding ``setup``, and its model."""
    fs = MemoryFileSystem()
    store = open_store(fs, walstore.Durability.FULL)
    if setup:
        anyio.run(run_tx, store, setup)
    anyio.run(store.aclose)
    return fs, applied({}, setup)


def user_files(fs: MemoryFileSystem) -> Model:
    return {p: v for p, v in fs.files(ROOT).items() if not p.endswith("/")}


@dataclass
class Tally:
    cases: int = 0
    violations: list[str] = field(default_factory=list)
    parts: dict[str, int] = field(default_factory=dict)  # named shares of the cases
    # other counts of the family (shapes, crash points); with these, the summary also
    # counts the violations by kind: those starting "lost:", "partial:", "failed recovery:"
    extra: dict[str, int] = field(default_factory=dict)

    def add(self, **counts: int) -> None:
        """Add to ``extra``: ``t.add(shapes=1)`` (use _ for spaces in the printed name)."""
        for key, n in counts.items():
            self.extra[key] = self.extra.get(key, 0) + n


TALLIES: dict[str, Tally] = {}  # family -> counts, printed at the end of the session


def tally(family: str) -> Tally:
    return TALLIES.setdefault(family, Tally())


def check_reopened(
    fs: MemoryFileSystem,
    store: walstore.Store,
    allowed: list[Model],
    what: str,
    tally: Tally,
) -> Model:
    """Check the reopened store against the allowed states; returns the state found."""
    tally.cases += 1
    found = user_files(fs)
    if found not in allowed:
        missing = {p for m in allowed for p in m} ^ set(found)
        tally.violations.append(f"{what}: state matches none of {len(allowed)} allowed ({missing})")
    staging = fs.files(ROOT + "/.walstore/staging", skip=())
    if staging:
        tally.violations.append(f"{what}: staging leftovers {sorted(staging)}")
    segments = segment_files(fs.files(ROOT + "/.walstore/journal", skip=()))
    if len(segments) != 1:
        tally.violations.append(f"{what}: {len(segments)} journal segments")
    return found


def crash_once(
    fs: MemoryFileSystem,
    store: walstore.Store,
    model: Model,
    ops: Ops,
    crash_after: int,
    rng: random.Random | None,
    recovery_crash_after: int | None,
    durability: walstore.Durability,
    tally: Tally,
    what: str,
) -> tuple[walstore.Store, Model]:
    """Run one transaction with a crash ``crash_after`` calls in, reboot (losing power when
    ``rng`` is given), optionally crash once more during recovery, reopen and check.
    Returns the reopened store and the new model."""
    fs.crash_at = fs.count + crash_after
    tx: walstore.Transaction | None = None
    crashed = False
    try:
        tx = anyio.run(run_tx, store, ops)
    except SimulatedCrash:
        crashed = True
    except BaseException as exc:  # a crash inside a worker thread surfaces as itself
        if not _is_crash(exc):
            raise
        crashed = True
    fs.crash_at = None
    after = applied(model, ops)
    if not crashed:
        assert tx is not None and tx.state is walstore.TxState.COMMITTED
        # acknowledged; now crash while closing (the checkpoint), or at once
        fs.crash_at = fs.count + max(0, crash_after)
        try:
            anyio.run(store.aclose)
        except BaseException as exc:
            if not _is_crash(exc):
                raise
        allowed = [after]
    else:
        allowed = [model, after]
    fs.reboot(power_loss=rng)
    if recovery_crash_after is not None:
        fs.crash_at = fs.count + recovery_crash_after
        try:
            s = open_store(fs, durability)
            anyio.run(s.aclose)
        except BaseException as exc:
            if not _is_crash(exc):
                raise
        fs.reboot(power_loss=random.Random(rng.random()) if rng else None)
    store = open_store(fs, durability)
    found = check_reopened(fs, store, allowed, what, tally)
    return store, found if found in allowed else model


def _is_crash(exc: BaseException) -> bool:
    if isinstance(exc, SimulatedCrash):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_crash(e) for e in exc.exceptions)
    cause = exc.__cause__ or exc.__context__
    return isinstance(exc, walstore.StoreFailedError) and cause is not None and _is_crash(cause)
