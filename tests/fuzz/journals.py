"""Journals to damage, the damage, and the two properties every damaged journal must keep.

The base journals are built record by record with the journal format's own encoders, with
fixed salts, so they are the same bytes in every run and a damaged copy kept in the regression
corpus (tests/fuzz/corpus/) still means the same thing later. ``real_journal`` adds the journal
of a real store (random salt) for the in-run fuzzers.

Properties:

- the reader (``scan_segment``) returns the base's header, checkpoint and a prefix of its
  commits, or raises ``CorruptionError`` (``TornSegment`` only for a segment no longer than a
  freshly created one); and what it returns re-encodes to exactly the bytes it claims to have
  read (it invents nothing);
- recovery on a disk that holds only the damaged journal raises nothing but
  ``CorruptionError``, and otherwise leaves exactly the state after some prefix of the
  commits.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import anyio

import walstore
from tests.support import segment_files
from walstore import _journal_format as fmt
from walstore._journal_reader import FRESH_SEGMENT_SIZE, SegmentScan, TornSegment, scan_segment
from walstore.testing import MemoryFileSystem

ROOT = "/store"
JOURNAL = ROOT + "/.walstore/journal"
Model = dict[str, bytes]

FILES = ["f0", "f1", "d1/f0", "d1/f2", "d1/d2/f0", "d1/d2/f1", "d3/f1", "d3/f3"]
TREES = ["d1", "d1/d2", "d3"]


@dataclass(frozen=True)
class Base:
    name: str
    data: bytes
    scan: SegmentScan
    prefixes: list[Model] | None  # states after 0..n commits; None: not recoverable alone


def _segment(
    first_lsn: int, salt: int, next_txid: int, commits: list[fmt.Commit], size: int = 0
) -> bytes:
    out = [
        fmt.encode_header(fmt.SegmentHeader(first_lsn, salt, size)),
        fmt.encode_record(
            fmt.RecordType.CHECKPOINT,
            fmt.encode_checkpoint(fmt.Checkpoint(first_lsn, next_txid)),
            salt,
        ),
    ]
    out += [fmt.encode_record(fmt.RecordType.COMMIT, fmt.encode_commit(c), salt) for c in commits]
    return b"".join(out)


def _ops(rng: random.Random, staged: bool) -> tuple[fmt.Op, ...]:
    ops: list[fmt.Op] = []
    for _ in range(rng.randint(1, 5)):
        roll = rng.random()
        if roll < 0.5:
            ops.append(fmt.Put(rng.choice(FILES), rng.randbytes(rng.choice([0, 1, 9, 80, 300]))))
        elif roll < 0.65:
            ops.append(fmt.Delete(rng.choice(FILES)))
        elif roll < 0.75:
            ops.append(fmt.DeleteDir(rng.choice(TREES)))
        elif roll < 0.85 or not staged:
            path = rng.choice(["d1/d2", "d3"])
            names = rng.sample(["f0", "f1", "f3"], rng.randint(0, 3))
            ops.append(fmt.ReplaceDir(path, tuple(fmt.Put(n, rng.randbytes(20)) for n in names)))
        else:
            size = rng.randint(1000, 100_000)
            ops.append(fmt.PutStaged(rng.choice(FILES), f"{rng.randint(1, 99)}/v", size, 12345))
    return tuple(ops)


def _commits(
    rng: random.Random, first_lsn: int, txid: int, n: int, staged: bool
) -> list[fmt.Commit]:
    commits = []
    for k in range(n):
        txs = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            txs.append(fmt.TxRecord(txid, _ops(rng, staged)))
            txid += 1
        commits.append(fmt.Commit(first_lsn + 1 + k, tuple(txs)))
    return commits


def model_after(model: Model, commit: fmt.Commit) -> Model:
    out = dict(model)
    for tx in commit.txs:
        for op in tx.ops:
            if isinstance(op, fmt.Put):
                out[op.path] = op.data
            elif isinstance(op, fmt.Delete):
                out.pop(op.path, None)
            elif isinstance(op, fmt.DeleteDir | fmt.ReplaceDir):
                out = {k: v for k, v in out.items() if not k.startswith(op.path + "/")}
                if isinstance(op, fmt.ReplaceDir):
                    for e in op.entries:
                        assert isinstance(e, fmt.Put)
                        out[f"{op.path}/{e.path}"] = e.data
            else:
                raise AssertionError(f"no model for {op}")
    return out


def _base(name: str, data: bytes, recoverable: bool) -> Base:
    scan = scan_segment(name, data)
    assert scan.torn_bytes == 0 and scan.valid_end == len(data)
    prefixes = None
    if recoverable:
        prefixes = [{}]
        for c in scan.commits:
            prefixes.append(model_after(prefixes[-1], c))
    return Base(name, data, scan, prefixes)


def _bases() -> dict[str, Base]:
    rng = random.Random(5)
    fresh = _segment(1, 0x5EED0001, 1, [])
    assert len(fresh) == FRESH_SEGMENT_SIZE
    inline = _segment(1, 0x5EED0002, 1, _commits(rng, 1, 1, 10, staged=False))
    later = _segment(1000, 0x5EED0003, 4000, _commits(rng, 1000, 4000, 6, staged=False))
    staged = _segment(1, 0x5EED0004, 1, _commits(rng, 1, 1, 8, staged=True))
    return {
        "fresh": _base("0000000000000001.wal", fresh, True),
        "inline": _base("0000000000000001.wal", inline, True),
        "later": _base("0000000000001000.wal", later, True),
        "staged": _base("0000000000000001.wal", staged, False),
    }


BASES = _bases()
EXTRA: list[Base] = []  # more bases whose records the damage may splice in (real_journal's)


def real_journal() -> Base:
    """The journal of a real store: inline values, commit groups, delete_dir, replace_dir."""
    from tests.support import MoveOp, ReplaceOp, applied, random_ops, run_tx

    fs = MemoryFileSystem()
    model: Model = {}

    async def go() -> None:
        nonlocal model
        store = await walstore.open(ROOT, fs=fs, inline_threshold=1 << 20)
        rng = random.Random(11)
        for _ in range(12):
            ops = [
                o
                for o in random_ops(rng, model, dirs=True)
                if not isinstance(o, MoveOp) and not (isinstance(o, ReplaceOp) and o.keep)
            ]  # no staged files: the journal alone must hold every value
            try:
                await run_tx(store, ops)
            except FileNotFoundError:
                continue  # an op that needed a dropped move; rolled back
            model = applied(model, ops)
        # before the checkpoint of aclose
        journals.update(segment_files(fs.files(JOURNAL, skip=())))
        await store.aclose()

    journals: dict[str, bytes] = {}
    anyio.run(go)
    [(name, data)] = journals.items()
    name = name.rsplit("/", 1)[-1]
    data = data[: scan_segment(name, data).valid_end]  # without the preallocated zeros
    base = _base(name, data, True)
    assert base.prefixes is not None and base.prefixes[-1] == model
    assert len(base.scan.commits) >= 8
    EXTRA.append(base)
    return base


# --- damage ---------------------------------------------------------------------------------

Damage = Callable[[bytes, random.Random], bytes]


def _record_bounds(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each whole record, read by length alone (no CRC check)."""
    out, pos = [], 0
    while pos + fmt.HEADER_SIZE <= len(data):
        length, _, _ = fmt.decode_head(data, pos)
        end = pos + fmt.HEADER_SIZE + length
        if end > len(data):
            break
        out.append((pos, end))
        pos = end
    return out


def truncate(d: bytes, rng: random.Random) -> bytes:
    return d[: rng.randint(0, len(d))]


def flip(d: bytes, rng: random.Random) -> bytes:
    b = bytearray(d)
    for _ in range(rng.choice([1, 1, 2, 8])):
        if b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def zero_tail(d: bytes, rng: random.Random) -> bytes:
    cut = rng.randint(0, len(d))
    return d[:cut] + bytes(len(d) - cut + rng.choice([0, 0, 7, 4096]))


def garbage_tail(d: bytes, rng: random.Random) -> bytes:
    return d[: rng.randint(len(d) // 2, len(d))] + rng.randbytes(rng.randint(1, 600))


def overwrite(d: bytes, rng: random.Random) -> bytes:
    pos = rng.randrange(max(1, len(d)))
    junk = rng.choice([rng.randbytes(rng.randint(1, 64)), bytes(rng.randint(1, 64))])
    return d[:pos] + junk + d[pos + len(junk) :]


def zero_range(d: bytes, rng: random.Random) -> bytes:
    pos = rng.randrange(max(1, len(d)))
    n = rng.randint(1, 4096)
    return d[:pos] + bytes(len(d[pos : pos + n])) + d[pos + n :]


def drop_record(d: bytes, rng: random.Random) -> bytes:
    bounds = _record_bounds(d)
    if not bounds:
        return d
    s, e = rng.choice(bounds)
    return d[:s] + d[e:]


def duplicate_record(d: bytes, rng: random.Random) -> bytes:
    bounds = _record_bounds(d)
    if not bounds:
        return d
    s, e = rng.choice(bounds)
    at = rng.choice(bounds)[rng.randint(0, 1)]
    return d[:at] + d[s:e] + d[at:]


def swap_records(d: bytes, rng: random.Random) -> bytes:
    bounds = _record_bounds(d)
    if len(bounds) < 2:
        return d
    i = rng.randrange(len(bounds) - 1)
    (s1, e1), (s2, e2) = bounds[i], bounds[i + 1]
    return d[:s1] + d[s2:e2] + d[s1:e1] + d[e2:]


def foreign_record(d: bytes, rng: random.Random) -> bytes:
    """Splice in a record of another segment (another salt)."""
    other = rng.choice(list(BASES.values())).data
    bounds = _record_bounds(other)
    s, e = rng.choice(bounds)
    at = rng.choice(_record_bounds(d) or [(0, 0)])[1]
    return d[:at] + other[s:e] + d[at:]


def torn_append(d: bytes, rng: random.Random) -> bytes:
    """The start of a record that was being appended when the writer died."""
    bounds = _record_bounds(d)
    s, e = rng.choice(bounds) if bounds else (0, 0)
    return d + d[s : rng.randint(s, e)]


DAMAGE: dict[str, Damage] = {
    "truncate": truncate,
    "flip": flip,
    "zero-tail": zero_tail,
    "garbage-tail": garbage_tail,
    "overwrite": overwrite,
    "zero-range": zero_range,
    "drop-record": drop_record,
    "duplicate-record": duplicate_record,
    "swap-records": swap_records,
    "foreign-record": foreign_record,
    "torn-append": torn_append,
}


def damaged(data: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    """One to three stacked kinds of damage."""
    kinds = [rng.choice(list(DAMAGE)) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
    for k in kinds:
        data = DAMAGE[k](data, rng)
    return data, kinds


# --- properties ------------------------------------------------------------------------------


def _reencoded(scan: SegmentScan) -> bytes:
    return _segment(
        scan.header.first_lsn,
        scan.header.salt,
        scan.checkpoint.next_txid,
        scan.commits,
        scan.header.size,
    )


def reader_outcome(name: str, data: bytes) -> SegmentScan | str:
    """scan_segment's result, or "refused"/"torn-segment"; any other exception propagates."""
    try:
        return scan_segment(name, data)
    except walstore.CorruptionError:
        return "refused"
    except TornSegment:
        return "torn-segment"


def check_reader(base: Base | None, data: bytes) -> str:
    """The reader property; returns the outcome ("refused", "torn-segment", "prefix",
    "full"), raises AssertionError on a violation (and whatever the reader raised if it
    raised anything else)."""
    name = base.name if base else "0000000000000001.wal"
    out = reader_outcome(name, data)
    if out == "torn-segment":
        assert len(data) <= FRESH_SEGMENT_SIZE, f"TornSegment for {len(data)} bytes"
        return out
    if isinstance(out, str):
        return out
    # torn_bytes: what follows the last good record, up to the zeros of a preallocated tail
    end = out.valid_end + out.torn_bytes
    assert end <= len(data) and not data[end:].strip(b"\0"), "valid_end + torn_bytes != size"
    assert data[: out.valid_end] == _reencoded(out), "reader returned records not in the bytes"
    if base is None:
        return "prefix"
    if out.header.salt != base.scan.header.salt:  # a whole foreign segment spliced in front
        base = next(b for b in [*BASES.values(), *EXTRA] if b.scan.header.salt == out.header.salt)
    assert out.header == base.scan.header and out.checkpoint == base.scan.checkpoint
    n = len(out.commits)
    assert out.commits == base.scan.commits[:n], "reader returned commits the base lacks"
    return "full" if n == len(base.scan.commits) else "prefix"


def recover(name: str, data: bytes) -> Model | walstore.CorruptionError:
    """Recover a disk that holds only this journal segment."""
    fs = MemoryFileSystem()
    for d in (ROOT, ROOT + "/.walstore", JOURNAL, ROOT + "/.walstore/staging"):
        fs.mkdir(d)
    fd = fs.open(f"{JOURNAL}/{name}", create=True)
    fs.pwrite(fd, data, 0)
    fs.close(fd)

    async def go() -> None:
        store = await walstore.open(ROOT, fs=fs)
        await store.aclose()

    try:
        anyio.run(go)
    except walstore.CorruptionError as exc:
        return exc
    return {p: v for p, v in fs.files(ROOT).items() if not p.endswith("/")}


def check_recovery(base: Base, data: bytes) -> str:
    assert base.prefixes is not None
    out = recover(base.name, data)
    if isinstance(out, walstore.CorruptionError):
        return "refused"
    assert out in base.prefixes, "recovered a state no prefix of the commits makes"
    return "full" if out == base.prefixes[-1] else "prefix"


def minimise(data: bytes, original: bytes, fails: Callable[[bytes], bool]) -> bytes:
    """Shrink a failing input: cut its tail, then put back original bytes, while it fails."""
    step = max(1, len(data) // 2)
    while step >= 1:
        while len(data) > step and fails(data[:-step]):
            data = data[:-step]
        step //= 2
    b = bytearray(data)
    for i in range(min(len(b), len(original))):
        if b[i] != original[i]:
            saved = b[i]
            b[i] = original[i]
            if not fails(bytes(b)):
                b[i] = saved
    return bytes(b)
