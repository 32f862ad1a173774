"""What the run is doing: the profile in the header, and a line as each family finishes.

A family is a directory of ``tests/`` (``crash``, ``property``, ``torture``...). With
pytest-xdist the controller learns the test ids from a worker's collection and counts the
reports as they arrive; without it, from the session's own collection. Workers print nothing.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import pytest

# The opt-in sizes, and what each one adds (the tests read these variables themselves).
TIERS = {
    "WALSTORE_SLOW": "the slow tier, which CI runs (tests/profile.py)",
    "WALSTORE_SOAK": "10x the cases of the crash, model, fuzz, SIGKILL and power-cut families",
    "WALSTORE_STRESS": "full-size contention in tests/concurrency/",
}


def family(nodeid: str) -> str:
    """``tests/crash/test_x.py::test_y[p]`` -> ``crash``."""
    parts = nodeid.split("::", 1)[0].split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "tests" else parts[0]


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


class FamilyProgress:
    """Counts finished tests per family; prints a family's line when its last one ends."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.expected: Counter[str] = Counter()
        self.outcomes: dict[str, Counter[str]] = {}
        self.pending: dict[str, str] = {}  # nodeid -> outcome so far
        self.started = time.monotonic()

    def _collected(self, nodeids: list[str]) -> None:
        if not self.expected:  # every worker collects the same tests; the first one tells
            self.expected = Counter(family(n) for n in nodeids)
            self.outcomes = {f: Counter() for f in self.expected}

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        self._collected(ids)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if session.items:  # not on an xdist controller, which collects nothing itself
            self._collected([item.nodeid for item in session.items])

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        outcome = self.pending.get(report.nodeid, "passed")
        if report.when == "call" or report.outcome != "passed":
            if hasattr(report, "wasxfail"):
                outcome = "xfailed" if report.skipped else "xpassed"
            elif report.failed:
                outcome = "failed" if report.when == "call" else "error"
            elif report.skipped:
                outcome = "skipped"
        if report.when != "teardown":
            self.pending[report.nodeid] = outcome
            return
        self.pending.pop(report.nodeid, None)
        name = family(report.nodeid)
        counts = self.outcomes.setdefault(name, Counter())
        counts[outcome] += 1
        if counts.total() == self.expected.get(name):
            self._finished(name, counts)

    def _finished(self, name: str, counts: Counter[str]) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        done = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
        left = sum(self.expected.values()) - sum(c.total() for c in self.outcomes.values())
        # write_line starts a new line only after a file name; in -q mode it follows dots
        if reporter._tw.width_of_current_line:
            reporter.write("\n")
        reporter.write_line(
            f"[{_clock(time.monotonic() - self.started)}] {name} done: {done} (left: {left})"
        )


def pytest_report_header(config: pytest.Config) -> list[str]:
    on = [var for var in TIERS if os.environ.get(var)]
    lines = ["walstore profile: " + (" + ".join(on) if on else "default")]
    lines += [f"  {var}=1 would add {what}" for var, what in TIERS.items() if var not in on]
    return lines


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller, or a run without xdist
        config.pluginmanager.register(FamilyProgress(config), "walstore-family-progress")
