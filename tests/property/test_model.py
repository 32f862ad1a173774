"""Model-based test: random transactions against a plain dict, with crashes and power cuts.

bbolt's simulation test with a model: random multi-file transactions (creates, overwrites,
deletes, 1-20 files, nested directories, values from 0 bytes to 4x the inline threshold) run
against the store and a dict. Random rules crash the process at a random file-system call,
cut the power (dropping, tearing or garbling unsynced writes and losing unsynced directory
entries), crash again during recovery, checkpoint, or reopen. After every step the files under
the root equal the model; after every reopen, the interrupted transaction is wholly present or
wholly absent, nothing acknowledged is missing and nothing is left in staging.
Hypothesis runs derandomized, so CI is reproducible; the count of crash cases is printed.
"""

from __future__ import annotations

import os
import random

import anyio
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import walstore
from tests.support import (
    Tally,
    applied,
    check_reopened,
    crash_once,
    open_store,
    random_ops,
    run_tx,
    tally,
    user_files,
)
from walstore.testing import MemoryFileSystem

pytestmark = [pytest.mark.guarantee(name="Atomic"), pytest.mark.guarantee(name="Durable")]

SOAK = 10 if os.environ.get("WALSTORE_SOAK") else 1
TALLY = tally("model-based crash/power-loss")


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fs = MemoryFileSystem()
        self.model: dict[str, bytes] = {}
        self.durability = walstore.Durability.FULL
        self.store: walstore.Store | None = None

    @initialize(full=st.booleans(), exchange=st.booleans())
    def open(self, full: bool, exchange: bool) -> None:
        self.fs.exchange_supported = exchange
        # OFF never syncs: it survives process crashes, not power cuts.
        self.durability = walstore.Durability.FULL if full else walstore.Durability.OFF
        self.store = open_store(self.fs, self.durability)

    @rule(seed=st.integers(0, 2**32 - 1))
    def commit(self, seed: int) -> None:
        assert self.store is not None
        ops = random_ops(random.Random(seed), self.model, dirs=True)
        tx = anyio.run(run_tx, self.store, ops)
        assert tx.state is walstore.TxState.COMMITTED
        self.model = applied(self.model, ops)

    @rule(
        cases=st.lists(
            st.tuples(
                st.integers(0, 2**32 - 1),  # seed of the transaction and the damage
                st.integers(0, 120),  # crash after this many file-system calls
                st.booleans(),  # power cut (FULL only) or process crash
                st.none() | st.integers(0, 80),  # crash again during recovery
            ),
            min_size=1,
            max_size=6,
        )
    )
    def crash(self, cases: list[tuple[int, int, bool, int | None]]) -> None:
        """A run of crashes, each during a new transaction, then reopen and check."""
        for seed, k, power, recovery_crash in cases:
            assert self.store is not None
            mine = Tally()
            rng = random.Random(seed)
            ops = random_ops(rng, self.model, dirs=True)
            power_rng = rng if power and self.durability is walstore.Durability.FULL else None
            self.store, self.model = crash_once(
                self.fs,
                self.store,
                self.model,
                ops,
                k,
                power_rng,
                recovery_crash,
                self.durability,
                mine,
                f"seed={seed} k={k} power={power} recovery_crash={recovery_crash}",
            )
            TALLY.cases += mine.cases
            TALLY.violations += mine.violations
            assert not mine.violations, mine.violations

    @rule()
    def checkpoint(self) -> None:
        assert self.store is not None
        anyio.run(self.store.checkpoint)

    @rule()
    def reopen(self) -> None:
        assert self.store is not None
        anyio.run(self.store.aclose)
        assert self.fs.open_fds() == 0
        self.store = open_store(self.fs, self.durability)
        assert self.store.recovery.clean
        check_reopened(self.fs, self.store, [self.model], "clean reopen", Tally())

    @precondition(lambda self: self.store is not None)
    @invariant()
    def files_equal_model(self) -> None:
        assert user_files(self.fs) == self.model

    def teardown(self) -> None:
        if self.store is not None:
            anyio.run(self.store.aclose)


StoreMachine.TestCase.settings = settings(
    max_examples=150 * SOAK,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreModel = StoreMachine.TestCase


def test_report_model_cases() -> None:
    """Runs after the machine (same module, defined later): the crash cases are counted."""
    print(
        f"\nmodel-based crash/power-loss cases: {TALLY.cases}, violations: {len(TALLY.violations)}"
    )
    assert not TALLY.violations
    assert TALLY.cases >= 2000 * SOAK, TALLY.cases
