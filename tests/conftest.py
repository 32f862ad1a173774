from __future__ import annotations

import pytest

from tests.support import Tally, tally


@pytest.fixture(scope="session")
def crash_tally() -> Tally:
    """Counts crash/power-loss cases of the crash-point sweep; printed at the end."""
    return tally("crash points (sweep)")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.support import TALLIES

    for name, t in TALLIES.items():
        terminalreporter.write_line(f"{name}: {t.cases} cases, violations: {len(t.violations)}")
