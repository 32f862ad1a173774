from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import Tally

_TOTALS: dict[str, Tally] = {}


@pytest.fixture(scope="session")
def crash_tally() -> Iterator[Tally]:
    """Counts crash/power-loss cases across the session; printed at the end."""
    tally = _TOTALS.setdefault("crash points", Tally())
    yield tally


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for name, tally in _TOTALS.items():
        terminalreporter.write_line(
            f"{name}: {tally.cases} cases, violations: {len(tally.violations)}"
        )
