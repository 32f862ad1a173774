"""Coverage-guided fuzzing of the journal reader with atheris (libFuzzer).

Run by tests/fuzz/test_atheris.py as a child process (atheris owns its process):

    python -m tests.fuzz.atheris_reader -runs=N -seed=S SEED_DIR

SEED_DIR starts with the base journals of journals.py; libFuzzer mutates them under coverage
feedback. Property (needs no reference, since libFuzzer can solve CRC comparisons and forge
records): ``scan_segment`` returns or raises CorruptionError (TornSegment only for a segment no
longer than a fresh one), and what it returns re-encodes to exactly the bytes it read.
A violation raises, and libFuzzer saves the input (``-artifact_prefix``).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["walstore"]):
    from walstore import _journal_format, _journal_reader  # noqa: F401

from tests.fuzz.journals import check_reader


def one_input(data: bytes) -> None:
    check_reader(None, data)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
