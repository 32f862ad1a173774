"""Workload shapes of the crash-point, power-loss and I/O-error families, and their oracle.

A shape is some setup transactions (committed before anything is crashed) and the transactions
under test, run one after another (an explicit checkpoint after some of them) or prepared one
after another and then committed by concurrent tasks, so that they share commit groups. The
store is closed at the end, so the sweep covers the checkpoint of ``aclose`` too.

The oracle is ALICE's: after a fault the store holds every acknowledged transaction, and each
other one wholly or not at all. Sequential transactions are acknowledged in order, so the
allowed states are "the first ``a`` applied" and "the first ``a + 1`` applied"; concurrent ones
touch disjoint paths, so any superset of the acknowledged ones is allowed.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import anyio

import walstore
from tests.support import (
    INLINE,
    DeleteDirOp,
    Model,
    MoveOp,
    Op,
    ReplaceOp,
    applied,
    random_ops,
)

SOAK = 10 if os.environ.get("WALSTORE_SOAK") else 1

# Small journal segments: the store zero-fills each new segment to about checkpoint_bytes,
# and every case copies the disk. (A larger journal would also checkpoint in the background
# less often, inside the workloads.)
CHECKPOINT_BYTES = 32 << 10
TUNING: dict[str, int] = {"inline_threshold": INLINE, "checkpoint_bytes": CHECKPOINT_BYTES}

BIG = bytes(range(256)) * 2  # over the inline threshold: staged while the transaction runs
assert len(BIG) > INLINE


def big(tag: int) -> bytes:
    """A distinct staged value."""
    return bytes((i * 7 + tag) % 251 for i in range(3 * INLINE + tag))


@dataclass(frozen=True)
class StreamOp:
    """``tx.open_write(path)``, written in ``chunks``."""

    path: str
    chunks: tuple[bytes, ...]


AnyOp = Op | StreamOp
TxOps = list[AnyOp]


@dataclass(frozen=True)
class Shape:
    name: str
    setup: list[TxOps]
    txs: list[TxOps]
    concurrent: bool = False  # prepared in order, committed by one task each
    checkpoint_after: frozenset[int] = frozenset()  # store.checkpoint() after these txs
    real_only: bool = False  # values too large for the simulated file system's damage model
    shared: bool = False  # opened with exclusive=False (other processes may share it)

    @property
    def base(self) -> Model:
        model: Model = {}
        for ops in self.setup:
            model = apply_ops(model, ops)
        return model

    def state(self, done: frozenset[int] | set[int]) -> Model:
        """The model after the setup and the transactions ``done``, in index order."""
        model = self.base
        for i in sorted(done):
            model = apply_ops(model, self.txs[i])
        return model

    def allowed(self, acked: set[int]) -> tuple[list[Model], list[Model]]:
        """(states allowed after a fault with ``acked`` acknowledged, states that lose one)."""
        n = len(self.txs)
        if self.concurrent:
            subsets = [
                frozenset(c) for r in range(n + 1) for c in itertools.combinations(range(n), r)
            ]
            ok = [self.state(s) for s in subsets if acked <= s]
            lost = [self.state(s) for s in subsets if not acked <= s]
            return ok, lost
        a = len(acked)
        assert acked == set(range(a)), f"acknowledged out of order: {sorted(acked)}"
        ok = [self.state(set(range(a)))]
        if a < n:
            ok.append(self.state(set(range(a + 1))))
        return ok, [self.state(set(range(i))) for i in range(a)]

    @property
    def final(self) -> Model:
        return self.state(set(range(len(self.txs))))


def plain(op: AnyOp) -> Op:
    if isinstance(op, StreamOp):
        return (op.path, b"".join(op.chunks))
    return op


def apply_ops(model: Model, ops: TxOps) -> Model:
    return applied(model, [plain(op) for op in ops])


async def fill(tx: walstore.Transaction, ops: TxOps) -> None:
    """Record ``ops`` in ``tx`` (as tests.support.run_tx does, plus streams)."""
    for op in ops:
        if isinstance(op, StreamOp):
            async with tx.open_write(op.path) as f:
                for chunk in op.chunks:
                    await f.write(chunk)
        elif isinstance(op, MoveOp):
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


async def run_tx(store: walstore.Store, ops: TxOps) -> walstore.Transaction:
    async with store.transaction() as tx:
        await fill(tx, ops)
    return tx


async def run_workload(store: walstore.Store, shape: Shape, ack: Callable[[int], None]) -> None:
    """The transactions under test, each acknowledged by ``ack(i)`` once its commit returned,
    then ``aclose`` (a checkpoint)."""
    if shape.concurrent:
        txs = []
        for ops in shape.txs:  # stage one after another: the call order stays repeatable
            tx = store.transaction()
            await fill(tx, ops)
            txs.append(tx)

        async def commit(i: int, tx: walstore.Transaction) -> None:
            await tx.commit()
            ack(i)

        async with anyio.create_task_group() as tg:
            for i, tx in enumerate(txs):  # the first leads alone, the rest form a group
                tg.start_soon(commit, i, tx)
    else:
        for i, ops in enumerate(shape.txs):
            await run_tx(store, ops)
            ack(i)
            if i in shape.checkpoint_after:
                await store.checkpoint()
    await store.aclose()


# -- the shapes ------------------------------------------------------------------------------

_D1 = [("d1/a", b"a"), ("d1/b.json", b"{}"), ("d1/d2/c", b"c"), ("d1/d2/big", BIG)]
_FIFTY = [(f"d{i % 5}/f{i}", f"value {i}".encode()) for i in range(50)]


def _random_shape(seed: int) -> Shape:
    rng = random.Random(f"shape-{seed}")
    setup = random_ops(rng, {}, n=8, dirs=False)
    model = applied({}, setup)
    txs: list[TxOps] = []
    for _ in range(2):
        ops = random_ops(rng, model, n=5, dirs=True)
        model = applied(model, ops)
        txs.append(list(ops))
    return Shape(f"random-{seed}", [list(setup)], txs)


SHAPES: list[Shape] = [
    Shape("create-one", [], [[("a", b"new")]]),
    Shape("overwrite-one", [[("a", b"old")]], [[("a", b"new")]]),
    Shape("overwrite-shared", [[("a", b"old")]], [[("a", b"new")]], shared=True),
    Shape("delete-one", [[("a", b"old"), ("b", b"b")]], [[("a", None)]]),
    Shape("empty-value", [[("a", b"old")]], [[("a", b"")]]),
    Shape("create-nested", [], [[("d1/d2/x.json", b"{}"), ("d3/e/f/g/y", b"y")]]),
    Shape("ten-files", [], [[(f"f{i}", bytes([i]) * i) for i in range(10)]]),
    Shape("fifty-files", [], [list(_FIFTY)]),
    Shape(
        "twenty-overwrite-delete",
        [list(_FIFTY[:20])],
        [
            [
                (p, None) if i % 2 else (p, big(i) if i % 5 == 0 else b"new")
                for i, (p, _) in enumerate(_FIFTY[:12])
            ]
        ],
    ),
    Shape(
        "mixed",
        [[("a", b"old"), ("d1/b", b"old-b"), ("c", b"c")]],
        [[("a", b"A2"), ("d1/b", None), ("d1/d2/n", b"n"), ("c", b"")]],
    ),
    Shape("staged-new", [], [[("big", BIG)]]),
    Shape("staged-overwrite", [[("big", b"small")]], [[("big", BIG), ("d1/big2", big(1))]]),
    Shape("staged-and-inline", [[("x", BIG)]], [[("x", b"tiny"), ("y", BIG), ("z", b"z")]]),
    Shape("staged-many", [], [[(f"s{i % 3}/t{i}", big(i)) for i in range(8)]]),
    Shape(
        "staged-superseded",
        [[("x", BIG)]],
        [[("x", big(2)), ("v", BIG), ("v", None), ("x", b"s"), ("w", big(3))]],
    ),
    Shape("stream-new", [], [[StreamOp("s/blob", (BIG, big(4), b"tail"))]]),
    Shape(
        "stream-and-inline",
        [[("a", b"old"), ("s/blob", b"old blob")]],
        [[("a", b"new"), StreamOp("s/blob", (big(5),)), ("a", None), ("c", b"c")]],
    ),
    Shape("stream-small", [], [[StreamOp("t", (b"ab", b"cd"))]]),
    Shape(
        "stream-multihop",
        [[("keep", b"k")]],
        [[StreamOp("huge", tuple(bytes([i]) * (512 << 10) for i in range(3))), ("n", b"n")]],
        real_only=True,
    ),
    Shape("move-file", [[("a", b"A"), ("b", b"B")]], [[MoveOp("a", "c")]]),
    Shape("move-over-existing", [[("a", b"A"), ("b", b"B")]], [[MoveOp("a", "b")]]),
    Shape("move-into-new-dir", [[("a", b"A")]], [[MoveOp("a", "n/m/a")]]),
    Shape("move-staged", [[("x", BIG), ("y", b"y")]], [[MoveOp("x", "d/y"), ("x", b"again")]]),
    Shape("delete-dir", [list(_D1)], [[DeleteDirOp("d1")]]),
    Shape("delete-dir-nested", [list(_D1)], [[DeleteDirOp("d1/d2"), ("d1/a", b"a2")]]),
    Shape("delete-dir-then-recreate", [list(_D1)], [[DeleteDirOp("d1"), ("d1/new", b"n")]]),
    Shape(
        "replace-dir",
        [list(_D1)],
        [[ReplaceOp("d1", (("x", b"x"), ("y/z", b"z")), ())]],
    ),
    Shape(
        "replace-dir-keep",
        [list(_D1)],
        [[ReplaceOp("d1", (("x", b"x"), ("a", b"a-new")), ("a", "d2"))]],
    ),
    Shape("replace-dir-new", [[("a", b"A")]], [[ReplaceOp("n/d", (("x", b"x"),), ())]]),
    Shape(
        "replace-dir-staged",
        [list(_D1)],
        [[ReplaceOp("d1/d2", (("big", big(6)), ("c", BIG)), ("c",)), ("d1/a", None)]],
    ),
    Shape("seq-three", [], [[("a", b"1"), ("b", b"1")], [("a", b"2")], [("b", None)]]),
    Shape(
        "seq-checkpoint",
        [[("a", b"0")]],
        [[("a", b"1"), ("d/x", BIG)], [("a", b"2")], [("d/x", None), ("e", b"e")]],
        checkpoint_after=frozenset({0}),
    ),
    Shape("seq-same-file", [], [[("a", bytes([i]) * (i * 40))] for i in range(1, 6)]),
    Shape(
        "seq-dirs",
        [list(_D1)],
        [[MoveOp("d1/a", "z/a")], [DeleteDirOp("d1/d2")], [ReplaceOp("d1", (("q", b"q"),), ())]],
    ),
    Shape(
        "concurrent-4",
        [[("p0/x", b"x"), ("p1/x", b"x"), ("p2/x", b"x"), ("p3/x", b"x")]],
        [[(f"p{i}/x", f"new {i}".encode()), (f"p{i}/y", b"y")] for i in range(4)],
        concurrent=True,
    ),
    Shape(
        "concurrent-staged",
        [[(f"p{i}/x", b"x") for i in range(4)]],
        [[(f"p{i}/x", big(i) if i % 2 else b"small"), (f"p{i}/n/z", BIG)] for i in range(4)],
        concurrent=True,
    ),
    Shape(
        "concurrent-dirs",
        [[*_D1, ("e/a", b"a"), ("f/a", b"fa"), ("f/b", b"fb"), ("g/big", BIG)]],
        [
            [MoveOp("e/a", "e/b")],
            [DeleteDirOp("d1")],
            [ReplaceOp("f", (("c", b"c"),), ("a",))],
            [StreamOp("g/s", (BIG,)), ("g/big", None)],
        ],
        concurrent=True,
    ),
    Shape(
        "everything",
        [[*_D1, ("m", b"m"), ("x", BIG), ("k/a", b"ka"), ("k/b", b"kb")]],
        [
            [
                ("w", b"w"),
                ("x", big(7)),
                ("m", None),
                MoveOp("d1/a", "moved/a"),
                DeleteDirOp("d1/d2"),
                ReplaceOp("k", (("c", big(8)), ("d/e", b"e")), ("a",)),
                StreamOp("s", (BIG, BIG)),
            ]
        ],
    ),
    *(_random_shape(seed) for seed in range(3)),
]

BY_NAME = {s.name: s for s in SHAPES}
assert len(BY_NAME) == len(SHAPES) >= 30
