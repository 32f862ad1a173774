"""Fuzz recovery with damaged journals: it may refuse with CorruptionError, never with
anything else, and never invents data: what it recovers is the state after some prefix of
the committed transactions.

The journal comes from a real store (inline values, several commit groups); each example
damages it (truncation, bit flips, a zero-filled or garbage tail, an overwritten range) and
recovers it on a fresh simulated disk that holds only the journal, as after a power cut
that lost every applied file.
"""

from __future__ import annotations

import os
import random

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import walstore
from tests.support import (
    ROOT,
    Model,
    applied,
    open_store,
    random_ops,
    run_tx,
    segment_files,
    tally,
    user_files,
)
from walstore.testing import MemoryFileSystem

pytestmark = pytest.mark.guarantee(name="Damage is told from a torn tail")

SOAK = 10 if os.environ.get("WALSTORE_SOAK") else 1
TALLY = tally("fuzzed inputs")
JOURNAL = ROOT + "/.walstore/journal"


def _journal_and_prefixes() -> tuple[str, bytes, list[Model]]:
    fs = MemoryFileSystem()
    store = open_store(fs, walstore.Durability.FULL)
    store._inline_threshold = 1 << 20  # everything inline: the journal alone holds it all
    rng = random.Random(7)
    models: list[Model] = [{}]
    for _ in range(8):
        ops = random_ops(rng, models[-1], n=rng.randint(1, 6))
        anyio.run(run_tx, store, ops)
        models.append(applied(models[-1], ops))
    [(name, data)] = segment_files(fs.files(JOURNAL, skip=())).items()
    return name, data, models


NAME, DATA, PREFIXES = _journal_and_prefixes()
OUTCOMES = {"refused": 0, "prefix": 0, "full": 0}


def _recover(data: bytes) -> Model | walstore.CorruptionError:
    fs = MemoryFileSystem()
    for d in (ROOT, ROOT + "/.walstore", JOURNAL, ROOT + "/.walstore/staging"):
        fs.mkdir(d)
    fd = fs.open(f"{JOURNAL}/{NAME}", create=True)
    fs.pwrite(fd, data, 0)
    fs.close(fd)
    try:
        store = open_store(fs, walstore.Durability.FULL)
    except walstore.CorruptionError as exc:
        return exc
    anyio.run(store.aclose)
    return user_files(fs)


damage = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, len(DATA))),
    st.tuples(st.just("flip"), st.integers(0, len(DATA) - 1), st.integers(0, 7)),
    st.tuples(st.just("zero-tail"), st.integers(0, len(DATA)), st.integers(0, 4096)),
    st.tuples(st.just("garbage-tail"), st.binary(min_size=1, max_size=512)),
    st.tuples(
        st.just("overwrite"), st.integers(0, len(DATA) - 1), st.binary(min_size=1, max_size=64)
    ),
)


def _damaged(how: tuple[object, ...]) -> bytes:
    kind = how[0]
    if kind == "truncate":
        return DATA[: int(how[1])]  # type: ignore[call-overload]
    if kind == "flip":
        pos, bit = int(how[1]), int(how[2])  # type: ignore[call-overload]
        return DATA[:pos] + bytes([DATA[pos] ^ (1 << bit)]) + DATA[pos + 1 :]
    if kind == "zero-tail":
        cut, extra = int(how[1]), int(how[2])  # type: ignore[call-overload]
        return DATA[:cut] + bytes(len(DATA) - cut + extra)
    if kind == "garbage-tail":
        return DATA + bytes(how[1])  # type: ignore[call-overload]
    pos, junk = int(how[1]), bytes(how[2])  # type: ignore[call-overload]
    return DATA[:pos] + junk + DATA[pos + len(junk) :]


def test_the_undamaged_journal_recovers_everything() -> None:
    assert _recover(DATA) == PREFIXES[-1]


@settings(
    max_examples=2000 * SOAK,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(how=damage)
def test_damaged_journal_recovers_a_prefix_or_refuses(how: tuple[object, ...]) -> None:
    TALLY.cases += 1
    TALLY.parts["recovery, Hypothesis"] = TALLY.parts.get("recovery, Hypothesis", 0) + 1
    out = _recover(_damaged(how))
    if isinstance(out, walstore.CorruptionError):
        OUTCOMES["refused"] += 1
        return
    OUTCOMES["full" if out == PREFIXES[-1] else "prefix"] += 1
    if out not in PREFIXES:
        TALLY.violations.append(f"{how[0]}: recovered a state no prefix of commits makes")
    assert out in PREFIXES, how


def test_the_fuzzer_reached_every_outcome() -> None:
    """Runs after the fuzz test (same module, defined later): damage was refused, cut back
    to a prefix, and shrugged off (a harmless tail), each at least once."""
    assert all(OUTCOMES.values()), OUTCOMES
