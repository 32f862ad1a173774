"""Replay the regression corpus (tests/fuzz/corpus/): every file through the reader and,
when its base journal is recoverable alone, through recovery. Seed cases (make_corpus.py)
carry the reader outcome they must get in their name; cases the fuzzers found carry none and
must keep the properties of journals.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz import journals

CORPUS = Path(__file__).with_name("corpus")
CASES = sorted(CORPUS.glob("*.bin"))


def test_the_corpus_has_its_seeds() -> None:
    assert len([p for p in CASES if len(p.stem.split("--")) == 3]) >= 19


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_corpus_case(path: Path) -> None:
    parts = path.stem.split("--")
    base = journals.BASES.get(parts[0])
    data = path.read_bytes()
    outcome = journals.check_reader(base, data)
    if len(parts) == 3:
        assert outcome == parts[2]
    if base is not None and base.prefixes is not None:
        journals.check_recovery(base, data)
