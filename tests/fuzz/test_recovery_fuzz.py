"""Fuzz recovery: damaged copies of the recoverable base journals of journals.py (and a real
store's journal) recovered on a simulated disk that holds nothing else, as after a power cut
that lost every applied file. Recovery raises nothing but CorruptionError, and what it
recovers is exactly the state after some prefix of the commits. A failure is minimised and
saved to tests/fuzz/corpus/ (the corpus replay test runs it through recovery too).
"""

from __future__ import annotations

import os
import random
from collections import Counter

from tests.fuzz import journals
from tests.fuzz.test_reader_fuzz import REAL, save
from tests.support import tally

SOAK = 10 if os.environ.get("WALSTORE_SOAK") else 1
INPUTS = 5_000 * SOAK
TALLY = tally("fuzzed inputs")
BASES = [b for b in (*journals.BASES.values(), REAL) if b.prefixes is not None]


def _fails(base: journals.Base, data: bytes) -> bool:
    try:
        journals.check_recovery(base, data)
    except Exception:
        return True
    return False


def test_recovery_mutation_loop() -> None:
    rng = random.Random(0xDEC0DE)
    outcomes: Counter[str] = Counter()
    for k in range(INPUTS):
        base = BASES[k % len(BASES)]
        data, kinds = journals.damaged(base.data, rng)
        TALLY.cases += 1
        TALLY.parts["recovery, mutation loop"] = TALLY.parts.get("recovery, mutation loop", 0) + 1
        try:
            outcomes[journals.check_recovery(base, data)] += 1
        except Exception as exc:
            small = journals.minimise(data, base.data, lambda d, b=base: _fails(b, d))
            path = save(base, small, "recovery")
            TALLY.violations.append(f"recovery of {base.name} after {kinds}: {exc!r} ({path})")
            raise AssertionError(f"{kinds} on {base.name}: {exc!r}; saved {path}") from exc
    assert len(outcomes) == 3 and min(outcomes.values()) >= INPUTS // 100, outcomes
