"""Fuzz the journal reader: the base journals of journals.py (and a real store's) damaged by
truncation, bit flips, zero-filled and garbage tails, overwritten and zeroed ranges, dropped,
duplicated, swapped and foreign records and torn appends, one to three at a time. The reader
must return the base's header, checkpoint and a prefix of its commits, re-encoding to exactly
the bytes it read, or raise CorruptionError; anything else is a crash.

Two drivers: a seeded mutation loop (most of the inputs; a failure is minimised and saved to
tests/fuzz/corpus/ for the corpus replay test) and Hypothesis (shrinks a failure; the last,
smallest failing input is saved likewise).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import journals
from tests.support import tally

SOAK = 10 if os.environ.get("WALSTORE_SOAK") else 1
LOOP_INPUTS = 150_000 * SOAK
HYPOTHESIS_INPUTS = 5_000 * SOAK
CORPUS = Path(__file__).with_name("corpus")
TALLY = tally("fuzzed inputs")
REAL = journals.real_journal()
BASES = [*journals.BASES.values(), REAL]


def _fails(base: journals.Base, data: bytes) -> bool:
    try:
        journals.check_reader(base, data)
    except Exception:
        return True
    return False


def save(base: journals.Base, data: bytes, label: str) -> Path:
    """Keep a failing input in the corpus (a base without fixed bytes is kept reference-free)."""
    prefix = next((k for k, b in journals.BASES.items() if b is base), "none")
    path = CORPUS / f"{prefix}--found-{label}-{hashlib.sha256(data).hexdigest()[:10]}.bin"
    path.write_bytes(data)
    return path


def test_reader_mutation_loop() -> None:
    rng = random.Random(0x5CA7)
    outcomes: Counter[str] = Counter()
    for k in range(LOOP_INPUTS):
        base = BASES[k % len(BASES)]
        data, kinds = journals.damaged(base.data, rng)
        TALLY.cases += 1
        TALLY.parts["reader, mutation loop"] = TALLY.parts.get("reader, mutation loop", 0) + 1
        try:
            outcomes[journals.check_reader(base, data)] += 1
        except Exception as exc:
            small = journals.minimise(data, base.data, lambda d, b=base: _fails(b, d))
            path = save(base, small, "loop")
            TALLY.violations.append(f"reader on {base.name} after {kinds}: {exc!r} ({path})")
            raise AssertionError(f"{kinds} on {base.name}: {exc!r}; saved {path}") from exc
    # every outcome was reached many times: the damage is neither all harmless nor all fatal
    assert min(outcomes.values()) >= LOOP_INPUTS // 100 and len(outcomes) == 4, outcomes


HYPOTHESIS_OUTCOMES: Counter[str] = Counter()


@settings(
    max_examples=HYPOTHESIS_INPUTS,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    base=st.sampled_from(BASES),
    damage=st.lists(
        st.tuples(st.sampled_from(sorted(journals.DAMAGE)), st.integers(0, 2**32)),
        min_size=1,
        max_size=3,
    ),
)
def test_reader_hypothesis(base: journals.Base, damage: list[tuple[str, int]]) -> None:
    data = base.data
    for kind, seed in damage:
        data = journals.DAMAGE[kind](data, random.Random(seed))
    TALLY.cases += 1
    TALLY.parts["reader, Hypothesis"] = TALLY.parts.get("reader, Hypothesis", 0) + 1
    try:
        HYPOTHESIS_OUTCOMES[journals.check_reader(base, data)] += 1
    except Exception:
        save(base, data, "hypothesis")  # the last save is Hypothesis's shrunk example
        raise


def test_hypothesis_reached_every_outcome() -> None:
    """Runs after the Hypothesis test (same module, later): refused, cut back to a prefix,
    read whole past a harmless tail, and a torn fresh segment, each at least once."""
    assert len(HYPOTHESIS_OUTCOMES) == 4, HYPOTHESIS_OUTCOMES
