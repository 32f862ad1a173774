from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support import TALLIES, Tally, tally

# pytester for tests/plugin/: pytest accepts pytest_plugins only in this, the top conftest.
# tests.profile: the default profile and the slow tier; tests.progress: a line per family.
pytest_plugins = ["pytester", "tests.profile", "tests.progress"]


@pytest.fixture(scope="session")
def crash_tally() -> Tally:
    """Counts crash/power-loss cases of the crash-point sweep; printed at the end."""
    return tally("crash points (sweep)")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On a pytest-xdist worker: hand this worker's counts to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["walstore_tallies"] = json.dumps(
            {name: [t.cases, t.violations, t.parts, t.extra] for name, t in TALLIES.items()}
        )


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """On the pytest-xdist controller: add up the counts of a worker that finished."""
    raw = getattr(node, "workeroutput", {}).get("walstore_tallies")
    for name, (cases, violations, parts, *extra) in json.loads(raw or "{}").items():
        t = tally(name)
        t.cases += cases
        t.violations += violations
        for part, n in parts.items():
            t.parts[part] = t.parts.get(part, 0) + n
        t.add(**(extra[0] if extra else {}))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for name, t in sorted(TALLIES.items()):
        parts = " + ".join(f"{n} {part}" for part, n in sorted(t.parts.items()))
        detail = f" ({parts})" if parts else ""
        for key, n in t.extra.items():
            detail += f", {n} {key.replace('_', ' ')}"
        if t.extra:  # a family with an oracle: its violations by kind
            for kind in ("lost", "partial", "failed recovery"):
                n = sum(v.startswith(kind + ":") for v in t.violations)
                detail += f", {kind}: {n}"
        terminalreporter.write_line(
            f"{name}: {t.cases} cases{detail}, violations: {len(t.violations)}"
        )
        for v in t.violations[:5]:
            terminalreporter.write_line(f"  {v}")
